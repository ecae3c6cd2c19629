//! The hyper service of one connection: hands each request to the router (with the client's
//! address as `ConnectInfo`) and tells the connection table when a request begins and when its
//! response ends, so the table knows which connections serve something (a device stream's
//! response lasts as long as the stream) and which only hold a descriptor.
//!
//! Not here: any decision about the request itself (the router's), or about the connection
//! (see [`super::admission`] and [`super::timing`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;

use crate::http::device::ConnectionAbort;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::{Request, Response};
use tower::ServiceExt;

use super::admission::ConnectionTable;

/// The service of connection `id`.
#[derive(Clone)]
pub struct Tracked {
    router: Router,
    peer: SocketAddr,
    table: Arc<ConnectionTable>,
    id: u64,
    /// Handed to every request: a device stream that stops draining cancels it, and the
    /// connection's task then drops the connection (its writes are blocked for good).
    abort: ConnectionAbort,
}

impl Tracked {
    pub fn new(router: Router, peer: SocketAddr, table: Arc<ConnectionTable>, id: u64, abort: ConnectionAbort) -> Self {
        Self { router, peer, table, id, abort }
    }
}

/// A request in flight on a connection: begun when created, ended when dropped.
struct InFlight {
    table: Arc<ConnectionTable>,
    id: u64,
}

impl InFlight {
    fn begin(table: Arc<ConnectionTable>, id: u64) -> Self {
        table.request_started(id, Instant::now());
        Self { table, id }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.table.request_finished(self.id, Instant::now());
    }
}

/// A response body that keeps its request in flight until it is dropped (sent, or given up).
pub struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<TrackedBody>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let response = self.respond(request);
        Box::pin(async move { Ok(response.await) })
    }
}

impl Tracked {
    /// Hands a request to the router, counted in flight until its response body is dropped:
    /// what hyper calls for every request, and what the listener calls for a device stream it
    /// serves itself ([`super::device_stream`]).
    pub fn respond<B>(&self, mut request: Request<B>) -> impl Future<Output = Response<TrackedBody>> + Send + 'static
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let in_flight = InFlight::begin(self.table.clone(), self.id);
        request.extensions_mut().insert(ConnectInfo(self.peer));
        request.extensions_mut().insert(self.abort.clone());
        let router = self.router.clone();
        async move {
            let response = match router.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            response.map(|inner| TrackedBody { inner, _in_flight: in_flight })
        }
    }
}

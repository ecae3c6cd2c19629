//! What the server does for the reverse proxies and load balancers in front of it:
//!
//! - Which client a request comes from ([`ClientIp`]): the TCP peer, unless that peer is one of
//!   `--trusted-proxies`; then the address its `X-Forwarded-For` (or, without one, its
//!   `Forwarded`) names, walking from the right past every trusted proxy to the first address
//!   that is not one. A client can put anything in those headers, but only the entries a
//!   trusted proxy appended are believed, so a spoofed value from an untrusted peer changes
//!   nothing. Rate limits and logs key on it.
//! - `X-Accel-Buffering: no` on every `text/event-stream` response, so nginx-style proxies
//!   pass frames on at once.
//!
//! Not here: the per-address connection cap, which counts TCP peers before any request is
//! read (see [`crate::listener::admission`]).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use crate::config::Settings;

/// The address a request is attributed to (in the request's extensions, set by
/// [`resolve_client`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// One network in CIDR notation (`10.0.0.0/8`, `fd00::/8`); a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(network) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(network) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network = address.parse::<IpAddr>().map_err(|_| format!("{text:?} is not an address or CIDR"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
        };
        // `::ffff:10.0.0.0/104` is the IPv4 network 10.0.0.0/8.
        let (network, prefix) = match canonical(network) {
            IpAddr::V4(v4) if network.is_ipv6() && prefix >= 96 => (IpAddr::V4(v4), prefix - 96),
            _ => (network, prefix),
        };
        Ok(Self { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The peers whose forwarding headers are believed (`--trusted-proxies`). Empty by default:
/// every request is attributed to its TCP peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// Parses a comma-separated list of CIDRs or addresses; blanks are skipped.
    pub fn parse(list: &str) -> Result<Self, String> {
        list.split(',').filter(|part| !part.trim().is_empty()).map(str::parse).collect::<Result<_, _>>().map(Self)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|cidr| cidr.contains(ip))
    }

    /// The client of a request that came from `peer` with `headers`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.trusts(peer) {
            return peer;
        }
        let hops = if headers.contains_key(X_FORWARDED_FOR) { forwarded_for(headers) } else { forwarded(headers) };
        // Right to left: each entry was appended by the proxy after it, trusted so far.
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop {
                Some(ip) => {
                    client = canonical(*ip);
                    if !self.trusts(client) {
                        break;
                    }
                }
                // `unknown`, an obfuscated name or garbage: the last proxy that could be
                // believed is as far as the walk goes.
                None => break,
            }
        }
        client
    }
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.0.iter().map(Cidr::to_string).collect();
        f.write_str(&list.join(","))
    }
}

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// IPv4-mapped IPv6 (`::ffff:10.0.0.1`, as a dual-stack socket reports IPv4 peers) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Every entry of every `X-Forwarded-For` line, in order; `None` for one that is no address.
fn forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .flat_map(|value| value.to_str().unwrap_or("?").split(','))
        .map(|entry| parse_node(entry.trim()))
        .collect()
}

/// The `for=` of every element of every `Forwarded` line (RFC 7239), in order.
fn forwarded(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all(header::FORWARDED)
        .iter()
        .flat_map(|value| value.to_str().unwrap_or("for=?").split(','))
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (name, value) = pair.split_once('=')?;
                name.trim().eq_ignore_ascii_case("for").then(|| parse_node(value.trim().trim_matches('"')))
            })
        })
        .collect()
}

/// An address as proxies write it: `203.0.113.7`, `203.0.113.7:4711`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:4711`.
fn parse_node(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    text.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// Middleware: puts the request's [`ClientIp`] in its extensions (the TCP peer's address when
/// the server did not give one, as in-process tests).
pub async fn resolve_client(State(settings): State<Arc<Settings>>, mut request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let client = settings.trusted_proxies.client(peer, request.headers());
    request.extensions_mut().insert(ClientIp(client));
    next.run(request).await
}

/// The request's client address: what [`resolve_client`] found, or `0.0.0.0` without it.
pub fn client_ip(request: &Request) -> IpAddr {
    request.extensions().get::<ClientIp>().map_or(IpAddr::from([0, 0, 0, 0]), |ClientIp(ip)| *ip)
}

/// The span of a request (as tower-http's default, with the client's address).
pub fn request_span<B>(request: &axum::http::Request<B>) -> tracing::Span {
    let client = request.extensions().get::<ClientIp>().map(|ClientIp(ip)| *ip);
    tracing::debug_span!(
        "request",
        method = %request.method(),
        uri = %request.uri(),
        version = ?request.version(),
        client = client.map(tracing::field::display),
    )
}

/// Response mapper: `X-Accel-Buffering: no` on event streams.
pub async fn unbuffered_event_streams(mut response: Response) -> Response {
    let is_event_stream = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
    if is_event_stream {
        response.headers_mut().insert(HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(HeaderName::from_bytes(name.as_bytes()).expect("name"), value.parse().expect("value"));
        }
        map
    }

    #[test]
    fn cidrs() {
        let cases = [
            ("10.0.0.0/8", "10.255.1.2", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("192.168.1.7", "192.168.1.7", true),
            ("192.168.1.7", "192.168.1.8", false),
            ("0.0.0.0/0", "203.0.113.9", true),
            ("0.0.0.0/0", "2001:db8::1", false),
            ("fd00::/8", "fd12:3456::1", true),
            ("fd00::/8", "fe80::1", false),
            ("::/0", "2001:db8::1", true),
            // A dual-stack socket's view of an IPv4 peer matches the IPv4 network.
            ("10.0.0.0/8", "::ffff:10.1.2.3", true),
            ("::ffff:10.0.0.0/104", "10.1.2.3", true),
        ];
        for (cidr, address, want) in cases {
            let cidr: Cidr = cidr.parse().expect(cidr);
            assert_eq!(cidr.contains(ip(address)), want, "{cidr} contains {address}");
        }
        for bad in ["", "10.0.0.0/33", "10.0.0.0/-1", "fd00::/129", "example.com", "10.0.0/8", "10.0.0.0/"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
        assert_eq!(TrustedProxies::parse(" 10.0.0.0/8, ,::1 ").expect("list").to_string(), "10.0.0.0/8,::1/128");
        assert!(TrustedProxies::parse("").expect("empty").is_empty());
        assert!(TrustedProxies::parse("10.0.0.0/8,nope").is_err());
    }

    #[test]
    fn the_client_behind_trusted_proxies() {
        let trusted = TrustedProxies::parse("10.0.0.0/8,127.0.0.1").expect("list");
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            // No proxy: the peer, whatever it claims.
            ("203.0.113.5", &[], "203.0.113.5"),
            ("203.0.113.5", &[("x-forwarded-for", "198.51.100.1")], "203.0.113.5"),
            ("203.0.113.5", &[("forwarded", "for=198.51.100.1")], "203.0.113.5"),
            // One trusted proxy.
            ("10.0.0.2", &[("x-forwarded-for", "198.51.100.1")], "198.51.100.1"),
            ("10.0.0.2", &[], "10.0.0.2"),
            // A client's spoofed entry stays left of the address the proxy appended.
            ("10.0.0.2", &[("x-forwarded-for", "1.2.3.4, 198.51.100.1")], "198.51.100.1"),
            // Two trusted proxies, the header split over two lines.
            (
                "10.0.0.2",
                &[("x-forwarded-for", "1.2.3.4, 198.51.100.1"), ("x-forwarded-for", "10.9.9.9")],
                "198.51.100.1",
            ),
            // Every hop trusted: the leftmost.
            ("10.0.0.2", &[("x-forwarded-for", "10.1.1.1, 127.0.0.1")], "10.1.1.1"),
            // Garbage stops the walk at the last believable proxy.
            ("10.0.0.2", &[("x-forwarded-for", "198.51.100.1, unknown")], "10.0.0.2"),
            ("10.0.0.2", &[("x-forwarded-for", "198.51.100.1, garbage, 10.3.3.3")], "10.3.3.3"),
            // Ports and brackets as proxies write them.
            ("10.0.0.2", &[("x-forwarded-for", "198.51.100.1:4711")], "198.51.100.1"),
            ("10.0.0.2", &[("x-forwarded-for", "[2001:db8::7]:4711")], "2001:db8::7"),
            ("10.0.0.2", &[("x-forwarded-for", "2001:db8::7")], "2001:db8::7"),
            // Forwarded (RFC 7239), used only without X-Forwarded-For.
            ("10.0.0.2", &[("forwarded", "for=198.51.100.1;proto=https")], "198.51.100.1"),
            ("10.0.0.2", &[("forwarded", "for=1.2.3.4, For=\"[2001:db8::7]:80\";by=10.0.0.2")], "2001:db8::7"),
            ("10.0.0.2", &[("forwarded", "for=_hidden")], "10.0.0.2"),
            ("10.0.0.2", &[("forwarded", "for=1.2.3.4"), ("x-forwarded-for", "198.51.100.1")], "198.51.100.1"),
            // A dual-stack listener's view of a trusted IPv4 proxy.
            ("::ffff:10.0.0.2", &[("x-forwarded-for", "198.51.100.1")], "198.51.100.1"),
            ("::ffff:203.0.113.5", &[("x-forwarded-for", "198.51.100.1")], "203.0.113.5"),
        ];
        for (peer, pairs, want) in cases {
            assert_eq!(trusted.client(ip(peer), &headers(pairs)), ip(want), "{peer} {pairs:?}");
        }
        // Nobody trusted: always the peer.
        let none = TrustedProxies::default();
        assert_eq!(none.client(ip("10.0.0.2"), &headers(&[("x-forwarded-for", "198.51.100.1")])), ip("10.0.0.2"));
    }
}

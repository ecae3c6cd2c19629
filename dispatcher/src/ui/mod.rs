//! The admin page door: `GET /ui` (also `/ui/` and `/ui/activate`, where a device's enrollment
//! link lands: the page approves or denies it) serves one page, and
//! `/ui/assets/{name}` its scripts and styles, all compiled into the binary from
//! `src/ui/assets/` (plain JavaScript modules, no build step, nothing fetched from elsewhere).
//!
//! Every answer carries a Content-Security-Policy that allows only this origin, `nosniff`, no
//! referrer, and `Cache-Control: no-cache` with a content-hash ETag, so a browser revalidates
//! cheaply (304) and never runs a stale script after an upgrade.
//!
//! The page drives the control API and `/api/events` like any client; this module decides
//! nothing about devices or proposals.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use crate::http::{ApiError, AppState};

/// The page's policy: scripts, styles, images (and `data:` icons) and connections to this
/// origin only; no plugins, no framing, no base or form target elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// One compiled-in file.
#[derive(Debug)]
pub struct Asset {
    pub name: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file of the page. `index.html` is served at `/ui`, the others at `/ui/assets/{name}`.
pub static ASSETS: &[Asset] = &[
    Asset { name: "index.html", content_type: "text/html; charset=utf-8", body: include_bytes!("assets/index.html") },
    Asset { name: "style.css", content_type: "text/css; charset=utf-8", body: include_bytes!("assets/style.css") },
    Asset { name: "app.js", content_type: JS, body: include_bytes!("assets/app.js") },
    Asset { name: "sse.js", content_type: JS, body: include_bytes!("assets/sse.js") },
    Asset { name: "form.js", content_type: JS, body: include_bytes!("assets/form.js") },
    Asset { name: "result.js", content_type: JS, body: include_bytes!("assets/result.js") },
    Asset { name: "activate.js", content_type: JS, body: include_bytes!("assets/activate.js") },
];

/// The page's routes (merged into the app's router).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(page))
        .route("/ui/", get(page))
        .route("/ui/activate", get(page))
        .route("/ui/assets/{name}", get(asset))
}

async fn page(headers: HeaderMap) -> Response {
    serve(find("index.html").expect("index.html is compiled in"), &headers)
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match find(&name).filter(|asset| asset.name != "index.html") {
        Some(asset) => serve(asset, &headers),
        None => with_page_headers(ApiError::NotFound.into_response()),
    }
}

pub fn find(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|asset| asset.name == name)
}

/// The strong ETag of an asset: a quoted prefix of its SHA-256, computed once.
pub fn etag(asset: &Asset) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        ASSETS.iter().map(|asset| format!("\"{}\"", hex::encode(&Sha256::digest(asset.body)[..12]))).collect()
    });
    ASSETS.iter().position(|candidate| std::ptr::eq(candidate, asset)).map_or("\"\"", |index| tags[index].as_str())
}

/// Whether an `If-None-Match` header names `tag` (a list, weak forms, or `*`).
pub fn matches_etag(if_none_match: Option<&str>, tag: &str) -> bool {
    let Some(header) = if_none_match else {
        return false;
    };
    header.split(',').map(str::trim).any(|candidate| candidate == "*" || candidate.trim_start_matches("W/") == tag)
}

fn serve(asset: &'static Asset, headers: &HeaderMap) -> Response {
    let tag = etag(asset);
    let if_none_match = headers.get(IF_NONE_MATCH).and_then(|value| value.to_str().ok());
    let mut response = if matches_etag(if_none_match, tag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut response = asset.body.into_response();
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
        response
    };
    response.headers_mut().insert(ETAG, HeaderValue::from_static(tag));
    with_page_headers(response)
}

fn with_page_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers
        .insert(HeaderName::from_static("content-security-policy"), HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(HeaderName::from_static("x-frame-options"), HeaderValue::from_static("DENY"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_per_content_and_quoted() {
        let tags: Vec<&str> = ASSETS.iter().map(etag).collect();
        for tag in &tags {
            assert!(tag.starts_with('"') && tag.ends_with('"') && tag.len() == 26, "{tag}");
        }
        let mut unique = tags.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), tags.len());
    }

    #[test]
    fn if_none_match_forms() {
        let tag = "\"abc\"";
        let cases: &[(Option<&str>, bool)] = &[
            (None, false),
            (Some("\"abc\""), true),
            (Some("W/\"abc\""), true),
            (Some("\"x\", \"abc\""), true),
            (Some("*"), true),
            (Some("\"abd\""), false),
            (Some("abc"), false),
            (Some(""), false),
        ];
        for (header, want) in cases {
            assert_eq!(matches_etag(*header, tag), *want, "{header:?}");
        }
    }

    #[test]
    fn every_module_the_page_imports_is_compiled_in() {
        for asset in ASSETS {
            let text = std::str::from_utf8(asset.body).expect("text");
            for line in text.lines().filter(|line| line.trim_start().starts_with("import ")) {
                let module = line.rsplit_once("'./").map(|(_, rest)| rest.trim_end_matches("';"));
                let module = module.unwrap_or_else(|| panic!("{}: import not relative: {line}", asset.name));
                assert!(find(module).is_some(), "{}: imports {module}, which is not compiled in", asset.name);
            }
            for reference in text.split("/ui/assets/").skip(1) {
                let name: String =
                    reference.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-').collect();
                assert!(find(&name).is_some(), "{}: refers to {name}, which is not compiled in", asset.name);
            }
        }
    }
}

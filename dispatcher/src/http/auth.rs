//! Bearer-token extractors: [`DeviceCaller`] for device-facing routes, [`UserCaller`] for the
//! control API. A token seen recently is answered from the hub's cache; the database is asked
//! only on first sight (see ARCHITECTURE.md, Storage). Anything odd about the header (missing,
//! another scheme, non-ASCII, absurd length) is a plain 401.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};
use crate::core::CachedDevice;

/// Longest token looked at; ours are far shorter.
const MAX_TOKEN_LEN: usize = 512;

/// An authenticated device.
#[derive(Debug, Clone)]
pub struct DeviceCaller {
    pub device_id: String,
    pub owner: String,
}

/// A device's bearer token, not yet verified: the stream route verifies it in the statement
/// that issues its stream's epoch (`Registry::open_stream`), so a reconnecting device costs the
/// database one shared statement rather than a lookup and an update of its own.
#[derive(Debug, Clone)]
pub struct DeviceToken {
    pub token: String,
    /// SHA-256 of the token: the key of the hub's credential cache.
    pub hash: [u8; 32],
}

/// An authenticated app backend acting for a user.
#[derive(Debug, Clone)]
pub struct UserCaller {
    pub user_id: String,
    /// SHA-256 of the api token it presented (what a revocation names).
    pub token_hash: [u8; 32],
}

impl UserCaller {
    /// The token's hash as the registry stores it (lowercase hex).
    pub fn token_hash_hex(&self) -> String {
        hex::encode(self.token_hash)
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer_token(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && token.len() <= MAX_TOKEN_LEN).then_some(token)
}

fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl FromRequestParts<AppState> for DeviceCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = bearer_token(parts).ok_or(ApiError::Unauthorized)?;
        let hash = token_hash(token);
        let hub = state.dispatcher.hub();
        if let Some(cached) = hub.cached_device(&hash) {
            return Ok(Self { device_id: cached.device_id, owner: cached.owner });
        }
        let auth = state.registry.device_for_token(token).await?.ok_or(ApiError::Unauthorized)?;
        hub.cache_device(hash, CachedDevice { device_id: auth.device_id.clone(), owner: auth.owner.clone() });
        Ok(Self { device_id: auth.device_id, owner: auth.owner })
    }
}

impl FromRequestParts<AppState> for DeviceToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &AppState) -> Result<Self, Self::Rejection> {
        let token = bearer_token(parts).ok_or(ApiError::Unauthorized)?;
        Ok(Self { hash: token_hash(token), token: token.to_owned() })
    }
}

impl FromRequestParts<AppState> for UserCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = bearer_token(parts).ok_or(ApiError::Unauthorized)?;
        let hash = token_hash(token);
        let hub = state.dispatcher.hub();
        if let Some(user_id) = hub.cached_user(&hash) {
            return Ok(Self { user_id, token_hash: hash });
        }
        let user_id = state.registry.user_for_api_token(token).await?.ok_or(ApiError::Unauthorized)?;
        hub.cache_user(hash, user_id.clone());
        Ok(Self { user_id, token_hash: hash })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn parts(value: Option<&[u8]>) -> Parts {
        let mut builder = Request::builder();
        if let Some(value) = value {
            builder = builder.header(AUTHORIZATION, axum::http::HeaderValue::from_bytes(value).expect("header"));
        }
        builder.body(()).expect("request").into_parts().0
    }

    #[test]
    fn bearer_parsing() {
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1));
        let cases: &[(Option<&[u8]>, Option<&str>)] = &[
            (Some(b"Bearer abc"), Some("abc")),
            (Some(b"bearer abc"), Some("abc")),
            (Some(b"BEARER   abc  "), Some("abc")),
            (None, None),
            (Some(b""), None),
            (Some(b"Bearer"), None),
            (Some(b"Bearer "), None),
            (Some(b"Basic abc"), None),
            (Some(b"Bearer \xff\xfe"), None),
            (Some(long.as_bytes()), None),
        ];
        for (header, want) in cases {
            let parts = parts(*header);
            assert_eq!(bearer_token(&parts), *want, "{header:?}");
        }
    }
}

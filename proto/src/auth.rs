//! A shared-secret bearer token between the coordinator and its workers and clients: with a
//! token configured (`SMELT_TOKEN`, or `--token-file` on the coordinator), the coordinator
//! refuses every call that does not carry `authorization: Bearer <token>` with
//! `UNAUTHENTICATED`, before any service code runs. Without one it accepts every call (a
//! single machine on loopback, `smelt up`'s default).
//!
//! The token protects the control plane (submitting, cancelling, registering as a worker and
//! receiving jobs); the transport itself is plain HTTP/2, so on an untrusted network it belongs
//! behind TLS (a proxy or a private network).

use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// The environment variable clients and workers read their token from.
pub const TOKEN_ENV: &str = "SMELT_TOKEN";

/// A channel whose every call carries the token (when there is one).
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

/// The token from `SMELT_TOKEN` (unset or blank: none).
pub fn token_from_env() -> Option<String> {
    std::env::var(TOKEN_ENV).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

/// Checks a token is usable in an HTTP header (visible ASCII, no spaces).
pub fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    if let Some(c) = token.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!("the token holds {c:?}: use visible ASCII characters without spaces"));
    }
    Ok(())
}

/// Client side: adds `authorization: Bearer <token>` to every call.
#[derive(Clone, Debug, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        match token {
            None => Ok(BearerToken(None)),
            Some(t) => {
                check_token(t)?;
                let v = format!("Bearer {t}").parse().map_err(|e| format!("the token is not a valid header value: {e}"))?;
                Ok(BearerToken(Some(v)))
            }
        }
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Server side: with a token, refuses calls that do not carry it.
#[derive(Clone, Debug, Default)]
pub struct RequireToken(Option<Arc<Vec<u8>>>);

impl RequireToken {
    /// Keeps the token alone: the scheme is matched apart, case-insensitively.
    pub fn new(token: Option<&str>) -> Self {
        RequireToken(token.map(|t| Arc::new(t.as_bytes().to_vec())))
    }
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }
}

/// Equal contents, in time that depends on the lengths only (no early exit a caller could time).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl RequireToken {
    /// Whether a call whose `authorization` header is `authorization` may go on; if not, why
    /// (the same words for gRPC calls and the dashboard's HTTP requests).
    pub fn admits(&self, authorization: Option<&[u8]>) -> Result<(), String> {
        let Some(want) = &self.0 else { return Ok(()) };
        match authorization.map(bearer_credentials) {
            Some(Some(got)) if constant_time_eq(got, want) => Ok(()),
            Some(Some(_)) => Err(format!("wrong token: the one sent ({TOKEN_ENV}, a worker's --token-file) does not match the coordinator's")),
            Some(None) => Err("the authorization header is not `Bearer <token>`".to_string()),
            None => Err(format!(
                "this coordinator requires a token: set {TOKEN_ENV} (a worker: or --token-file; over HTTP: send `authorization: Bearer <token>`)"
            )),
        }
    }
}

/// The credentials of an `authorization: Bearer <token>` header. The scheme is case-insensitive
/// (RFC 9110 11.1: curl users and proxies write `bearer`), one or more spaces follow it.
fn bearer_credentials(header: &[u8]) -> Option<&[u8]> {
    let scheme = header.get(..6)?;
    let rest = header.get(6..)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    let token = rest.trim_ascii_start();
    (!token.is_empty()).then_some(token)
}

impl Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match self.admits(req.metadata().get("authorization").map(|v| v.as_bytes())) {
            Ok(()) => Ok(req),
            Err(why) => Err(Status::unauthenticated(why)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(server: &mut RequireToken, client: &mut BearerToken) -> Result<(), Status> {
        server.call(client.call(Request::new(())).unwrap()).map(|_| ())
    }

    #[test]
    fn a_coordinator_with_a_token_admits_only_calls_carrying_it() {
        let mut open = RequireToken::new(None);
        let mut with = RequireToken::new(Some("s3cret"));
        assert!(!open.enabled() && with.enabled());
        assert!(call(&mut open, &mut BearerToken::new(None).unwrap()).is_ok());
        assert!(call(&mut open, &mut BearerToken::new(Some("anything")).unwrap()).is_ok());
        assert!(call(&mut with, &mut BearerToken::new(Some("s3cret")).unwrap()).is_ok());
        let missing = call(&mut with, &mut BearerToken::new(None).unwrap()).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(missing.message().contains(TOKEN_ENV), "{}", missing.message());
        for wrong in ["s3cre", "s3cret!", "S3CRET"] {
            let e = call(&mut with, &mut BearerToken::new(Some(wrong)).unwrap()).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{wrong}");
            assert!(e.message().contains("wrong token"), "{}", e.message());
        }
    }

    #[test]
    fn the_scheme_is_matched_without_regard_to_case() {
        let with = RequireToken::new(Some("s3cret"));
        for ok in ["Bearer s3cret", "bearer s3cret", "BEARER s3cret", "Bearer   s3cret"] {
            assert!(with.admits(Some(ok.as_bytes())).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("Basic s3cret", "not `Bearer"),
            ("Bearers3cret", "not `Bearer"),
            ("Bearer ", "not `Bearer"),
            ("s3cret", "not `Bearer"),
            ("bearer S3CRET", "wrong token"),
        ] {
            let e = with.admits(Some(bad.as_bytes())).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn unusable_tokens_are_refused_with_the_reason() {
        assert!(BearerToken::new(Some("")).unwrap_err().contains("empty"));
        assert!(BearerToken::new(Some("two words")).unwrap_err().contains("' '"));
        assert!(BearerToken::new(Some("naïve")).unwrap_err().contains("visible ASCII"));
    }
}

//! Optional bearer-token authentication, the same on both services: a server given a token
//! answers UNAUTHENTICATED to any call of its API that lacks `authorization: Bearer <token>`;
//! health checks stay open so probes need no secret.
//!
//! A server may accept several tokens, given comma-separated (`--auth-token a,b`): one per
//! client, so that what a client registers (shared-memory regions) is its own.

use std::sync::Arc;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Server side: checks each call's `authorization` header against the configured token.
#[derive(Clone, Debug)]
pub struct BearerCheck {
    /// `authorization` values accepted; empty: authentication is off.
    expected: Arc<[Vec<u8>]>,
}

/// Why an `authorization` header was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Invalid,
}

impl BearerCheck {
    /// `None` or an empty string: every call passes. Several tokens are comma-separated.
    pub fn new(tokens: Option<&str>) -> Self {
        BearerCheck {
            expected: tokens
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| format!("Bearer {t}").into_bytes())
                .collect(),
        }
    }

    /// Whether a token is required at all.
    pub fn is_on(&self) -> bool {
        !self.expected.is_empty()
    }

    /// Checks an `authorization` header value (any transport: gRPC metadata, HTTP).
    pub fn check(&self, header: Option<&[u8]>) -> Result<(), Refusal> {
        if !self.is_on() {
            return Ok(());
        }
        let header = header.ok_or(Refusal::Missing)?;
        // Every token is compared, so the time taken does not tell which one nearly matched.
        let matched = self
            .expected
            .iter()
            .fold(false, |ok, e| constant_time_eq(header, e) | ok);
        if matched {
            Ok(())
        } else {
            Err(Refusal::Invalid)
        }
    }
}

impl Interceptor for BearerCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let header = req.metadata().get("authorization").map(|v| v.as_bytes());
        match self.check(header) {
            Ok(()) => Ok(req),
            Err(Refusal::Invalid) => Err(Status::unauthenticated(
                "authorization: invalid bearer token",
            )),
            Err(Refusal::Missing) => Err(Status::unauthenticated(
                "authorization: missing; send 'authorization: Bearer <token>'",
            )),
        }
    }
}

/// Compares without an early exit, so response time does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Client side, as a tonic interceptor: adds the token, when there is one, to every call.
#[derive(Clone, Default)]
pub struct AddToken(Option<MetadataValue<Ascii>>);

impl AddToken {
    pub fn new(token: Option<&str>) -> Result<Self, Status> {
        match token.filter(|t| !t.is_empty()) {
            None => Ok(AddToken(None)),
            Some(t) => MetadataValue::try_from(format!("Bearer {t}"))
                .map(|v| AddToken(Some(v)))
                .map_err(|_| Status::invalid_argument("token: not a valid header value")),
        }
    }
}

impl Interceptor for AddToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Client side, one request at a time: adds the token, when there is one.
pub fn authorize<T>(mut req: Request<T>, token: Option<&str>) -> Result<Request<T>, Status> {
    if let Some(v) = AddToken::new(token)?.0 {
        req.metadata_mut().insert("authorization", v);
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_passes() {
        let mut check = BearerCheck::new(Some("s3cret"));
        let call = |t: Option<&str>| authorize(Request::new(()), t).unwrap();
        assert!(check.call(call(Some("s3cret"))).is_ok());
        for bad in [None, Some("s3cre"), Some("s3cret2"), Some("other")] {
            let e = check.call(call(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert!(BearerCheck::new(None).call(call(None)).is_ok());
        assert!(BearerCheck::new(Some("")).call(call(None)).is_ok());
        let mut two = BearerCheck::new(Some("alice, bob"));
        assert!(two.call(call(Some("alice"))).is_ok());
        assert!(two.call(call(Some("bob"))).is_ok());
        for bad in [None, Some("alice,bob"), Some("carol"), Some("")] {
            assert!(two.call(call(bad)).is_err(), "{bad:?}");
        }
    }
}

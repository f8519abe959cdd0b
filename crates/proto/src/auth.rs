//! Optional bearer-token authentication, the same on both services: a server given a token
//! answers UNAUTHENTICATED to any call of its API that lacks `authorization: Bearer <token>`;
//! health checks stay open so probes need no secret.

use std::sync::Arc;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Server side: checks each call's `authorization` header against the configured token.
#[derive(Clone)]
pub struct BearerCheck {
    expected: Option<Arc<[u8]>>,
}

impl BearerCheck {
    /// `None` or an empty token: every call passes.
    pub fn new(token: Option<&str>) -> Self {
        BearerCheck {
            expected: token
                .filter(|t| !t.is_empty())
                .map(|t| Arc::from(format!("Bearer {t}").into_bytes())),
        }
    }
}

impl Interceptor for BearerCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(req);
        };
        match req.metadata().get("authorization") {
            Some(v) if constant_time_eq(v.as_bytes(), expected) => Ok(req),
            Some(_) => Err(Status::unauthenticated(
                "authorization: invalid bearer token",
            )),
            None => Err(Status::unauthenticated(
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
    }
}

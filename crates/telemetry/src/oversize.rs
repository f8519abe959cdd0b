//! One status for a message over the size limit, as gRPC's core libraries give it.
//!
//! tonic answers a request larger than `max_decoding_message_size` with OUT_OF_RANGE; gRPC
//! core (C++, Java, Go, and so Triton and its clients) uses RESOURCE_EXHAUSTED, which is what
//! clients of the protocol test for. [`OversizeLayer`] rewrites the status of unary calls
//! (tonic writes it into the response headers before any handler runs); streaming handlers
//! pass their decode errors through [`oversize_as_exhausted`].

use std::task::{Context, Poll};
use tonic::codegen::http;

/// tonic's message for a received message over the limit.
const DECODE_TOO_LARGE: &str = "Error, decoded message length too large";

/// `s` with OUT_OF_RANGE turned into RESOURCE_EXHAUSTED when it reports an over-size message.
pub fn oversize_as_exhausted(s: tonic::Status) -> tonic::Status {
    if s.code() == tonic::Code::OutOfRange && s.message().starts_with(DECODE_TOO_LARGE) {
        tonic::Status::resource_exhausted(s.message().to_string())
    } else {
        s
    }
}

/// A client stream's next message, as a handler loop takes it: `None` once the stream is
/// over. A message that could not be decoded (too large, corrupt) also ends it, and the
/// client is told why on `replies`, the stream's reply channel.
pub async fn next_request<T, R>(
    message: Option<Result<T, tonic::Status>>,
    replies: &tokio::sync::mpsc::Sender<Result<R, tonic::Status>>,
) -> Option<T> {
    match message? {
        Ok(m) => Some(m),
        Err(status) => {
            // A client that is not reading would never see it: never wait for room.
            let _ = replies.try_send(Err(oversize_as_exhausted(status)));
            None
        }
    }
}

/// Server layer applying [`oversize_as_exhausted`] to trailers-only responses.
#[derive(Clone, Copy, Debug, Default)]
pub struct OversizeLayer;

impl<S> tower::Layer<S> for OversizeLayer {
    type Service = Oversize<S>;

    fn layer(&self, inner: S) -> Oversize<S> {
        Oversize(inner)
    }
}

#[derive(Clone, Debug)]
pub struct Oversize<S>(S);

type Fix<R> = fn(http::Response<R>) -> http::Response<R>;

impl<S, B, R> tower::Service<http::Request<B>> for Oversize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = futures::future::MapOk<S::Future, Fix<R>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        use futures::TryFutureExt;
        self.0.call(req).map_ok(fix_headers as Fix<R>)
    }
}

fn fix_headers<R>(mut resp: http::Response<R>) -> http::Response<R> {
    let headers = resp.headers_mut();
    let out_of_range = headers.get("grpc-status").is_some_and(|v| v == "11");
    // The message travels percent-encoded (spaces as %20).
    let too_large = headers.get("grpc-message").is_some_and(|m| {
        String::from_utf8_lossy(m.as_bytes())
            .replace("%20", " ")
            .starts_with(DECODE_TOO_LARGE)
    });
    if out_of_range && too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_over_size_out_of_range_becomes_resource_exhausted() {
        let too_large = tonic::Status::out_of_range(format!("{DECODE_TOO_LARGE}: found 9 bytes"));
        assert_eq!(
            oversize_as_exhausted(too_large.clone()).code(),
            tonic::Code::ResourceExhausted
        );
        let other = tonic::Status::out_of_range("index 7");
        assert_eq!(
            oversize_as_exhausted(other.clone()).code(),
            tonic::Code::OutOfRange
        );

        for (status, want) in [(too_large, "8"), (other, "11")] {
            let resp = status.into_http::<()>();
            let fixed = fix_headers(resp);
            assert_eq!(fixed.headers()["grpc-status"], want);
        }
    }
}

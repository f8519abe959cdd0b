//! HTTP/1.1 on a port that faces the network: the metrics port of every service and the
//! gateway's page and signalling. Nothing a client does holds a connection for long:
//!
//! - a connection that does not finish a request's headers within the header timeout
//!   (idle keep-alive connections included) is closed, and with TLS the handshake has the
//!   same deadline;
//! - a request's body must arrive whole within the body timeout after its headers: one that
//!   does not is answered 408 and its connection closed, so headers followed by a body that
//!   never comes cannot hold a connection either (a handler that does not read a body
//!   answers at once, and the connection is then closed, not kept to drain it). Paths a port
//!   names as streaming ([`HttpLimits::streaming`]: speech piped from a TTS as it is made)
//!   may take longer, as long as the body keeps coming: no gap between its pieces may
//!   exceed the body timeout;
//! - at most `max_connections` are served at once, and at most `max_connections_per_client`
//!   from one client address ([`framecast_proto::client::address`]: IPv6 by /64), so one
//!   host cannot take every connection; more are closed on accept.

use crate::tls::ServerTls;
use axum::body::{Body, Bytes};
use axum::http::{header, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// How long a client may take to send its request headers, unless a port says otherwise.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's body once its headers are in.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// How a port defends itself.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Serve over TLS (with its client-certificate rule, if any).
    pub tls: Option<ServerTls>,
    /// How long a client may take to send its request headers (and finish a TLS handshake).
    pub header_timeout: Duration,
    /// How long a client may take to send a request's body after its headers.
    pub body_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections served at once from one client address.
    pub max_connections_per_client: usize,
    /// Paths whose request bodies stream: the body timeout bounds the gaps between their
    /// pieces instead of the whole body.
    pub streaming: Option<fn(&str) -> bool>,
}

impl HttpLimits {
    /// The default deadlines, `max_connections` in all and `per_client` from one address.
    pub fn new(tls: Option<ServerTls>, max_connections: usize, per_client: usize) -> Self {
        HttpLimits {
            tls,
            header_timeout: HEADER_TIMEOUT,
            body_timeout: BODY_TIMEOUT,
            max_connections,
            max_connections_per_client: per_client.max(1),
            streaming: None,
        }
    }
}

/// Open connections per client address.
#[derive(Default)]
struct PerClient(Mutex<HashMap<String, usize>>);

/// One connection's place under its client's cap; given back when dropped.
struct ClientSlot {
    table: Arc<PerClient>,
    client: String,
}

impl PerClient {
    fn take(self: &Arc<Self>, client: String, cap: usize) -> Option<ClientSlot> {
        let mut open = self.0.lock();
        let n = open.entry(client.clone()).or_default();
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            table: self.clone(),
            client,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.table.0.lock();
        if let Some(n) = open.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves; then no connection is accepted, and
/// those open finish on their own tasks. `name` tells the port apart in the logs.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: HttpLimits,
    name: &'static str,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let per_client = Arc::new(PerClient::default());
    let acceptor = limits.tls.as_ref().map(|t| t.acceptor());
    let (body_timeout, streaming) = (limits.body_timeout, limits.streaming);
    let app = app.layer(axum::middleware::from_fn(
        move |req: Request<Body>, next| {
            let gaps = streaming.is_some_and(|s| s(req.uri().path()));
            body_deadline(req, next, body_timeout, gaps)
        },
    ));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "{name}: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let client = framecast_proto::client::address(peer.ip());
        let Some(client_slot) = per_client.take(client, limits.max_connections_per_client) else {
            tracing::debug!(%peer, "{name}: this client's connection limit reached, closing a new connection");
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("{name}: connection limit reached, closing a new connection");
            continue;
        };
        let (app, acceptor, timeout) = (app.clone(), acceptor.clone(), limits.header_timeout);
        tokio::spawn(async move {
            let _slots = (slot, client_slot);
            match acceptor {
                None => serve_connection(tcp, peer, app, timeout, name).await,
                Some(acceptor) => match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => serve_connection(tls, peer, app, timeout, name).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, "{name}: TLS handshake failed"),
                    Err(_) => tracing::debug!("{name}: TLS handshake timed out"),
                },
            }
        });
    }
}

/// Serves one connection from `peer`; handlers see the peer's address as
/// `axum::extract::ConnectInfo<SocketAddr>`.
async fn serve_connection<IO>(
    io: IO,
    peer: SocketAddr,
    app: axum::Router,
    header_timeout: Duration,
    name: &str,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let mut app = app.clone();
        tower::Service::call(&mut app, req.map(Body::new))
    });
    let io = hyper_util::rt::TokioIo::new(io);
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(io, svc)
        .with_upgrades()
        .await
    {
        tracing::debug!(error = %e, "{name}: connection ended with an error");
    }
}

/// Gives the request's body `timeout` to arrive whole (with `gaps`: `timeout` between its
/// pieces); a handler that waited for it in vain is answered 408, and the connection closed.
async fn body_deadline(
    req: Request<Body>,
    next: axum::middleware::Next,
    timeout: Duration,
    gaps: bool,
) -> Response {
    let expired = Arc::new(AtomicBool::new(false));
    let (parts, body) = req.into_parts();
    let body = Body::new(DeadlineBody {
        inner: body,
        deadline: Box::pin(tokio::time::sleep(timeout)),
        gap: gaps.then_some(timeout),
        expired: expired.clone(),
    });
    let response = next.run(Request::from_parts(parts, body)).await;
    if expired.load(Ordering::Acquire) {
        let reason = format!(
            "request body not received within {} s of its headers\n",
            timeout.as_secs_f64()
        );
        return (
            StatusCode::REQUEST_TIMEOUT,
            [
                (header::CONNECTION, "close"),
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            ],
            reason,
        )
            .into_response();
    }
    response
}

/// A request body that fails once its deadline passes before its end.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// The deadline moves this far on with each piece (a streaming body).
    gap: Option<Duration>,
    expired: Arc<AtomicBool>,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            if let Some(gap) = self.gap {
                let next = tokio::time::Instant::now() + gap;
                self.deadline.as_mut().reset(next);
            }
            return Poll::Ready(frame);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.expired.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(axum::Error::new(
                "the request body did not arrive within its deadline",
            ))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

//! The Prometheus `/metrics` endpoint both services serve on their own port.
//!
//! The port faces the same network as the gRPC one, so it defends itself the same way: a
//! connection that does not finish its request headers within [`HEADER_TIMEOUT`] is closed
//! (a half-sent request cannot hold a connection open), at most [`MAX_CONNECTIONS`] are served
//! at once (more are closed on accept), and with `require_token` the bearer token of the gRPC
//! port is required here too (Prometheus sends it with `authorization.credentials`).

use framecast_proto::auth::{BearerCheck, Refusal};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once on the metrics port.
pub const MAX_CONNECTIONS: usize = 64;

/// Who may read `/metrics`, and how patient the port is.
#[derive(Clone, Debug)]
pub struct MetricsAccess {
    /// Serve over TLS (with the gRPC port's client-certificate rule).
    pub tls: Option<crate::tls::ServerTls>,
    /// Require this bearer check on `/metrics`; `None`: open to whoever reaches the port.
    pub auth: Option<BearerCheck>,
    pub header_timeout: Duration,
}

impl MetricsAccess {
    /// `tls` as given; the token required when `require_token` and a token is configured.
    pub fn new(
        tls: Option<&crate::tls::ServerTls>,
        token: Option<&str>,
        require_token: bool,
    ) -> Self {
        let check = BearerCheck::new(token);
        MetricsAccess {
            tls: tls.cloned(),
            auth: (require_token && check.is_on()).then_some(check),
            header_timeout: HEADER_TIMEOUT,
        }
    }
}

/// Serves `GET /metrics` (Prometheus text format) of `registry` on `addr` on a task of its own.
pub async fn serve_metrics(
    addr: SocketAddr,
    registry: prometheus::Registry,
    access: MetricsAccess,
) -> anyhow::Result<SocketAddr> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics-listen: cannot bind {addr}"))?;
    let local = listener.local_addr()?;
    let auth = access.auth.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let registry = registry.clone();
            let auth = auth.clone();
            async move { metrics(&registry, auth.as_ref(), &headers) }
        }),
    );
    let scheme = if access.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(addr = %local, protected = access.auth.is_some(), "metrics on {scheme}://{local}/metrics");
    tokio::spawn(accept_loop(listener, app, access));
    Ok(local)
}

fn metrics(
    registry: &prometheus::Registry,
    auth: Option<&BearerCheck>,
    headers: &axum::http::HeaderMap,
) -> (axum::http::StatusCode, String) {
    use axum::http::StatusCode;
    if let Some(check) = auth {
        let header = headers.get("authorization").map(|v| v.as_bytes());
        match check.check(header) {
            Ok(()) => {}
            Err(Refusal::Missing) => {
                return (
                    StatusCode::UNAUTHORIZED,
                    "authorization: missing; send 'authorization: Bearer <token>'\n".into(),
                )
            }
            Err(Refusal::Invalid) => {
                return (
                    StatusCode::UNAUTHORIZED,
                    "authorization: invalid bearer token\n".into(),
                )
            }
        }
    }
    let mut out = String::new();
    match prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out) {
        Ok(()) => (StatusCode::OK, out),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// HTTP/1.1, one task per connection; a TLS handshake or request head that stalls drops only
/// its own connection.
async fn accept_loop(listener: tokio::net::TcpListener, app: axum::Router, access: MetricsAccess) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let acceptor = access.tls.as_ref().map(|t| t.acceptor());
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("metrics: connection limit reached, closing a new connection");
            continue;
        };
        let (app, acceptor, timeout) = (app.clone(), acceptor.clone(), access.header_timeout);
        tokio::spawn(async move {
            let _slot = slot;
            match acceptor {
                None => serve_connection(tcp, app, timeout).await,
                Some(acceptor) => match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => serve_connection(tls, app, timeout).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, "metrics: TLS handshake failed"),
                    Err(_) => tracing::debug!("metrics: TLS handshake timed out"),
                },
            }
        });
    }
}

async fn serve_connection<IO>(io: IO, app: axum::Router, header_timeout: Duration)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper_util::service::TowerToHyperService::new(app);
    let io = hyper_util::rt::TokioIo::new(io);
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(io, svc)
        .await
    {
        tracing::debug!(error = %e, "metrics: connection ended with an error");
    }
}

//! HTTP/1.1 on a port that faces the network: the metrics port of every service and the
//! gateway's page and signalling. A connection that does not finish its request headers
//! within the header timeout is closed (a half-sent request cannot hold a connection open),
//! at most `max_connections` are served at once (more are closed on accept), and with TLS
//! the handshake has the same deadline as the headers.

use crate::tls::ServerTls;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How long a client may take to send its request headers, unless a port says otherwise.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How a port defends itself.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Serve over TLS (with its client-certificate rule, if any).
    pub tls: Option<ServerTls>,
    /// How long a client may take to send its request headers (and finish a TLS handshake).
    pub header_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
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
    let acceptor = limits.tls.as_ref().map(|t| t.acceptor());
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "{name}: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("{name}: connection limit reached, closing a new connection");
            continue;
        };
        let (app, acceptor, timeout) = (app.clone(), acceptor.clone(), limits.header_timeout);
        tokio::spawn(async move {
            let _slot = slot;
            match acceptor {
                None => serve_connection(tcp, app, timeout, name).await,
                Some(acceptor) => match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => serve_connection(tls, app, timeout, name).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, "{name}: TLS handshake failed"),
                    Err(_) => tracing::debug!("{name}: TLS handshake timed out"),
                },
            }
        });
    }
}

async fn serve_connection<IO>(io: IO, app: axum::Router, header_timeout: Duration, name: &str)
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
        tracing::debug!(error = %e, "{name}: connection ended with an error");
    }
}

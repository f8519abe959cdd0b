//! What both services share to be observed and stopped: log set-up, the Prometheus
//! `/metrics` endpoint, and the shutdown signal.

use std::net::SocketAddr;

pub mod config_file;
pub mod drain;
pub mod running;
pub mod tls;
pub use drain::{serve_with_grace, Drain};
pub use prometheus;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logs() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received: finishing in-flight work");
}

/// Exponential histogram buckets in seconds from 100 us to ~13 s.
pub fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(1e-4, 2.0, 18).unwrap_or_default()
}

/// Serves `GET /metrics` (Prometheus text format) of `registry` on `addr`, over TLS when `tls`
/// is given (then with the same client-certificate rule as the gRPC port).
pub async fn serve_metrics(
    addr: SocketAddr,
    registry: prometheus::Registry,
    tls: Option<&tls::ServerTls>,
) -> anyhow::Result<SocketAddr> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics-listen: cannot bind {addr}"))?;
    let local = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut out = String::new();
                match prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out) {
                    Ok(()) => (axum::http::StatusCode::OK, out),
                    Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
        }),
    );
    match tls {
        None => {
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "metrics server stopped");
                }
            });
            tracing::info!(addr = %local, "metrics on http://{local}/metrics");
        }
        Some(tls) => {
            tokio::spawn(serve_tls(listener, app, tls.acceptor()));
            tracing::info!(addr = %local, "metrics on https://{local}/metrics");
        }
    }
    Ok(local)
}

/// HTTP/1.1 over TLS, one task per connection; a handshake that fails or stalls past 10 s
/// drops only its own connection.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    acceptor: tokio_rustls::TlsAcceptor,
) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let handshake = acceptor.accept(tcp);
            let stream = match tokio::time::timeout(std::time::Duration::from_secs(10), handshake)
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(error = %e, "metrics: TLS handshake failed"),
                Err(_) => return tracing::debug!("metrics: TLS handshake timed out"),
            };
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(error = %e, "metrics: connection ended with an error");
            }
        });
    }
}

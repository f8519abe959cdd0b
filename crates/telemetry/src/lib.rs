//! What both services share to be observed and stopped: log set-up, the Prometheus
//! `/metrics` endpoint, and the shutdown signal.

use std::net::SocketAddr;

pub mod config_file;
pub mod drain;
pub mod running;
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

/// Serves `GET /metrics` (Prometheus text format) of `registry` on `addr`.
pub async fn serve_metrics(
    addr: SocketAddr,
    registry: prometheus::Registry,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
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
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    tracing::info!(addr = %local, "metrics on http://{local}/metrics");
    Ok(local)
}

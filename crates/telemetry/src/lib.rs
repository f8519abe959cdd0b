//! What both services share to be observed and stopped: log set-up, the Prometheus
//! `/metrics` endpoint, and the shutdown signal.

pub mod config_file;
pub mod drain;
pub mod metrics_http;
pub mod oversize;
pub mod running;
pub mod tls;
pub use drain::{serve_with_grace, Drain};
pub use metrics_http::{serve_metrics, MetricsAccess};
pub use oversize::{oversize_as_exhausted, OversizeLayer};
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

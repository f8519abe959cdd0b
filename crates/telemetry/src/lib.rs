//! What both services share to be observed and stopped: log set-up, the Prometheus
//! `/metrics` endpoint, and the shutdown signal.

pub mod config_file;
pub mod drain;
pub mod host_cpu;
pub mod http_server;
pub mod metrics_http;
pub mod oversize;
pub mod periodic;
pub mod places;
pub mod running;
pub mod tls;
pub use drain::{serve_with_grace, Drain};
pub use metrics_http::{serve_metrics, MetricsAccess};
pub use oversize::{next_request, oversize_as_exhausted, OversizeLayer};
pub use prometheus;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event, span fields in front.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`, `spans`), for log
    /// pipelines: the request ids in the spans can be searched across both services.
    Json,
}

/// Logs to stderr in `format`, filtered by `RUST_LOG` (default `info`).
pub fn init_logs(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().with_current_span(false).init(),
    }
}

/// For the one-shot subcommands (no sockets): a closed stdout ends the process quietly, as
/// `grep -q` and `head` expect of a Unix tool, where `println!` would panic on EPIPE. Not for
/// the servers: Rust ignores SIGPIPE so that a peer's closed socket is an error to handle, not
/// the process's death.
pub fn exit_quietly_when_stdout_closes() {
    // SAFETY: called first in `main`, before any thread that could be writing exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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

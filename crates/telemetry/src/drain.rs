//! Graceful shutdown in two steps, shared by both services.
//!
//! When the shutdown signal fires, the server stops accepting connections and [`Drain`] tells
//! long-lived streams to stop taking new work; work already accepted runs to completion. If it
//! has not finished after the grace period, [`serve_with_grace`] returns anyway, so a process
//! never hangs on a peer that keeps a stream open.

use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;

/// Tells streams that shutdown has begun.
#[derive(Clone, Debug)]
pub struct Drain(watch::Receiver<bool>);

impl Drain {
    /// A drain that never starts (tests, embedding without shutdown).
    pub fn never() -> Self {
        Drain(watch::channel(false).1)
    }

    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown has begun.
    pub async fn started(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|d| *d).await.is_err() {
            // The sender is gone and shutdown never began: it never will.
            std::future::pending::<()>().await;
        }
    }
}

/// Runs a server until it finishes, or until `grace` after `shutdown` resolved.
///
/// `serve` receives the [`Drain`]: it hands it to its services and passes
/// `drain.started()` to tonic's `serve_with_incoming_shutdown`.
pub async fn serve_with_grace<S, F, E>(
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    serve: S,
) -> Result<(), E>
where
    S: FnOnce(Drain) -> F,
    F: Future<Output = Result<(), E>>,
{
    let (tx, rx) = watch::channel(false);
    let drain = Drain(rx);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let serving = serve(drain.clone());
    tokio::pin!(serving);
    tokio::select! {
        r = &mut serving => r,
        _ = async { drain.started().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(
                grace_s = grace.as_secs_f64(),
                "grace period over: closing connections with work still in flight"
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_that_ignores_the_drain_is_cut_off_after_the_grace_period() {
        let started = std::time::Instant::now();
        let r: Result<(), ()> = serve_with_grace(async {}, Duration::from_millis(100), |_drain| {
            std::future::pending()
        })
        .await;
        assert!(r.is_ok());
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_server_that_drains_returns_at_once_and_never_before_the_signal() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(serve_with_grace(
            async move {
                let _ = rx.await;
            },
            Duration::from_secs(60),
            |drain| async move {
                drain.started().await;
                assert!(drain.is_draining());
                Ok::<(), ()>(())
            },
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!served.is_finished(), "returned before the signal");
        let _ = tx.send(());
        let r = tokio::time::timeout(Duration::from_secs(5), served).await;
        assert!(matches!(r, Ok(Ok(Ok(())))));
        assert!(!Drain::never().is_draining());
    }
}

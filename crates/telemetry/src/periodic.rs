//! Background upkeep tied to an object's life: sweeps and reapers that run while their
//! owner exists and stop by themselves once it is dropped.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Calls `tick` every `period` (the first time one period from now) on a task of its own,
/// for as long as `target` lives: the task holds only a weak reference, so it never keeps
/// `target` alive. `tick` returning false ends it too.
pub fn every<T, F, Fut>(target: &Arc<T>, period: Duration, mut tick: F)
where
    T: Send + Sync + 'static,
    F: FnMut(Arc<T>) -> Fut + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let weak = Arc::downgrade(target);
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(period);
        interval.tick().await; // immediate: nothing to do at start
        loop {
            interval.tick().await;
            let Some(target) = weak.upgrade() else { return };
            if !tick(target).await {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// It ticks while the target lives and stops once it is dropped (the task never holds
    /// it between ticks).
    #[tokio::test]
    async fn ticks_while_the_target_lives() {
        let target = Arc::new(AtomicUsize::new(0));
        every(&target, Duration::from_millis(5), |t| async move {
            t.fetch_add(1, Ordering::Relaxed);
            true
        });
        tokio::time::sleep(Duration::from_millis(60)).await;
        let seen = target.load(Ordering::Relaxed);
        assert!(seen >= 3, "{seen} ticks in 60 ms");
        let weak = Arc::downgrade(&target);
        drop(target);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(weak.upgrade().is_none(), "the task kept the target alive");
    }
}

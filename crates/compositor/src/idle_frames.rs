//! Idle frames kept as raw I420. A session that takes raw frames (a WebRTC gateway encodes
//! them) is sent the avatar's background between utterances at full frame rate; made from
//! the prepared JPEG that is a whole-frame decode each time (about 3 ms at 720p, as much as
//! a speaking frame's composite). Made once and kept, an idle frame costs a reference count,
//! and a talking frame of that background a copy with the face region put in
//! (`render::composite`), no decode.
//!
//! The kept frames belong to their avatar (they go when it is unloaded) and count against
//! one budget for all avatars (`--idle-frame-cache-mib`). A frame is kept while the budget
//! has room and never evicted: a loop longer than the budget then keeps its first frames for
//! good, where least-recently-used would keep none of a loop it cycles through.

use bytes::Bytes;
use framecast_telemetry::prometheus::IntGauge;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// The bytes all avatars' kept frames may hold.
#[derive(Debug)]
pub struct IdleBudget {
    limit: u64,
    used: AtomicU64,
    gauge: Option<IntGauge>,
}

impl IdleBudget {
    /// `gauge`, if given, follows the bytes held.
    pub fn new(limit_bytes: u64, gauge: Option<IntGauge>) -> Arc<Self> {
        Arc::new(IdleBudget {
            limit: limit_bytes,
            used: AtomicU64::new(0),
            gauge,
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: u64) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= self.limit).then_some(u + n)
            })
            .is_ok();
        self.show();
        taken
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
        self.show();
    }

    fn show(&self) {
        if let Some(g) = &self.gauge {
            g.set(self.used() as i64);
        }
    }
}

/// One avatar's kept frames, by background index.
#[derive(Default)]
pub struct IdleFrames {
    frames: Mutex<HashMap<usize, Bytes>>,
    /// The budget the frames count against (set by the first frame kept).
    budget: OnceLock<Arc<IdleBudget>>,
    bytes: AtomicU64,
}

impl IdleFrames {
    /// Frame `index`: the kept one, or `make`'s (kept if `budget` has room).
    pub fn get_or_make(
        &self,
        index: usize,
        budget: &Arc<IdleBudget>,
        make: impl FnOnce() -> Result<Vec<u8>, String>,
    ) -> Result<Bytes, String> {
        if let Some(frame) = self.frames.lock().get(&index) {
            return Ok(frame.clone());
        }
        // Made outside the lock: two sessions may make the same frame once each, the first
        // kept.
        let frame = Bytes::from(make()?);
        let n = frame.len() as u64;
        let owner = self.budget.get_or_init(|| budget.clone());
        // An avatar's frames count against the budget they were first kept under.
        if Arc::ptr_eq(owner, budget) {
            let mut frames = self.frames.lock();
            if !frames.contains_key(&index) && owner.take(n) {
                frames.insert(index, frame.clone());
                self.bytes.fetch_add(n, Ordering::Relaxed);
            }
        }
        Ok(frame)
    }
}

impl Drop for IdleFrames {
    fn drop(&mut self) {
        if let Some(budget) = self.budget.get() {
            budget.give(self.bytes.load(Ordering::Relaxed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames are made once and kept while the budget has room, never past it; dropping the
    /// avatar's frames gives their bytes back.
    #[test]
    fn frames_are_kept_within_the_budget_and_given_back() {
        let budget = IdleBudget::new(250, None);
        let frames = IdleFrames::default();
        let mut made = 0;
        let mut make = |i: u8| {
            made += 1;
            Ok(vec![i; 100])
        };
        assert_eq!(frames.get_or_make(0, &budget, || make(0)).unwrap()[0], 0);
        assert_eq!(frames.get_or_make(0, &budget, || make(9)).unwrap()[0], 0);
        assert_eq!(frames.get_or_make(1, &budget, || make(1)).unwrap()[0], 1);
        // No room for a third: made each time, not kept.
        assert_eq!(frames.get_or_make(2, &budget, || make(2)).unwrap()[0], 2);
        assert_eq!(frames.get_or_make(2, &budget, || make(2)).unwrap()[0], 2);
        assert_eq!(made, 4);
        assert_eq!(budget.used(), 200);
        let failed = frames.get_or_make(3, &budget, || Err("bad".into()));
        assert_eq!(failed.unwrap_err(), "bad");
        drop(frames);
        assert_eq!(budget.used(), 0);
    }
}

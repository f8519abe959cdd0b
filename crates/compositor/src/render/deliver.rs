//! A batch's frames composited in parallel on the rayon pool (a lone frame on tokio's
//! blocking pool) and sent in order, each as soon as it and every frame before it are done.

use super::plan::Plan;
use super::wire::Crops;
use super::{BatchTiming, FrameSink, Output};
use crate::error::Error;
use crate::metrics::Metrics;
use bytes::Bytes;
use framecast_proto::compositor::v1::{FaceRegion, ImageFormat, RenderedFrame, StageTimings};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::SendTimeoutError;
use tokio::sync::Semaphore;

/// Why a frame of a batch has no image.
enum FrameError {
    /// Not composited: the client went away or its deadline passed.
    Skipped,
    Failed(String),
}

/// Single frames composited at once: as many as the rayon pool (`--workers`) has threads.
fn single_frame_slots() -> Arc<Semaphore> {
    static SLOTS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    SLOTS
        .get_or_init(|| Arc::new(Semaphore::new(rayon::current_num_threads())))
        .clone()
}

/// Composites frames `lo..hi` of `plan` from their `crops` (none: idle frames) and sends
/// them on `sink` in order. Returns false when the client has gone away.
pub(super) async fn batch(
    plan: &Arc<Plan>,
    lo: usize,
    hi: usize,
    crops: Option<Crops>,
    timing: BatchTiming,
    metrics: &Metrics,
    sink: &FrameSink,
) -> Result<bool, Error> {
    let n = hi - lo;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let work = plan.clone();
    let watch = sink.clone();
    let frame = move |i: usize| {
        let bg = work.avatar.background_index(work.start + (lo + i) as u64);
        // A client gone or out of time stops the rest of the batch here, not after it.
        let r = if watch.is_closed() || work.past_deadline() {
            Err(FrameError::Skipped)
        } else {
            // A panic on a rayon::spawn thread aborts the process: a frame that panics
            // (a codec's assertion) fails its request instead.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &crops {
                Some(crops) => super::compose(
                    &work.avatar,
                    bg,
                    crops.get(i),
                    work.output,
                    Some(&work.idle_budget),
                ),
                None => super::idle(&work.avatar, bg, work.output, Some(&work.idle_budget)),
            }))
            .unwrap_or_else(|_| Err("compositing the frame panicked".to_string()))
            .map_err(FrameError::Failed)
        };
        (i, bg, r)
    };
    if n == 1 {
        // A live session's frames come one at a time. Handed to rayon, each woke a worker
        // that then spun in sched_yield looking for more (11% of the compositor's CPU
        // samples at 8 sessions, docs/performance.md); a blocking-pool thread sleeps until
        // the next instead, and the permits keep as many frames at once as the rayon pool
        // has threads.
        let permit = single_frame_slots()
            .acquire_owned()
            .await
            .map_err(|_| Error::Internal("compositing slots closed".into()))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _ = tx.send(frame(0));
        });
    } else {
        rayon::spawn(move || {
            (0..n)
                .into_par_iter()
                .for_each_with(tx, |tx, i| drop(tx.send(frame(i))));
        });
    }
    let mut pending = BTreeMap::new();
    let mut emitted = 0usize;
    while emitted < n {
        let (i, bg, r) = rx
            .recv()
            .await
            .ok_or_else(|| Error::Internal("compositing worker stopped".into()))?;
        pending.insert(i, (bg, r));
        while let Some((bg, r)) = pending.remove(&emitted) {
            let frame_index = plan.start + (lo + emitted) as u64;
            let c = match r {
                Ok(c) => c,
                Err(FrameError::Skipped) if sink.is_closed() => return Ok(false),
                Err(FrameError::Skipped) => {
                    plan.check_deadline(lo + emitted, hi)?;
                    return Err(Error::Internal(format!("frame {frame_index} was skipped")));
                }
                Err(FrameError::Failed(e)) => {
                    return Err(Error::Internal(format!("frame {frame_index}: {e}")))
                }
            };
            let m = &plan.avatar.manifest;
            let background = &plan.avatar.frames[bg];
            let crc = background.jpeg_crc;
            let frame = RenderedFrame {
                request_id: plan.request_id.clone(),
                frame_index,
                background_index: bg as u32,
                format: match plan.output {
                    Output::Jpeg { .. } => ImageFormat::Jpeg,
                    Output::I420 | Output::I420Region(_) => ImageFormat::I420,
                } as i32,
                region: c.region.map(FaceRegion::from),
                background_crc32: c.region.map_or(0, |_| crc),
                background: match (c.region, &plan.sent) {
                    (Some(_), None) => background.jpeg.clone(),
                    (Some(_), Some(sent))
                        if sent.first(&plan.avatar.manifest.id, bg as u32, crc) =>
                    {
                        background.jpeg.clone()
                    }
                    _ => Bytes::new(),
                },
                image: c.image,
                width: m.width,
                height: m.height,
                timings: Some(StageTimings {
                    queue_us: timing.queue.as_micros() as u64,
                    inference_us: timing.inference.as_micros() as u64,
                    blend_us: c.blend.as_micros() as u64,
                    encode_us: c.encode.as_micros() as u64,
                    total_us: plan.arrived.elapsed().as_micros() as u64,
                    idle: plan.idle,
                }),
                last_in_request: plan.closes && lo + emitted + 1 == plan.count,
            };
            match sink.send_timeout(Ok(frame), plan.idle_timeout).await {
                Ok(()) => {}
                Err(SendTimeoutError::Closed(_)) => return Ok(false),
                Err(SendTimeoutError::Timeout(_)) => {
                    return Err(Error::DeadlineExceeded(format!(
                        "stream idle: the client took no frame for {} s (--stream-idle-timeout-s)",
                        plan.idle_timeout.as_secs_f64()
                    )))
                }
            }
            metrics.frames.inc();
            if plan.idle {
                metrics.idle_frames.inc();
            } else {
                metrics.blend_seconds.observe(c.blend.as_secs_f64());
            }
            metrics.encode_seconds.observe(c.encode.as_secs_f64());
            metrics
                .end_to_end_seconds
                .observe(plan.arrived.elapsed().as_secs_f64());
            emitted += 1;
        }
    }
    while rx.recv().await.is_some() {}
    Ok(true)
}

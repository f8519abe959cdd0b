//! One `RenderRequest` from validation to frames on the stream.
//!
//! The requested frames are cut into batches of at most `max_batch`. Up to `pipeline_depth`
//! batches are at the inference service at once, so the GPU works on batch k+1 while this
//! process blends and encodes batch k. Within a batch, frames are blended and encoded in
//! parallel on the rayon pool and sent in order as soon as each and its predecessors are done.
//!
//! The steps, one file each: `plan` checks the request against its avatar and model;
//! `wire` builds each batch's KServe request and reads the face crops out of the answer;
//! `composite` pastes one crop into its background's face region and splices the region's
//! encode into the prepared frame; `deliver` runs a batch's frames on the rayon pool and
//! sends them in order. This file schedules the batches. Idle frames (`RenderRequest.idle`)
//! skip inference: each is its prepared background.

mod clock;
mod composite;
mod deliver;
mod plan;
mod wire;

pub use clock::{Asker, FrameClock, FrameTick};
pub use composite::{compose, idle, splices, Composed, Crop, Output};
pub use wire::FaceInputs;

use crate::avatar::Avatar;
use crate::encode::Subsampling;
use crate::error::Error;
use crate::idle_frames::IdleBudget;
use crate::inference::ModelInfo;
use crate::metrics::Metrics;
use framecast_proto::compositor::v1::{RenderRequest, RenderedFrame};
use framecast_proto::kserve::ModelInferResponse;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::Status;
use tracing::Instrument;

/// Render settings shared by every request.
#[derive(Debug, Clone)]
pub struct RenderOptions {
    /// Frames per inference call.
    pub max_batch: usize,
    /// Largest `frame_count` a request may ask for.
    pub max_frames_per_request: u32,
    /// Batches at the inference service at once per request.
    pub pipeline_depth: usize,
    pub subsampling: Subsampling,
    /// A stream waiting this long for its client (to send the next request, or to take a
    /// frame) is ended.
    pub idle_timeout: Duration,
    /// Audio an audio session may hold ahead of its rendered frames; more is refused with
    /// RESOURCE_EXHAUSTED.
    pub max_audio_ahead: Duration,
    /// How long the audio-encoder batcher collects windows of different sessions into one
    /// request.
    pub encoder_batch_wait: Duration,
    /// How long the face model's frame clock holds a batch for other sessions' frames
    /// ([`FrameClock`]).
    pub frame_tick: FrameTick,
    /// An audio session's frame is idle (the background as it is, no inference) when its
    /// mel window's loudness ([`framecast_audio::window::loudness`], 0 silence .. 1 loud
    /// speech) is below this; 0 never.
    pub idle_loudness: f32,
    /// Where idle raw frames are kept, and how many bytes they may hold
    /// ([`crate::idle_frames`]).
    pub idle_budget: Arc<IdleBudget>,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            max_batch: 24,
            max_frames_per_request: 3000,
            pipeline_depth: 2,
            subsampling: Subsampling::S420,
            idle_timeout: DEFAULT_STREAM_IDLE_TIMEOUT,
            max_audio_ahead: Duration::from_secs(10),
            encoder_batch_wait: Duration::from_millis(5),
            frame_tick: FrameTick::Auto,
            idle_loudness: 0.05,
            idle_budget: IdleBudget::new(DEFAULT_IDLE_FRAME_CACHE_MIB << 20, None),
        }
    }
}

/// The frame clock's tick: one frame period at 25 fps, so the frames every session readies
/// in one period share a forward pass (docs/performance.md, "Cross-session batching").
pub const DEFAULT_FRAME_TICK: Duration = Duration::from_millis(40);

/// The bytes (MiB) of idle raw frames kept for all avatars by default: 388 frames at 720p.
/// At 256 the `make-demo` avatar's 200 did not fit: the 6 left out were decoded at every use,
/// 5% of a compositor's CPU with 8 spliced sessions (docs/performance.md).
pub const DEFAULT_IDLE_FRAME_CACHE_MIB: u64 = 512;

/// How long a Render stream may wait for its client, with nothing in flight, before it is
/// ended and its admission slot freed.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where frames go; a closed receiver means the client went away.
pub type FrameSink = mpsc::Sender<Result<RenderedFrame, Status>>;

/// The background JPEGs a stream has sent with region frames, by avatar: with
/// `RenderRequest.backgrounds_once` each goes once (until `resend_backgrounds`).
#[derive(Default)]
pub struct SentBackgrounds(parking_lot::Mutex<HashMap<String, HashSet<(u32, u32)>>>);

impl SentBackgrounds {
    /// Whether `avatar`'s background `background` (its JPEG's CRC `crc`) goes with this frame:
    /// true the first time.
    pub fn first(&self, avatar: &str, background: u32, crc: u32) -> bool {
        let mut sent = self.0.lock();
        match sent.get_mut(avatar) {
            Some(set) => set.insert((background, crc)),
            None => {
                sent.insert(avatar.to_string(), HashSet::from([(background, crc)]));
                true
            }
        }
    }

    /// Every background goes again (`RenderRequest.resend_backgrounds`).
    pub fn forget(&self) {
        self.0.lock().clear();
    }
}

/// Where a request's frames go and what renders them: shared by every request of a stream.
pub struct Target<'a> {
    /// Where the face model's requests meet other sessions' ([`FrameClock`]).
    pub clock: &'a FrameClock,
    /// The stream rendering (a session, for the clock).
    pub stream: u64,
    pub opts: &'a RenderOptions,
    pub metrics: &'a Metrics,
    pub sink: &'a FrameSink,
    /// The client's deadline for the stream (`grpc-timeout`), if it set one.
    pub deadline: Option<Instant>,
    pub sent: &'a Arc<SentBackgrounds>,
}

/// Renders one request onto `target.sink`. Returns an error for the stream, or Ok when done
/// (also when the client went away: there is no one left to tell). Past the deadline no
/// batch is sent for inference or composited, and the error is DEADLINE_EXCEEDED. The last
/// frame is marked `last_in_request` when `closes` (an audio session's slices do not close
/// it, except the last).
pub async fn render(
    req: RenderRequest,
    avatar: Arc<Avatar>,
    model: Arc<ModelInfo>,
    target: &Target<'_>,
    closes: bool,
    due: Option<Instant>,
) -> Result<(), Error> {
    let Target {
        clock,
        stream,
        opts,
        metrics,
        sink,
        deadline,
        sent,
    } = *target;
    let arrived = Instant::now();
    let plan = plan::validate(req, avatar, model, opts, arrived, deadline, sent)?;
    let plan = Arc::new(plan::Plan { closes, ..plan });
    // When each frame is due: an audio session's media clock, else as soon as it can be.
    let due = due.unwrap_or(arrived);
    let period = Duration::from_secs_f64(1.0 / plan.avatar.manifest.fps.max(1.0));
    let batch = opts.max_batch.max(1);
    if plan.idle {
        let timing = BatchTiming {
            queue: Duration::ZERO,
            inference: Duration::ZERO,
        };
        for lo in (0..plan.count).step_by(batch) {
            let hi = (lo + batch).min(plan.count);
            plan.check_deadline(lo, hi)?;
            if !deliver::batch(&plan, lo, hi, None, timing, metrics, sink).await? {
                break;
            }
        }
        return Ok(());
    }
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut next = 0usize;
    while next < plan.count || !in_flight.is_empty() {
        while next < plan.count && in_flight.len() < opts.pipeline_depth.max(1) {
            let end = (next + batch).min(plan.count);
            let clock = clock.clone();
            let (request, faces, expected) = wire::infer_request(&plan, next, end);
            let sent = Instant::now();
            let lo = next;
            let first_due = due + period.mul_f64(lo as f64);
            let on_gpu = plan.model.on_gpu;
            let last = plan.closes && end == plan.count;
            in_flight.push_back((
                next,
                end,
                sent,
                tokio::spawn(
                    async move {
                        let asker = Asker {
                            frames: end - lo,
                            due: first_due,
                            last,
                            session: stream,
                            on_gpu,
                        };
                        clock
                            .infer(request, faces, expected, deadline, asker)
                            .await
                            .map_err(|s| {
                                Error::inference(format!("inference for frames {lo}..{end}"), s)
                            })
                    }
                    .in_current_span(),
                ),
            ));
            next = end;
        }
        let Some((lo, hi, sent, handle)) = in_flight.pop_front() else {
            break;
        };
        let response = handle
            .await
            .map_err(|e| Error::Internal(format!("inference task failed: {e}")))??;
        if let Err(e) = plan.check_deadline(lo, hi) {
            for (.., h) in in_flight {
                h.abort();
            }
            return Err(e);
        }
        let timing = BatchTiming {
            queue: sent - plan.arrived,
            inference: sent.elapsed(),
        };
        metrics.queue_seconds.observe(timing.queue.as_secs_f64());
        metrics
            .inference_seconds
            .observe(timing.inference.as_secs_f64());
        let crops = wire::face_crops(&plan, response, hi - lo)?;
        metrics
            .face_crops
            .with_label_values(&[crops.format()])
            .inc_by((hi - lo) as u64);
        if !deliver::batch(&plan, lo, hi, Some(crops), timing, metrics, sink).await? {
            // Client gone: drop the batches still in flight.
            for (.., h) in in_flight {
                h.abort();
            }
            return Ok(());
        }
    }
    Ok(())
}

/// A batch at the inference service: its frame range, when it was sent, and the call.
type InFlight = (
    usize,
    usize,
    Instant,
    tokio::task::JoinHandle<Result<ModelInferResponse, Error>>,
);

#[derive(Clone, Copy)]
struct BatchTiming {
    queue: Duration,
    inference: Duration,
}

//! One `RenderRequest` from validation to frames on the stream.
//!
//! The requested frames are cut into batches of at most `max_batch`. Up to `pipeline_depth`
//! batches are at the inference service at once, so the GPU works on batch k+1 while this
//! process blends and encodes batch k. Within a batch, frames are blended and encoded in
//! parallel on the rayon pool and sent in order as soon as each and its predecessors are done.

use crate::avatar::Avatar;
use crate::blend::{self, BlendScratch};
use crate::encode::{self, Subsampling};
use crate::face_contract;
use crate::inference::{Expected, InferenceClient, ModelInfo};
use crate::metrics::Metrics;
use bytes::{Bytes, BytesMut};
use framecast_proto::compositor::v1::{
    ImageFormat, RenderRequest, RenderedFrame, StageTimings, Tensor,
};
use framecast_proto::echo;
use framecast_proto::kserve::{
    model_infer_request::InferInputTensor, ModelInferRequest, ModelInferResponse,
};
use framecast_proto::tensor::{self, DataType};
use rayon::prelude::*;
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::SendTimeoutError;
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
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            max_batch: 24,
            max_frames_per_request: 3000,
            pipeline_depth: 2,
            subsampling: Subsampling::S420,
            idle_timeout: DEFAULT_STREAM_IDLE_TIMEOUT,
        }
    }
}

/// How long a Render stream may wait for its client, with nothing in flight, before it is
/// ended and its admission slot freed.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where frames go; a closed receiver means the client went away.
pub type FrameSink = mpsc::Sender<Result<RenderedFrame, Status>>;

/// A validated request: everything needed to build its batches.
struct Job {
    request_id: String,
    avatar: Arc<Avatar>,
    model: Arc<ModelInfo>,
    start: u64,
    count: usize,
    quality: u8,
    subsampling: Subsampling,
    idle_timeout: Duration,
    /// Conditioning payloads in model input order, each `count` frames long.
    conditioning: Vec<(Arc<str>, DataType, Vec<i64>, Bytes)>,
    arrived: Instant,
    /// The client's deadline for the stream (`grpc-timeout`), if it set one.
    deadline: Option<Instant>,
}

impl Job {
    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// DEADLINE_EXCEEDED for frames `lo..hi` if the client's deadline has passed.
    fn check_deadline(&self, lo: usize, hi: usize) -> Result<(), Status> {
        if !self.past_deadline() {
            return Ok(());
        }
        Err(Status::deadline_exceeded(format!(
            "request '{}': the stream's deadline passed before frames {}..{} were rendered",
            self.request_id,
            self.start + lo as u64,
            self.start + hi as u64
        )))
    }
}

/// Checks a request against its avatar and model.
fn validate(
    req: RenderRequest,
    avatar: Arc<Avatar>,
    model: Arc<ModelInfo>,
    opts: &RenderOptions,
    arrived: Instant,
    deadline: Option<Instant>,
) -> Result<Job, Status> {
    if req.frame_count == 0 || req.frame_count > opts.max_frames_per_request {
        return Err(Status::invalid_argument(format!(
            "frame_count {} is out of range 1..={}",
            req.frame_count, opts.max_frames_per_request
        )));
    }
    if req
        .start_frame
        .checked_add(req.frame_count as u64)
        .is_none()
    {
        return Err(Status::invalid_argument(
            "start_frame + frame_count overflows u64",
        ));
    }
    if req.jpeg_quality > 100 {
        return Err(Status::invalid_argument(format!(
            "jpeg_quality {} is out of range 0..=100 (0: the avatar's default)",
            req.jpeg_quality
        )));
    }
    if model.crop_size != avatar.manifest.crop_size {
        return Err(Status::failed_precondition(format!(
            "avatar '{}' has crop_size {} but model '{}' takes {}",
            avatar.manifest.id, avatar.manifest.crop_size, model.name, model.crop_size
        )));
    }
    let count = req.frame_count as usize;
    for (i, t) in req.conditioning.iter().enumerate() {
        if req.conditioning[..i].iter().any(|u| u.name == t.name) {
            return Err(Status::invalid_argument(format!(
                "conditioning[{i}]: '{}' is given twice",
                echo(&t.name)
            )));
        }
        if !model.conditioning.iter().any(|m| m.name == t.name) {
            return Err(Status::invalid_argument(format!(
                "conditioning: '{}' is not an input of model '{}' (expects {})",
                echo(&t.name),
                model.name,
                model
                    .conditioning
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let mut conditioning = Vec::with_capacity(model.conditioning.len());
    for m in &model.conditioning {
        let mut shape = m.shape.clone();
        shape[0] = count as i64;
        let Some(t) = req.conditioning.iter().find(|t| t.name == m.name) else {
            return Err(Status::invalid_argument(format!(
                "conditioning: '{}' {} {:?} is missing",
                m.name, m.datatype, shape
            )));
        };
        let Tensor {
            name,
            datatype,
            shape: got,
            data,
        } = t.clone();
        let dt = DataType::parse(&datatype).map_err(|e| {
            Status::invalid_argument(format!(
                "conditioning '{name}': datatype: {}",
                echo(&e.to_string())
            ))
        })?;
        if dt.as_str() != m.datatype {
            return Err(Status::invalid_argument(format!(
                "conditioning '{name}': datatype is {dt}; model '{}' expects {}",
                model.name, m.datatype
            )));
        }
        if got != shape {
            return Err(Status::invalid_argument(format!(
                "conditioning '{name}': shape {} should be {shape:?} (frame_count first)",
                echo(&format!("{got:?}"))
            )));
        }
        tensor::check_byte_len(dt, &shape, data.len())
            .map_err(|e| Status::invalid_argument(format!("conditioning '{name}': {e}")))?;
        conditioning.push((Arc::from(name.as_str()), dt, shape, data));
    }
    let quality = if req.jpeg_quality == 0 {
        avatar.manifest.jpeg_quality
    } else {
        req.jpeg_quality as u8
    };
    Ok(Job {
        request_id: req.request_id,
        avatar,
        model,
        start: req.start_frame,
        count,
        quality,
        subsampling: opts.subsampling,
        idle_timeout: opts.idle_timeout,
        conditioning,
        arrived,
        deadline,
    })
}

/// Renders one request onto `sink`. Returns an error status for the stream, or Ok when done
/// (also when the client went away: there is no one left to tell). Past `deadline` no batch
/// is sent for inference or composited, and the status is DEADLINE_EXCEEDED.
#[allow(clippy::too_many_arguments)]
pub async fn render(
    req: RenderRequest,
    avatar: Arc<Avatar>,
    model: Arc<ModelInfo>,
    client: &InferenceClient,
    opts: &RenderOptions,
    metrics: &Metrics,
    sink: &FrameSink,
    deadline: Option<Instant>,
) -> Result<(), Status> {
    let arrived = Instant::now();
    let job = Arc::new(validate(req, avatar, model, opts, arrived, deadline)?);
    let batch = opts.max_batch.max(1);
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut next = 0usize;
    while next < job.count || !in_flight.is_empty() {
        while next < job.count && in_flight.len() < opts.pipeline_depth.max(1) {
            let end = (next + batch).min(job.count);
            let request = infer_request(&job, next, end);
            let expected = Expected {
                output: job.model.output.clone(),
                bytes: (end - next) * face_contract::output_bytes(job.model.crop_size as usize),
            };
            let client = client.clone();
            let sent = Instant::now();
            in_flight.push_back((
                next,
                end,
                sent,
                tokio::spawn(
                    async move { client.infer(request, &expected, deadline).await }
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
            .map_err(|e| Status::internal(format!("inference task failed: {e}")))?
            .map_err(|s| {
                Status::new(
                    s.code(),
                    format!("inference for frames {lo}..{hi}: {}", s.message()),
                )
            })?;
        if let Err(s) = job.check_deadline(lo, hi) {
            for (.., h) in in_flight {
                h.abort();
            }
            return Err(s);
        }
        let timing = BatchTiming {
            queue: sent - job.arrived,
            inference: sent.elapsed(),
        };
        metrics.queue_seconds.observe(timing.queue.as_secs_f64());
        metrics
            .inference_seconds
            .observe(timing.inference.as_secs_f64());
        if !finish_batch(&job, lo, hi, response, timing, metrics, sink).await? {
            // Client gone: drop the batches still in flight.
            for (.., h) in in_flight {
                h.abort();
            }
            return Ok(());
        }
    }
    Ok(())
}

fn infer_request(job: &Job, lo: usize, hi: usize) -> ModelInferRequest {
    let n = hi - lo;
    let s = job.model.crop_size as i64;
    let per_frame = job.avatar.face_inputs[0].len();
    let mut face = BytesMut::with_capacity(n * per_frame);
    for i in lo..hi {
        face.extend_from_slice(
            &job.avatar.face_inputs[job.avatar.background_index(job.start + i as u64)],
        );
    }
    let mut inputs = vec![InferInputTensor::new(
        &job.model.face_input,
        DataType::U8,
        face_contract::input_shape(n, s as usize),
    )];
    let mut raw = vec![face.freeze()];
    for (name, dt, shape, data) in &job.conditioning {
        let per = data.len() / job.count;
        let mut sh = shape.clone();
        sh[0] = n as i64;
        inputs.push(InferInputTensor::new(name, *dt, sh));
        raw.push(data.slice(lo * per..hi * per));
    }
    ModelInferRequest {
        model_name: job.model.name.clone(),
        id: format!("{}:{lo}", echo(&job.request_id)),
        inputs,
        raw_input_contents: raw,
        ..Default::default()
    }
}

/// A batch at the inference service: its frame range, when it was sent, and the call.
type InFlight = (
    usize,
    usize,
    Instant,
    tokio::task::JoinHandle<Result<ModelInferResponse, Status>>,
);

#[derive(Clone, Copy)]
struct BatchTiming {
    queue: Duration,
    inference: Duration,
}

struct Composed {
    jpeg: Vec<u8>,
    blend: Duration,
    encode: Duration,
}

/// Why a frame of a batch has no JPEG.
enum FrameError {
    /// Not composited: the client went away or its deadline passed.
    Skipped,
    Failed(String),
}

thread_local! {
    /// Per rayon thread: blend buffers and the background pixels a paste covers, reused frame
    /// after frame so the hot path allocates nothing.
    static SCRATCH: RefCell<(BlendScratch, Vec<u8>)> = RefCell::new((BlendScratch::default(), Vec::new()));
}

/// A background frame with a face pasted into it, locked; dropping it (also when unwinding)
/// puts the saved pixels back and unlocks.
struct Pasted<'a> {
    pixels: MutexGuard<'a, Vec<u8>>,
    saved: &'a mut Vec<u8>,
    avatar: &'a Avatar,
    background: usize,
}

impl<'a> Pasted<'a> {
    /// Locks `avatar`'s frame `background` and saves the pixels a paste may write.
    fn save(avatar: &'a Avatar, background: usize, saved: &'a mut Vec<u8>) -> Pasted<'a> {
        let pixels = avatar.frames[background].lock();
        saved.clear();
        for r in Self::rows(avatar, background) {
            saved.extend_from_slice(&pixels[r]);
        }
        Pasted {
            pixels,
            saved,
            avatar,
            background,
        }
    }

    fn rows(avatar: &Avatar, background: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        blend::pasted_rows(
            avatar.manifest.width,
            &avatar.boxes[background],
            &avatar.box_masks[background],
        )
    }
}

impl Drop for Pasted<'_> {
    fn drop(&mut self) {
        let mut from = 0;
        for r in Self::rows(self.avatar, self.background) {
            let n = r.len();
            self.pixels[r].copy_from_slice(&self.saved[from..from + n]);
            from += n;
        }
    }
}

/// Blends and encodes one frame on the calling (rayon) thread; returns the JPEG and the
/// blend and encode times. The face is pasted into the background in place, encoded, and
/// the background restored (see [`crate::avatar::Background`]).
pub fn compose(
    avatar: &Avatar,
    background: usize,
    crop_chw: &[u8],
    quality: u8,
    subsampling: Subsampling,
) -> Result<(Vec<u8>, Duration, Duration), String> {
    let m = &avatar.manifest;
    SCRATCH.with(|cell| {
        let (scratch, saved) = &mut *cell.borrow_mut();
        let t0 = Instant::now();
        let mut frame = Pasted::save(avatar, background, saved);
        blend::paste(
            &mut frame.pixels,
            m.width,
            &avatar.boxes[background],
            crop_chw,
            m.crop_size,
            &avatar.box_masks[background],
            scratch,
        )?;
        let t1 = Instant::now();
        let jpeg = encode::encode_rgb(&frame.pixels, m.width, m.height, quality, subsampling)?;
        let t2 = Instant::now();
        drop(frame);
        Ok((jpeg, (t1 - t0) + t2.elapsed(), t2 - t1))
    })
}

/// Returns false when the client has gone away.
async fn finish_batch(
    job: &Arc<Job>,
    lo: usize,
    hi: usize,
    response: ModelInferResponse,
    timing: BatchTiming,
    metrics: &Metrics,
    sink: &FrameSink,
) -> Result<bool, Status> {
    let n = hi - lo;
    let s = job.model.crop_size as usize;
    let idx = response
        .outputs
        .iter()
        .position(|o| o.name == job.model.output)
        .ok_or_else(|| {
            Status::internal(format!(
                "inference response lacks output '{}'",
                job.model.output
            ))
        })?;
    let crops = response
        .raw_output_contents
        .get(idx)
        .cloned()
        .ok_or_else(|| Status::internal("inference response has no raw_output_contents"))?;
    let per = face_contract::output_bytes(s);
    if crops.len() != n * per {
        return Err(Status::internal(format!(
            "inference output '{}' is {} bytes; {n} frames of 3x{s}x{s} need {}",
            job.model.output,
            crops.len(),
            n * per
        )));
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let work = job.clone();
    let watch = sink.clone();
    rayon::spawn(move || {
        (0..n).into_par_iter().for_each_with(tx.clone(), |tx, i| {
            let bg = work.avatar.background_index(work.start + (lo + i) as u64);
            // A client gone or out of time stops the rest of the batch here, not after it.
            let r = if watch.is_closed() || work.past_deadline() {
                Err(FrameError::Skipped)
            } else {
                let crop = &crops[i * per..(i + 1) * per];
                compose(&work.avatar, bg, crop, work.quality, work.subsampling)
                    .map(|(jpeg, blend, encode)| Composed {
                        jpeg,
                        blend,
                        encode,
                    })
                    .map_err(FrameError::Failed)
            };
            let _ = tx.send((i, bg, r));
        });
    });
    let mut pending = BTreeMap::new();
    let mut emitted = 0usize;
    while emitted < n {
        let (i, bg, r) = rx
            .recv()
            .await
            .ok_or_else(|| Status::internal("compositing worker stopped"))?;
        pending.insert(i, (bg, r));
        while let Some((bg, r)) = pending.remove(&emitted) {
            let frame_index = job.start + (lo + emitted) as u64;
            let c = match r {
                Ok(c) => c,
                Err(FrameError::Skipped) if sink.is_closed() => return Ok(false),
                Err(FrameError::Skipped) => {
                    job.check_deadline(lo + emitted, hi)?;
                    return Err(Status::internal(format!("frame {frame_index} was skipped")));
                }
                Err(FrameError::Failed(e)) => {
                    return Err(Status::internal(format!("frame {frame_index}: {e}")))
                }
            };
            let m = &job.avatar.manifest;
            let frame = RenderedFrame {
                request_id: job.request_id.clone(),
                frame_index,
                background_index: bg as u32,
                image: Bytes::from(c.jpeg),
                format: ImageFormat::Jpeg as i32,
                width: m.width,
                height: m.height,
                timings: Some(StageTimings {
                    queue_us: timing.queue.as_micros() as u64,
                    inference_us: timing.inference.as_micros() as u64,
                    blend_us: c.blend.as_micros() as u64,
                    encode_us: c.encode.as_micros() as u64,
                    total_us: job.arrived.elapsed().as_micros() as u64,
                }),
                last_in_request: lo + emitted + 1 == job.count,
            };
            match sink.send_timeout(Ok(frame), job.idle_timeout).await {
                Ok(()) => {}
                Err(SendTimeoutError::Closed(_)) => return Ok(false),
                Err(SendTimeoutError::Timeout(_)) => {
                    return Err(Status::deadline_exceeded(format!(
                        "stream idle: the client took no frame for {} s (--stream-idle-timeout-s)",
                        job.idle_timeout.as_secs_f64()
                    )))
                }
            }
            metrics.frames.inc();
            metrics.blend_seconds.observe(c.blend.as_secs_f64());
            metrics.encode_seconds.observe(c.encode.as_secs_f64());
            metrics
                .end_to_end_seconds
                .observe(job.arrived.elapsed().as_secs_f64());
            emitted += 1;
        }
    }
    while rx.recv().await.is_some() {}
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{self, DemoOptions};

    fn avatar(root: &std::path::Path) -> Avatar {
        let opts = DemoOptions {
            id: "a".into(),
            width: 96,
            height: 64,
            frames: 3,
            crop_size: 32,
            ..Default::default()
        };
        Avatar::load(&demo::write_demo(root, &opts).unwrap()).unwrap()
    }

    /// What `compose` must produce: the crop pasted into a copy of the background, encoded.
    fn expected(a: &Avatar, bg: usize, crop: &[u8]) -> Vec<u8> {
        let m = &a.manifest;
        let mut frame = a.frames[bg].to_vec();
        let mut scratch = BlendScratch::default();
        let (b, mask) = (&a.boxes[bg], &a.box_masks[bg]);
        blend::paste(
            &mut frame,
            m.width,
            b,
            crop,
            m.crop_size,
            mask,
            &mut scratch,
        )
        .unwrap();
        assert_ne!(frame, a.frames[bg].to_vec(), "the paste changed nothing");
        encode::encode_rgb(&frame, m.width, m.height, 90, Subsampling::S444).unwrap()
    }

    #[test]
    fn compose_pastes_in_place_then_restores_the_background() {
        let tmp = tempfile::tempdir().unwrap();
        let a = avatar(tmp.path());
        let before = a.frames[1].to_vec();
        let crop = vec![250u8; 3 * 32 * 32];
        let (jpeg, _, _) = compose(&a, 1, &crop, 90, Subsampling::S444).unwrap();
        assert_eq!(jpeg, expected(&a, 1, &crop));
        assert!(a.frames[1].to_vec() == before, "background not restored");
    }

    /// Many workers compositing different faces into the same background at once each get
    /// their own face: the lock keeps one paste from showing in another's frame.
    #[test]
    fn concurrent_composes_of_one_background_do_not_mix() {
        let tmp = tempfile::tempdir().unwrap();
        let a = avatar(tmp.path());
        let crops = [vec![250u8; 3 * 32 * 32], vec![5u8; 3 * 32 * 32]];
        let want = [expected(&a, 2, &crops[0]), expected(&a, 2, &crops[1])];
        let before = a.frames[2].to_vec();
        (0..64usize).into_par_iter().for_each(|i| {
            let (jpeg, _, _) = compose(&a, 2, &crops[i % 2], 90, Subsampling::S444).unwrap();
            assert!(jpeg == want[i % 2], "compose {i} saw another worker's face");
        });
        assert!(a.frames[2].to_vec() == before, "background not restored");
    }
}

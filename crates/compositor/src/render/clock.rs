//! The face model's batches across sessions: one frame clock per model and avatar.
//!
//! Each live session's frames become ready when its own audio lands, at its own phase of the
//! frame period, so sent as they come they reach the inference service one frame per request
//! and its short queue delay almost never merges two: one forward pass per frame per session,
//! where a GPU's cost is the call, not the frame. The clock holds a ready batch for up to one
//! tick (`--frame-tick-ms`, a frame period by default), long enough for every other session's
//! frames of the same period to come, and sends what came as one request of at most
//! `max_batch` frames. A lone session is not held: while no other session of the model and
//! avatar has asked within the last second, a batch goes at once; and a batch goes as soon
//! as every session that asked within the last second is in it.
//!
//! By default (`auto`) the clock runs for models a replica serves on a GPU and not for those
//! on a CPU: there one forward pass of many frames costs more per frame than a pass each, and
//! holds one core where separate requests use every instance (docs/performance.md,
//! "Cross-session batching").
//!
//! Batches are filled by due time (when a request's first frame is due on screen), not by
//! arrival: a session whose audio came far ahead has frames due later, so it cannot fill
//! every batch and delay the frames other sessions need now. A request is never split;
//! what does not fit goes in the next batch, which is sent at once.
//!
//! A stream's last request (the frames left when its audio ends) goes at once, alone: its
//! session is leaving the clock and every one of those frames is due, so holding it only
//! delays them; merged into one pass with the other sessions' it ran on one instance where
//! alone the inference service spreads such requests over its instances
//! (docs/performance.md, "Cross-session batching"). A session catching up after a stall is
//! still merged: merging is what lets an overloaded host catch up.
//!
//! Requests merge when they name the same model, the same avatar's face rows (one tensor in
//! the replica's cache) and the same inputs; sessions of different avatars meet only at the
//! inference service's own batcher.

use crate::inference::{CachedInput, Expected, InferenceClient};
use crate::metrics::Metrics;
use framecast_proto::kserve::{ModelInferRequest, ModelInferResponse};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

/// How long a session counts as another one of its clock after its last request.
const PEER_WINDOW: Duration = Duration::from_secs(1);

/// How long the clock holds a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameTick {
    /// [`super::DEFAULT_FRAME_TICK`] for models a replica runs on a GPU; none (every request
    /// alone) for models on a CPU.
    Auto,
    /// This long for every model (zero: every request alone).
    Fixed(Duration),
}

impl FrameTick {
    /// The tick for a model that runs on a GPU or not.
    pub fn for_model(self, on_gpu: bool) -> Duration {
        match self {
            FrameTick::Auto if on_gpu => super::DEFAULT_FRAME_TICK,
            FrameTick::Auto => Duration::ZERO,
            FrameTick::Fixed(d) => d,
        }
    }
}

impl std::str::FromStr for FrameTick {
    type Err = String;

    /// `auto`, or milliseconds 0..=1000.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(FrameTick::Auto);
        }
        match s.parse::<u64>() {
            Ok(ms) if ms <= 1000 => Ok(FrameTick::Fixed(Duration::from_millis(ms))),
            _ => Err(format!(
                "{s:?} is neither auto nor milliseconds in 0..=1000"
            )),
        }
    }
}

impl std::fmt::Display for FrameTick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameTick::Auto => f.write_str("auto"),
            FrameTick::Fixed(d) => write!(f, "{}", d.as_millis()),
        }
    }
}

/// Who asks, for what: a request's frames, when its first is due, whether it is its stream's
/// last, the session (its Render stream), and whether its model runs on a GPU.
pub struct Asker {
    pub frames: usize,
    pub due: Instant,
    pub last: bool,
    pub session: u64,
    pub on_gpu: bool,
}

/// One inference request of a session, waiting for its batch.
struct Ask {
    request: ModelInferRequest,
    faces: CachedInput,
    expected: Expected,
    /// Frames in it.
    n: usize,
    /// When its first frame is due on screen.
    due: Instant,
    deadline: Option<Instant>,
    /// Who asked (a session's Render stream), to know whether it is alone.
    session: u64,
    queued: Instant,
    reply: oneshot::Sender<Result<ModelInferResponse, Status>>,
}

/// The requests that may share a forward pass.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    model: String,
    faces: String,
    i420: bool,
    /// Each input's name, datatype and shape past the batch dimension.
    inputs: Vec<(String, String, Vec<i64>)>,
}

/// The frame clocks of a compositor, one per model, avatar and input layout, started on first
/// use.
#[derive(Clone)]
pub struct FrameClock {
    client: InferenceClient,
    metrics: Arc<Metrics>,
    tick: FrameTick,
    max_batch: usize,
    queues: Arc<Mutex<HashMap<Key, mpsc::Sender<Ask>>>>,
}

impl FrameClock {
    /// Batches of at most `max_batch` frames, held for at most `tick`.
    pub fn new(
        client: InferenceClient,
        metrics: Arc<Metrics>,
        tick: FrameTick,
        max_batch: usize,
    ) -> Self {
        FrameClock {
            client,
            metrics,
            tick,
            max_batch: max_batch.max(1),
            queues: Arc::default(),
        }
    }

    /// The answer to `request`, from a forward pass shared with the other sessions of its
    /// model and avatar: the response holds this request's rows only.
    pub async fn infer(
        &self,
        request: ModelInferRequest,
        faces: CachedInput,
        expected: Expected,
        deadline: Option<Instant>,
        asker: Asker,
    ) -> Result<ModelInferResponse, Status> {
        let Asker {
            frames: n,
            due,
            last,
            session,
            on_gpu,
        } = asker;
        let tick = self.tick.for_model(on_gpu);
        if tick.is_zero() || last {
            self.metrics.face_batch_requests.observe(1.0);
            self.metrics.face_batch_frames.observe(n as f64);
            return self
                .client
                .infer(request, Some(&faces), &expected, deadline)
                .await;
        }
        let key = Key {
            model: request.model_name.clone(),
            faces: faces.source.name().to_string(),
            i420: expected.i420,
            inputs: request
                .inputs
                .iter()
                .map(|i| {
                    let dims = i.shape.get(1..).unwrap_or_default().to_vec();
                    (i.name.clone(), i.datatype.clone(), dims)
                })
                .collect(),
        };
        let (reply, rx) = oneshot::channel();
        let ask = Ask {
            request,
            faces,
            expected,
            n,
            due,
            deadline,
            session,
            queued: Instant::now(),
            reply,
        };
        self.queue(key, tick)
            .send(ask)
            .await
            .map_err(|_| Status::internal("the frame clock stopped"))?;
        rx.await
            .map_err(|_| Status::internal("the frame clock dropped a request"))?
    }

    fn queue(&self, key: Key, tick: Duration) -> mpsc::Sender<Ask> {
        let mut queues = self.queues.lock();
        if let Some(q) = queues.get(&key).filter(|q| !q.is_closed()) {
            return q.clone();
        }
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(collect(self.clone(), tick, rx));
        queues.insert(key, tx.clone());
        tx
    }
}

/// Gathers asks into batches, one tick at a time, and sends each on its own task.
async fn collect(clock: FrameClock, tick: Duration, mut rx: mpsc::Receiver<Ask>) {
    let mut pending: Vec<Ask> = Vec::new();
    // When each session last asked.
    let mut seen: HashMap<u64, Instant> = HashMap::new();
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(a) => pending.push(a),
                None => return,
            }
        }
        let now = Instant::now();
        seen.retain(|_, t| now.duration_since(*t) < PEER_WINDOW);
        for a in &pending {
            seen.insert(a.session, a.queued);
        }
        let alone = seen.len() <= 1;
        let oldest = pending.iter().map(|a| a.queued).min().unwrap_or(now);
        let until = tokio::time::Instant::from_std(oldest + tick);
        let mut frames: usize = pending.iter().map(|a| a.n).sum();
        // Every session that asked lately has its frames here: no one else is coming.
        let everyone = |pending: &[Ask], seen: &HashMap<u64, Instant>| {
            seen.keys().all(|s| pending.iter().any(|a| a.session == *s))
        };
        while !alone && frames < clock.max_batch && !everyone(&pending, &seen) {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(a)) => {
                    seen.insert(a.session, a.queued);
                    frames += a.n;
                    pending.push(a);
                }
                Ok(None) | Err(_) => break,
            }
        }
        while let Ok(a) = rx.try_recv() {
            seen.insert(a.session, a.queued);
            pending.push(a);
        }
        pending.sort_by_key(|a| a.due);
        let sizes: Vec<usize> = pending.iter().map(|a| a.n).collect();
        let taken = choose(&sizes, clock.max_batch);
        let (mut batch, mut rest) = (Vec::new(), Vec::new());
        for (a, take) in pending.drain(..).zip(taken) {
            if take {
                batch.push(a);
            } else {
                rest.push(a);
            }
        }
        pending = rest;
        let n = batch.iter().map(|a| a.n).sum();
        tokio::spawn(run(clock.clone(), batch, n));
    }
}

/// Which requests (their frame counts, in due order) the next batch takes: the frames due
/// first, whole requests, up to `max` frames (a first request larger than `max` goes alone);
/// later requests that fit the room left go too. What is not taken waits for the next batch.
fn choose(sizes: &[usize], max: usize) -> Vec<bool> {
    let mut n = 0;
    sizes
        .iter()
        .map(|&k| {
            let take = n == 0 || n + k <= max;
            if take {
                n += k;
            }
            take
        })
        .collect()
}

/// One request for every frame of `batch`; each ask gets its rows of the answer, or the error.
async fn run(clock: FrameClock, batch: Vec<Ask>, n: usize) {
    let sent = Instant::now();
    let m = &clock.metrics;
    m.face_batch_requests.observe(batch.len() as f64);
    m.face_batch_frames.observe(n as f64);
    for a in &batch {
        m.frame_clock_wait_seconds
            .observe(sent.duration_since(a.queued).as_secs_f64());
    }
    if batch.len() == 1 {
        let a = batch.into_iter().next().expect("one ask");
        let result = clock
            .client
            .infer(a.request, Some(&a.faces), &a.expected, a.deadline)
            .await;
        let _ = a.reply.send(result);
        return;
    }
    let (request, faces, expected, deadline) = merge(&batch, n);
    let result = clock
        .client
        .infer(request, Some(&faces), &expected, deadline)
        .await;
    let sizes: Vec<usize> = batch.iter().map(|a| a.n).collect();
    let shares = result.and_then(|r| split(r, &sizes));
    match shares {
        Ok(shares) => {
            for (a, share) in batch.into_iter().zip(shares) {
                let _ = a.reply.send(Ok(share));
            }
        }
        Err(s) => {
            for a in batch {
                let _ = a
                    .reply
                    .send(Err(Status::new(s.code(), s.message().to_string())));
            }
        }
    }
}

/// One request holding the asks' frames end to end (they share a [`Key`]: the same inputs,
/// the same face tensor), with the latest of their deadlines.
fn merge(batch: &[Ask], n: usize) -> (ModelInferRequest, CachedInput, Expected, Option<Instant>) {
    let first = &batch[0];
    let mut request = first.request.clone();
    request.id = format!("{} (+{} more)", first.request.id, batch.len() - 1);
    for input in &mut request.inputs {
        if let Some(b) = input.shape.first_mut() {
            *b = n as i64;
        }
    }
    request.raw_input_contents = (0..first.request.raw_input_contents.len())
        .map(|j| {
            let mut all = bytes::BytesMut::new();
            for a in batch {
                if let Some(part) = a.request.raw_input_contents.get(j) {
                    all.extend_from_slice(part);
                }
            }
            all.freeze()
        })
        .collect();
    let faces = CachedInput {
        input: first.faces.input,
        source: first.faces.source.clone(),
        rows: batch
            .iter()
            .flat_map(|a| a.faces.rows.iter().copied())
            .collect(),
    };
    let expected = Expected {
        output: first.expected.output.clone(),
        bytes: batch.iter().map(|a| a.expected.bytes).sum(),
        i420: first.expected.i420,
    };
    let deadline = crate::inference::latest_deadline(batch.iter().map(|a| a.deadline));
    (request, faces, expected, deadline)
}

/// The answer to a merged request cut back into one answer per ask (`sizes`: each ask's
/// frames, in the merged order): every output's rows split in proportion.
fn split(response: ModelInferResponse, sizes: &[usize]) -> Result<Vec<ModelInferResponse>, Status> {
    let total: usize = sizes.iter().sum();
    let mut shares: Vec<ModelInferResponse> = sizes
        .iter()
        .map(|&k| {
            let mut r = response.clone();
            r.raw_output_contents.clear();
            for o in &mut r.outputs {
                if let Some(b) = o.shape.first_mut() {
                    *b = k as i64;
                }
            }
            r
        })
        .collect();
    for (j, raw) in response.raw_output_contents.iter().enumerate() {
        if total == 0 || raw.len() % total != 0 {
            return Err(Status::internal(format!(
                "output {j} of the merged batch is {} bytes, not a whole number of rows for {total} frames",
                raw.len()
            )));
        }
        let per = raw.len() / total;
        let mut at = 0;
        for (share, &k) in shares.iter_mut().zip(sizes) {
            share.raw_output_contents.push(raw.slice(at..at + k * per));
            at += k * per;
        }
    }
    Ok(shares)
}

#[cfg(test)]
mod tests {
    use super::*;
    use framecast_proto::kserve::model_infer_response::InferOutputTensor;

    /// `auto` holds batches for GPU-served models only; a number holds them for every model.
    #[test]
    fn the_tick_follows_the_device() {
        let auto: FrameTick = "auto".parse().unwrap();
        assert_eq!(auto.for_model(true), crate::render::DEFAULT_FRAME_TICK);
        assert_eq!(auto.for_model(false), Duration::ZERO);
        let fixed: FrameTick = "25".parse().unwrap();
        assert_eq!(fixed.for_model(false), Duration::from_millis(25));
        assert!("1001".parse::<FrameTick>().is_err() && "soon".parse::<FrameTick>().is_err());
        assert_eq!(auto.to_string(), "auto");
    }

    /// A session with a backlog (a request of 8 frames due later) does not crowd out the
    /// frames due now: requests go by due time, whole, and what fits the room left joins.
    #[test]
    fn batches_take_the_frames_due_first() {
        // In due order: three live sessions' single frames, then the backlog's 8.
        assert_eq!(choose(&[1, 1, 1, 8], 8), [true, true, true, false]);
        assert_eq!(choose(&[1, 8, 1, 1], 8), [true, false, true, true]);
        // A request larger than a batch still goes, alone.
        assert_eq!(choose(&[12, 1], 8), [true, false]);
        assert_eq!(choose(&[], 8), Vec::<bool>::new());
    }

    /// A merged answer of 2 + 3 frames, 4 bytes a row, is cut at the asks' boundaries, with
    /// each share's shape saying its own frame count; a size that is no whole number of rows
    /// is an error, not a short share.
    #[test]
    fn answers_split_at_the_asks_rows() {
        let response = ModelInferResponse {
            outputs: vec![InferOutputTensor {
                name: "out".into(),
                datatype: "UINT8".into(),
                shape: vec![5, 4],
                ..Default::default()
            }],
            raw_output_contents: vec![bytes::Bytes::from((0u8..20).collect::<Vec<_>>())],
            ..Default::default()
        };
        let shares = split(response.clone(), &[2, 3]).unwrap();
        assert_eq!(
            shares[0].raw_output_contents[0].as_ref(),
            &(0u8..8).collect::<Vec<_>>()[..]
        );
        assert_eq!(
            shares[1].raw_output_contents[0].as_ref(),
            &(8u8..20).collect::<Vec<_>>()[..]
        );
        assert_eq!(shares[0].outputs[0].shape, vec![2, 4]);
        assert_eq!(shares[1].outputs[0].shape, vec![3, 4]);
        assert!(split(response, &[2, 4]).is_err());
    }
}

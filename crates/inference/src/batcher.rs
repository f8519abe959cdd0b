//! Dynamic batching: requests of 1..N elements queue per model; each worker thread takes the
//! oldest, adds more until the batch is full, reaches one of the model's preferred sizes, or
//! the oldest has waited `max_queue_delay_us`, runs the model once, and splits the outputs
//! back to the callers in order.
//!
//! Workers are OS threads (libtorch calls block), one per instance; they share one MPMC queue,
//! so a free instance always takes the next batch. What runs a batch is a
//! [`Backend`]: the batcher is tested with plain Rust ones.

use crate::backend::{Backend, BackendError, ExecTimings, Executed, Payload};
use crate::config::ModelConfig;
use crate::shared_memory::Window;
use crate::stats::ModelStats;
use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// One validated request: `inputs[i]` is the payload for config input `i`.
pub struct Job {
    pub batch: usize,
    pub inputs: Vec<Payload>,
    /// Per config output, how the request wants its share.
    pub deliver: Vec<Delivery>,
    pub enqueued: Instant,
    /// Dropped unexecuted if still queued at this instant.
    pub deadline: Option<Instant>,
    pub reply: oneshot::Sender<Result<JobOutput, JobError>>,
}

/// How a request wants its share of one output. The default: back in
/// [`JobOutput::outputs`], as the model made it.
#[derive(Clone, Default)]
pub struct Delivery {
    /// Written into this shared-memory window instead (straight from the batch's output
    /// tensor, no copy in between).
    pub window: Option<Window>,
    /// As I420 ([`framecast_proto::i420`]) of images of (height, width): converted by the
    /// backend where every request of the batch asks for it, else by `deliver` for the
    /// requests that do.
    pub i420: Option<(usize, usize)>,
}

impl Job {
    /// How config output `output` goes to this job: its window, its I420 image size.
    fn delivery(&self, output: usize) -> (Option<&Window>, Option<(usize, usize)>) {
        self.deliver
            .get(output)
            .map_or((None, None), |d| (d.window.as_ref(), d.i420))
    }
}

/// Why a queued request produced no output.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("request waited {:.1} ms in the queue, past its deadline", waited.as_secs_f64() * 1e3)]
    Expired { waited: Duration },
    #[error("queue full ({capacity} requests waiting); retry later or add replicas")]
    QueueFull { capacity: usize },
    /// The model's workers are gone (it is being unloaded).
    #[error("{0}")]
    Stopped(&'static str),
    /// The backend failed the batch the request rode in.
    #[error(transparent)]
    Failed(#[from] BackendError),
    /// The output was computed but could not be written into the request's shared memory.
    #[error("output '{output}': shared memory: {source}")]
    Delivery {
        output: String,
        #[source]
        source: framecast_proto::shm::ShmError,
    },
}

/// A request's share of a batch's outputs, one buffer per config output (empty for those
/// delivered into shared memory), in the format it asked for.
pub struct JobOutput {
    pub outputs: Vec<Bytes>,
    pub queue: Duration,
    pub compute: ExecTimings,
    /// Elements in the batch this request rode in.
    pub batch_size: usize,
}

/// Creates the queue shared by a model's workers, holding at most `capacity` requests.
pub fn queue(capacity: usize) -> (Sender<Job>, Receiver<Job>) {
    crossbeam_channel::bounded(capacity.max(1))
}

/// Starts one worker thread named `name`. `start` runs on that thread and builds its backend
/// (loading and warming a model); its outcome, with the report `start` makes (how long the
/// warm-up took, what it cost), comes back on the returned channel before the worker takes its
/// first request. The worker returns when
/// every sender of `rx` is dropped.
pub fn spawn_worker<B, R, S>(
    name: String,
    start: S,
    config: Arc<ModelConfig>,
    stats: Arc<ModelStats>,
    rx: Receiver<Job>,
) -> Result<std::sync::mpsc::Receiver<Result<R, String>>, String>
where
    B: Backend,
    R: Send + 'static,
    S: FnOnce() -> Result<(B, R), String> + Send + 'static,
{
    let (ready, started) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || match start() {
            Ok((backend, report)) => {
                let _ = ready.send(Ok(report));
                run_worker(backend, &config, &stats, rx);
            }
            Err(e) => {
                let _ = ready.send(Err(e));
            }
        })
        .map_err(|e| format!("cannot start worker thread: {e}"))?;
    Ok(started)
}

/// Forward loop of one instance; returns when every sender is dropped.
fn run_worker<B: Backend>(model: B, config: &ModelConfig, stats: &ModelStats, rx: Receiver<Job>) {
    let delay = Duration::from_micros(config.max_queue_delay_us);
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        let Some(first) = live(first, stats) else {
            continue;
        };
        let deadline = first.enqueued + delay;
        let mut size = first.batch;
        let mut jobs = vec![first];
        // A preferred size gathered is executed at once; short of one, keep waiting.
        while size < config.max_batch_size
            && config.preferred_batch_sizes.binary_search(&size).is_err()
        {
            match rx.recv_deadline(deadline) {
                Ok(j) => {
                    let Some(j) = live(j, stats) else { continue };
                    if size + j.batch > config.max_batch_size {
                        carried = Some(j);
                        break;
                    }
                    size += j.batch;
                    jobs.push(j);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        // Waiting for batch-mates may have outlived some deadlines: drop those unexecuted.
        let jobs: Vec<Job> = jobs.into_iter().filter_map(|j| live(j, stats)).collect();
        stats.record_queue_depth(rx.len() + usize::from(carried.is_some()));
        let size = jobs.iter().map(|j| j.batch).sum();
        if size > 0 {
            execute(&model, config, stats, size, jobs);
        }
    }
}

/// The job, unless it should not run: its caller has gone (nobody would read the result), or
/// its deadline has passed (answered DEADLINE_EXCEEDED instead).
fn live(job: Job, stats: &ModelStats) -> Option<Job> {
    if job.reply.is_closed() {
        tracing::debug!(
            batch = job.batch,
            "request dropped unexecuted: its caller has gone"
        );
        return None;
    }
    match job.deadline {
        Some(d) if Instant::now() >= d => {
            let waited = job.enqueued.elapsed();
            stats.record_failure(waited);
            let _ = job.reply.send(Err(JobError::Expired { waited }));
            None
        }
        _ => Some(job),
    }
}

fn execute<B: Backend>(
    model: &B,
    config: &ModelConfig,
    stats: &ModelStats,
    size: usize,
    jobs: Vec<Job>,
) {
    let started = Instant::now();
    let n_inputs = jobs[0].inputs.len();
    let inputs: Vec<Vec<Payload>> = (0..n_inputs)
        .map(|i| jobs.iter().map(|j| j.inputs[i].clone()).collect())
        .collect();
    // Converted on the device only where the whole batch wants it; a mixed batch gets the
    // model's own output and the I420 requests convert theirs on the host.
    let i420: Vec<bool> = (0..config.outputs.len())
        .map(|o| jobs.iter().all(|j| j.delivery(o).1.is_some()))
        .collect();
    for j in &jobs {
        stats.record_queue(started - j.enqueued);
    }
    match model.execute(size, &inputs, &i420) {
        Ok(executed) => {
            let t = Instant::now();
            let shares = deliver(config, &executed, size, &jobs);
            // Writing into shared memory is the last step of producing the output, as in
            // Triton's compute-output time.
            let mut timings = executed.timings;
            timings.output += t.elapsed();
            stats.record_execution(
                size,
                jobs.len(),
                timings.input,
                timings.infer,
                timings.output,
            );
            for (job, share) in jobs.into_iter().zip(shares) {
                let reply = match share {
                    Ok(outputs) => {
                        stats.record_success(job.enqueued.elapsed());
                        Ok(JobOutput {
                            outputs,
                            queue: started - job.enqueued,
                            compute: timings,
                            batch_size: size,
                        })
                    }
                    Err(e) => {
                        stats.record_failure(job.enqueued.elapsed());
                        Err(e)
                    }
                };
                let _ = job.reply.send(reply);
            }
            free_later(executed);
        }
        Err(e) => {
            tracing::error!(error = %e, cause = ?std::error::Error::source(&e), batch = size, "model execution failed");
            for job in jobs {
                stats.record_failure(job.enqueued.elapsed());
                let _ = job.reply.send(Err(JobError::Failed(e.clone())));
            }
        }
    }
}

/// Frees a batch's tensors on a thread of their own. Handing tens of MB of pages back to the
/// kernel takes milliseconds (measured in docs/performance.md), which neither the batch's callers nor the next batch in the queue should wait for. At most two
/// batches wait to be freed; past that the worker frees its own, so memory stays bounded.
///
/// The same thread gives freed heap back to the system once batches stop for
/// [`TRIM_AFTER_IDLE`]: glibc keeps what a burst of requests freed in its arenas (its mmap
/// threshold rises with the sizes it sees, so later tensor-sized blocks come from the heap),
/// and without a trim the process stays at its peak after the burst is over.
fn free_later(spent: Executed) {
    static FREER: OnceLock<Option<Sender<Executed>>> = OnceLock::new();
    let freer = FREER.get_or_init(|| {
        let (tx, rx) = crossbeam_channel::bounded::<Executed>(2);
        std::thread::Builder::new()
            .name("batch-free".into())
            .spawn(move || free_and_trim(rx))
            .ok()
            .map(|_| tx)
    });
    if let Some(tx) = freer {
        // Full (or the thread gone): free it here, as without the thread.
        let _ = tx.try_send(spent);
    }
}

/// How long without a batch before freed heap is returned to the system.
pub const TRIM_AFTER_IDLE: Duration = Duration::from_secs(1);

fn free_and_trim(rx: Receiver<Executed>) {
    // FRAMECAST_MALLOC_TRIM=0 turns the trim off (for measuring what it saves).
    let trim = std::env::var("FRAMECAST_MALLOC_TRIM").map_or(true, |v| v != "0");
    let mut freed_since_trim = false;
    loop {
        match rx.recv_timeout(TRIM_AFTER_IDLE) {
            Ok(spent) => {
                drop(spent);
                freed_since_trim = true;
            }
            Err(RecvTimeoutError::Timeout) => {
                if trim && freed_since_trim {
                    // SAFETY: malloc_trim only returns free memory; it is thread-safe.
                    unsafe { libc::malloc_trim(0) };
                    freed_since_trim = false;
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Splits a batch's outputs among its jobs, in order: each job's share is written into its
/// shared-memory window, or returned as a slice of one buffer shared by the batch (`Bytes`
/// slices, no copy per request). A share asked for as I420 that the backend did not convert
/// (the batch was mixed) is converted here, one place for both ways it leaves.
fn deliver(
    config: &ModelConfig,
    executed: &Executed,
    size: usize,
    jobs: &[Job],
) -> Vec<Result<Vec<Bytes>, JobError>> {
    let outputs = &executed.outputs;
    let mut shares: Vec<Result<Vec<Bytes>, JobError>> = jobs
        .iter()
        .map(|_| Ok(Vec::with_capacity(outputs.len())))
        .collect();
    for (o, out) in outputs.iter().enumerate() {
        let converted = executed.i420.get(o).copied().unwrap_or(false);
        let all = out.as_bytes();
        let per = all.len() / size;
        // The share a job takes as it is: I420 the backend made, or the model's own format.
        let as_is = |j: &Job| converted || j.delivery(o).1.is_none();
        let wants_slice = jobs.iter().any(|j| j.delivery(o).0.is_none() && as_is(j));
        let buffer = if wants_slice {
            Bytes::copy_from_slice(all)
        } else {
            Bytes::new()
        };
        let mut offset = 0;
        for (job, share) in jobs.iter().zip(&mut shares) {
            let range = offset * per..(offset + job.batch) * per;
            offset += job.batch;
            let Ok(parts) = share else { continue };
            let (window, i420) = job.delivery(o);
            let converted_here = match i420 {
                Some((h, w)) if !converted => Some(Bytes::from(
                    framecast_proto::i420::from_planar_rgb(&all[range.clone()], job.batch, h, w),
                )),
                _ => None,
            };
            match (window, converted_here) {
                (Some(window), here) => {
                    match window.write(here.as_deref().unwrap_or(&all[range])) {
                        Ok(()) => parts.push(Bytes::new()),
                        Err(source) => {
                            *share = Err(JobError::Delivery {
                                output: config.outputs[o].name.clone(),
                                source,
                            });
                        }
                    }
                }
                (None, Some(here)) => parts.push(here),
                (None, None) => parts.push(buffer.slice(range)),
            }
        }
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TensorSpec;
    use crate::metrics::Metrics;
    use framecast_proto::tensor::DataType;
    use parking_lot::Mutex;

    /// Copies its one input to its one output and remembers each batch's size.
    struct Echo {
        batches: Arc<Mutex<Vec<usize>>>,
        fail: bool,
    }

    impl Backend for Echo {
        fn execute(
            &self,
            batch: usize,
            inputs: &[Vec<Payload>],
            _: &[bool],
        ) -> Result<Executed, BackendError> {
            self.batches.lock().push(batch);
            if self.fail {
                return Err(BackendError::new("echo refused the batch"));
            }
            Ok(echoed(inputs))
        }
    }

    const ELEMENT: usize = 4;

    /// One UINT8 input `x` and output `y` of [`ELEMENT`] bytes.
    fn echo_config(max_batch: usize, delay_us: u64) -> ModelConfig {
        let spec = |name: &str| TensorSpec {
            name: name.into(),
            datatype: DataType::U8,
            dims: vec![ELEMENT as i64],
            normalize: crate::config::Normalize::Off,
            bgr: false,
        };
        let mut config = ModelConfig::new(max_batch, vec![spec("x")], vec![spec("y")]);
        config.max_queue_delay_us = delay_us;
        config
    }

    /// Its one input, as its one output.
    fn echoed(inputs: &[Vec<Payload>]) -> Executed {
        let out: Vec<u8> = inputs[0]
            .iter()
            .flat_map(|b| b.to_bytes().to_vec())
            .collect();
        Executed {
            outputs: vec![Box::new(out)],
            i420: Vec::new(),
            timings: ExecTimings::default(),
            spent: None,
        }
    }

    struct Worker {
        tx: Sender<Job>,
        batches: Arc<Mutex<Vec<usize>>>,
    }

    /// A worker over `Echo` (max batch 4, waiting up to `delay_ms` for batch-mates), with
    /// `queued` jobs already in its queue when it starts.
    fn worker(delay_ms: u64, fail: bool, queued: Vec<Job>) -> Worker {
        let config = echo_config(4, delay_ms * 1000);
        let stats = Arc::new(ModelStats::new(&Metrics::new(), "echo"));
        let (tx, rx) = queue(16);
        for j in queued {
            tx.send(j).unwrap();
        }
        let batches = Arc::new(Mutex::new(Vec::new()));
        let backend = Echo {
            batches: batches.clone(),
            fail,
        };
        let ready = spawn_worker(
            "echo".into(),
            move || Ok((backend, Duration::ZERO)),
            Arc::new(config),
            stats,
            rx,
        )
        .unwrap();
        ready.recv().unwrap().unwrap();
        Worker { tx, batches }
    }

    type Reply = oneshot::Receiver<Result<JobOutput, JobError>>;

    /// A job of `batch` elements whose bytes are all `fill`.
    fn job(batch: usize, fill: u8, deadline: Option<Instant>) -> (Job, Reply) {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            batch,
            inputs: vec![Payload::Bytes(Bytes::from(vec![fill; batch * ELEMENT]))],
            deliver: vec![Delivery::default()],
            enqueued: Instant::now(),
            deadline,
            reply,
        };
        (job, rx)
    }

    fn wait(rx: Reply) -> Result<JobOutput, JobError> {
        rx.blocking_recv().expect("the worker dropped a reply")
    }

    /// Takes `pause` per batch and records which instance ran it.
    struct Slow {
        id: usize,
        ran: Arc<Mutex<Vec<usize>>>,
        pause: Duration,
    }

    impl Backend for Slow {
        fn execute(
            &self,
            _: usize,
            inputs: &[Vec<Payload>],
            _: &[bool],
        ) -> Result<Executed, BackendError> {
            std::thread::sleep(self.pause);
            self.ran.lock().push(self.id);
            Ok(echoed(inputs))
        }
    }

    /// Two instances on one queue (`--instances 2`, or two devices): while one runs a batch
    /// the other takes the next, and every request is answered once.
    #[test]
    fn instances_share_one_queue_and_a_batch_goes_to_whichever_is_free() {
        let config = Arc::new(echo_config(4, 0));
        let stats = Arc::new(ModelStats::new(&Metrics::new(), "slow"));
        let (tx, rx) = queue(16);
        let ran = Arc::new(Mutex::new(Vec::new()));
        for id in 0..2 {
            let backend = Slow {
                id,
                ran: ran.clone(),
                pause: Duration::from_millis(100),
            };
            let ready = spawn_worker(
                format!("slow-{id}"),
                move || Ok((backend, Duration::ZERO)),
                config.clone(),
                stats.clone(),
                rx.clone(),
            )
            .unwrap();
            ready.recv().unwrap().unwrap();
        }
        let replies: Vec<(u8, Reply)> = (1..=6u8)
            .map(|fill| {
                let (j, r) = job(4, fill, None);
                tx.send(j).unwrap();
                (fill, r)
            })
            .collect();
        for (fill, r) in replies {
            let out = wait(r).unwrap();
            assert_eq!(out.outputs[0], vec![fill; 4 * ELEMENT]);
        }
        let ran = ran.lock().clone();
        assert_eq!(ran.len(), 6, "each full request is one batch");
        assert!(
            ran.contains(&0) && ran.contains(&1),
            "one instance did all: {ran:?}"
        );
    }

    /// With a preferred size of 2, two requests run as soon as both are queued, long before a
    /// 10 s batching delay; a third waits for company.
    #[test]
    fn a_preferred_batch_size_runs_without_waiting_out_the_delay() {
        let mut config = echo_config(8, 10_000_000);
        config.preferred_batch_sizes = vec![2];
        let stats = Arc::new(ModelStats::new(&Metrics::new(), "preferred"));
        let (tx, rx) = queue(16);
        let batches = Arc::new(Mutex::new(Vec::new()));
        let backend = Echo {
            batches: batches.clone(),
            fail: false,
        };
        let ready = spawn_worker(
            "preferred".into(),
            move || Ok((backend, Duration::ZERO)),
            Arc::new(config),
            stats,
            rx,
        )
        .unwrap();
        ready.recv().unwrap().unwrap();
        let (a, ra) = job(1, 1, None);
        let (b, rb) = job(1, 2, None);
        tx.send(a).unwrap();
        tx.send(b).unwrap();
        let started = Instant::now();
        assert_eq!(wait(ra).unwrap().batch_size, 2);
        assert_eq!(wait(rb).unwrap().batch_size, 2);
        // The 10 s delay was not waited out (a bound, not a speed claim).
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(*batches.lock(), [2]);
    }

    #[test]
    fn concurrent_requests_share_a_batch_and_each_gets_its_own_share() {
        let w = worker(200, false, Vec::new());
        let replies: Vec<(u8, Reply)> = (1..=3u8)
            .map(|fill| {
                let (j, rx) = job(1, fill, None);
                w.tx.send(j).unwrap();
                (fill, rx)
            })
            .collect();
        for (fill, rx) in replies {
            let out = wait(rx).unwrap();
            assert_eq!(out.outputs[0].as_ref(), &[fill; ELEMENT]);
            assert_eq!(out.batch_size, 3);
        }
        assert_eq!(*w.batches.lock(), [3]);
    }

    #[test]
    fn a_request_that_does_not_fit_is_carried_to_the_next_batch() {
        let (a, ra) = job(3, 1, None);
        let (b, rb) = job(2, 2, None);
        let w = worker(50, false, vec![a, b]);
        assert_eq!(wait(ra).unwrap().outputs[0].len(), 3 * ELEMENT);
        assert_eq!(wait(rb).unwrap().outputs[0].as_ref(), &[2; 2 * ELEMENT]);
        assert_eq!(*w.batches.lock(), [3, 2]);
    }

    #[test]
    fn expired_requests_and_requests_whose_caller_left_are_not_computed() {
        let (late, r_late) = job(1, 1, Some(Instant::now()));
        let (gone, r_gone) = job(1, 2, None);
        drop(r_gone);
        let (live, r_live) = job(1, 3, None);
        let w = worker(0, false, vec![late, gone, live]);
        assert!(matches!(wait(r_late), Err(JobError::Expired { .. })));
        assert_eq!(wait(r_live).unwrap().outputs[0].as_ref(), &[3; ELEMENT]);
        // Neither the expired request nor the abandoned one reached the backend.
        assert_eq!(*w.batches.lock(), [1]);
    }

    #[test]
    fn a_failed_batch_fails_every_request_in_it() {
        let (a, ra) = job(1, 1, None);
        let (b, rb) = job(2, 2, None);
        let _w = worker(50, true, vec![a, b]);
        for rx in [ra, rb] {
            match wait(rx) {
                Err(JobError::Failed(e)) => assert!(e.to_string().contains("echo refused"), "{e}"),
                other => panic!("expected a failure, got {:?}", other.map(|o| o.batch_size)),
            }
        }
    }

    /// A mixed batch (one request wants I420, one the model's own RGB, and the backend
    /// converted nothing): each request gets its share in its own format.
    #[test]
    fn a_mixed_batch_gives_each_request_its_format() {
        let config = echo_config(4, 0);
        // Two images of 3 x 2 x 2 per request, planar RGB.
        let rgb: Vec<u8> = (0..2 * 2 * 12).map(|i| (i * 11 % 256) as u8).collect();
        let executed = Executed {
            outputs: vec![Box::new(rgb.clone())],
            i420: Vec::new(),
            timings: ExecTimings::default(),
            spent: None,
        };
        let job = |i420: Option<(usize, usize)>| Job {
            batch: 2,
            inputs: Vec::new(),
            deliver: vec![Delivery { window: None, i420 }],
            enqueued: Instant::now(),
            deadline: None,
            reply: oneshot::channel().0,
        };
        let jobs = [job(Some((2, 2))), job(None)];
        let shares = deliver(&config, &executed, 4, &jobs);
        let first = &shares[0].as_ref().unwrap()[0];
        let second = &shares[1].as_ref().unwrap()[0];
        assert_eq!(
            first.as_ref(),
            framecast_proto::i420::from_planar_rgb(&rgb[..24], 2, 2, 2)
        );
        assert_eq!(second.as_ref(), &rgb[24..]);
    }
}

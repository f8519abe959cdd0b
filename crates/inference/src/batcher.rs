//! Dynamic batching: requests of 1..N elements queue per model; each worker thread takes the
//! oldest, adds more until the batch is full or the oldest has waited `max_queue_delay_us`,
//! runs the model once, and splits the outputs back to the callers in order.
//!
//! Workers are OS threads (libtorch calls block), one per instance; they share one MPMC queue,
//! so a free instance always takes the next batch.

use crate::config::ModelConfig;
use crate::shared_memory::Slot;
use crate::stats::ModelStats;
use crate::torch_model::{ExecTimings, Executed, HostOutput, TorchModel};
use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// One validated request: `inputs[i]` is the payload for config input `i`.
pub struct Job {
    pub batch: usize,
    pub inputs: Vec<Bytes>,
    /// Per config output: the shared-memory slot the worker writes this request's share
    /// into (straight from the batch's output tensor, no copy in between), or `None` to get
    /// it back in [`JobOutput::outputs`].
    pub deliver: Vec<Option<Slot>>,
    pub enqueued: Instant,
    /// Dropped unexecuted if still queued at this instant.
    pub deadline: Option<Instant>,
    pub reply: oneshot::Sender<Result<JobOutput, JobError>>,
}

impl Job {
    /// The shared-memory slot config output `output` goes to, if any.
    fn slot(&self, output: usize) -> Option<&Slot> {
        self.deliver.get(output).and_then(Option::as_ref)
    }
}

/// Why a queued request produced no output.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    #[error("request waited {waited:?} in the queue, past its deadline")]
    Expired { waited: Duration },
    #[error("queue full ({capacity} requests waiting)")]
    QueueFull { capacity: usize },
    #[error("{0}")]
    Failed(String),
}

/// A request's share of a batch's outputs, one buffer per config output (empty for those
/// delivered into shared memory).
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

/// Forward loop of one instance; returns when every sender is dropped.
pub fn run_worker(
    model: TorchModel,
    config: Arc<ModelConfig>,
    stats: Arc<ModelStats>,
    rx: Receiver<Job>,
) {
    let _no_grad = tch::no_grad_guard();
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
        let Some(first) = live(first, &stats) else {
            continue;
        };
        let deadline = first.enqueued + delay;
        let mut size = first.batch;
        let mut jobs = vec![first];
        while size < config.max_batch_size {
            match rx.recv_deadline(deadline) {
                Ok(j) => {
                    let Some(j) = live(j, &stats) else { continue };
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
        let jobs: Vec<Job> = jobs.into_iter().filter_map(|j| live(j, &stats)).collect();
        stats.record_queue_depth(rx.len() + usize::from(carried.is_some()));
        let size = jobs.iter().map(|j| j.batch).sum();
        if size > 0 {
            execute(&model, &config, &stats, size, jobs);
        }
    }
}

/// Answers an expired job instead of running it; its client has stopped waiting.
fn live(job: Job, stats: &ModelStats) -> Option<Job> {
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

fn execute(
    model: &TorchModel,
    config: &ModelConfig,
    stats: &ModelStats,
    size: usize,
    jobs: Vec<Job>,
) {
    let started = Instant::now();
    let n_inputs = jobs[0].inputs.len();
    let inputs: Vec<Vec<Bytes>> = (0..n_inputs)
        .map(|i| jobs.iter().map(|j| j.inputs[i].clone()).collect())
        .collect();
    for j in &jobs {
        stats.record_queue(started - j.enqueued);
    }
    match model.execute(size, &inputs) {
        Ok(executed) => {
            let t = Instant::now();
            let shares = deliver(config, &executed.outputs, size, &jobs);
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
                        Err(JobError::Failed(e))
                    }
                };
                let _ = job.reply.send(reply);
            }
            free_later(executed);
        }
        Err(e) => {
            tracing::error!(error = %e, batch = size, "model execution failed");
            for job in jobs {
                stats.record_failure(job.enqueued.elapsed());
                let _ = job.reply.send(Err(JobError::Failed(e.clone())));
            }
        }
    }
}

/// Frees a batch's tensors on a thread of their own. Handing tens of MB of pages back to the
/// kernel takes milliseconds (4-5 ms for a 24-frame batch on the development machine), which
/// neither the batch's callers nor the next batch in the queue should wait for. At most two
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
/// shared-memory slot, or returned as a slice of one buffer shared by the batch (`Bytes`
/// slices, no copy per request).
fn deliver(
    config: &ModelConfig,
    outputs: &[HostOutput],
    size: usize,
    jobs: &[Job],
) -> Vec<Result<Vec<Bytes>, String>> {
    let mut shares: Vec<Result<Vec<Bytes>, String>> = jobs
        .iter()
        .map(|_| Ok(Vec::with_capacity(outputs.len())))
        .collect();
    for (o, out) in outputs.iter().enumerate() {
        let all = out.as_bytes();
        let per = all.len() / size;
        let wants_bytes = jobs.iter().any(|j| j.slot(o).is_none());
        let buffer = if wants_bytes {
            Bytes::copy_from_slice(all)
        } else {
            Bytes::new()
        };
        let mut offset = 0;
        for (job, share) in jobs.iter().zip(&mut shares) {
            let range = offset * per..(offset + job.batch) * per;
            offset += job.batch;
            let Ok(parts) = share else { continue };
            match job.slot(o) {
                Some(slot) => match slot.write(&all[range]) {
                    Ok(()) => parts.push(Bytes::new()),
                    Err(e) => {
                        let name = &config.outputs[o].name;
                        *share = Err(format!("output '{name}': shared memory: {e}"));
                    }
                },
                None => parts.push(buffer.slice(range)),
            }
        }
    }
    shares
}

//! The load engine: closed-loop concurrency levels, open-loop request rates, the sustained
//! search, and real-time sessions. Every loop is bounded in time and in count.

use crate::report::{self, Level, Outcome, Realtime, RealtimeTrial, Recorder, Window};
use crate::target::{Compositor, Target};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

/// Timing of one load level.
#[derive(Debug, Clone)]
pub struct Phase {
    pub warmup: Duration,
    pub duration: Duration,
    pub window: Duration,
    /// Hard cap on requests per level (on top of the duration).
    pub max_requests: u64,
}

struct Shared {
    recorder: Mutex<Recorder>,
    window: Mutex<Recorder>,
    measuring: AtomicBool,
    seq: AtomicU64,
}

impl Shared {
    fn new() -> Arc<Self> {
        Arc::new(Shared {
            recorder: Mutex::new(Recorder::default()),
            window: Mutex::new(Recorder::default()),
            measuring: AtomicBool::new(false),
            seq: AtomicU64::new(0),
        })
    }

    fn record(&self, o: &Outcome) {
        if self.measuring.load(Ordering::Acquire) {
            if let Ok(mut r) = self.recorder.lock() {
                r.record(o);
            }
            if let Ok(mut w) = self.window.lock() {
                w.record(o);
            }
        }
    }
}

/// Prints a progress line: in place on a terminal, every few seconds otherwise.
fn progress(label: &str, elapsed: Duration, total: Duration, r: &Recorder) {
    let line = format!(
        "{label}: {:>5.1}/{:.0} s  {} ok  {} failed  {:.1} frames/s",
        elapsed.as_secs_f64(),
        total.as_secs_f64(),
        r.succeeded,
        r.failed,
        r.frames as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = write!(err, "\r{line}   ");
        let _ = err.flush();
    } else {
        let _ = writeln!(err, "{line}");
    }
}

/// Measures windows until the phase ends; returns them.
async fn watch(shared: &Shared, phase: &Phase, label: &str, started: Instant) -> Vec<Window> {
    let mut windows = Vec::new();
    let mut window_start = Instant::now();
    while started.elapsed() < phase.duration
        && shared.seq.load(Ordering::Relaxed) < phase.max_requests
    {
        tokio::time::sleep(phase.window.min(Duration::from_millis(500))).await;
        if window_start.elapsed() >= phase.window {
            let w = std::mem::take(&mut *shared.window.lock().expect("window lock"));
            let secs = window_start.elapsed().as_secs_f64();
            windows.push(Window {
                start_s: (window_start - started).as_secs_f64(),
                frames_per_s: w.frames as f64 / secs,
                requests_per_s: w.succeeded as f64 / secs,
                p99_ms: report::Percentiles::of(&w.latency).p99,
            });
            window_start = Instant::now();
            if let Ok(r) = shared.recorder.lock() {
                progress(label, started.elapsed(), phase.duration, &r);
            }
        }
    }
    windows
}

/// Closed loop: `concurrency` workers each call back to back.
pub async fn closed_loop(target: Arc<dyn Target>, concurrency: usize, phase: &Phase) -> Level {
    let shared = Shared::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (t, shared, stop, cap) = (
            target.clone(),
            shared.clone(),
            stop.clone(),
            phase.max_requests,
        );
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
                if seq >= cap {
                    break;
                }
                let o = t.clone().call(seq).await;
                shared.record(&o);
            }
        }));
    }
    tokio::time::sleep(phase.warmup).await;
    shared.seq.store(0, Ordering::Relaxed);
    let (started, cpu0) = (Instant::now(), report::cpu_time());
    shared.measuring.store(true, Ordering::Release);
    let windows = watch(
        &shared,
        phase,
        &format!("concurrency {concurrency}"),
        started,
    )
    .await;
    shared.measuring.store(false, Ordering::Release);
    let seconds = started.elapsed().as_secs_f64();
    let cpu = (report::cpu_time() - cpu0).as_secs_f64() / seconds;
    stop.store(true, Ordering::Release);
    for w in workers {
        let _ = w.await;
    }
    let r = shared.recorder.lock().expect("recorder lock");
    Level::from_recorder(&r, concurrency, seconds, cpu, windows)
}

/// Open loop: requests start at `rate` per second (evenly spaced, or Poisson arrivals),
/// whatever the latency; at most `max_in_flight` at once, beyond which arrivals are counted
/// as `ClientOverloaded` failures rather than queued without bound.
pub async fn open_loop(
    target: Arc<dyn Target>,
    rate: f64,
    poisson: bool,
    max_in_flight: usize,
    phase: &Phase,
) -> Level {
    let shared = Shared::new();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1)));
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let started = Instant::now() + phase.warmup;
    let end = started + phase.duration;
    let (cpu0, mut next) = (report::cpu_time(), Instant::now());
    let mut windows_task = None;
    let mut tasks = Vec::new();
    while Instant::now() < end {
        if windows_task.is_none() && Instant::now() >= started {
            shared.seq.store(0, Ordering::Relaxed);
            shared.measuring.store(true, Ordering::Release);
            let (shared, phase) = (shared.clone(), phase.clone());
            windows_task = Some(tokio::spawn(async move {
                watch(&shared, &phase, "rate", Instant::now()).await
            }));
        }
        let gap = if poisson {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let u = (rng >> 11) as f64 / (1u64 << 53) as f64;
            -(1.0 - u).ln() / rate
        } else {
            1.0 / rate
        };
        next += Duration::from_secs_f64(gap);
        tokio::time::sleep_until(next.into()).await;
        let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
        if seq >= phase.max_requests {
            break;
        }
        match in_flight.clone().try_acquire_owned() {
            Ok(permit) => {
                let (t, shared) = (target.clone(), shared.clone());
                tasks.push(tokio::spawn(async move {
                    let o = t.call(seq).await;
                    shared.record(&o);
                    drop(permit);
                }));
            }
            Err(_) => shared.record(&Outcome {
                error: Some("ClientOverloaded".into()),
                ..Default::default()
            }),
        }
        tasks.retain(|t| !t.is_finished());
    }
    for t in tasks {
        let _ = t.await;
    }
    shared.measuring.store(false, Ordering::Release);
    let windows = match windows_task {
        Some(w) => w.await.unwrap_or_default(),
        None => Vec::new(),
    };
    let seconds = started.elapsed().as_secs_f64();
    let cpu = (report::cpu_time() - cpu0).as_secs_f64() / seconds.max(1e-9);
    let r = shared.recorder.lock().expect("recorder lock");
    let mut level = Level::from_recorder(&r, max_in_flight, seconds, cpu, windows);
    level.rate = Some(rate);
    level
}

/// Highest concurrency whose p99 stays under `bound`: doubles until it breaks, then bisects.
pub async fn sustained(
    target: Arc<dyn Target>,
    bound_ms: f64,
    max_concurrency: usize,
    phase: &Phase,
) -> (Option<usize>, Vec<Level>) {
    let mut levels = Vec::new();
    let ok = |l: &Level| {
        l.requests_failed == 0 && l.requests_succeeded > 0 && l.latency_ms.p99 <= bound_ms
    };
    let (mut good, mut bad) = (None::<usize>, None::<usize>);
    let mut c = 1;
    while c <= max_concurrency {
        let l = closed_loop(target.clone(), c, phase).await;
        let pass = ok(&l);
        levels.push(l);
        if pass {
            good = Some(c);
            c *= 2;
        } else {
            bad = Some(c);
            break;
        }
    }
    if let (Some(mut lo), Some(mut hi)) = (good, bad) {
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            let l = closed_loop(target.clone(), mid, phase).await;
            if ok(&l) {
                lo = mid;
            } else {
                hi = mid;
            }
            levels.push(l);
        }
        good = Some(lo);
    }
    levels.sort_by_key(|l| l.concurrency);
    (good, levels)
}

/// One real-time trial: `sessions` streams, each asking for `chunk` frames every
/// `chunk / fps` seconds as a live front end does. Frame `f` of a session must arrive by
/// `start + f / fps + deadline`.
pub async fn realtime_trial(
    target: Arc<Compositor>,
    sessions: usize,
    fps: f64,
    deadline: Duration,
    duration: Duration,
) -> RealtimeTrial {
    let chunks = ((duration.as_secs_f64() * fps) / target.chunk as f64)
        .ceil()
        .max(1.0) as u64;
    let mut handles = Vec::new();
    for s in 0..sessions {
        let t = target.clone();
        handles.push(tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let start = Instant::now();
            let chunk = t.chunk as u64;
            // Sessions start at different points of the avatar's loop.
            let offset = s as u64 * 37;
            let sender = {
                let t = t.clone();
                tokio::spawn(async move {
                    for k in 0..chunks {
                        let due = start + Duration::from_secs_f64((k * chunk) as f64 / fps);
                        tokio::time::sleep_until(due.into()).await;
                        if tx
                            .send(t.request(format!("rt-{s}-{k}"), offset + k * chunk))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                })
            };
            let mut slack = Vec::new();
            let mut errors = 0u64;
            let mut rejected = false;
            match t
                .client
                .clone()
                .render(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            {
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    let mut f = 0u64;
                    while let Some(frame) = stream.next().await {
                        match frame {
                            Ok(_) => {
                                let due = Duration::from_secs_f64(f as f64 / fps) + deadline;
                                slack.push(due.as_secs_f64() - start.elapsed().as_secs_f64());
                                f += 1;
                            }
                            Err(_) => {
                                errors += 1;
                                break;
                            }
                        }
                        if f == chunks * chunk {
                            break;
                        }
                    }
                    if f < chunks * chunk && errors == 0 {
                        errors += 1;
                    }
                }
                Err(s) if s.code() == tonic::Code::ResourceExhausted => rejected = true,
                Err(_) => errors += 1,
            }
            sender.abort();
            (slack, errors, rejected)
        }));
    }
    let mut late = report::histogram();
    let (mut frames, mut late_frames, mut errors, mut rejected) = (0, 0, 0, 0);
    let mut all = Vec::new();
    for h in handles {
        let (slack, e, r) = h.await.unwrap_or((Vec::new(), 1, false));
        errors += e;
        rejected += u64::from(r);
        frames += slack.len() as u64;
        for s in slack {
            if s < 0.0 {
                late_frames += 1;
                let _ = late.record((-s * 1e6).max(1.0) as u64);
            }
            all.push(s);
        }
    }
    all.sort_by(f64::total_cmp);
    let p1 = all.get(all.len() / 100).copied().unwrap_or(0.0) * 1e3;
    RealtimeTrial {
        sessions,
        rejected,
        expected_frames: (sessions as u64 - rejected) * chunks * target.chunk as u64,
        frames,
        late_frames,
        errors,
        lateness_ms: report::Percentiles::of(&late),
        slack_ms_p1: p1,
        passed: late_frames == 0 && errors == 0 && rejected == 0 && frames > 0,
    }
}

/// Largest session count with no late frame: doubles, then bisects; at most `max_sessions`.
pub async fn realtime(
    target: Arc<Compositor>,
    fps: f64,
    deadline: Duration,
    duration: Duration,
    max_sessions: usize,
) -> Realtime {
    let mut trials = Vec::new();
    let (mut good, mut bad) = (0usize, None::<usize>);
    let mut n = 1;
    while n <= max_sessions {
        eprintln!("realtime: {n} sessions for {:.0} s", duration.as_secs_f64());
        let t = realtime_trial(target.clone(), n, fps, deadline, duration).await;
        let pass = t.passed;
        trials.push(t);
        if pass {
            good = n;
            if n == max_sessions {
                break;
            }
            n = (n * 2).min(max_sessions);
        } else {
            bad = Some(n);
            break;
        }
    }
    if let Some(mut hi) = bad {
        let mut lo = good;
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            eprintln!(
                "realtime: {mid} sessions for {:.0} s",
                duration.as_secs_f64()
            );
            let t = realtime_trial(target.clone(), mid, fps, deadline, duration).await;
            if t.passed {
                lo = mid;
            } else {
                hi = mid;
            }
            trials.push(t);
        }
        good = lo;
    }
    trials.sort_by_key(|t| t.sessions);
    Realtime {
        fps,
        chunk: target.chunk,
        deadline_ms: deadline.as_secs_f64() * 1e3,
        max_sessions: good,
        trials,
    }
}

//! What a run measured: latency histogram, counts, errors by status, windows over time,
//! server stages, client CPU; printed as a table, written as JSON and CSV.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1e3;
        Percentiles {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
            mean: h.mean() / 1e3,
        }
    }
}

/// Microsecond histogram from 1 us to 1 hour, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}

/// Accumulates calls as they finish.
pub struct Recorder {
    pub latency: Histogram<u64>,
    pub ttff: Histogram<u64>,
    pub sent: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub frames: u64,
    pub errors: BTreeMap<String, u64>,
    /// Server-reported stage time sums in microseconds, and frames they cover.
    pub stages: BTreeMap<String, u64>,
    pub stage_frames: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            latency: histogram(),
            ttff: histogram(),
            sent: 0,
            succeeded: 0,
            failed: 0,
            frames: 0,
            errors: BTreeMap::new(),
            stages: BTreeMap::new(),
            stage_frames: 0,
        }
    }
}

/// One finished call.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub latency: Duration,
    pub ttff: Option<Duration>,
    pub frames: u64,
    /// gRPC code name on failure.
    pub error: Option<String>,
    /// Stage name -> summed microseconds over this call's frames.
    pub stages: Vec<(&'static str, u64)>,
    pub stage_frames: u64,
}

impl Recorder {
    pub fn record(&mut self, o: &Outcome) {
        self.sent += 1;
        match &o.error {
            None => {
                self.succeeded += 1;
                self.frames += o.frames;
                let _ = self.latency.record(o.latency.as_micros().max(1) as u64);
                if let Some(t) = o.ttff {
                    let _ = self.ttff.record(t.as_micros().max(1) as u64);
                }
                for (k, v) in &o.stages {
                    *self.stages.entry(k.to_string()).or_default() += v;
                }
                self.stage_frames += o.stage_frames;
            }
            Some(code) => {
                self.failed += 1;
                *self.errors.entry(code.clone()).or_default() += 1;
            }
        }
    }
}

/// Throughput of one measurement window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Window {
    pub start_s: f64,
    pub frames_per_s: f64,
    pub requests_per_s: f64,
    pub p99_ms: f64,
}

/// The result of one load level.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Level {
    pub concurrency: usize,
    /// Offered request rate for `rate` mode.
    pub rate: Option<f64>,
    pub seconds: f64,
    pub requests_sent: u64,
    pub requests_succeeded: u64,
    pub requests_failed: u64,
    pub frames: u64,
    pub frames_per_s: f64,
    pub requests_per_s: f64,
    pub latency_ms: Percentiles,
    pub time_to_first_frame_ms: Percentiles,
    pub errors: BTreeMap<String, u64>,
    /// Mean server-side milliseconds per frame by stage.
    pub server_stages_ms: BTreeMap<String, f64>,
    /// Client CPU time / wall time (1.0 = one core busy).
    pub client_cpu_cores: f64,
    pub windows: Vec<Window>,
    /// Last three windows within 10% of their mean.
    pub stable: bool,
}

impl Level {
    pub fn from_recorder(
        r: &Recorder,
        concurrency: usize,
        seconds: f64,
        cpu: f64,
        windows: Vec<Window>,
    ) -> Self {
        let stable = windows.len() >= 3 && {
            let last = &windows[windows.len() - 3..];
            let mean = last.iter().map(|w| w.frames_per_s).sum::<f64>() / 3.0;
            mean > 0.0
                && last
                    .iter()
                    .all(|w| (w.frames_per_s - mean).abs() <= 0.1 * mean)
        };
        Level {
            concurrency,
            rate: None,
            seconds,
            requests_sent: r.sent,
            requests_succeeded: r.succeeded,
            requests_failed: r.failed,
            frames: r.frames,
            frames_per_s: r.frames as f64 / seconds.max(1e-9),
            requests_per_s: r.succeeded as f64 / seconds.max(1e-9),
            latency_ms: Percentiles::of(&r.latency),
            time_to_first_frame_ms: Percentiles::of(&r.ttff),
            errors: r.errors.clone(),
            server_stages_ms: r
                .stages
                .iter()
                .map(|(k, &us)| (k.clone(), us as f64 / 1e3 / r.stage_frames.max(1) as f64))
                .collect(),
            client_cpu_cores: cpu,
            windows,
            stable,
        }
    }
}

/// Real-time capacity search result.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Realtime {
    pub fps: f64,
    pub chunk: u32,
    pub deadline_ms: f64,
    /// Largest number of sessions whose every frame arrived before its deadline.
    pub max_sessions: usize,
    pub trials: Vec<RealtimeTrial>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RealtimeTrial {
    pub sessions: usize,
    /// Sessions the compositor refused at once with RESOURCE_EXHAUSTED (its `--max-streams`
    /// admission limit); they asked for no frame and are not counted in `errors`.
    #[serde(default)]
    pub rejected: u64,
    /// Frames the admitted sessions asked for; `expected_frames - frames` were lost.
    #[serde(default)]
    pub expected_frames: u64,
    pub frames: u64,
    pub late_frames: u64,
    pub errors: u64,
    /// Lateness (arrival minus deadline) of late frames, ms.
    pub lateness_ms: Percentiles,
    /// Slack (deadline minus arrival) of every frame, ms; negative means late.
    pub slack_ms_p1: f64,
    pub passed: bool,
}

/// Everything a run reports; what `--json` writes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub target: String,
    pub mode: String,
    pub url: String,
    pub levels: Vec<Level>,
    pub realtime: Option<Realtime>,
    /// For `sustained`: highest concurrency whose p99 stayed under the bound.
    pub sustained_concurrency: Option<usize>,
}

impl Report {
    pub fn print(&self) {
        println!("\n{} {} against {}", self.target, self.mode, self.url);
        if !self.levels.is_empty() {
            println!(
                "{:>5} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6}",
                "conc",
                "frames/s",
                "req/s",
                "p50 ms",
                "p90 ms",
                "p95 ms",
                "p99 ms",
                "max ms",
                "ttff ms",
                "errors",
                "cpu"
            );
            for l in &self.levels {
                println!(
                    "{:>5} {:>9.1} {:>9.2} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>6} {:>6.2}{}",
                    l.concurrency,
                    l.frames_per_s,
                    l.requests_per_s,
                    l.latency_ms.p50,
                    l.latency_ms.p90,
                    l.latency_ms.p95,
                    l.latency_ms.p99,
                    l.latency_ms.max,
                    l.time_to_first_frame_ms.p50,
                    l.requests_failed,
                    l.client_cpu_cores,
                    if l.stable { "" } else { "  (unstable)" }
                );
            }
            if let Some(l) = self.levels.last() {
                if !l.server_stages_ms.is_empty() {
                    let stages: Vec<String> = l
                        .server_stages_ms
                        .iter()
                        .map(|(k, v)| format!("{k} {v:.2}"))
                        .collect();
                    println!(
                        "server stages, ms per frame (last level): {}",
                        stages.join(", ")
                    );
                }
                if !l.errors.is_empty() {
                    println!("errors by status (last level): {:?}", l.errors);
                }
            }
        }
        if let Some(c) = self.sustained_concurrency {
            println!("sustained: highest concurrency within the p99 bound: {c}");
        }
        if let Some(rt) = &self.realtime {
            println!(
                "realtime at {} fps, chunks of {}, deadline {:.0} ms after each frame's play time",
                rt.fps, rt.chunk, rt.deadline_ms
            );
            for t in &rt.trials {
                println!(
                    "  {:>4} sessions ({} rejected): {:>6} frames, {:>4} lost, {:>5} late, {:>3} errors, worst lateness {:>7.1} ms, 1st-percentile slack {:>7.1} ms  {}",
                    t.sessions,
                    t.rejected,
                    t.frames,
                    t.expected_frames.saturating_sub(t.frames),
                    t.late_frames,
                    t.errors,
                    t.lateness_ms.max,
                    t.slack_ms_p1,
                    if t.passed { "pass" } else { "FAIL" }
                );
            }
            println!(
                "real-time capacity: {} concurrent sessions",
                rt.max_sessions
            );
        }
    }

    /// One CSV row per level (and per realtime trial).
    pub fn csv(&self) -> String {
        let mut s = String::from("kind,concurrency,rate,seconds,sent,succeeded,failed,frames,frames_per_s,requests_per_s,p50_ms,p90_ms,p95_ms,p99_ms,max_ms,ttff_p50_ms,client_cpu_cores,late_frames\n");
        for l in &self.levels {
            s += &format!(
                "level,{},{},{:.3},{},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},\n",
                l.concurrency,
                l.rate.map(|r| r.to_string()).unwrap_or_default(),
                l.seconds,
                l.requests_sent,
                l.requests_succeeded,
                l.requests_failed,
                l.frames,
                l.frames_per_s,
                l.requests_per_s,
                l.latency_ms.p50,
                l.latency_ms.p90,
                l.latency_ms.p95,
                l.latency_ms.p99,
                l.latency_ms.max,
                l.time_to_first_frame_ms.p50,
                l.client_cpu_cores
            );
        }
        if let Some(rt) = &self.realtime {
            for t in &rt.trials {
                s += &format!(
                    "realtime,{},,,,,{},{},,,,,,,{:.3},,,{}\n",
                    t.sessions, t.errors, t.frames, t.lateness_ms.max, t.late_frames
                );
            }
        }
        s
    }
}

/// CPU time (user + system) this process has used.
pub fn cpu_time() -> Duration {
    cpu_time_of(None).unwrap_or_default()
}

/// CPU time (user + system) process `pid` (`None`: this one) has used, from /proc.
pub fn cpu_time_of(pid: Option<u32>) -> Result<Duration, String> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("{path}: unreadable stat line"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after the name and state.
    let (Some(utime), Some(stime)) = (ticks(11), ticks(12)) else {
        return Err(format!("{path}: unreadable stat line"));
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos((utime + stime) * 1_000_000_000 / hz))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut r = Recorder::default();
        // 1..=1000 ms, uniformly: p50 = 500, p90 = 900, p99 = 990, max = 1000.
        for ms in 1..=1000u64 {
            r.record(&Outcome {
                latency: Duration::from_millis(ms),
                frames: 2,
                ..Default::default()
            });
        }
        for _ in 0..10 {
            r.record(&Outcome {
                error: Some("unavailable".into()),
                ..Default::default()
            });
        }
        let l = Level::from_recorder(&r, 4, 10.0, 0.5, Vec::new());
        let close = |a: f64, b: f64| (a - b).abs() <= b * 0.002 + 0.01;
        assert!(close(l.latency_ms.p50, 500.0), "{:?}", l.latency_ms);
        assert!(close(l.latency_ms.p90, 900.0), "{:?}", l.latency_ms);
        assert!(close(l.latency_ms.p95, 950.0), "{:?}", l.latency_ms);
        assert!(close(l.latency_ms.p99, 990.0), "{:?}", l.latency_ms);
        assert!(close(l.latency_ms.max, 1000.0), "{:?}", l.latency_ms);
        assert_eq!(l.requests_sent, 1010);
        assert_eq!(l.requests_succeeded + l.requests_failed, l.requests_sent);
        assert_eq!(l.errors.get("unavailable"), Some(&10));
        assert_eq!(l.frames, 2000);
        assert!((l.frames_per_s - 200.0).abs() < 1e-9);
    }

    #[test]
    fn json_parses_back() {
        let report = Report {
            target: "compositor".into(),
            mode: "quick".into(),
            url: "http://127.0.0.1:1".into(),
            levels: vec![Level {
                concurrency: 2,
                frames_per_s: 12.5,
                ..Default::default()
            }],
            realtime: Some(Realtime {
                max_sessions: 3,
                ..Default::default()
            }),
            sustained_concurrency: None,
        };
        let text = serde_json::to_string_pretty(&report).unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back, report);
        assert!(report.csv().lines().count() >= 2);
    }

    #[test]
    fn cpu_time_advances() {
        let t0 = cpu_time();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(cpu_time() > t0);
    }
}

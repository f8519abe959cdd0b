//! Admission by measured margin: a new session is admitted only while the sessions already
//! running hold their frame rate and the host has the CPU one more needs. `--max-sessions`
//! stays the hard cap; this refuses earlier, at once, when the machine is already full.
//!
//! Every second the gateway takes a [`Sample`]: each session's frame counters and the host's
//! CPU time. The verdict compares the newest sample with the one [`WINDOW`] before it:
//! - a connected session that dropped or lost frames in the window, or sent fewer than 90% of
//!   its frame rate, is falling behind: nothing more is admitted until none is;
//! - the host's free cores must cover what one session costs (the busy cores above what the
//!   host keeps busy with no session open, over the sessions open: everything else on the
//!   host counted, a conservative estimate when the compositor and the inference service
//!   share the host, as on one machine) times `--admission-headroom`.
//!
//! Work done once for every session (encoding an avatar's shared stream: its first pass of
//! the loop, paid by whichever session reaches a frame first) is taken out of a session's
//! cost: counted in, it made the first session of a burst look two to three times what a
//! session costs, and admission took a third of what the host holds.
//!
//! The CPU lags the admissions (a session costs only once it is connected and streaming), so
//! sessions admitted in the last two windows count against the free cores at the last
//! measured cost each: a burst of offers takes what the margin holds, not every place up to
//! the cap. Before any session's cost has been measured, one session is admitted per two
//! windows.
//!
//! A refused offer gets 503 with `Retry-After` (the window) and the reason, counted as
//! `session_requests_total{outcome="no_margin"}`.

use framecast_telemetry::host_cpu::{self, CpuTimes};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The span a verdict looks back over.
pub const WINDOW: Duration = Duration::from_secs(2);

/// Fraction of its frame rate a session must send in the window.
const MIN_RATE: f64 = 0.9;

/// What admission looks at of one session.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    pub sent: u64,
    /// Dropped by the pacer and lost between the compositor and the encoder.
    pub missed: u64,
    pub fps: f64,
    /// The browser is connected (before that no frame is expected).
    pub connected: bool,
}

/// The gateway at one moment.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub cpu: Option<CpuTimes>,
    /// CPU time spent so far on work shared by every session ([`crate::idle_video`]'s
    /// encodes onto the shared streams).
    pub shared: Duration,
    pub sessions: HashMap<String, Counters>,
}

/// Cores spent on shared work between `old` and `new`.
fn shared_cores(old: &Sample, new: &Sample) -> f64 {
    let span = new.at.saturating_duration_since(old.at).as_secs_f64();
    if span <= 0.0 {
        return 0.0;
    }
    new.shared.saturating_sub(old.shared).as_secs_f64() / span
}

/// Whether one more session may come, and if not why (for the 503's body).
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Admit,
    Refuse(String),
}

/// The verdict from `old` to `new` on a host of `cores`, one session needing its measured
/// share of the cores busy above `idle` and the shared work times `headroom` (0: CPU not
/// considered).
pub fn judge(old: &Sample, new: &Sample, cores: f64, headroom: f64, idle: f64) -> Verdict {
    let span = new.at.saturating_duration_since(old.at).as_secs_f64();
    if span <= 0.0 {
        return Verdict::Admit;
    }
    let mut ids: Vec<&String> = new.sessions.keys().collect();
    ids.sort();
    for id in ids {
        let (n, Some(o)) = (&new.sessions[id], old.sessions.get(id)) else {
            continue;
        };
        if !(n.connected && o.connected) {
            continue;
        }
        let missed = n.missed.saturating_sub(o.missed);
        if missed > 0 {
            return Verdict::Refuse(format!(
                "no margin: session {id} missed {missed} frames in the last {span:.1} s; try again later"
            ));
        }
        let rate = n.sent.saturating_sub(o.sent) as f64 / span;
        if rate < MIN_RATE * n.fps {
            return Verdict::Refuse(format!(
                "no margin: session {id} sent {rate:.1} frames/s of its {:.0} in the last {span:.1} s; try again later",
                n.fps
            ));
        }
    }
    let open = new.sessions.len();
    let above = idle + shared_cores(old, new);
    match host_cpu::short_of(old.cpu, new.cpu, cores, open, headroom, above, "session") {
        Some(why) => Verdict::Refuse(why),
        None => Verdict::Admit,
    }
}

/// The samples of the last window and the verdict they give.
pub struct Admission {
    headroom: f64,
    cores: f64,
    samples: std::collections::VecDeque<Sample>,
    verdict: Verdict,
    /// Free cores at the last sample, and the cores one connected session cost (the last
    /// time one was measured).
    free: Option<f64>,
    cost: Option<f64>,
    /// Sessions admitted lately, not yet in the CPU figures.
    recent: std::collections::VecDeque<Instant>,
    /// What the host keeps busy with no session open.
    idle: host_cpu::Idle,
}

impl Admission {
    /// `headroom`: see [`judge`].
    pub fn new(headroom: f64) -> Self {
        Admission {
            headroom,
            cores: host_cpu::cores(),
            samples: Default::default(),
            verdict: Verdict::Admit,
            free: None,
            cost: None,
            recent: Default::default(),
            idle: Default::default(),
        }
    }

    /// One more session, if the margin holds it (it is then counted as admitted); else why not.
    pub fn admit(&mut self) -> Result<(), String> {
        if let Verdict::Refuse(why) = &self.verdict {
            return Err(why.clone());
        }
        let now = Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > 2 * WINDOW)
        {
            self.recent.pop_front();
        }
        if self.headroom > 0.0 {
            let pending = self.recent.len();
            match (self.free, self.cost) {
                (Some(free), Some(one)) => {
                    let need = one * self.headroom * (pending + 1) as f64;
                    if free < need {
                        return Err(format!(
                            "no margin: {free:.2} cores were free; {pending} sessions admitted in the last {} s are not in that figure yet, and with this one they need about {need:.2} (a session costs about {one:.2}, times --admission-headroom {}); try again later",
                            (2 * WINDOW).as_secs(),
                            self.headroom
                        ));
                    }
                }
                _ if pending > 0 => {
                    return Err(format!(
                        "no margin known yet: what a session costs here is not measured; one session every {} s until it is; try again later",
                        (2 * WINDOW).as_secs()
                    ));
                }
                _ => {}
            }
        }
        self.recent.push_back(now);
        Ok(())
    }

    /// Takes a sample of `sessions` now and judges it against the one a window before.
    /// `shared`: CPU time spent so far on work shared by every session.
    pub fn sample(&mut self, sessions: HashMap<String, Counters>, shared: Duration) {
        let now = Sample {
            at: Instant::now(),
            cpu: CpuTimes::now(),
            shared,
            sessions,
        };
        while self
            .samples
            .get(1)
            .is_some_and(|s| now.at.saturating_duration_since(s.at) >= WINDOW)
        {
            self.samples.pop_front();
        }
        self.verdict = match self.samples.front() {
            Some(old) if now.at.saturating_duration_since(old.at) >= WINDOW / 2 => {
                if let (Some(a), Some(b)) = (old.cpu, now.cpu) {
                    if let Some(busy) = b.busy_cores_since(&a, self.cores) {
                        self.free = Some((self.cores - busy).max(0.0));
                        let open = old.sessions.len().max(now.sessions.len());
                        self.idle.observe(now.at, busy, open + self.recent.len());
                        // A session's cost from the busy cores only while every open session
                        // streams at its rate through the window: one connecting costs next to
                        // nothing yet and would make the others look cheap.
                        let span = now.at.saturating_duration_since(old.at).as_secs_f64();
                        let steady = now
                            .sessions
                            .iter()
                            .filter(|(id, c)| {
                                old.sessions.get(*id).is_some_and(|o| {
                                    o.connected
                                        && c.connected
                                        && c.sent.saturating_sub(o.sent) as f64
                                            >= MIN_RATE * c.fps * span
                                })
                            })
                            .count();
                        if steady > 0 && steady == now.sessions.len() {
                            let above = self.idle.cores() + shared_cores(old, &now);
                            self.cost = Some(host_cpu::share(busy, above, steady));
                        }
                    }
                }
                let verdict = judge(old, &now, self.cores, self.headroom, self.idle.cores());
                tracing::debug!(free = ?self.free, cost = ?self.cost, ?verdict, "admission sample");
                verdict
            }
            _ => Verdict::Admit,
        };
        self.samples.push_back(now);
    }

    pub fn verdict(&self) -> &Verdict {
        &self.verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: Instant, cpu: (u64, u64), sessions: &[(&str, u64, u64)]) -> Sample {
        Sample {
            at,
            cpu: Some(CpuTimes {
                busy: cpu.0,
                total: cpu.1,
            }),
            shared: Duration::ZERO,
            sessions: sessions
                .iter()
                .map(|&(id, sent, missed)| {
                    let c = Counters {
                        sent,
                        missed,
                        fps: 25.0,
                        connected: true,
                    };
                    (id.to_string(), c)
                })
                .collect(),
        }
    }

    /// Sessions at their rate on a host with room: admitted. One that missed frames, or sent
    /// too few, or a host without a session's worth of free cores: refused, saying which.
    #[test]
    fn the_verdict_follows_the_sessions_and_the_cpu() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(2);
        let old = sample(t0, (0, 0), &[("a", 0, 0), ("b", 0, 0)]);
        // Two sessions, 50 frames each in 2 s; half of 2 cores busy: 1.5 free, 0.5 each.
        let fine = sample(t1, (100, 200), &[("a", 50, 0), ("b", 50, 0)]);
        assert_eq!(judge(&old, &fine, 2.0, 1.25, 0.0), Verdict::Admit);
        let missed = sample(t1, (100, 200), &[("a", 50, 0), ("b", 49, 1)]);
        let Verdict::Refuse(why) = judge(&old, &missed, 2.0, 1.25, 0.0) else {
            panic!("a session missed a frame");
        };
        assert!(why.contains("session b missed 1 frames"), "{why}");
        let slow = sample(t1, (100, 200), &[("a", 50, 0), ("b", 40, 0)]);
        let Verdict::Refuse(why) = judge(&old, &slow, 2.0, 1.25, 0.0) else {
            panic!("a session is slow");
        };
        assert!(
            why.contains("session b sent 20.0 frames/s of its 25"),
            "{why}"
        );
        // 1.6 of 2 cores busy: 0.4 free, a session costs 0.8.
        let full = sample(t1, (160, 200), &[("a", 50, 0), ("b", 50, 0)]);
        let Verdict::Refuse(why) = judge(&old, &full, 2.0, 1.25, 0.0) else {
            panic!("no CPU left");
        };
        assert!(why.contains("0.40 of 2 cores free"), "{why}");
        assert_eq!(
            judge(&old, &full, 2.0, 0.0, 0.0),
            Verdict::Admit,
            "headroom 0: CPU ignored"
        );
        // The same load with 0.6 cores busy when no session was open: a session costs 0.5,
        // and 0.4 free does not hold 0.625 either; with 1.2 of it idle, 0.2 does.
        assert!(matches!(
            judge(&old, &full, 2.0, 1.25, 0.6),
            Verdict::Refuse(_)
        ));
        assert_eq!(judge(&old, &full, 2.0, 1.25, 1.2), Verdict::Admit);
        // 1.2 of the 1.6 busy cores went on the shared stream's encodes: a session costs
        // 0.2, which 0.4 free holds.
        let mut shared = full.clone();
        shared.shared = Duration::from_millis(2400);
        assert_eq!(judge(&old, &shared, 2.0, 1.25, 0.0), Verdict::Admit);
        // A session not yet connected is not judged; a new one has no old counters.
        let mut waiting = sample(t1, (100, 200), &[("a", 50, 0), ("c", 0, 0)]);
        waiting.sessions.get_mut("a").unwrap().connected = false;
        assert_eq!(judge(&old, &waiting, 2.0, 1.25, 0.0), Verdict::Admit);
    }

    /// No sample a window old yet (start-up): the first session is admitted, and no more
    /// until what one costs is measured.
    #[test]
    fn without_history_one_session_is_admitted_at_a_time() {
        let mut a = Admission::new(1.25);
        a.sample(HashMap::new(), Duration::ZERO);
        assert_eq!(a.verdict(), &Verdict::Admit);
        assert!(a.admit().is_ok());
        let why = a.admit().unwrap_err();
        assert!(why.contains("not measured"), "{why}");
        // Headroom 0 (frame rates only): no CPU accounting.
        let mut b = Admission::new(0.0);
        assert!(b.admit().is_ok() && b.admit().is_ok());
    }

    /// A burst of offers takes what the free cores hold at the measured cost, not more.
    #[test]
    fn a_burst_takes_what_the_margin_holds() {
        let mut a = Admission::new(1.0);
        a.free = Some(1.0);
        a.cost = Some(0.3);
        assert!(a.admit().is_ok() && a.admit().is_ok() && a.admit().is_ok());
        let why = a.admit().unwrap_err();
        assert!(why.contains("3 sessions admitted"), "{why}");
    }
}

//! The host's CPU, as admission control reads it: how many cores were busy over a span, from
//! `/proc/stat` (Linux; elsewhere nothing is known and admission does not use it).

/// Cumulative CPU time of the host, in clock ticks: (busy, total).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

impl CpuTimes {
    /// Now, from the `cpu` line of `/proc/stat`; `None` where there is none.
    pub fn now() -> Option<CpuTimes> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        parse(stat.lines().next()?)
    }

    /// Cores busy on average between `earlier` and `self`, of `cores`.
    pub fn busy_cores_since(&self, earlier: &CpuTimes, cores: f64) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let busy = self.busy.checked_sub(earlier.busy)?;
        (total > 0).then(|| busy as f64 / total as f64 * cores)
    }
}

/// CPU time the calling thread has used so far (Linux `CLOCK_THREAD_CPUTIME_ID`): what a
/// piece of work cost the host, unlike its wall time, which grows when the cores are busy.
pub fn thread_cpu() -> Option<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is, and reads nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// Why the host cannot take one more unit of work (a session, a stream) between `old` and
/// `new`: its free cores are fewer than one unit's share of the busy ones (`units` running)
/// times `headroom`. A unit's share is of the cores busy above `idle`, what the host keeps
/// busy with none open ([`Idle`]). `None`: it can, or nothing is known (no units, no CPU
/// figures).
pub fn short_of(
    old: Option<CpuTimes>,
    new: Option<CpuTimes>,
    cores: f64,
    units: usize,
    headroom: f64,
    idle: f64,
    unit: &str,
) -> Option<String> {
    if headroom <= 0.0 || units == 0 {
        return None;
    }
    let busy = new?.busy_cores_since(&old?, cores)?;
    let free = (cores - busy).max(0.0);
    let one = share(busy, idle, units);
    (free < one * headroom).then(|| {
        format!(
            "no margin: the host has {free:.2} of {cores:.0} cores free; a {unit} costs about {one:.2} here (busy cores above the {idle:.2} busy with none open or on work shared by all, over {units} {unit}s) and the admission headroom asks {headroom}x that; try again later"
        )
    })
}

/// One unit's share of `busy` cores with `units` open: what is busy above `idle`, over them.
pub fn share(busy: f64, idle: f64, units: usize) -> f64 {
    (busy - idle).max(0.0) / units.max(1) as f64
}

/// How long an idle figure counts: the host's other load changes.
const IDLE_KEPT: std::time::Duration = std::time::Duration::from_secs(300);

/// What the host keeps busy with no unit of work open (the services idling, whatever else
/// runs there): the least figure of the last five minutes, 0 until one is seen. Without it
/// one open unit is charged with the idle cost of everything on the host, and admission
/// refuses sessions the host would hold (on the 2-core test machine, 1 of 12 offers where 6
/// sessions held). The least, so a busy moment of something else is not taken for idle.
#[derive(Debug, Default)]
pub struct Idle {
    seen: std::collections::VecDeque<(std::time::Instant, f64)>,
}

impl Idle {
    /// `busy` cores over a span ending `at` in which `units` were open.
    pub fn observe(&mut self, at: std::time::Instant, busy: f64, units: usize) {
        if units == 0 {
            self.seen.push_back((at, busy));
        }
        while self
            .seen
            .front()
            .is_some_and(|(t, _)| at.saturating_duration_since(*t) > IDLE_KEPT)
        {
            self.seen.pop_front();
        }
    }

    /// Busy cores with nothing open.
    pub fn cores(&self) -> f64 {
        let least = self.seen.iter().map(|(_, b)| *b).reduce(f64::min);
        least.unwrap_or(0.0)
    }
}

/// `--admission-headroom`: a factor (0..=100), or `off` (`None`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Headroom(pub Option<f64>);

impl Headroom {
    pub fn parse(s: &str) -> Result<Headroom, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Headroom(None));
        }
        match s.parse::<f64>() {
            Ok(h) if h.is_finite() && (0.0..=100.0).contains(&h) => Ok(Headroom(Some(h))),
            _ => Err(format!("{s:?} is neither off nor a factor in 0..=100")),
        }
    }
}

/// The cores this process may run on.
pub fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

/// `cpu  user nice system idle iowait irq softirq steal ...`: idle and iowait are not busy.
fn parse(line: &str) -> Option<CpuTimes> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4];
    Some(CpuTimes {
        busy: total - idle,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_line_gives_busy_and_total_ticks() {
        let t = parse("cpu  100 5 50 800 20 3 2 10 0 0").unwrap();
        assert_eq!(
            t,
            CpuTimes {
                busy: 170,
                total: 990
            }
        );
        let later = CpuTimes {
            busy: 270,
            total: 1190,
        };
        assert_eq!(later.busy_cores_since(&t, 2.0), Some(1.0));
        assert!(parse("intr 1 2 3").is_none() && parse("cpu 1 2").is_none());
        assert!(CpuTimes::now().is_some(), "this test runs on Linux");
    }

    /// The idle figure is the least seen with nothing open, forgotten after five minutes; a
    /// unit's share is of what is busy above it.
    #[test]
    fn a_unit_is_charged_above_what_the_host_keeps_busy_idle() {
        let t = std::time::Instant::now();
        let s = std::time::Duration::from_secs;
        let mut idle = Idle::default();
        assert_eq!(idle.cores(), 0.0);
        idle.observe(t, 0.3, 0);
        idle.observe(t + s(1), 0.2, 0);
        idle.observe(t + s(2), 1.5, 2);
        assert_eq!(idle.cores(), 0.2);
        idle.observe(t + s(400), 0.25, 0);
        assert_eq!(
            idle.cores(),
            0.25,
            "figures past five minutes count no more"
        );
        assert!((share(0.8, 0.2, 2) - 0.3).abs() < 1e-9);
        assert_eq!(share(0.1, 0.2, 1), 0.0);
        // 0.8 of 2 cores busy, 0.2 of it idle, one unit: 1.2 free, a unit costs 0.6.
        let (a, b) = (
            CpuTimes { busy: 0, total: 0 },
            CpuTimes {
                busy: 80,
                total: 200,
            },
        );
        assert!(short_of(Some(a), Some(b), 2.0, 1, 1.9, 0.2, "session").is_none());
        let why = short_of(Some(a), Some(b), 2.0, 1, 2.5, 0.2, "session").unwrap();
        assert!(why.contains("costs about 0.60"), "{why}");
        assert!(short_of(Some(a), Some(b), 2.0, 1, 2.0, 0.0, "session").is_some());
    }
}

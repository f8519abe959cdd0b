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

/// Why the host cannot take one more unit of work (a session, a stream) between `old` and
/// `new`: its free cores are fewer than one unit's share of the busy ones (`units` running)
/// times `headroom`. `None`: it can, or nothing is known (no units, no CPU figures).
pub fn short_of(
    old: Option<CpuTimes>,
    new: Option<CpuTimes>,
    cores: f64,
    units: usize,
    headroom: f64,
    unit: &str,
) -> Option<String> {
    if headroom <= 0.0 || units == 0 {
        return None;
    }
    let busy = new?.busy_cores_since(&old?, cores)?;
    let free = (cores - busy).max(0.0);
    let one = busy / units as f64;
    (free < one * headroom).then(|| {
        format!(
            "no margin: the host has {free:.2} of {cores:.0} cores free; a {unit} costs about {one:.2} here (busy cores over {units} {unit}s) and the admission headroom asks {headroom}x that; try again later"
        )
    })
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
}

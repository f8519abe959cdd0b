//! Stage-timing summaries: medians and tail percentiles of the per-frame timings.

use framecast_proto::compositor::v1::StageTimings;

#[derive(Default)]
pub struct Summary {
    queue: Vec<u64>,
    inference: Vec<u64>,
    blend: Vec<u64>,
    encode: Vec<u64>,
    total: Vec<u64>,
}

/// The `q` quantile (0..=1) by nearest rank; `None` for no samples.
pub fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

impl Summary {
    pub fn add(&mut self, t: &StageTimings) {
        self.queue.push(t.queue_us);
        self.inference.push(t.inference_us);
        self.blend.push(t.blend_us);
        self.encode.push(t.encode_us);
        self.total.push(t.total_us);
    }

    pub fn print(&mut self) {
        println!("stage (ms)         p50      p90      p99      max");
        for (name, v) in [
            ("queue", &mut self.queue),
            ("inference rtt", &mut self.inference),
            ("resize+blend", &mut self.blend),
            ("jpeg encode", &mut self.encode),
            ("end to end", &mut self.total),
        ] {
            v.sort_unstable();
            let p = |q| percentile(v, q).unwrap_or(0) as f64 / 1e3;
            println!(
                "{name:<14} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                p(0.5),
                p(0.9),
                p(0.99),
                p(1.0)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[], 0.5), None);
    }
}

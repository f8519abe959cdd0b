//! A model's speed with no server in front: the same `TorchModel::execute` the batcher calls
//! (wire bytes to the device, forward, bytes back), in a loop on the calling thread. Set beside
//! `framecast-bench kserve` against a server on the same host, the difference is what serving
//! costs (gRPC, queueing, batching).

use crate::backend::{Backend, ExecTimings, Payload};
use crate::config::ModelConfig;
use crate::torch_model::TorchModel;
use bytes::Bytes;
use std::path::Path;
use std::time::{Duration, Instant};

/// One batch size's figures.
#[derive(Debug, Clone)]
pub struct Timing {
    pub batch: usize,
    /// Executions timed (after one untimed warm-up).
    pub runs: usize,
    pub frames_per_s: f64,
    /// Medians per execution.
    pub median: ExecTimings,
}

/// Loads `dir` onto `device` and times `execute` at each of `batches` (each at most the
/// model's `max_batch_size`) for about `seconds` each, with zero-filled inputs.
pub fn time(
    dir: &Path,
    device: tch::Device,
    batches: &[usize],
    seconds: f64,
) -> Result<Vec<Timing>, String> {
    let config = ModelConfig::load(dir).map_err(|e| e.to_string())?;
    let max = config.max_batch_size;
    if let Some(b) = batches.iter().find(|&&b| b == 0 || b > max) {
        return Err(format!(
            "batch: {b} is outside 1..={max} (the model's max_batch_size)"
        ));
    }
    let model = TorchModel::load(dir, config, device)?;
    let budget = Duration::from_secs_f64(seconds.max(0.0));
    batches
        .iter()
        .map(|&batch| {
            let inputs: Vec<Vec<Payload>> = model
                .config()
                .inputs
                .iter()
                .map(|t| {
                    vec![Payload::Bytes(Bytes::from(vec![
                        0u8;
                        t.element_bytes() * batch
                    ]))]
                })
                .collect();
            model.warm_up(batch)?;
            let mut runs: Vec<ExecTimings> = Vec::new();
            let started = Instant::now();
            while runs.is_empty() || started.elapsed() < budget {
                let done = model
                    .execute(batch, &inputs, &[])
                    .map_err(|e| e.to_string())?;
                runs.push(done.timings);
            }
            let elapsed = started.elapsed().as_secs_f64();
            let median = |f: fn(&ExecTimings) -> Duration| {
                let mut v: Vec<Duration> = runs.iter().map(f).collect();
                v.sort_unstable();
                v[v.len() / 2]
            };
            Ok(Timing {
                batch,
                runs: runs.len(),
                frames_per_s: (runs.len() * batch) as f64 / elapsed,
                median: ExecTimings {
                    input: median(|t| t.input),
                    infer: median(|t| t.infer),
                    output: median(|t| t.output),
                },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zoo::{self, Builtin, ZooOptions};

    #[test]
    fn times_each_batch_and_refuses_batches_the_model_cannot_take() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = ZooOptions {
            crop: 32,
            max_batch_size: 4,
            max_queue_delay_us: 0,
        };
        let dir = zoo::write(tmp.path(), Builtin::Passthrough, &opts).unwrap();
        let t = time(&dir, tch::Device::Cpu, &[1, 4], 0.05).unwrap();
        assert_eq!(t.iter().map(|t| t.batch).collect::<Vec<_>>(), [1, 4]);
        for t in &t {
            assert!(t.runs >= 1 && t.frames_per_s > 0.0, "{t:?}");
        }
        let e = time(&dir, tch::Device::Cpu, &[5], 0.05).unwrap_err();
        assert!(e.contains("batch: 5 is outside 1..=4"), "{e}");
    }
}

//! GPU utilisation and memory from NVML: exported per CUDA device the server runs on, and
//! measured around each model load so the memory budget charges what a model really took.
//!
//! `nvml-wrapper` loads the NVIDIA driver's library at run time: on a host without the driver
//! there are simply no GPU metrics and no measurements (the budget keeps its estimates), and
//! nothing fails.

use crate::metrics::Metrics;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// How often the GPUs are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Samples each CUDA device of `devices` every [`SAMPLE_EVERY`] on a thread of its own, for
/// the life of the process. Returns false, having started nothing, when no device is a CUDA
/// one or NVML cannot be loaded.
pub fn watch(metrics: Arc<Metrics>, devices: &[tch::Device]) -> bool {
    let mut indices: Vec<u32> = devices
        .iter()
        .filter_map(|d| match d {
            tch::Device::Cuda(i) => Some(*i as u32),
            _ => None,
        })
        .collect();
    indices.sort_unstable();
    indices.dedup();
    if indices.is_empty() {
        return false;
    }
    let Some(nvml) = nvml() else {
        return false;
    };
    let spawned = std::thread::Builder::new()
        .name("gpu-metrics".into())
        .spawn(move || loop {
            for &i in &indices {
                let label = format!("cuda:{i}");
                let Ok(device) = nvml.device_by_index(i) else {
                    continue;
                };
                if let Ok(u) = device.utilization_rates() {
                    metrics
                        .gpu_utilization
                        .with_label_values(&[&label])
                        .set(u.gpu as f64 / 100.0);
                }
                if let Ok(m) = device.memory_info() {
                    metrics
                        .gpu_memory_used_bytes
                        .with_label_values(&[&label])
                        .set(m.used as i64);
                    metrics
                        .gpu_memory_total_bytes
                        .with_label_values(&[&label])
                        .set(m.total as i64);
                }
            }
            std::thread::sleep(SAMPLE_EVERY);
        });
    spawned.is_ok()
}

/// The process's NVML handle, initialised on first use; `None` without the NVIDIA driver.
fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(|| match Nvml::init() {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::info!(error = %e, "NVML unavailable: no GPU metrics or measurements");
            None
        }
    })
    .as_ref()
}

/// Device memory in use on CUDA device `index`: this process's own where NVML lists it, else
/// (a container whose PIDs NVML cannot map) the whole device's.
fn memory_in_use(nvml: &Nvml, index: u32) -> Option<u64> {
    let device = nvml.device_by_index(index).ok()?;
    let me = std::process::id();
    let own = device.running_compute_processes().ok().and_then(|ps| {
        ps.into_iter()
            .find_map(|p| match (p.pid == me, p.used_gpu_memory) {
                (true, UsedGpuMemory::Used(b)) => Some(b),
                _ => None,
            })
    });
    own.or_else(|| device.memory_info().ok().map(|m| m.used))
}

/// Runs `load` (a model's load and warm-up on `device`) and returns, with its result, the
/// device memory it grew by: `None` on the CPU or without NVML. Loads on one device are
/// serialised here so one load's growth is not another's. The figure is what the CUDA caching
/// allocator took from the device for the weights and the warm-up's activations, so it can
/// only overstate (another model's first large batch at the same moment), never understate.
pub fn measure_load<T>(device: tch::Device, load: impl FnOnce() -> T) -> (T, Option<u64>) {
    let (tch::Device::Cuda(index), Some(nvml)) = (device, nvml()) else {
        return (load(), None);
    };
    static LOCKS: OnceLock<Mutex<HashMap<usize, Arc<Mutex<()>>>>> = OnceLock::new();
    let lock = LOCKS
        .get_or_init(Default::default)
        .lock()
        .entry(index)
        .or_default()
        .clone();
    let _serial = lock.lock();
    // The CUDA context (hundreds of MiB) belongs to the process, not to the first model.
    let _ = tch::Tensor::zeros([1], (tch::Kind::Float, device));
    let before = memory_in_use(nvml, index as u32);
    let out = load();
    let after = memory_in_use(nvml, index as u32);
    let grew = before.zip(after).map(|(b, a)| a.saturating_sub(b));
    (out, grew)
}

/// What a model holds on each device it runs on: per device the sum over its instances there
/// of what their loads measured, or `estimate` per instance where a load measured nothing.
pub fn per_device(loads: &[(tch::Device, Option<u64>)], estimate: u64) -> Vec<(tch::Device, u64)> {
    let mut out: Vec<(tch::Device, u64)> = Vec::new();
    for &(device, measured) in loads {
        let bytes = measured.unwrap_or(estimate);
        match out.iter_mut().find(|(d, _)| *d == device) {
            Some((_, total)) => *total += bytes,
            None => out.push((device, bytes)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without CUDA devices, or without the NVIDIA driver (this test's usual host), nothing
    /// starts and nothing fails.
    #[test]
    fn no_gpu_means_no_gpu_metrics_and_no_failure() {
        let metrics = Arc::new(Metrics::new());
        assert!(!watch(metrics.clone(), &[tch::Device::Cpu]));
        if std::path::Path::new("/proc/driver/nvidia").exists() {
            return; // A GPU host: NVML may well load here.
        }
        assert!(!watch(metrics.clone(), &[tch::Device::Cuda(0)]));
        let text = framecast_telemetry::prometheus::TextEncoder::new()
            .encode_to_string(&metrics.registry.gather())
            .unwrap();
        assert!(!text.contains("gpu_utilization_ratio{"), "{text}");
        let (value, grew) = measure_load(tch::Device::Cuda(0), || 7);
        assert_eq!((value, grew), (7, None));
    }

    #[test]
    fn per_device_sums_instances_and_falls_back_to_the_estimate() {
        use tch::Device::{Cpu, Cuda};
        let loads = [
            (Cuda(0), Some(100)),
            (Cuda(1), Some(120)),
            (Cuda(0), Some(90)),
            (Cpu, None),
        ];
        assert_eq!(
            per_device(&loads, 50),
            vec![(Cuda(0), 190), (Cuda(1), 120), (Cpu, 50)]
        );
        assert_eq!(
            per_device(&[(Cpu, None), (Cpu, None)], 50),
            vec![(Cpu, 100)]
        );
    }
}

//! GPU utilisation and memory from NVML, exported per CUDA device the server runs on.
//!
//! `nvml-wrapper` loads the NVIDIA driver's library at run time: on a host without the driver
//! there are simply no GPU metrics, and nothing fails.

use crate::metrics::Metrics;
use std::sync::Arc;
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
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(n) => n,
        Err(e) => {
            tracing::info!(error = %e, "NVML unavailable: no GPU metrics");
            return false;
        }
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
    }
}

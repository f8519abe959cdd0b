//! framecast-inference: batched TorchScript models behind the KServe v2 gRPC protocol.
//!
//! A request flows `rpc` (the gRPC edge: look up the model, `validate` the request, turn any
//! [`error::Error`] into a status) → `models` (load on demand, one load for concurrent
//! callers) → `batcher` (a queue per model, drained by one OS thread per instance that merges
//! requests into batches) → a `backend::Backend`, here `torch_model` (bytes to tensors,
//! forward, tensors to bytes), and back through a oneshot channel. `server` is the transport
//! (listener, TLS, health, reflection) the RPCs are served on.

pub mod backend;
pub mod batcher;
pub mod config;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod gpu;
pub mod inprocess;
pub mod metrics;
pub mod models;
pub mod repository;
pub mod rpc;
pub mod server;
pub mod shared_memory;
pub mod stats;
pub mod stream_budget;
pub mod tensor_cache;
pub mod torch_model;
pub mod validate;
pub mod zoo;

/// Parses a device list such as `cpu` or `cuda:0,cuda:1`.
pub fn parse_devices(list: &str) -> Result<Vec<tch::Device>, String> {
    list.split(',')
        .map(str::trim)
        .map(|d| match d {
            "cpu" => Ok(tch::Device::Cpu),
            "cuda" => Ok(tch::Device::Cuda(0)),
            _ => d
                .strip_prefix("cuda:")
                .and_then(|i| i.parse::<usize>().ok())
                .map(tch::Device::Cuda)
                .ok_or_else(|| format!("devices: {d:?} is not `cpu`, `cuda` or `cuda:N`")),
        })
        .collect()
}

/// Fails, naming the device, when a CUDA device of `devices` is not visible (a CPU-only
/// libtorch sees none): libtorch would otherwise fail at the first tensor placed there.
pub fn check_visible(devices: &[tch::Device]) -> Result<(), String> {
    let visible = tch::Cuda::device_count();
    match devices.iter().find_map(|d| match d {
        tch::Device::Cuda(i) if *i as i64 >= visible => Some(i),
        _ => None,
    }) {
        Some(i) => Err(format!(
            "devices: cuda:{i} requested but {visible} CUDA device(s) are visible"
        )),
        None => Ok(()),
    }
}

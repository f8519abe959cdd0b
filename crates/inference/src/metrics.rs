//! Prometheus metrics of the inference service.

use framecast_telemetry::prometheus::{
    histogram_opts, opts, GaugeVec, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Registry,
};

pub struct Metrics {
    pub registry: Registry,
    /// Requests by model and outcome (`ok`, or the failure reason).
    pub requests: IntCounterVec,
    /// Request arrival to response, per model (validation, queue, compute, delivery).
    pub request_seconds: HistogramVec,
    pub queue_seconds: HistogramVec,
    pub compute_seconds: HistogramVec,
    pub batch_size: HistogramVec,
    pub models_loaded: IntGauge,
    /// Loads by outcome (`ok`, `failed`, `refused`).
    pub loads: IntCounterVec,
    pub load_seconds: HistogramVec,
    pub evictions: IntCounter,
    pub memory_used_bytes: IntGauge,
    pub memory_budget_bytes: IntGauge,
    /// Bytes the tensor cache extension holds, all clients together.
    pub tensor_cache_bytes: IntGauge,
    pub queue_capacity: IntGauge,
    /// Requests waiting in each model's queue, sampled at every enqueue and every batch taken.
    pub queue_depth: IntGaugeVec,
    /// NVML, per CUDA device the server runs on (absent without an NVIDIA driver).
    pub gpu_utilization: GaugeVec,
    pub gpu_memory_used_bytes: IntGaugeVec,
    pub gpu_memory_total_bytes: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("framecast_inference".into()), None)
            .expect("static registry prefix is valid");
        let latency = framecast_telemetry::latency_buckets();
        let m = Metrics {
            requests: IntCounterVec::new(
                opts!("requests_total", "Inference requests by model and outcome"),
                &["model", "outcome"],
            )
            .expect("valid metric"),
            request_seconds: HistogramVec::new(
                histogram_opts!(
                    "request_seconds",
                    "Request arrival to response, per model",
                    latency.clone()
                ),
                &["model"],
            )
            .expect("valid metric"),
            queue_seconds: HistogramVec::new(
                histogram_opts!(
                    "queue_seconds",
                    "Time requests wait in the batch queue",
                    latency.clone()
                ),
                &["model"],
            )
            .expect("valid metric"),
            compute_seconds: HistogramVec::new(
                histogram_opts!(
                    "compute_seconds",
                    "Input conversion, forward and output conversion per batch",
                    latency.clone()
                ),
                &["model"],
            )
            .expect("valid metric"),
            batch_size: HistogramVec::new(
                histogram_opts!(
                    "batch_size",
                    "Elements per executed batch",
                    vec![1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0]
                ),
                &["model"],
            )
            .expect("valid metric"),
            models_loaded: IntGauge::new("models_loaded", "Models loaded and ready")
                .expect("valid metric"),
            loads: IntCounterVec::new(opts!("loads_total", "Model loads by outcome"), &["outcome"])
                .expect("valid metric"),
            load_seconds: HistogramVec::new(
                histogram_opts!("load_seconds", "Model load plus warm-up time", latency),
                &["model"],
            )
            .expect("valid metric"),
            evictions: IntCounter::new(
                "evictions_total",
                "Models evicted to make room under the memory budget",
            )
            .expect("valid metric"),
            memory_used_bytes: IntGauge::new(
                "memory_used_bytes",
                "Device memory accounted to loaded models (per device)",
            )
            .expect("valid metric"),
            memory_budget_bytes: IntGauge::new(
                "memory_budget_bytes",
                "Device memory budget per device (0: unlimited)",
            )
            .expect("valid metric"),
            tensor_cache_bytes: IntGauge::new(
                "tensor_cache_bytes",
                "Host memory held by tensors registered with the tensor cache extension",
            )
            .expect("valid metric"),
            queue_capacity: IntGauge::new(
                "queue_capacity",
                "Admission limit: requests one model's queue holds before RESOURCE_EXHAUSTED",
            )
            .expect("valid metric"),
            queue_depth: IntGaugeVec::new(
                opts!("queue_depth", "Requests waiting in a model's queue"),
                &["model"],
            )
            .expect("valid metric"),
            gpu_utilization: GaugeVec::new(
                opts!(
                    "gpu_utilization_ratio",
                    "Fraction of the last sample period the GPU was busy (NVML)"
                ),
                &["device"],
            )
            .expect("valid metric"),
            gpu_memory_used_bytes: IntGaugeVec::new(
                opts!(
                    "gpu_memory_used_bytes",
                    "Device memory in use on the GPU, all processes (NVML)"
                ),
                &["device"],
            )
            .expect("valid metric"),
            gpu_memory_total_bytes: IntGaugeVec::new(
                opts!("gpu_memory_total_bytes", "Device memory of the GPU (NVML)"),
                &["device"],
            )
            .expect("valid metric"),
            registry,
        };
        for c in [
            Box::new(m.requests.clone())
                as Box<dyn framecast_telemetry::prometheus::core::Collector>,
            Box::new(m.request_seconds.clone()),
            Box::new(m.gpu_utilization.clone()),
            Box::new(m.gpu_memory_used_bytes.clone()),
            Box::new(m.gpu_memory_total_bytes.clone()),
            Box::new(m.queue_seconds.clone()),
            Box::new(m.compute_seconds.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.models_loaded.clone()),
            Box::new(m.loads.clone()),
            Box::new(m.load_seconds.clone()),
            Box::new(m.evictions.clone()),
            Box::new(m.memory_used_bytes.clone()),
            Box::new(m.memory_budget_bytes.clone()),
            Box::new(m.tensor_cache_bytes.clone()),
            Box::new(m.queue_capacity.clone()),
            Box::new(m.queue_depth.clone()),
        ] {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

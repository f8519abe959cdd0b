//! Per-model counters behind `ModelStatistics`, updated by the worker threads: atomics, and
//! one short lock per executed batch for the per-batch-size table.

use crate::metrics::Metrics;
use framecast_proto::kserve;
use framecast_telemetry::prometheus::{Histogram, IntGauge};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Default)]
struct Counter {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Counter {
    fn add(&self, n: u64, d: Duration) {
        self.count.fetch_add(n, Relaxed);
        self.ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    fn snapshot(&self) -> kserve::StatisticDuration {
        kserve::StatisticDuration {
            count: self.count.load(Relaxed),
            ns: self.ns.load(Relaxed),
        }
    }
}

/// Cumulative statistics of one model since it was loaded, and its Prometheus histograms.
#[derive(Default)]
pub struct ModelStats {
    histograms: Option<(Histogram, Histogram, Histogram)>,
    queue_depth: Option<IntGauge>,
    inference_count: AtomicU64,
    execution_count: AtomicU64,
    last_inference_ms: AtomicU64,
    success: Counter,
    fail: Counter,
    queue: Counter,
    compute_input: Counter,
    compute_infer: Counter,
    compute_output: Counter,
    /// Per batch size: executions and their (input, infer, output) times, as Triton's
    /// `batch_stats` counts them (once per execution, not per request).
    by_batch_size: Mutex<BTreeMap<usize, [(u64, u64); 3]>>,
}

impl ModelStats {
    /// Statistics that also feed the model's queue, compute and batch-size histograms.
    pub fn new(metrics: &Metrics, model: &str) -> Self {
        ModelStats {
            histograms: Some((
                metrics.queue_seconds.with_label_values(&[model]),
                metrics.compute_seconds.with_label_values(&[model]),
                metrics.batch_size.with_label_values(&[model]),
            )),
            queue_depth: Some(metrics.queue_depth.with_label_values(&[model])),
            ..Default::default()
        }
    }

    /// Requests now waiting in the model's queue.
    pub fn record_queue_depth(&self, waiting: usize) {
        if let Some(g) = &self.queue_depth {
            g.set(waiting as i64);
        }
    }

    /// Records one executed batch of `frames` elements serving `requests` requests.
    pub fn record_execution(
        &self,
        frames: usize,
        requests: usize,
        input: Duration,
        infer: Duration,
        output: Duration,
    ) {
        let n = requests as u64;
        if let Some((_, compute, batch)) = &self.histograms {
            compute.observe((input + infer + output).as_secs_f64());
            batch.observe(frames as f64);
        }
        self.execution_count.fetch_add(1, Relaxed);
        self.inference_count.fetch_add(frames as u64, Relaxed);
        // Like Triton, compute durations are counted per request in the batch.
        self.compute_input.add(n, input * requests as u32);
        self.compute_infer.add(n, infer * requests as u32);
        self.compute_output.add(n, output * requests as u32);
        {
            let mut table = self.by_batch_size.lock();
            let row = table.entry(frames).or_default();
            for (slot, d) in row.iter_mut().zip([input, infer, output]) {
                slot.0 += 1;
                slot.1 += d.as_nanos() as u64;
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.last_inference_ms
            .store(now.as_millis() as u64, Relaxed);
    }

    pub fn record_queue(&self, d: Duration) {
        if let Some((queue, ..)) = &self.histograms {
            queue.observe(d.as_secs_f64());
        }
        self.queue.add(1, d);
    }

    pub fn record_success(&self, d: Duration) {
        self.success.add(1, d);
    }

    pub fn record_failure(&self, d: Duration) {
        self.fail.add(1, d);
    }

    pub fn execution_count(&self) -> u64 {
        self.execution_count.load(Relaxed)
    }

    /// The statistics as `ModelStatistics` reports them; `memory` is what the model holds per
    /// device.
    pub fn snapshot(
        &self,
        name: &str,
        memory: Vec<kserve::MemoryUsage>,
    ) -> kserve::ModelStatistics {
        kserve::ModelStatistics {
            name: name.to_string(),
            version: "1".to_string(),
            last_inference: self.last_inference_ms.load(Relaxed),
            inference_count: self.inference_count.load(Relaxed),
            execution_count: self.execution_count.load(Relaxed),
            inference_stats: Some(kserve::InferStatistics {
                success: Some(self.success.snapshot()),
                fail: Some(self.fail.snapshot()),
                queue: Some(self.queue.snapshot()),
                compute_input: Some(self.compute_input.snapshot()),
                compute_infer: Some(self.compute_infer.snapshot()),
                compute_output: Some(self.compute_output.snapshot()),
                cache_hit: None,
                cache_miss: None,
            }),
            batch_stats: self
                .by_batch_size
                .lock()
                .iter()
                .map(|(&size, row)| {
                    let d = |(count, ns): (u64, u64)| Some(kserve::StatisticDuration { count, ns });
                    kserve::InferBatchStatistics {
                        batch_size: size as u64,
                        compute_input: d(row[0]),
                        compute_infer: d(row[1]),
                        compute_output: d(row[2]),
                    }
                })
                .collect(),
            memory_usage: memory,
        }
    }
}

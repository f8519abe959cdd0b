//! Prometheus metrics of the compositor.

use framecast_telemetry::prometheus::{
    histogram_opts, opts, Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    pub frames: IntCounter,
    /// Of `frames`, the idle ones: the background as it is, no inference, no encode.
    pub idle_frames: IntCounter,
    /// Render requests by outcome (`ok`, `cancelled`, or the failing status).
    pub requests: IntCounterVec,
    pub queue_seconds: Histogram,
    pub inference_seconds: Histogram,
    pub blend_seconds: Histogram,
    pub encode_seconds: Histogram,
    pub end_to_end_seconds: Histogram,
    pub streams_active: IntGauge,
    pub streams_limit: IntGauge,
    pub avatar_hits: IntCounter,
    pub avatar_misses: IntCounter,
    pub avatar_evictions: IntCounter,
    pub avatar_bytes: IntGauge,
    pub avatar_budget_bytes: IntGauge,
    /// Bytes of idle frames kept as raw I420 ([`crate::idle_frames`]).
    pub idle_frame_cache_bytes: IntGauge,
    pub avatar_load_seconds: Histogram,
    /// Inference replicas in the pool by `health` (`healthy`, `unhealthy`), as of the last
    /// health check.
    pub inference_replicas: IntGaugeVec,
    /// Audio sessions whose mel windows shared one audio-encoder request.
    pub encoder_batch_sessions: Histogram,
    /// Requests (a session's ready frames) per face-model inference request, and frames per
    /// such request ([`crate::render::FrameClock`]).
    pub face_batch_requests: Histogram,
    pub face_batch_frames: Histogram,
    /// How long requests waited in the frame clock for other sessions' frames.
    pub frame_clock_wait_seconds: Histogram,
    /// Mel frames held by the open audio sessions (80 a second of audio).
    pub audio_mel_frames_held: IntGauge,
    /// Bytes of the batches sent to the inference replicas over gRPC and of their answers,
    /// by `direction` (`sent`, `received`), from the messages' encoded sizes.
    pub inference_bytes: IntCounterVec,
    /// Face crops received from inference, by `format` (`i420`: blended as they come into a
    /// 4:2:0 avatar's planes; `rgb`: from a replica without framecast's I420 outputs).
    pub face_crops: IntCounterVec,
}

fn histogram(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(histogram_opts!(
        name,
        help,
        framecast_telemetry::latency_buckets()
    ))
    .expect("valid metric")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("framecast_compositor".into()), None)
            .expect("static registry prefix is valid");
        let m = Metrics {
            frames: IntCounter::new("frames_total", "Frames streamed to clients")
                .expect("valid metric"),
            idle_frames: IntCounter::new(
                "idle_frames_total",
                "Frames streamed as the background itself (no speech): no inference, no encode",
            )
            .expect("valid metric"),
            inference_bytes: IntCounterVec::new(
                opts!(
                    "inference_bytes_total",
                    "Bytes sent to the inference replicas over gRPC and received from them, by direction (sent, received) and kind (batch: batches and their answers; tensor_registration: tensors registered with a replica's tensor cache)"
                ),
                &["direction", "kind"],
            )
            .expect("valid metric"),
            face_crops: IntCounterVec::new(
                opts!(
                    "face_crops_total",
                    "Face crops received from inference, by format (i420, rgb)"
                ),
                &["format"],
            )
            .expect("valid metric"),
            requests: IntCounterVec::new(
                opts!("requests_total", "Render requests by outcome"),
                &["outcome"],
            )
            .expect("valid metric"),
            queue_seconds: histogram(
                "queue_seconds",
                "Request arrival until its batch left for inference",
            ),
            inference_seconds: histogram("inference_seconds", "Inference round trip per batch"),
            blend_seconds: histogram("blend_seconds", "Resize and alpha blend per frame"),
            encode_seconds: histogram(
                "encode_seconds",
                "JPEG encode per frame: the face region's encode and splice, or a whole frame",
            ),
            end_to_end_seconds: histogram(
                "end_to_end_seconds",
                "Request arrival until the frame was sent",
            ),
            streams_limit: IntGauge::new(
                "render_streams_limit",
                "Admission limit: open Render streams before RESOURCE_EXHAUSTED",
            )
            .expect("valid metric"),
            streams_active: IntGauge::new("render_streams_active", "Open Render streams")
                .expect("valid metric"),
            avatar_hits: IntCounter::new("avatar_hits_total", "Avatar lookups served from memory")
                .expect("valid metric"),
            avatar_misses: IntCounter::new(
                "avatar_misses_total",
                "Avatar lookups that loaded from disk",
            )
            .expect("valid metric"),
            avatar_evictions: IntCounter::new(
                "avatar_evictions_total",
                "Avatars evicted under the RAM budget",
            )
            .expect("valid metric"),
            avatar_bytes: IntGauge::new("avatar_bytes", "Bytes of avatars in memory")
                .expect("valid metric"),
            avatar_budget_bytes: IntGauge::new(
                "avatar_budget_bytes",
                "RAM budget for avatars (0: unlimited)",
            )
            .expect("valid metric"),
            idle_frame_cache_bytes: IntGauge::new(
                "idle_frame_cache_bytes",
                "Bytes of idle frames kept as raw I420 for sessions that take raw frames (--idle-frame-cache-mib)",
            )
            .expect("valid metric"),
            avatar_load_seconds: histogram(
                "avatar_load_seconds",
                "Avatar decode and preparation time",
            ),
            inference_replicas: IntGaugeVec::new(
                opts!(
                    "inference_replicas",
                    "Inference replicas in the pool, by health at the last check"
                ),
                &["health"],
            )
            .expect("valid metric"),
            encoder_batch_sessions: Histogram::with_opts(histogram_opts!(
                "encoder_batch_sessions",
                "Audio sessions whose mel windows shared one audio-encoder request",
                vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0]
            ))
            .expect("valid metric"),
            face_batch_requests: Histogram::with_opts(histogram_opts!(
                "face_batch_requests",
                "Render requests (sessions' ready frames) merged into one face-model inference request",
                vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0]
            ))
            .expect("valid metric"),
            face_batch_frames: Histogram::with_opts(histogram_opts!(
                "face_batch_frames",
                "Frames per face-model inference request (per forward pass)",
                vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0]
            ))
            .expect("valid metric"),
            frame_clock_wait_seconds: histogram(
                "frame_clock_wait_seconds",
                "Time a face-model request waited in the frame clock for other sessions' frames",
            ),
            audio_mel_frames_held: IntGauge::new(
                "audio_mel_frames_held",
                "Mel frames held by the open audio sessions (80 a second of audio)",
            )
            .expect("valid metric"),
            registry,
        };
        let collectors: Vec<Box<dyn framecast_telemetry::prometheus::core::Collector>> = vec![
            Box::new(m.frames.clone()),
            Box::new(m.idle_frames.clone()),
            Box::new(m.inference_bytes.clone()),
            Box::new(m.face_crops.clone()),
            Box::new(m.requests.clone()),
            Box::new(m.queue_seconds.clone()),
            Box::new(m.inference_seconds.clone()),
            Box::new(m.blend_seconds.clone()),
            Box::new(m.encode_seconds.clone()),
            Box::new(m.end_to_end_seconds.clone()),
            Box::new(m.streams_active.clone()),
            Box::new(m.streams_limit.clone()),
            Box::new(m.avatar_hits.clone()),
            Box::new(m.avatar_misses.clone()),
            Box::new(m.avatar_evictions.clone()),
            Box::new(m.avatar_bytes.clone()),
            Box::new(m.avatar_budget_bytes.clone()),
            Box::new(m.idle_frame_cache_bytes.clone()),
            Box::new(m.avatar_load_seconds.clone()),
            Box::new(m.inference_replicas.clone()),
            Box::new(m.encoder_batch_sessions.clone()),
            Box::new(m.face_batch_requests.clone()),
            Box::new(m.face_batch_frames.clone()),
            Box::new(m.frame_clock_wait_seconds.clone()),
            Box::new(m.audio_mel_frames_held.clone()),
        ];
        for c in collectors {
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

//! The gateway's Prometheus metrics (`framecast_gateway_*`).

use prometheus::{histogram_opts, Histogram, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Sessions open now.
    pub sessions: IntGauge,
    /// Session requests by outcome (`answered`, or the refusal: `bad_offer`, `unknown_avatar`,
    /// `full`, `error`).
    pub session_requests: IntCounterVec,
    pub frames_sent: IntCounter,
    /// Frames that arrived too late for their moment.
    pub frames_dropped: IntCounter,
    /// Frames missing between the compositor and the encoder.
    pub frames_lost: IntCounter,
    pub encode_seconds: Histogram,
    pub rtt_seconds: Histogram,
    /// Idle frames sent from the shared encode of their avatar's loop ([`crate::idle_video`]).
    pub idle_frames_shared: IntCounter,
    /// Talking frames sent as their avatar's shared stream with the session's face region
    /// spliced in ([`crate::splice`]).
    pub frames_spliced: IntCounter,
    /// Frames encoded onto the shared streams, by kind (`key`, `delta`).
    pub idle_stream_encoded: IntCounterVec,
    /// Bytes of the shared idle streams.
    pub idle_cache_bytes: IntGauge,
    /// 1 while admission by margin admits new sessions, 0 while it refuses them.
    pub admission_open: IntGauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry =
            Registry::new_custom(Some("framecast_gateway".into()), None).expect("valid registry");
        let buckets = framecast_telemetry::latency_buckets();
        let m = Metrics {
            sessions: IntGauge::new("sessions", "Browser sessions open").expect("valid metric"),
            session_requests: IntCounterVec::new(
                Opts::new(
                    "session_requests_total",
                    "Session requests (POST /sessions) by outcome",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            frames_sent: IntCounter::new("frames_sent_total", "Video frames encoded and sent")
                .expect("valid metric"),
            frames_dropped: IntCounter::new(
                "frames_dropped_total",
                "Frames dropped because they arrived after their play time",
            )
            .expect("valid metric"),
            frames_lost: IntCounter::new(
                "frames_lost_total",
                "Frames missing between the compositor and the encoder",
            )
            .expect("valid metric"),
            encode_seconds: Histogram::with_opts(histogram_opts!(
                "encode_seconds",
                "Video encode time per frame (H.264 or VP8)",
                buckets.clone()
            ))
            .expect("valid metric"),
            rtt_seconds: Histogram::with_opts(histogram_opts!(
                "rtt_seconds",
                "Round-trip time to the browser, from its receiver reports",
                buckets
            ))
            .expect("valid metric"),
            idle_frames_shared: IntCounter::new(
                "idle_frames_shared_total",
                "Idle frames sent from the shared encode of their avatar's loop (no encode of their own)",
            )
            .expect("valid metric"),
            frames_spliced: IntCounter::new(
                "frames_spliced_total",
                "Talking frames sent as the avatar's shared stream with the session's own face region spliced in (only the region encoded)",
            )
            .expect("valid metric"),
            idle_stream_encoded: IntCounterVec::new(
                Opts::new(
                    "idle_stream_encoded_total",
                    "Frames encoded onto the avatars' shared streams (each a background decoded and encoded once for every session), by kind: key or delta",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            idle_cache_bytes: IntGauge::new(
                "idle_cache_bytes",
                "Bytes held by the shared encodes of the avatars' idle loops (--idle-cache-mib)",
            )
            .expect("valid metric"),
            admission_open: IntGauge::new(
                "admission_open",
                "1 while the measured margin admits new sessions, 0 while it refuses them (503 no_margin)",
            )
            .expect("valid metric"),
            registry,
        };
        for c in [
            Box::new(m.sessions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.session_requests.clone()),
            Box::new(m.frames_sent.clone()),
            Box::new(m.frames_dropped.clone()),
            Box::new(m.frames_lost.clone()),
            Box::new(m.encode_seconds.clone()),
            Box::new(m.rtt_seconds.clone()),
            Box::new(m.idle_frames_shared.clone()),
            Box::new(m.frames_spliced.clone()),
            Box::new(m.idle_stream_encoded.clone()),
            Box::new(m.idle_cache_bytes.clone()),
            Box::new(m.admission_open.clone()),
        ] {
            m.registry.register(c).expect("metric registered once");
        }
        m
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

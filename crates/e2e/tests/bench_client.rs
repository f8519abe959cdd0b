//! framecast-bench against real servers on loopback.

use framecast_bench::load::{self, Phase};
use framecast_bench::target::{self, Fill};
use framecast_compositor::avatar_store::AvatarStore;
use framecast_compositor::demo::{self, DemoOptions};
use framecast_compositor::inference::{ClientOptions, InferenceClient};
use framecast_compositor::render::RenderOptions;
use framecast_compositor::rpc::{CompositorService, DEFAULT_MAX_STREAMS};
use framecast_inference::server::{self as inf_server, ServeOptions};
use framecast_inference::zoo::{self, Builtin, ZooOptions};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Both servers; `delay_us` is the model's batching delay (large = a slow server),
/// `max_streams` the compositor's admission limit.
async fn stack(
    root: &Path,
    delay_us: u64,
    max_streams: usize,
) -> (inf_server::Running, framecast_compositor::server::Running) {
    let models = root.join("models");
    let opts = ZooOptions {
        crop: 32,
        max_batch_size: 64,
        max_queue_delay_us: delay_us,
    };
    zoo::write(&models, Builtin::Passthrough, &opts).unwrap();
    let avatars = root.join("avatars");
    let demo_opts = DemoOptions {
        id: "a".into(),
        width: 128,
        height: 96,
        frames: 8,
        crop_size: 32,
        model: "passthrough".into(),
        ..Default::default()
    };
    demo::write_demo(&avatars, &demo_opts).unwrap();
    let inference = framecast_e2e::spawn_inference(&models, ServeOptions::default()).await;
    let client =
        InferenceClient::connect_lazy(&[inference.url()], &ClientOptions::default()).unwrap();
    let metrics = Arc::new(framecast_compositor::metrics::Metrics::new());
    let svc = CompositorService::new(
        Arc::new(AvatarStore::new(&avatars, true, None, metrics.clone()).unwrap()),
        client,
        RenderOptions::default(),
        metrics,
    )
    .with_max_streams(max_streams, max_streams);
    let compositor = framecast_compositor::server::spawn_on_loopback(svc, Default::default())
        .await
        .unwrap();
    (inference, compositor)
}

fn phase(seconds: f64) -> Phase {
    Phase {
        warmup: Duration::from_millis(300),
        duration: Duration::from_secs_f64(seconds),
        window: Duration::from_millis(500),
        max_requests: 10_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compositor_load_counts_add_up() {
    let tmp = tempfile::tempdir().unwrap();
    let (_i, c) = stack(tmp.path(), 1000, DEFAULT_MAX_STREAMS).await;
    let client = framecast_bench::client::compositor(&c.url(), &Default::default()).unwrap();
    let good = Arc::new(target::Compositor::new(client.clone(), "a", 6));
    let level = load::closed_loop(good, 2, &phase(2.0)).await;
    assert!(level.requests_succeeded > 0, "{level:?}");
    assert_eq!(
        level.requests_sent,
        level.requests_succeeded + level.requests_failed
    );
    assert_eq!(level.frames, level.requests_succeeded * 6);
    assert!(level.latency_ms.p50 > 0.0 && level.latency_ms.p99 >= level.latency_ms.p50);
    assert!(level.time_to_first_frame_ms.p50 <= level.latency_ms.p50 + 1e-9);
    assert!(
        level.server_stages_ms.contains_key("encode"),
        "{:?}",
        level.server_stages_ms
    );

    // A missing avatar: every request fails, and is counted by status.
    let bad = Arc::new(target::Compositor::new(client, "nobody", 6));
    let level = load::closed_loop(bad, 2, &phase(1.0)).await;
    assert!(level.requests_failed > 0);
    assert_eq!(level.requests_succeeded, 0);
    assert_eq!(
        level.errors.get("not_found"),
        Some(&level.requests_failed),
        "{:?}",
        level.errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kserve_load_counts_add_up() {
    let tmp = tempfile::tempdir().unwrap();
    let (i, _c) = stack(tmp.path(), 1000, DEFAULT_MAX_STREAMS).await;
    let client = framecast_bench::client::kserve(&i.url(), &Default::default()).unwrap();
    for stream in [false, true] {
        let t = Arc::new(
            target::Kserve::new(client.clone(), "passthrough", 3, &Fill::Random, stream)
                .await
                .unwrap(),
        );
        let level = load::open_loop(t, 40.0, true, 16, &phase(1.5)).await;
        assert!(level.requests_succeeded > 10, "stream={stream}: {level:?}");
        assert_eq!(
            level.requests_sent,
            level.requests_succeeded + level.requests_failed
        );
        assert_eq!(level.frames, level.requests_succeeded * 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn realtime_detects_a_slow_server() {
    let tmp = tempfile::tempdir().unwrap();
    // A batching delay of 600 ms against a deadline of one 4-frame chunk at 25 fps (160 ms).
    let (_i, c) = stack(tmp.path(), 600_000, DEFAULT_MAX_STREAMS).await;
    let client = framecast_bench::client::compositor(&c.url(), &Default::default()).unwrap();
    let t = Arc::new(target::Compositor::new(client, "a", 4));
    let trial = load::realtime_trial(
        t,
        1,
        25.0,
        Duration::from_millis(160),
        Duration::from_secs(1),
    )
    .await;
    assert!(trial.frames > 0, "{trial:?}");
    assert!(
        trial.late_frames > 0,
        "a 600 ms server must miss 160 ms deadlines: {trial:?}"
    );
    assert!(!trial.passed);
    assert!(trial.lateness_ms.max > 100.0, "{trial:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn realtime_passes_a_fast_server_with_generous_deadlines() {
    let tmp = tempfile::tempdir().unwrap();
    let (_i, c) = stack(tmp.path(), 0, DEFAULT_MAX_STREAMS).await;
    let client = framecast_bench::client::compositor(&c.url(), &Default::default()).unwrap();
    let t = Arc::new(target::Compositor::new(client, "a", 4));
    let trial =
        load::realtime_trial(t, 1, 25.0, Duration::from_secs(3), Duration::from_secs(1)).await;
    assert!(trial.passed, "{trial:?}");
    assert_eq!(trial.late_frames, 0);
    assert_eq!(
        trial.frames, 28,
        "7 chunks of 4 frames cover one second at 25 fps"
    );
}

/// Sessions past the compositor's `--max-streams` are counted as refused, not as errors or
/// lost frames, and the trial does not pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn realtime_counts_sessions_refused_at_the_admission_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let (_i, c) = stack(tmp.path(), 0, 1).await;
    let client = framecast_bench::client::compositor(&c.url(), &Default::default()).unwrap();
    let t = Arc::new(target::Compositor::new(client, "a", 4));
    let trial =
        load::realtime_trial(t, 3, 25.0, Duration::from_secs(3), Duration::from_secs(1)).await;
    assert_eq!(trial.rejected, 2, "{trial:?}");
    assert_eq!(trial.errors, 0, "{trial:?}");
    assert_eq!((trial.frames, trial.expected_frames), (28, 28), "{trial:?}");
    assert!(!trial.passed, "{trial:?}");
}

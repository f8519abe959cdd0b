//! A real browser against the three real services on loopback: headless Chromium (Debian's,
//! driven through chromedriver by scripts/browser_check.py) opens the gateway's page, its fake
//! microphone plays a spoken sentence and then silence (looped), and the avatar talks back
//! over WebRTC. Needs `chromium`, `chromium-driver` and selenium: `make test` installs them.

use framecast_compositor::demo::{self, DemoOptions};
use framecast_compositor::inference::{ClientOptions, InferenceClient};
use framecast_gateway::GatewayOptions;
use framecast_inference::zoo::{self, Builtin, ZooOptions};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const WIDTH: u32 = 640;
const HEIGHT: u32 = 360;
const CROP: u32 = 160;
/// Seconds of video the browser watches.
const WATCH_S: f64 = 25.0;

fn out_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../out/browser");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_sees_and_hears_the_avatar_talk() {
    let python = std::env::var("FRAMECAST_REFERENCE_PYTHON").expect(
        "FRAMECAST_REFERENCE_PYTHON is not set: run through `make test`, or eval \"$(FRAMECAST_BROWSER=1 scripts/setup.sh)\" first (it installs chromium, chromium-driver and selenium)",
    );
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    let zoo_opts = ZooOptions {
        crop: CROP as i64,
        max_batch_size: 8,
        max_queue_delay_us: 1000,
    };
    zoo::write(&models, Builtin::TalkingDemo, &zoo_opts).unwrap();
    let avatars = tmp.path().join("avatars");
    // One background frame: in silence every frame is that frame, so the mouth is still.
    let avatar = DemoOptions {
        id: "browser".into(),
        width: WIDTH,
        height: HEIGHT,
        frames: 1,
        fps: 25.0,
        crop_size: CROP,
        model: "talking-demo".into(),
    };
    let dir = demo::write_demo(&avatars, &avatar).unwrap();
    let face = framecast_compositor::avatar::Avatar::load(&dir)
        .unwrap()
        .boxes[0];
    let inference = framecast_e2e::spawn_inference(&models, Default::default()).await;
    let pool =
        InferenceClient::connect_lazy(&[inference.url()], &ClientOptions::default()).unwrap();
    let compositor = framecast_e2e::spawn_compositor(&avatars, pool, 8, Default::default()).await;
    let (gateway, addr) =
        framecast_e2e::spawn_gateway(compositor.url(), GatewayOptions::default()).await;
    let url = format!("http://{addr}");

    // The mouth: the middle of the face box's lower third.
    let probe = format!(
        "{},{},{},{}",
        face.x + face.w * 3 / 10,
        face.y + face.h * 6 / 10,
        face.w * 4 / 10,
        face.h * 2 / 10
    );
    let screenshot = out_dir().join("page.png");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/browser_check.py");
    let args: Vec<String> = vec![
        script.display().to_string(),
        "--url".into(),
        url.clone(),
        "--avatar".into(),
        "browser".into(),
        "--sentence".into(),
        "Hello there. I am the framecast avatar, and I speak as you listen.".into(),
        "--probe".into(),
        probe,
        "--seconds".into(),
        WATCH_S.to_string(),
        "--screenshot".into(),
        screenshot.display().to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || Command::new(python).args(args).output())
        .await
        .unwrap()
        .expect("running scripts/browser_check.py");
    assert!(
        out.status.success(),
        "browser_check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    std::fs::write(out_dir().join("result.json"), &out.stdout).unwrap();
    check(&seen);

    // The page hung up: the gateway forgets the session and holds nothing.
    let open = framecast_e2e::stack::poll_until(
        std::time::Duration::from_secs(10),
        || async { gateway.open_sessions() },
        |&n| n == 0,
    )
    .await;
    assert_eq!(open, 0, "the session outlived the page's hang-up");
}

fn check(seen: &Value) {
    let speech_s = seen["speech_s"].as_f64().unwrap();
    assert_eq!(seen["state"], "connected", "{:?}", seen["error"]);
    let video = &seen["video"];
    assert_eq!(
        (video["frameWidth"].as_u64(), video["frameHeight"].as_u64()),
        (Some(WIDTH as u64), Some(HEIGHT as u64)),
        "decoded frame size"
    );
    // Presented frames (requestVideoFrameCallback), from the first on.
    let frames: Vec<f64> = seen["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let span_s = (frames.last().unwrap() - frames[0]) / 1e3;
    let fps = (frames.len() - 1) as f64 / span_s;
    assert!(span_s >= 20.0, "only {span_s:.1} s of video");
    assert!(
        fps >= 24.0,
        "{fps:.1} frames/s presented over {span_s:.1} s"
    );
    let freeze = frames.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    assert!(freeze < 500.0, "a freeze of {freeze:.0} ms");
    let decoded = video["framesDecoded"].as_u64().unwrap() as f64;
    assert!(decoded >= 24.0 * 20.0, "{decoded} frames decoded");
    let gw = &seen["gateway"];
    assert_eq!(
        gw["frames_lost"], 0,
        "frames lost between compositor and encoder: {gw}"
    );

    // The mouth: it moves while the sentence plays and is still through the silences. The
    // fake microphone loops sentence + 3 s of silence; each silence holds more than a second
    // of frames whose audio window is all silent (idle frames: the background itself).
    let probe: Vec<(f64, f64)> = seen["probe"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_f64().unwrap(), p[1].as_f64().unwrap()))
        .collect();
    let lumas: Vec<f64> = probe.iter().map(|p| p.1).collect();
    let (lo, hi) = lumas
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &l| (a.min(l), b.max(l)));
    assert!(
        hi - lo > 8.0,
        "the mouth never moved: luma {lo:.1}..{hi:.1} over {} frames",
        lumas.len()
    );
    // Longest stretch (in seconds) over which the mouth's luma stays within 1.5 of its start.
    let mut still_s: f64 = 0.0;
    let mut start = 0;
    for i in 0..probe.len() {
        if (probe[i].1 - probe[start].1).abs() > 1.5 {
            start = i;
        }
        still_s = still_s.max((probe[i].0 - probe[start].0) / 1e3);
    }
    assert!(
        still_s > 1.5,
        "the mouth is never still for 1.5 s (longest {still_s:.2} s) though the speech ({speech_s:.1} s) pauses for 3 s"
    );
    // Mouth-to-ear as a viewer sees it: from each speech onset in the voice the page sends
    // to the mouth's first move on screen (scripts/browser_check.py pairs them).
    let latency: Vec<f64> = seen["mouth_latency_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!(
        latency.len() >= 2,
        "{} speech onsets paired with a mouth move in {WATCH_S} s",
        latency.len()
    );
    assert!(
        latency.iter().all(|&ms| ms < 2000.0),
        "mouth-to-ear latencies {latency:?} ms"
    );
    // Moving through most of the speech: at most the silences are still.
    let cycle = speech_s + 3.0;
    assert!(
        still_s < 3.0 + 1.0,
        "the mouth was still for {still_s:.1} s: longer than a silence (the cycle is {cycle:.1} s)"
    );
}

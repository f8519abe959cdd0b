//! A real browser against the three real services on loopback: headless Chromium (Debian's,
//! driven through chromedriver by scripts/browser_check.py) opens the gateway's page. In
//! mirror mode its fake microphone plays a spoken sentence and then silence (looped), and the
//! avatar talks back over WebRTC; in agent mode the speech API makes the avatar say a
//! sentence and an interrupt stops it. Needs `chromium`, `chromium-driver` and selenium:
//! `make test` installs them.

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

/// One browser at a time: two would share two cores with three services each.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The three services over a talking-demo avatar: what the tests drive the page against.
struct Stack {
    _tmp: tempfile::TempDir,
    _servers: (
        framecast_inference::server::Running,
        framecast_compositor::server::Running,
    ),
    gateway: std::sync::Arc<framecast_gateway::Gateway>,
    url: String,
    /// The probe over the mouth: x,y,w,h in video pixels.
    probe: String,
}

fn python() -> String {
    std::env::var("FRAMECAST_REFERENCE_PYTHON").expect(
        "FRAMECAST_REFERENCE_PYTHON is not set: run through `make test`, or eval \"$(FRAMECAST_BROWSER=1 scripts/setup.sh)\" first (it installs chromium, chromium-driver and selenium)",
    )
}

/// Runs scripts/browser_check.py with `args`; what the page saw.
async fn browser_check(args: Vec<String>) -> (Value, Vec<u8>) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/browser_check.py");
    let mut all = vec![script.display().to_string()];
    all.extend(args);
    let out = tokio::task::spawn_blocking(move || Command::new(python()).args(all).output())
        .await
        .unwrap()
        .expect("running scripts/browser_check.py");
    assert!(
        out.status.success(),
        "browser_check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (serde_json::from_slice(&out.stdout).unwrap(), out.stdout)
}

/// browser_check.py's arguments for `s`'s page (the `browser` avatar, its probe) and `rest`.
fn page(s: &Stack, rest: &[&str]) -> Vec<String> {
    let common = ["--url", &s.url, "--avatar", "browser", "--probe", &s.probe];
    common.iter().chain(rest).map(|a| a.to_string()).collect()
}

async fn stack() -> Stack {
    stack_with(GatewayOptions::default()).await
}

async fn stack_with(opts: GatewayOptions) -> Stack {
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
    let (gateway, addr) = framecast_e2e::spawn_gateway(compositor.url(), opts).await;
    // The mouth: the middle of the face box's lower third.
    let probe = format!(
        "{},{},{},{}",
        face.x + face.w * 3 / 10,
        face.y + face.h * 6 / 10,
        face.w * 4 / 10,
        face.h * 2 / 10
    );
    Stack {
        _tmp: tmp,
        _servers: (inference, compositor),
        gateway,
        url: format!("http://{addr}"),
        probe,
    }
}

/// The page hung up: the gateway forgets the session and holds nothing.
async fn all_hung_up(s: &Stack) {
    let open = framecast_e2e::stack::poll_until(
        std::time::Duration::from_secs(10),
        || async { s.gateway.open_sessions() },
        |&n| n == 0,
    )
    .await;
    assert_eq!(open, 0, "the session outlived the page's hang-up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_sees_and_hears_the_avatar_talk() {
    let _one = ONE_BROWSER.lock().await;
    let s = stack().await;
    let screenshot = out_dir().join("page.png");
    let args = page(
        &s,
        &[
            "--sentence",
            "Hello there. I am the framecast avatar, and I speak as you listen.",
            "--seconds",
            &WATCH_S.to_string(),
            "--screenshot",
            &screenshot.display().to_string(),
        ],
    );
    let (seen, raw) = browser_check(args).await;
    std::fs::write(out_dir().join("result.json"), &raw).unwrap();
    check(&seen);
    all_hung_up(&s).await;
}

/// NAT traversal for real: a TURN server (coturn) started here, the gateway naming it in its
/// `Link` headers (RFC 9725), and Chromium forced to relay (`iceTransportPolicy: "relay"`, the
/// page reading the servers from `OPTIONS /sessions`): the session connects through the relay
/// and the video flows at its rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_plays_through_a_turn_relay() {
    let _one = ONE_BROWSER.lock().await;
    let turn = Turn::start();
    let url = format!("turn:127.0.0.1:{}?transport=udp", turn.port);
    let server =
        framecast_gateway::whip::IceServer::new(&url, Some("framecast"), Some("relay-test"))
            .unwrap();
    let s = stack_with(GatewayOptions {
        ice_servers: vec![server],
        ..Default::default()
    })
    .await;
    let args = page(
        &s,
        &[
            "--sentence",
            "Through the relay.",
            "--seconds",
            "8",
            "--relay",
        ],
    );
    let (seen, raw) = browser_check(args).await;
    std::fs::write(out_dir().join("relay.json"), &raw).unwrap();
    assert_eq!(seen["state"], "connected", "{:?}", seen["error"]);
    assert_eq!(
        seen["local_candidate"], "relay",
        "the page's media did not go through TURN"
    );
    let frames = seen["frames"].as_array().unwrap().len();
    assert!(
        frames >= 24 * 7,
        "{frames} frames presented in 8 s through the relay"
    );
    // The selected pair's local candidate is the relay coturn allocated (the page's own
    // report): no host path was allowed. coturn's log is out/browser/turnserver.log.
    drop(turn);
    all_hung_up(&s).await;
}

/// A browser without H.264: the page offers VP8 only (`setCodecPreferences`), the gateway
/// chooses VP8 from the offer, and Chromium decodes the avatar at its rate, the mouth moving
/// with the voice; idle frames come from the avatar's VP8 idle stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_without_h264_gets_vp8() {
    let _one = ONE_BROWSER.lock().await;
    let s = stack().await;
    let args = page(
        &s,
        &[
            "--sentence",
            "Hello there, in VP8.",
            "--seconds",
            "10",
            "--codec",
            "vp8",
        ],
    );
    let (seen, raw) = browser_check(args).await;
    std::fs::write(out_dir().join("vp8.json"), &raw).unwrap();
    assert_eq!(seen["state"], "connected", "{:?}", seen["error"]);
    assert_eq!(seen["codec"], "video/VP8", "the codec Chromium decoded");
    let gw = &seen["gateway"];
    assert_eq!(gw["video_codec"], "VP8", "{gw}");
    let video = &seen["video"];
    assert_eq!(
        (video["frameWidth"].as_u64(), video["frameHeight"].as_u64()),
        (Some(WIDTH as u64), Some(HEIGHT as u64)),
        "decoded frame size"
    );
    let frames = seen["frames"].as_array().unwrap().len();
    assert!(frames >= 24 * 9, "{frames} VP8 frames presented in 10 s");
    let lumas: Vec<f64> = seen["probe"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_f64().unwrap())
        .collect();
    let (lo, hi) = lumas
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &l| (a.min(l), b.max(l)));
    assert!(
        hi - lo > 8.0,
        "the mouth never moved: luma {lo:.1}..{hi:.1}"
    );
    assert!(
        gw["idle_frames_shared"].as_u64().unwrap_or(0) > 0,
        "no idle frame from the VP8 idle stream: {gw}"
    );
    all_hung_up(&s).await;
}

/// A coturn `turnserver` on loopback for one test, with one long-term credential.
struct Turn {
    child: std::process::Child,
    port: u16,
}

impl Turn {
    fn start() -> Turn {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = out_dir().join("turnserver.log");
        let child = std::process::Command::new("turnserver")
            .args([
                "-n",
                "--no-cli",
                "--no-tls",
                "--no-dtls",
                "--listening-ip=127.0.0.1",
                "--relay-ip=127.0.0.1",
                &format!("--listening-port={port}"),
                "--min-port=49160",
                "--max-port=49400",
                "--allow-loopback-peers",
                "--lt-cred-mech",
                "--user=framecast:relay-test",
                "--realm=framecast",
                "--simple-log",
                &format!("--log-file={}", log.display()),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("turnserver (coturn) is installed by scripts/setup.sh for the browser tests");
        // It binds at once; give it a moment before the browser gathers.
        std::thread::sleep(std::time::Duration::from_millis(500));
        Turn { child, port }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Agent mode in a real browser: the mouth is still while idle, moves while the speech API's
/// sentence plays and is still again after the interrupt; the voice the page plays is near
/// silent in idle, loud during the sentence and silent after the interrupt; the page's data
/// channel gets the events in order with their frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_shows_the_application_speaking_and_interrupted() {
    let _one = ONE_BROWSER.lock().await;
    let s = stack().await;
    let args = page(&s, &["--agent", "Hello there. I am the framecast avatar, speaking for the application, and this sentence goes on for a while.", "--idle-s", "3", "--interrupt-after", "2.5", "--seconds", "4", "--screenshot", &out_dir().join("agent.png").display().to_string()]);
    let (seen, raw) = browser_check(args).await;
    std::fs::write(out_dir().join("agent.json"), &raw).unwrap();
    check_agent(&seen);
    all_hung_up(&s).await;
}

/// Pairs `(page ms, value)` from a JSON array.
fn series(v: &Value) -> Vec<(f64, f64)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_f64().unwrap(), p[1].as_f64().unwrap()))
        .collect()
}

fn check_agent(seen: &Value) {
    assert_eq!(seen["state"], "connected", "{:?}", seen["error"]);
    assert_eq!(seen["say"][0], 202, "{}", seen["say"]);
    assert_eq!(seen["interrupt"][0], 200, "{}", seen["interrupt"]);
    let say = seen["say_ms"].as_f64().unwrap();
    let cut = seen["interrupt_ms"].as_f64().unwrap();
    let probe = series(&seen["probe"]);
    let voice = series(&seen["voice"]);
    let within = |s: &[(f64, f64)], a: f64, b: f64| -> Vec<f64> {
        s.iter()
            .filter(|p| p.0 >= a && p.0 < b)
            .map(|p| p.1)
            .collect()
    };
    let range = |v: &[f64]| {
        v.iter().fold(f64::MIN, |a, &b| a.max(b)) - v.iter().fold(f64::MAX, |a, &b| a.min(b))
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    // Idle before the sentence: the mouth still, the voice near silent.
    let idle = within(&probe, say - 2000.0, say);
    assert!(
        idle.len() >= 40 && range(&idle) <= 1.5,
        "idle mouth moved: {:.1} over {}",
        range(&idle),
        idle.len()
    );
    let idle_voice = within(&voice, say - 2000.0, say);
    assert!(
        mean(&idle_voice) < 0.005,
        "idle voice level {}",
        mean(&idle_voice)
    );
    // Speaking (after the latency, before the interrupt): the mouth moves, the voice is loud.
    let talking = within(&probe, say + 800.0, cut);
    assert!(
        range(&talking) > 8.0,
        "the mouth did not move while speaking: {:.1}",
        range(&talking)
    );
    let talking_voice = within(&voice, say + 800.0, cut);
    assert!(
        mean(&talking_voice) > 0.01,
        "speaking voice level {}",
        mean(&talking_voice)
    );
    // After the interrupt (one frame and the jitter margin, and the page's own buffers):
    // still and silent.
    let after = within(&probe, cut + 600.0, cut + 3500.0);
    assert!(
        after.len() >= 40 && range(&after) <= 1.5,
        "the mouth moved after the interrupt: {:.1}",
        range(&after)
    );
    let after_voice = within(&voice, cut + 600.0, cut + 3500.0);
    assert!(
        mean(&after_voice) < 0.005,
        "voice after the interrupt: {}",
        mean(&after_voice)
    );
    // The events, in order, with frames that agree.
    let events: Vec<&Value> = seen["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e[1])
        .collect();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let at = |t: &str| {
        types
            .iter()
            .position(|x| *x == t)
            .unwrap_or_else(|| panic!("no {t} in {types:?}"))
    };
    assert!(at("utterance_queued") < at("utterance_started"));
    assert!(at("utterance_started") < at("utterance_ended"));
    assert!(at("utterance_ended") < at("idle"), "{types:?}");
    let (started, ended) = (
        events[at("utterance_started")],
        events[at("utterance_ended")],
    );
    assert_eq!(ended["interrupted"], true);
    let frames = ended["frames"].as_u64().unwrap();
    let shown_ms = ended["unix_ms"].as_u64().unwrap() - started["unix_ms"].as_u64().unwrap();
    assert!(frames > 25 && frames < 120, "{frames} frames shown");
    assert!(
        (shown_ms as f64 - frames as f64 * 40.0).abs() < 400.0,
        "{frames} frames in {shown_ms} ms"
    );
    // Figures for docs/performance.md.
    let first_move = probe
        .iter()
        .find(|p| p.0 > say && (p.1 - idle[idle.len() - 1]).abs() > 4.0)
        .map(|p| p.0 - say);
    let still = probe
        .iter()
        .rev()
        .take_while(|p| p.0 > cut && (p.1 - after[after.len() - 1]).abs() <= 1.5)
        .last()
        .map(|p| p.0 - cut);
    let silent = voice
        .iter()
        .rev()
        .find(|p| p.0 > cut && p.1 > 0.005)
        .map(|p| p.0 - cut);
    eprintln!(
        "agent in Chromium: speech call to first mouth move {first_move:?} ms, interrupt to a still mouth {still:?} ms, to silence {silent:?} ms"
    );
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
    // Talking frames were the avatar's shared stream with the session's face region spliced
    // in (H.264, crate::splice): what Chromium decoded and the mouth checks below watch.
    assert!(
        gw["frames_spliced"].as_u64().unwrap_or(0) > 100,
        "talking frames spliced: {gw}"
    );
    // The page's figures tell the truth: the round trip is RTCP's (not the ICE pair's 0.0 on
    // loopback), the frame rate is what it presented (not the browser's estimate rounded to
    // 26), and there is a latency figure.
    let rtt = seen["rtt_ms"].as_f64().unwrap_or(0.0);
    assert!(
        rtt > 0.0 && !seen["rtt"].as_str().unwrap_or("").contains("ICE"),
        "round trip shown: {}",
        seen["rtt"]
    );
    let page_fps = seen["page_fps"].as_f64().unwrap_or(0.0);
    assert!(
        (22.0..=25.5).contains(&page_fps),
        "frame rate shown: {}",
        seen["fps_shown"]
    );
    let shown = seen["latency"].as_str().unwrap_or("");
    assert!(
        shown.contains("ms in the gateway") && shown.contains("ms buffered here"),
        "latency shown: {shown:?}"
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

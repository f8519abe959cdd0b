//! Agent sessions with str0m as the browser, against the real gateway, compositor and
//! inference service: the speech API makes the avatar speak (its voice on the audio track, its
//! lips in the video), interrupts stop it, events say what was shown and when, the
//! microphone reaches the application, and every bad call gets its status without disturbing
//! the session.

use framecast_compositor::inference::{ClientOptions, InferenceClient};
use framecast_gateway::{Gateway, GatewayOptions};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::change::SdpAnswer;
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

struct Fixture {
    _tmp: tempfile::TempDir,
    _servers: (
        framecast_inference::server::Running,
        framecast_compositor::server::Running,
    ),
    gateway: Arc<Gateway>,
    addr: SocketAddr,
}

async fn fixture(opts: GatewayOptions) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let (models, avatars) = framecast_e2e::write_fixtures(tmp.path(), 0);
    let inference = framecast_e2e::spawn_inference(&models, Default::default()).await;
    let pool =
        InferenceClient::connect_lazy(&[inference.url()], &ClientOptions::default()).unwrap();
    let compositor = framecast_e2e::spawn_compositor(&avatars, pool, 8, Default::default()).await;
    let (gateway, addr) = framecast_e2e::spawn_gateway(compositor.url(), opts).await;
    Fixture {
        _tmp: tmp,
        _servers: (inference, compositor),
        gateway,
        addr,
    }
}

/// One HTTP/1.1 request: (status, body).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let (status, _, body) = http_full(addr, method, path, headers, body).await;
    (status, body)
}

/// One HTTP/1.1 request: (status, head, body).
async fn http_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: gateway\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

/// A tone at `hz` for `seconds`, as a 16 kHz WAV file.
fn tone_wav(hz: f64, seconds: f64) -> Vec<u8> {
    let rate = 16_000u32;
    let samples: Vec<i16> = (0..(rate as f64 * seconds) as usize)
        .map(|i| {
            let t = i as f64 / rate as f64;
            // A syllable-like envelope, so the mouth opens and closes.
            let env = (std::f64::consts::PI * 4.0 * t).sin().abs();
            (env * 0.5 * (2.0 * std::f64::consts::PI * hz * t).sin() * 32767.0) as i16
        })
        .collect();
    let mut w = framecast_gateway::audio_in::wav_header(rate, samples.len());
    w.extend(samples.iter().flat_map(|s| s.to_le_bytes()));
    w
}

/// A browser made of str0m: its connection on a thread, what it receives counted.
struct Peer {
    session: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
    seen: Arc<parking_lot::Mutex<Seen>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Seen {
    connected: bool,
    video_frames: u64,
    /// (arrival, RMS level 0..1, dominant frequency Hz) of each 20 ms of received voice.
    voice: Vec<(Instant, f64, f64)>,
    /// Events from the data channel, as JSON.
    channel_events: Vec<serde_json::Value>,
}

impl Peer {
    /// Offers to the gateway at `addr` for the `small` avatar in `mode`, sending a tone of
    /// `mic_hz` (0: silence) as its microphone.
    async fn connect(addr: SocketAddr, mode: &str, mic_hz: f64) -> Peer {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let local = socket.local_addr().unwrap();
        let mut rtc = RtcConfig::new().build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
        let mut api = rtc.sdp_api();
        let audio = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        api.add_channel("events".into());
        let (offer, pending) = api.apply().unwrap();
        let (status, head, answer) = http_full(
            addr,
            "POST",
            &format!("/sessions?avatar=small&mode={mode}"),
            &[("Content-Type", "application/sdp")],
            offer.to_sdp_string().as_bytes(),
        )
        .await;
        assert_eq!(status, 201, "{answer}");
        let session = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("location: /sessions/")
                    .or(l.strip_prefix("Location: /sessions/"))
            })
            .expect("a Location header")
            .trim()
            .to_string();
        rtc.sdp_api()
            .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap())
            .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = Arc::new(parking_lot::Mutex::new(Seen::default()));
        let (s, sn) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || run_peer(rtc, socket, local, audio, mic_hz, s, sn));
        Peer {
            session,
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> parking_lot::MutexGuard<'_, Seen> {
        self.seen.lock()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_peer(
    mut rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    audio: Mid,
    mic_hz: f64,
    stop: Arc<std::sync::atomic::AtomicBool>,
    seen: Arc<parking_lot::Mutex<Seen>>,
) {
    let mut encoder =
        opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Voip).unwrap();
    let mut decoder = opus::Decoder::new(48_000, opus::Channels::Mono).unwrap();
    let mut events_channel = None;
    let mut buf = vec![0u8; 2000];
    let start = Instant::now();
    let mut sent_packets = 0u64;
    let mut pcm = vec![0i16; 5760];
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        // The microphone: 20 ms packets in real time.
        let due = (start.elapsed().as_millis() / 20) as u64;
        while seen.lock().connected && sent_packets < due {
            let samples: Vec<i16> = (0..960)
                .map(|i| {
                    let t = (sent_packets * 960 + i) as f64 / 48_000.0;
                    (0.3 * (2.0 * std::f64::consts::PI * mic_hz * t).sin() * 32767.0) as i16
                })
                .collect();
            let mut out = [0u8; 400];
            let n = encoder.encode(&samples, &mut out).unwrap();
            if let Some(w) = rtc.writer(audio) {
                let pt = w
                    .payload_params()
                    .find(|p| p.spec().codec == Codec::Opus)
                    .map(|p| p.pt());
                if let Some(pt) = pt {
                    let time = MediaTime::new(sent_packets * 960, Frequency::FORTY_EIGHT_KHZ);
                    let _ = w.write(pt, Instant::now(), time, out[..n].to_vec());
                }
            }
            sent_packets += 1;
        }
        let timeout = loop {
            match rtc.poll_output() {
                Ok(Output::Timeout(t)) => break t,
                Ok(Output::Transmit(t)) => {
                    let _ = socket.send_to(&t.contents, t.destination);
                }
                Ok(Output::Event(e)) => match e {
                    Event::Connected => seen.lock().connected = true,
                    Event::ChannelOpen(id, _) => events_channel = Some(id),
                    Event::ChannelData(d) if Some(d.id) == events_channel => {
                        if let Ok(v) = serde_json::from_slice(&d.data) {
                            seen.lock().channel_events.push(v);
                        }
                    }
                    Event::MediaData(d) if d.mid == audio => {
                        if let Ok(n) = decoder.decode(&d.data, &mut pcm, false) {
                            let level = rms(&pcm[..n]);
                            let hz = dominant_hz(&pcm[..n], 48_000.0);
                            seen.lock().voice.push((Instant::now(), level, hz));
                        }
                    }
                    Event::MediaData(_) => seen.lock().video_frames += 1,
                    _ => {}
                },
                Err(_) => return,
            }
        };
        let wait = timeout
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(5));
        socket
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .unwrap();
        match socket.recv_from(&mut buf) {
            Ok((n, source)) => {
                if let Ok(contents) = buf[..n].try_into() {
                    let _ = rtc.handle_input(Input::Receive(
                        Instant::now(),
                        Receive {
                            proto: Protocol::Udp,
                            source,
                            destination: local,
                            contents,
                        },
                    ));
                }
            }
            Err(_) => {
                let _ = rtc.handle_input(Input::Timeout(Instant::now()));
            }
        }
    }
}

fn rms(pcm: &[i16]) -> f64 {
    let sum: f64 = pcm.iter().map(|&s| (s as f64 / 32768.0).powi(2)).sum();
    (sum / pcm.len().max(1) as f64).sqrt()
}

/// The frequency, among 200 to 2000 Hz in 20 Hz steps, with the most energy (a Goertzel
/// scan: enough to tell 440 from 880).
fn dominant_hz(pcm: &[i16], rate: f64) -> f64 {
    (10..=100)
        .map(|k| k as f64 * 20.0)
        .map(|hz| {
            let w = 2.0 * std::f64::consts::PI * hz / rate;
            let (mut s1, mut s2) = (0.0, 0.0);
            for &x in pcm {
                let s = x as f64 + 2.0 * w.cos() * s1 - s2;
                s2 = s1;
                s1 = s;
            }
            (s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2, hz)
        })
        .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a })
        .1
}

/// The session's server-sent events as they come, collected by a task.
struct EventLog(Arc<parking_lot::Mutex<Vec<serde_json::Value>>>);

impl EventLog {
    async fn open(addr: SocketAddr, session: &str, token: Option<&str>) -> EventLog {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let head = format!(
            "GET /sessions/{session}/events HTTP/1.1\r\nHost: gateway\r\nAccept: text/event-stream\r\n{auth}\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let into = log.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(s).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(data) = line.strip_prefix("data:") {
                    if let Ok(v) = serde_json::from_str(data.trim()) {
                        into.lock().push(v);
                    }
                }
            }
        });
        EventLog(log)
    }

    fn types(&self) -> Vec<String> {
        self.0
            .lock()
            .iter()
            .map(|v| v["type"].as_str().unwrap_or("").to_string())
            .collect()
    }

    fn find(&self, kind: &str) -> Option<serde_json::Value> {
        self.0.lock().iter().find(|v| v["type"] == kind).cloned()
    }
}

/// Waits up to `within` for `done` to hold.
async fn until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

async fn say_wav(addr: SocketAddr, session: &str, wav: &[u8], query: &str) -> (u16, String) {
    http(
        addr,
        "POST",
        &format!("/sessions/{session}/speech{query}"),
        &[("Content-Type", "audio/wav")],
        wav,
    )
    .await
}

/// Voice levels heard in `[from, to)`: (packets, mean RMS, share of packets at `hz`).
fn heard(seen: &Seen, from: Instant, to: Instant, hz: f64) -> (usize, f64, f64) {
    let v: Vec<&(Instant, f64, f64)> = seen
        .voice
        .iter()
        .filter(|(t, _, _)| *t >= from && *t < to)
        .collect();
    let n = v.len();
    let mean = v.iter().map(|(_, l, _)| l).sum::<f64>() / n.max(1) as f64;
    let loud: Vec<_> = v.iter().filter(|(_, l, _)| *l > 0.02).collect();
    let at = loud
        .iter()
        .filter(|(_, _, f)| (f - hz).abs() <= 40.0)
        .count();
    (n, mean, at as f64 / loud.len().max(1) as f64)
}

/// The application speaks: the browser gets the avatar's voice (the utterance's tone, loud
/// while it plays and silent before and after), video at full rate throughout (idle frames
/// between utterances), and the events in order with their frames, on the server-sent
/// events and on the data channel alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_application_speaks_and_the_browser_hears_and_sees_it() {
    let f = fixture(GatewayOptions::default()).await;
    let peer = Peer::connect(f.addr, "agent", 0.0).await;
    assert!(
        until(Duration::from_secs(10), || peer.seen().video_frames > 25).await,
        "no video"
    );
    let events = EventLog::open(f.addr, &peer.session, None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_from = Instant::now();
    let frames_before = peer.seen().video_frames;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_to = Instant::now();
    assert!(
        peer.seen().video_frames - frames_before >= 20,
        "idle video below 20 frames/s"
    );
    let (status, body) = say_wav(f.addr, &peer.session, &tone_wav(440.0, 1.5), "").await;
    assert_eq!(status, 202, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = reply["id"].as_str().unwrap().to_string();
    assert_eq!(reply["position"], 0);
    assert!(
        until(Duration::from_secs(8), || events
            .types()
            .contains(&"idle".to_string()))
        .await,
        "{:?}",
        events.types()
    );
    let types = events.types();
    let order: Vec<&str> = [
        "utterance_queued",
        "utterance_started",
        "utterance_ended",
        "idle",
    ]
    .into_iter()
    .filter(|t| types.iter().any(|x| x == t))
    .collect();
    assert_eq!(order.len(), 4, "{types:?}");
    let pos = |t: &str| types.iter().position(|x| x == t).unwrap();
    assert!(pos("utterance_queued") < pos("utterance_started"));
    assert!(pos("utterance_started") < pos("utterance_ended"));
    let started = events.find("utterance_started").unwrap();
    let ended = events.find("utterance_ended").unwrap();
    assert_eq!(started["id"], id.as_str());
    assert_eq!(ended["interrupted"], false);
    let frames = ended["frames"].as_u64().unwrap();
    assert!(
        (33..=42).contains(&frames),
        "1.5 s shown as {frames} frames"
    );
    let shown_s =
        (ended["unix_ms"].as_u64().unwrap() - started["unix_ms"].as_u64().unwrap()) as f64 / 1e3;
    assert!((1.2..=1.9).contains(&shown_s), "shown for {shown_s} s");
    // What the browser heard: silence before, the tone while it played, silence after.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = peer.seen();
    let (n, level, _) = heard(&seen, idle_from, idle_to, 440.0);
    assert!(
        n >= 40 && level < 0.01,
        "idle: {n} packets at level {level}"
    );
    let first_loud = seen
        .voice
        .iter()
        .find(|(t, l, _)| *t > idle_to && *l > 0.05)
        .map(|v| v.0);
    let first_loud = first_loud.expect("the utterance was never heard");
    let (n, level, at_hz) = heard(
        &seen,
        first_loud,
        first_loud + Duration::from_secs(1),
        440.0,
    );
    assert!(
        n >= 40 && level > 0.05 && at_hz > 0.8,
        "speaking: {n} at {level}, {at_hz} at 440 Hz"
    );
    let after = first_loud + Duration::from_millis(2000);
    let (n, level, _) = heard(&seen, after, after + Duration::from_millis(500), 440.0);
    assert!(
        n >= 15 && level < 0.01,
        "after: {n} packets at level {level}"
    );
    // The page's data channel got the same events.
    let page: Vec<String> = seen
        .channel_events
        .iter()
        .map(|v| v["type"].as_str().unwrap_or("").to_string())
        .collect();
    for t in [
        "utterance_queued",
        "utterance_started",
        "utterance_ended",
        "idle",
    ] {
        assert!(
            page.iter().any(|p| p == t),
            "{t} not on the data channel: {page:?}"
        );
    }
    assert_eq!(f.gateway.open_sessions(), 1);
}

/// An interrupt stops the voice at once and clears the queue: the utterance ends
/// interrupted (the queued one too), the browser hears silence within a few frames, and
/// the session speaks again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interrupt_silences_the_voice_and_clears_the_queue() {
    let f = fixture(GatewayOptions::default()).await;
    let peer = Peer::connect(f.addr, "agent", 0.0).await;
    assert!(until(Duration::from_secs(10), || peer.seen().video_frames > 25).await);
    let events = EventLog::open(f.addr, &peer.session, None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        say_wav(f.addr, &peer.session, &tone_wav(440.0, 4.0), "")
            .await
            .0,
        202
    );
    let (status, body) = say_wav(f.addr, &peer.session, &tone_wav(440.0, 2.0), "").await;
    assert_eq!(status, 202);
    assert!(body.contains("\"position\":1"), "{body}");
    assert!(
        until(Duration::from_secs(5), || peer
            .seen()
            .voice
            .iter()
            .any(|v| v.1 > 0.05))
        .await
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (status, body) = http(
        f.addr,
        "POST",
        &format!("/sessions/{}/interrupt", peer.session),
        &[],
        b"",
    )
    .await;
    let cut = Instant::now();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"interrupted\":2"), "{body}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    {
        // Loud packets after the interrupt: those already on their way (and the decoder's
        // tail of the last), none later than one frame period plus the jitter margin.
        let seen = peer.seen();
        let loud: Vec<Duration> = seen
            .voice
            .iter()
            .filter(|(t, l, _)| *t > cut && *l > 0.02)
            .map(|v| v.0 - cut)
            .collect();
        assert!(
            loud.iter().all(|d| *d < Duration::from_millis(190)),
            "voice after the interrupt: {loud:?}"
        );
        let heard_after = seen.voice.iter().filter(|(t, _, _)| *t > cut).count();
        assert!(
            heard_after >= 40,
            "the voice track stopped: {heard_after} packets in 1.2 s"
        );
    }
    let ended: Vec<serde_json::Value> = events
        .0
        .lock()
        .iter()
        .filter(|v| v["type"] == "utterance_ended")
        .cloned()
        .collect();
    assert_eq!(ended.len(), 2, "{ended:?}");
    assert!(ended.iter().all(|e| e["interrupted"] == true));
    // Still serving.
    assert_eq!(
        say_wav(f.addr, &peer.session, &tone_wav(440.0, 0.5), "")
            .await
            .0,
        202
    );
    assert!(
        until(Duration::from_secs(5), || {
            events
                .0
                .lock()
                .iter()
                .filter(|v| v["type"] == "utterance_ended")
                .count()
                == 3
        })
        .await
    );
}

/// Two sessions speak different utterances at once: each browser hears its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sessions_speak_at_once_without_crossing() {
    let f = fixture(GatewayOptions::default()).await;
    let a = Peer::connect(f.addr, "agent", 0.0).await;
    let b = Peer::connect(f.addr, "agent", 0.0).await;
    for p in [&a, &b] {
        assert!(until(Duration::from_secs(10), || p.seen().video_frames > 25).await);
    }
    let start = Instant::now();
    let (wa, wb) = (tone_wav(440.0, 2.0), tone_wav(880.0, 2.0));
    let (sa, sb) = tokio::join!(
        say_wav(f.addr, &a.session, &wa, ""),
        say_wav(f.addr, &b.session, &wb, "")
    );
    assert_eq!((sa.0, sb.0), (202, 202));
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let end = Instant::now();
    let (_, _, a440) = heard(&a.seen(), start, end, 440.0);
    let (_, _, b880) = heard(&b.seen(), start, end, 880.0);
    assert!(
        a440 > 0.8 && b880 > 0.8,
        "a at 440 Hz {a440}, b at 880 Hz {b880}"
    );
}

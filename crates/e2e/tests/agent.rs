//! Agent sessions with str0m as the browser, against the real gateway, compositor and
//! inference service: the speech API makes the avatar speak (its voice on the audio track, its
//! lips in the video), interrupts stop it, events say what was shown and when, the
//! microphone reaches the application, and every bad call gets its status without disturbing
//! the session.

use framecast_e2e::gateway_stack;
use framecast_e2e::http_request as http_full;
use framecast_gateway::GatewayOptions;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::change::SdpAnswer;
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid};
use str0m::{Candidate, Event, Output, Rtc, RtcConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

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
    /// The microphone's tone, Hz (f64 bits; 0: silence).
    mic: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    seen: Arc<parking_lot::Mutex<Seen>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Seen {
    connected: bool,
    video_frames: u64,
    /// Video frames the peer's H.264 decoder turned into pictures, and those it refused (a
    /// P frame it cannot place: joining the shared idle stream anywhere but at a key frame,
    /// a gap in it). A P frame decoded against the wrong picture still decodes: that the
    /// pictures are right across the switches is checked in the gateway's `idle_video` tests.
    video_decoded: u64,
    video_undecodable: u64,
    /// (arrival, RMS level 0..1, dominant frequency Hz) of each 20 ms of received voice.
    voice: Vec<(Instant, f64, f64)>,
    /// Its RTP time (48 kHz) and sequence number, in the same order.
    voice_rtp: Vec<(u64, u64)>,
    /// Events from the data channel, as JSON.
    channel_events: Vec<serde_json::Value>,
}

impl Peer {
    /// Offers to the gateway at `addr` for the `small` avatar in `mode`, sending a tone of
    /// `mic_hz` (0: silence) as its microphone.
    async fn connect(addr: SocketAddr, mode: &str, mic_hz: f64) -> Peer {
        Self::connect_with(addr, mode, mic_hz, None).await
    }

    /// [`Peer::connect`] with the gateway's `--api-token`.
    async fn connect_with(addr: SocketAddr, mode: &str, mic_hz: f64, token: Option<&str>) -> Peer {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let local = socket.local_addr().unwrap();
        let mut rtc = RtcConfig::new().build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
        let mut api = rtc.sdp_api();
        let audio = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        api.add_channel("events".into());
        let (offer, pending) = api.apply().unwrap();
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/sdp")];
        headers.extend(bearer.as_deref().map(|b| ("Authorization", b)));
        let (status, head, answer) = http_full(
            addr,
            "POST",
            &format!("/sessions?avatar=small&mode={mode}"),
            &headers,
            offer.to_sdp_string().as_bytes(),
        )
        .await;
        assert_eq!(status, 201, "{answer}");
        // The Location is absolute (RFC 9725): the session id is its last segment.
        let session = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .starts_with("location:")
                    .then(|| l[9..].trim())
            })
            .and_then(|url| url.rsplit("/sessions/").next())
            .expect("a Location header")
            .to_string();
        rtc.sdp_api()
            .accept_answer(pending, SdpAnswer::from_sdp_string(&answer).unwrap())
            .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = Arc::new(parking_lot::Mutex::new(Seen::default()));
        let mic = Arc::new(std::sync::atomic::AtomicU64::new(mic_hz.to_bits()));
        let (s, sn, m) = (stop.clone(), seen.clone(), mic.clone());
        let thread = std::thread::spawn(move || run_peer(rtc, socket, local, audio, m, s, sn));
        Peer {
            session,
            mic,
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> parking_lot::MutexGuard<'_, Seen> {
        self.seen.lock()
    }

    /// The microphone plays a tone at `hz` from now on (0: silence).
    fn mic(&self, hz: f64) {
        self.mic
            .store(hz.to_bits(), std::sync::atomic::Ordering::Release);
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
    mic: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    seen: Arc<parking_lot::Mutex<Seen>>,
) {
    let mut encoder =
        opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Voip).unwrap();
    let mut decoder = opus::Decoder::new(48_000, opus::Channels::Mono).unwrap();
    let mut video = openh264::decoder::Decoder::new().unwrap();
    let mut events_channel = None;
    let mut buf = vec![0u8; 2000];
    let start = Instant::now();
    let mut sent_packets = 0u64;
    let mut pcm = vec![0i16; 5760];
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        // The microphone: 20 ms packets in real time.
        let due = (start.elapsed().as_millis() / 20) as u64;
        while seen.lock().connected && sent_packets < due {
            let mic_hz = f64::from_bits(mic.load(std::sync::atomic::Ordering::Acquire));
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
                            let mut seen = seen.lock();
                            seen.voice.push((Instant::now(), level, hz));
                            let seq: u64 = *(*d.seq_range.start());
                            seen.voice_rtp.push((d.time.numer(), seq));
                        }
                    }
                    Event::MediaData(d) => {
                        let decoded = video.decode(&d.data);
                        let mut seen = seen.lock();
                        seen.video_frames += 1;
                        match decoded {
                            Ok(Some(_)) => seen.video_decoded += 1,
                            Ok(None) => {}
                            Err(_) => seen.video_undecodable += 1,
                        }
                    }
                    _ => {}
                },
                Err(_) => return,
            }
        };
        framecast_bench::gateway::feed(&mut rtc, &socket, local, timeout, &mut buf).unwrap();
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

    /// Every event of type `kind`, in order.
    fn all(&self, kind: &str) -> Vec<serde_json::Value> {
        self.0
            .lock()
            .iter()
            .filter(|v| v["type"] == kind)
            .cloned()
            .collect()
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
    let f = gateway_stack(GatewayOptions::default()).await;
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
    // Idle frames came from the avatar's shared idle stream, and every frame decoded,
    // the session's own encodes and the stream's, across idle -> speech -> idle.
    let (status, body) = http(
        f.addr,
        "GET",
        &format!("/sessions/{}", peer.session),
        &[],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    let shared = stats["idle_frames_shared"].as_u64().unwrap_or(0);
    assert!(
        shared > 50,
        "{shared} idle frames from the shared stream: {stats}"
    );
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
    assert_eq!(seen.video_undecodable, 0, "of {} frames", seen.video_frames);
    assert!(
        seen.video_decoded + 2 >= seen.video_frames,
        "{} of {} frames decoded",
        seen.video_decoded,
        seen.video_frames
    );
    assert_eq!(f.gateway.open_sessions(), 1);
}

/// An interrupt stops the voice at once and clears the queue: the utterance ends
/// interrupted (the queued one too), the browser hears silence within a few frames, and
/// the session speaks again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interrupt_silences_the_voice_and_clears_the_queue() {
    let f = gateway_stack(GatewayOptions::default()).await;
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
        let loud: Vec<(Duration, (u64, u64))> = seen
            .voice
            .iter()
            .zip(&seen.voice_rtp)
            .filter(|((t, l, _), _)| *t > cut && *l > 0.02)
            .map(|(v, rtp)| (v.0 - cut, *rtp))
            .collect();
        let around: Vec<String> = seen
            .voice
            .iter()
            .zip(&seen.voice_rtp)
            .filter(|((t, _, _), _)| {
                *t > cut - Duration::from_millis(100) && *t < cut + Duration::from_millis(500)
            })
            .map(|((t, l, _), (rtp, seq))| {
                format!("{}ms:{l:.3}:{rtp}:{seq}", (*t - cut).as_millis() as i64)
            })
            .collect();
        assert!(
            loud.iter().all(|d| d.0 < Duration::from_millis(190)),
            "voice after the interrupt: {loud:?}\n{around:?}"
        );
        let heard_after = seen.voice.iter().filter(|(t, _, _)| *t > cut).count();
        assert!(
            heard_after >= 40,
            "the voice track stopped: {heard_after} packets in 1.2 s"
        );
    }
    let ended = events.all("utterance_ended");
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
        until(Duration::from_secs(5), || events
            .all("utterance_ended")
            .len()
            == 3)
        .await
    );
    // `?interrupt=true` replaces what plays: a long 440 Hz utterance, cut by a 660 Hz one
    // that plays at once (position 0), the first reported interrupted.
    assert_eq!(
        say_wav(f.addr, &peer.session, &tone_wav(440.0, 4.0), "")
            .await
            .0,
        202
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (status, body) = say_wav(
        f.addr,
        &peer.session,
        &tone_wav(660.0, 1.5),
        "?interrupt=true",
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert!(body.contains("\"position\":0"), "{body}");
    let replaced = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, _, at660) = heard(
        &peer.seen(),
        replaced + Duration::from_millis(400),
        replaced + Duration::from_millis(1400),
        660.0,
    );
    assert!(
        at660 > 0.8,
        "after ?interrupt=true, {at660} of the voice at 660 Hz"
    );
    let ended = events.all("utterance_ended");
    assert!(
        ended.len() >= 4 && ended[3]["interrupted"] == true,
        "{ended:?}"
    );
}

/// Two sessions speak different utterances at once: each browser hears its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sessions_speak_at_once_without_crossing() {
    let f = gateway_stack(GatewayOptions::default()).await;
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

/// Every bad call gets its status and a reason naming what is wrong, and none disturbs the
/// session: it still speaks afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_calls_get_their_status_and_leave_the_session_alone() {
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let f = gateway_stack(GatewayOptions {
        max_speech_bytes: 64 << 10,
        max_utterances: 1,
        tts: framecast_gateway::tts::Tts::Http {
            url: format!("http://{closed_port}/tts"),
        },
        ..Default::default()
    })
    .await;
    let peer = Peer::connect(f.addr, "agent", 0.0).await;
    let mirror = Peer::connect(f.addr, "mirror", 0.0).await;
    assert!(until(Duration::from_secs(10), || peer.seen().video_frames > 10).await);
    let s = peer.session.clone();
    let post = |path: String, ct: &'static str, body: Vec<u8>| {
        let addr = f.addr;
        async move { http(addr, "POST", &path, &[("Content-Type", ct)], &body).await }
    };
    let speech = |ct: &'static str, body: Vec<u8>| post(format!("/sessions/{s}/speech"), ct, body);
    // Unknown and mirror sessions.
    for path in ["speech", "interrupt"] {
        let (status, why) = post(format!("/sessions/0123/{path}"), "audio/wav", vec![]).await;
        assert_eq!(status, 404, "{path}: {why}");
        let (status, why) = post(
            format!("/sessions/{}/{path}", mirror.session),
            "audio/wav",
            tone_wav(440.0, 0.1),
        )
        .await;
        assert_eq!(status, 409, "{path}: {why}");
        assert!(why.contains("mode=agent"), "{why}");
    }
    let (status, _) = http(f.addr, "GET", "/sessions/0123/events", &[], b"").await;
    assert_eq!(status, 404);
    // Content type, audio and text.
    let (status, why) = speech("application/octet-stream", vec![1, 2, 3]).await;
    assert_eq!(status, 415, "{why}");
    assert!(why.contains("Content-Type"), "{why}");
    let mut not_pcm = tone_wav(440.0, 0.1);
    not_pcm[20] = 3;
    let mut stereo = tone_wav(440.0, 0.1);
    stereo[22] = 2;
    let mut absurd = tone_wav(440.0, 0.1);
    absurd[24..28].copy_from_slice(&1_000_000u32.to_le_bytes());
    for (body, field) in [
        (not_pcm, "format"),
        (stereo, "channels"),
        (absurd, "sample_rate"),
    ] {
        let (status, why) = speech("audio/wav", body).await;
        assert_eq!(status, 400, "{why}");
        assert!(why.contains(field), "{field}: {why}");
    }
    let (status, why) = speech("audio/L16", vec![0; 100]).await;
    assert_eq!((status, why.contains("rate")), (400, true), "{why}");
    let (status, why) = speech("text/plain", b"   ".to_vec()).await;
    assert_eq!((status, why.starts_with("text")), (400, true), "{why}");
    let (status, why) = post(
        format!("/sessions/{s}/speech?rate=5"),
        "text/plain",
        b"hi".to_vec(),
    )
    .await;
    assert_eq!((status, why.starts_with("rate")), (400, true), "{why}");
    // A body past --max-speech-bytes.
    let (status, why) = speech("audio/pcm; rate=16000", vec![0; 100 << 10]).await;
    assert_eq!(status, 413, "{why}");
    // The TTS service is down: 502, and the session goes on.
    let (status, why) = speech("text/plain", b"hello".to_vec()).await;
    assert_eq!(status, 502, "{why}");
    // The queue holds one waiting utterance (besides the one playing).
    let first = speech("audio/wav", tone_wav(440.0, 1.5)).await.0;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let statuses = [
        first,
        speech("audio/wav", tone_wav(440.0, 1.5)).await.0,
        speech("audio/wav", tone_wav(440.0, 1.5)).await.0,
    ];
    assert_eq!(statuses, [202, 202, 429]);
    // The microphone: on a mirror session, and twice.
    let ws = |session: &str| {
        let url = format!("ws://{}/sessions/{session}/microphone", f.addr);
        async move { tokio_tungstenite::connect_async(url).await }
    };
    let Err(refused) = ws(&mirror.session).await else {
        panic!("a mirror session's microphone opened");
    };
    assert!(refused.to_string().contains("409"), "{refused}");
    let first = ws(&s).await.expect("the microphone");
    let Err(again) = ws(&s).await else {
        panic!("a second microphone opened");
    };
    assert!(again.to_string().contains("409"), "{again}");
    drop(first);
    // Ended: 410.
    let (status, _) = http(
        f.addr,
        "DELETE",
        &format!("/sessions/{}", mirror.session),
        &[],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    let (status, why) = post(
        format!("/sessions/{}/speech", mirror.session),
        "audio/wav",
        tone_wav(440.0, 0.1),
    )
    .await;
    assert_eq!(status, 410, "{why}");
    // Through all of it the session stayed, and speaks.
    let (status, why) = post(format!("/sessions/{s}/interrupt"), "text/plain", vec![]).await;
    assert_eq!(status, 200, "{why}");
    let (status, why) = speech("audio/wav", tone_wav(440.0, 0.3)).await;
    assert_eq!(status, 202, "{why}");
    assert_eq!(f.gateway.open_sessions(), 1);
}

/// With --api-token, opening a session and every agent endpoint want it: the session's id
/// alone is refused (401).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agent_endpoints_require_the_api_token() {
    let f = gateway_stack(GatewayOptions {
        api_token: Some("s3cret".into()),
        ..Default::default()
    })
    .await;
    // Opening a session wants it too (as WHIP's bearer token).
    let (status, why) = http(
        f.addr,
        "POST",
        "/sessions?avatar=small&mode=agent",
        &[("Content-Type", "application/sdp")],
        b"v=0\r\n",
    )
    .await;
    assert_eq!(status, 401, "{why}");
    let peer = Peer::connect_with(f.addr, "agent", 0.0, Some("s3cret")).await;
    let s = &peer.session;
    let wav = tone_wav(440.0, 0.2);
    for (method, path) in [
        ("POST", format!("/sessions/{s}/speech")),
        ("POST", format!("/sessions/{s}/interrupt")),
        ("GET", format!("/sessions/{s}/events")),
        ("GET", format!("/sessions/{s}/microphone")),
    ] {
        let (status, why) = http(
            f.addr,
            method,
            &path,
            &[("Content-Type", "audio/wav")],
            &wav,
        )
        .await;
        assert_eq!(status, 401, "{path}: {why}");
        let (status, _) = http(
            f.addr,
            method,
            &path,
            &[
                ("Content-Type", "audio/wav"),
                ("Authorization", "Bearer wrong"),
            ],
            &wav,
        )
        .await;
        assert_eq!(status, 401, "{path}");
    }
    let (status, why) = http(
        f.addr,
        "POST",
        &format!("/sessions/{s}/speech"),
        &[
            ("Content-Type", "audio/wav"),
            ("Authorization", "Bearer s3cret"),
        ],
        &wav,
    )
    .await;
    assert_eq!(status, 202, "{why}");
}

/// Text is spoken by espeak-ng (the voice and rate asked for), and the user's voice reaches
/// the application on the microphone WebSocket as 16 kHz PCM: the tone the browser sends
/// comes out at its frequency.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn text_is_spoken_and_the_microphone_reaches_the_application() {
    use futures::StreamExt;
    let f = gateway_stack(GatewayOptions::default()).await;
    let peer = Peer::connect(f.addr, "agent", 440.0).await;
    assert!(until(Duration::from_secs(10), || peer.seen().video_frames > 10).await);
    let events = EventLog::open(f.addr, &peer.session, None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, why) = http(
        f.addr,
        "POST",
        &format!("/sessions/{}/speech?voice=en-us&rate=180", peer.session),
        &[("Content-Type", "text/plain; charset=utf-8")],
        b"Hello from the application.",
    )
    .await;
    assert_eq!(status, 202, "{why}");
    let url = format!("ws://{}/sessions/{}/microphone", f.addr, peer.session);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut pcm: Vec<i16> = Vec::new();
    while pcm.len() < 16_000 {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(b)))) => {
                assert_eq!(b.len() % 2, 0, "half a sample");
                pcm.extend(b.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])));
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("microphone: {other:?}"),
        }
    }
    let hz = dominant_hz(&pcm[8000..16_000], 16_000.0);
    assert!((hz - 440.0).abs() <= 20.0, "the microphone carried {hz} Hz");
    assert!(
        until(Duration::from_secs(10), || events
            .types()
            .contains(&"utterance_ended".to_string()))
        .await,
        "{:?}",
        events.types()
    );
    let ended = events.find("utterance_ended").unwrap();
    assert!(ended["frames"].as_u64().unwrap() > 25, "{ended}");
    assert!(
        peer.seen().voice.iter().any(|(_, l, _)| *l > 0.05),
        "the speech was not heard"
    );
}

/// Speech streams: a chunked body's audio starts playing before the body has ended (the
/// call answers 202 once the header is in), and an operator's TTS service streaming raw PCM
/// back is spoken the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streamed_bodies_and_an_operators_tts_speak_before_they_end() {
    // A TTS service: raw 16-bit big-endian PCM at 16 kHz, 2 s of a 660 Hz tone in 100 ms
    // pieces, one every 100 ms: no faster than it is spoken.
    let tts = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tts_addr = tts.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tts.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\nContent-Type: audio/L16; rate=16000\r\nTransfer-Encoding: chunked\r\n\r\n";
                let _ = s.write_all(head.as_bytes()).await;
                for piece in 0..20 {
                    let pcm: Vec<u8> = (0..1600)
                        .flat_map(|i| {
                            let t = (piece * 1600 + i) as f64 / 16_000.0;
                            ((0.4 * (2.0 * std::f64::consts::PI * 660.0 * t).sin() * 32767.0)
                                as i16)
                                .to_be_bytes()
                        })
                        .collect();
                    let chunk = format!("{:x}\r\n", pcm.len());
                    let _ = s.write_all(chunk.as_bytes()).await;
                    let _ = s.write_all(&pcm).await;
                    let _ = s.write_all(b"\r\n").await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let _ = s.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    let f = gateway_stack(GatewayOptions {
        tts: framecast_gateway::tts::Tts::Http {
            url: format!("http://{tts_addr}/speak"),
        },
        ..Default::default()
    })
    .await;
    let peer = Peer::connect(f.addr, "agent", 0.0).await;
    assert!(until(Duration::from_secs(10), || peer.seen().video_frames > 10).await);
    let events = EventLog::open(f.addr, &peer.session, None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A chunked WAV body sent over 2 s: the utterance starts long before it ends.
    let wav = tone_wav(440.0, 2.0);
    let mut s = tokio::net::TcpStream::connect(f.addr).await.unwrap();
    let head = format!(
        "POST /sessions/{}/speech HTTP/1.1\r\nHost: gateway\r\nContent-Type: audio/wav\r\nTransfer-Encoding: chunked\r\n\r\n",
        peer.session
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let sent_from = Instant::now();
    for piece in wav.chunks(wav.len() / 20 + 1) {
        s.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(piece).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body_sent = sent_from.elapsed();
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let started = events
        .find("utterance_started")
        .expect("not started while the body came");
    assert!(body_sent > Duration::from_millis(1800));
    let mut reply = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut reply))
        .await
        .expect("no answer")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 202"), "{reply}");
    assert!(started["unix_ms"].as_u64().is_some());
    // The operator's TTS, streamed back: spoken as it comes.
    let (status, why) = http(
        f.addr,
        "POST",
        &format!("/sessions/{}/speech", peer.session),
        &[("Content-Type", "text/plain")],
        b"anything",
    )
    .await;
    assert_eq!(status, 202, "{why}");
    assert!(
        until(Duration::from_secs(10), || {
            events
                .0
                .lock()
                .iter()
                .filter(|v| v["type"] == "utterance_ended")
                .count()
                == 2
        })
        .await,
        "{:?}",
        events.types()
    );
    let ended: Vec<_> = events
        .0
        .lock()
        .iter()
        .filter(|v| v["type"] == "utterance_ended")
        .cloned()
        .collect();
    let frames: Vec<u64> = ended
        .iter()
        .map(|e| e["frames"].as_u64().unwrap())
        .collect();
    assert!(
        frames.iter().all(|n| (45..=56).contains(n)),
        "2 s each shown as {frames:?} frames"
    );
    let seen = peer.seen();
    assert!(
        seen.voice
            .iter()
            .filter(|(_, l, hz)| *l > 0.05 && (hz - 660.0).abs() <= 40.0)
            .count()
            > 40,
        "the TTS's 660 Hz was not heard"
    );
}

/// The example voice agent (examples/voice_agent.py) against a browser whose microphone
/// talks: it hears the end of the user's turn and answers through the speech API, and when
/// the user talks over the answer it cuts the avatar off (barge-in), then answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_voice_agent_answers_and_is_cut_off_by_the_user() {
    let python = std::env::var("FRAMECAST_REFERENCE_PYTHON").expect(
        "FRAMECAST_REFERENCE_PYTHON is not set: run through `make test` (scripts/setup.sh installs the example's websockets)",
    );
    let f = gateway_stack(GatewayOptions::default()).await;
    let peer = Peer::connect(f.addr, "agent", 0.0).await;
    assert!(until(Duration::from_secs(10), || peer.seen().video_frames > 10).await);
    let events = EventLog::open(f.addr, &peer.session, None).await;
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/voice_agent.py");
    let mut agent = tokio::process::Command::new(python)
        .arg(example)
        .args([
            "--gateway",
            &f.addr.to_string(),
            "--session",
            &format!("/sessions/{}", peer.session),
        ])
        .args(["--turns", "2", "--end-of-turn", "0.6"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("running examples/voice_agent.py");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The user speaks for 1.5 s; the agent answers once the turn is over.
    peer.mic(440.0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    peer.mic(0.0);
    assert!(
        until(Duration::from_secs(10), || events
            .types()
            .contains(&"utterance_started".to_string()))
        .await,
        "the agent never answered: {:?}",
        events.types()
    );
    // The user talks over the answer: the avatar is cut off.
    tokio::time::sleep(Duration::from_millis(400)).await;
    peer.mic(440.0);
    assert!(
        until(Duration::from_secs(5), || events
            .0
            .lock()
            .iter()
            .any(
                |e| e["type"] == "utterance_ended" && e["interrupted"] == true
            ))
        .await,
        "the agent did not stop for the user: {:?}",
        events.types()
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    peer.mic(0.0);
    let done = tokio::time::timeout(Duration::from_secs(15), agent.wait()).await;
    let status = done
        .expect("the agent did not finish its two turns")
        .unwrap();
    assert!(status.success(), "{status}");
    let mut out = String::new();
    agent
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .await
        .unwrap();
    let said: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("agent: saying"))
        .collect();
    assert_eq!(said.len(), 2, "{out}");
    assert!(said[0].contains("You spoke for 1."), "{out}");
    assert!(out.contains("agent: interrupted 1"), "{out}");
}

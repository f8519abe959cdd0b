//! `framecast-bench gateway`: many WebRTC sessions against framecast-gateway from one process,
//! each a real peer (str0m: the SDP offer over HTTP, ICE, DTLS-SRTP), speaking a WAV (or
//! espeak-ng's sentence) as Opus at real time and receiving the video, H.264 or VP8 as
//! `--codec` offers (decoded with `--decode`). Per session: frames per second, the longest gap between frames, the time from
//! each voice onset sent to the same onset coming back on the audio track (mirror mode plays
//! the browser's voice back with the frames of it, on one clock: this is the frames' latency
//! too), and the gateway's own latency figure. Per level: the CPU of each `--cpu` process per
//! delivered frame, and offers refused (503, admission) apart from sessions that failed.
//! `--sweep` finds the largest count where every session holds `--min-fps` with no gap over
//! `--max-gap-ms`.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::change::SdpAnswer;
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    /// The gateway's URL (http://HOST:PORT).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    #[arg(long, default_value = "demo")]
    pub avatar: String,
    /// Bearer token for session creation (the gateway's --api-token).
    #[arg(long, env = "FRAMECAST_GATEWAY_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Sessions at once (ignored with --sweep).
    #[arg(long, default_value_t = 1)]
    pub sessions: usize,
    /// Counts to try in turn, `FIRST:LAST[:STEP]`; reports the largest that held.
    #[arg(long)]
    pub sweep: Option<String>,
    /// Seconds each level runs once its sessions are up (frames before that do not count).
    #[arg(long, default_value_t = 15.0)]
    pub seconds: f64,
    /// What each session says (espeak-ng), looped, with a second of silence after each pass.
    #[arg(long, default_value = crate::demo::DEFAULT_TEXT)]
    pub text: String,
    /// A mono 16-bit WAV to speak instead of --text.
    #[arg(long)]
    pub wav: Option<std::path::PathBuf>,
    /// Decode the video (OpenH264, libvpx), as a browser would; without it frames are
    /// counted as they arrive.
    #[arg(long)]
    pub decode: bool,
    /// The video codecs each peer offers: h264, vp8, or both (the gateway chooses).
    #[arg(long, value_enum, default_value_t = Offer::Both)]
    pub codec: Offer,
    /// A session holds if it receives at least this many frames a second...
    #[arg(long, default_value_t = 24.0)]
    pub min_fps: f64,
    /// ...and no gap between frames is longer than this, ms.
    #[arg(long, default_value_t = 500.0)]
    pub max_gap_ms: f64,
    /// A process whose CPU time per delivered frame to report, as NAME=PID (repeat).
    #[arg(long = "cpu", value_parser = crate::speech::parse_cpu)]
    pub cpu: Vec<(String, u32)>,
    /// Where speech.wav and results.json go.
    #[arg(long, default_value = "out/bench-gateway")]
    pub out: std::path::PathBuf,
}

/// Video codecs a peer offers.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    H264,
    Vp8,
    Both,
}

/// A peer's video decoder, made for the codec the gateway chose.
enum VideoDecoder {
    H264(openh264::decoder::Decoder),
    Vp8(framecast_vp8::Decoder),
}

impl VideoDecoder {
    fn new(codec: Codec) -> Result<VideoDecoder> {
        Ok(match codec {
            Codec::Vp8 => VideoDecoder::Vp8(framecast_vp8::Decoder::new()?),
            _ => VideoDecoder::H264(openh264::decoder::Decoder::new().context("H.264 decoder")?),
        })
    }

    /// Whether `frame` decoded to a picture.
    fn decode(&mut self, frame: &[u8]) -> Result<bool> {
        Ok(match self {
            VideoDecoder::H264(d) => d.decode(frame)?.is_some(),
            VideoDecoder::Vp8(d) => d.decode(frame)?.is_some(),
        })
    }
}

/// What one session saw.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct Seen {
    /// The offer was refused with 503 (admission): no session.
    refused: bool,
    /// Why the session failed, if it did (not a refusal).
    failed: Option<String>,
    /// The video codec the gateway chose (as str0m names it).
    codec: Option<String>,
    frames: u64,
    decoded: u64,
    undecodable: u64,
    fps: f64,
    longest_gap_ms: f64,
    /// Voice onset sent -> the same onset heard back, ms, one per onset.
    onset_ms: Vec<f64>,
    /// The gateway's own figure for the session (`latency_ms_p50`, `latency_ms_p99`).
    gateway_latency_ms: (Option<f64>, Option<f64>),
}

#[derive(Debug, serde::Serialize)]
struct Level {
    sessions: usize,
    admitted: usize,
    refused: usize,
    failed: usize,
    held: usize,
    /// The video codecs the sessions got, as str0m names them.
    codecs: Vec<String>,
    fps_min: f64,
    fps_median: f64,
    longest_gap_ms: f64,
    onset_ms_p50: Option<f64>,
    onset_ms_p99: Option<f64>,
    gateway_latency_ms_p99_max: Option<f64>,
    frames: u64,
    /// CPU ms per delivered frame, per `--cpu` process.
    cpu_ms_per_frame: Vec<(String, f64)>,
    per_session: Vec<Seen>,
}

pub async fn run(args: GatewayArgs) -> Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let addr = http_addr(&args.url)?;
    let (rate, speech) = crate::demo::speech(&args.text, args.wav.as_deref(), &args.out)?;
    let voice = Arc::new(voice_packets(rate, &speech)?);
    let counts: Vec<usize> = match &args.sweep {
        Some(s) => sweep_counts(s)?,
        None => vec![args.sessions.max(1)],
    };
    let mut levels = Vec::new();
    let mut best = None;
    for n in counts {
        let level = run_level(&args, addr, n, voice.clone()).await?;
        print_level(&level);
        if level.held == level.sessions {
            best = Some(n);
        }
        levels.push(level);
    }
    if args.sweep.is_some() {
        match best {
            Some(n) => println!(
                "largest count with every session at >= {} frames/s and no gap over {} ms: {n}",
                args.min_fps, args.max_gap_ms
            ),
            None => println!("no count held every session"),
        }
    }
    let json = serde_json::to_string_pretty(&levels)?;
    std::fs::write(args.out.join("results.json"), json)?;
    Ok(())
}

fn print_level(l: &Level) {
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let cpu: String = l
        .cpu_ms_per_frame
        .iter()
        .map(|(n, ms)| format!("  cpu/frame {n} {ms:.2} ms"))
        .collect();
    println!(
        "sessions {:>3}  admitted {:>3}  refused {:>3}  failed {:>2}  held {:>3}  video {}  fps min {:>5.1} median {:>5.1}  longest gap {:>6.0} ms  onset->voice p50 {} p99 {} ms  gateway latency p99 max {} ms  frames {:>6}{cpu}",
        l.sessions,
        l.admitted,
        l.refused,
        l.failed,
        l.held,
        if l.codecs.is_empty() { "-".to_string() } else { l.codecs.join(",") },
        l.fps_min,
        l.fps_median,
        l.longest_gap_ms,
        opt(l.onset_ms_p50),
        opt(l.onset_ms_p99),
        opt(l.gateway_latency_ms_p99_max),
        l.frames
    );
}

fn sweep_counts(s: &str) -> Result<Vec<usize>> {
    let parts: Vec<usize> = s
        .split(':')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--sweep {s:?}: FIRST:LAST[:STEP], whole numbers"))?;
    let (first, last, step) = match parts[..] {
        [a, b] => (a, b, 1),
        [a, b, c] => (a, b, c),
        _ => bail!("--sweep {s:?}: FIRST:LAST[:STEP]"),
    };
    if first == 0 || last < first || step == 0 {
        bail!("--sweep {s:?}: need 1 <= FIRST <= LAST and STEP >= 1");
    }
    Ok((first..=last).step_by(step).collect())
}

/// `http://host:port` as a socket address.
fn http_addr(url: &str) -> Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--url {url}: only http:// is supported"))?;
    let host = rest.split('/').next().unwrap_or(rest);
    use std::net::ToSocketAddrs;
    host.to_socket_addrs()
        .with_context(|| format!("--url {url}: cannot resolve {host}"))?
        .next()
        .with_context(|| format!("--url {url}: no address for {host}"))
}

/// The speech as 20 ms Opus packets at 16 kHz (the RTP clock counts 48 kHz), with a second
/// of silence after it; and the indices of the packets where the voice starts after silence.
struct Voice {
    packets: Vec<Vec<u8>>,
    onsets: Vec<usize>,
}

const PACKET_MS: u64 = 20;

fn voice_packets(rate: u32, speech: &[i16]) -> Result<Voice> {
    let input: Vec<f32> = speech.iter().map(|&s| s as f32 / 32768.0).collect();
    let mut r = framecast_audio::Resampler::new(rate).map_err(anyhow::Error::msg)?;
    let mut pcm = Vec::new();
    r.push(&input, &mut pcm);
    r.finish(&mut pcm);
    pcm.extend(std::iter::repeat_n(0.0, 16_000));
    let mut enc = opus::Encoder::new(16_000, opus::Channels::Mono, opus::Application::Voip)
        .context("opus encoder")?;
    let per = 16_000 * PACKET_MS as usize / 1000;
    let mut packets = Vec::new();
    let mut onsets = Vec::new();
    let mut quiet = true;
    for chunk in pcm.chunks(per) {
        let mut frame: Vec<i16> = chunk.iter().map(|&s| (s * 32767.0) as i16).collect();
        frame.resize(per, 0);
        let level = (frame.iter().map(|&s| (s as f64).powi(2)).sum::<f64>() / per as f64).sqrt();
        let loud = level > 1000.0;
        if loud && quiet {
            onsets.push(packets.len());
        }
        quiet = level < 200.0 || (quiet && !loud);
        packets.push(enc.encode_vec(&frame, 4000).context("opus encode")?);
    }
    if onsets.is_empty() {
        bail!("the speech has no onset (it is silent)");
    }
    Ok(Voice { packets, onsets })
}

async fn run_level(
    args: &GatewayArgs,
    addr: SocketAddr,
    n: usize,
    voice: Arc<Voice>,
) -> Result<Level> {
    let stop = Arc::new(AtomicBool::new(false));
    // Sessions connect in the first few seconds; counting starts after.
    let warm = Duration::from_secs(4);
    let start = Instant::now();
    let count_from = start + warm;
    let until = count_from + Duration::from_secs_f64(args.seconds);
    let plan = Arc::new(Plan {
        addr,
        avatar: args.avatar.clone(),
        token: args.token.clone(),
        decode: args.decode,
        codec: args.codec,
        voice,
        count_from,
        until,
    });
    let mut threads = Vec::new();
    for i in 0..n {
        let (plan, stop) = (plan.clone(), stop.clone());
        // Offers spread over the first second, as independent browsers would come.
        let at = start + Duration::from_millis(1000 * i as u64 / n as u64);
        threads.push(std::thread::spawn(move || {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            peer(&plan, &stop)
        }));
    }
    let cpu_now = || -> Result<Vec<f64>> {
        args.cpu
            .iter()
            .map(|(_, pid)| crate::speech::cpu_seconds(*pid).map_err(anyhow::Error::msg))
            .collect()
    };
    // CPU over the counted span only: connecting (DTLS handshakes) is not a frame's cost.
    tokio::time::sleep(count_from.saturating_duration_since(Instant::now())).await;
    let cpu_before = cpu_now()?;
    tokio::time::sleep(until.saturating_duration_since(Instant::now()) + Duration::from_millis(50))
        .await;
    let cpu_after = cpu_now()?;
    stop.store(true, Ordering::Release);
    let mut seen = Vec::new();
    for t in threads {
        let s = tokio::task::spawn_blocking(move || t.join())
            .await?
            .map_err(|_| anyhow::anyhow!("a peer thread panicked"))?;
        seen.push(s);
    }
    let frames: u64 = seen.iter().map(|s| s.frames).sum();
    let cpu_ms_per_frame = args
        .cpu
        .iter()
        .zip(cpu_before.iter().zip(&cpu_after))
        .map(|((name, _), (a, b))| (name.clone(), (b - a) * 1e3 / frames.max(1) as f64))
        .collect();
    let admitted: Vec<&Seen> = seen.iter().filter(|s| !s.refused).collect();
    let ok = |s: &&&Seen| {
        s.failed.is_none() && s.fps >= args.min_fps && s.longest_gap_ms <= args.max_gap_ms
    };
    let mut fps: Vec<f64> = admitted.iter().map(|s| s.fps).collect();
    fps.sort_by(f64::total_cmp);
    let mut onsets: Vec<f64> = admitted.iter().flat_map(|s| s.onset_ms.clone()).collect();
    onsets.sort_by(f64::total_cmp);
    let pct =
        |v: &[f64], p: f64| (!v.is_empty()).then(|| v[((v.len() - 1) as f64 * p).round() as usize]);
    Ok(Level {
        sessions: n,
        admitted: admitted.len(),
        refused: seen.iter().filter(|s| s.refused).count(),
        failed: admitted.iter().filter(|s| s.failed.is_some()).count(),
        held: admitted.iter().filter(ok).count(),
        codecs: {
            let mut c: Vec<String> = admitted.iter().filter_map(|s| s.codec.clone()).collect();
            c.sort();
            c.dedup();
            c
        },
        fps_min: fps.first().copied().unwrap_or(0.0),
        fps_median: pct(&fps, 0.5).unwrap_or(0.0),
        longest_gap_ms: admitted
            .iter()
            .map(|s| s.longest_gap_ms)
            .fold(0.0, f64::max),
        onset_ms_p50: pct(&onsets, 0.5),
        onset_ms_p99: pct(&onsets, 0.99),
        gateway_latency_ms_p99_max: admitted
            .iter()
            .filter_map(|s| s.gateway_latency_ms.1)
            .reduce(f64::max),
        frames,
        cpu_ms_per_frame,
        per_session: seen,
    })
}

/// What every peer of a level does.
struct Plan {
    addr: SocketAddr,
    avatar: String,
    token: Option<String>,
    decode: bool,
    codec: Offer,
    voice: Arc<Voice>,
    /// Frames are counted from `count_from` to `until`.
    count_from: Instant,
    until: Instant,
}

/// One browser: offers, connects, speaks the voice in a loop at real time and takes the
/// video.
fn peer(plan: &Plan, stop: &AtomicBool) -> Seen {
    let mut seen = Seen::default();
    if let Err(e) = peer_inner(plan, stop, &mut seen) {
        if !seen.refused {
            seen.failed = Some(format!("{e:#}"));
        }
    }
    seen
}

/// A peer's input step: waits on `socket` (its address `local`) until str0m's `timeout`, at
/// least 1 ms and at most 5 ms (the peer has voice to send meanwhile), and hands `rtc` the
/// datagram that came, or the time that passed.
pub fn feed(
    rtc: &mut Rtc,
    socket: &UdpSocket,
    local: SocketAddr,
    timeout: Instant,
    buf: &mut [u8],
) -> std::io::Result<()> {
    let wait = timeout
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_millis(1), Duration::from_millis(5));
    socket.set_read_timeout(Some(wait))?;
    let input = match socket.recv_from(buf) {
        Ok((n, source)) => match buf[..n].try_into() {
            Ok(contents) => Input::Receive(
                Instant::now(),
                Receive {
                    proto: Protocol::Udp,
                    source,
                    destination: local,
                    contents,
                },
            ),
            // Not STUN, DTLS or RTP: ignored.
            Err(_) => return Ok(()),
        },
        Err(_) => Input::Timeout(Instant::now()),
    };
    let _ = rtc.handle_input(input);
    Ok(())
}

fn peer_inner(plan: &Plan, stop: &AtomicBool, seen: &mut Seen) -> Result<()> {
    let Plan {
        addr,
        ref avatar,
        ref token,
        decode,
        codec,
        ref voice,
        count_from,
        until,
    } = *plan;
    let token = token.as_deref();
    let socket = UdpSocket::bind((addr.ip(), 0)).context("UDP socket")?;
    let local = socket.local_addr()?;
    let config = RtcConfig::new().clear_codecs().enable_opus(true, false);
    let config = match codec {
        Offer::H264 => config.enable_h264(true),
        Offer::Vp8 => config.enable_vp8(true),
        Offer::Both => config.enable_h264(true).enable_vp8(true),
    };
    let mut rtc = config.build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local, "udp").context("candidate")?);
    let mut api = rtc.sdp_api();
    let audio = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    let (offer, pending) = api.apply().context("no offer")?;
    let path = format!("/sessions?avatar={avatar}&mode=mirror");
    let (status, head, body) = http_post(addr, &path, token, offer.to_sdp_string().as_bytes())?;
    if status == 503 {
        seen.refused = true;
        bail!("refused: {body}");
    }
    if status != 201 {
        bail!("offer answered {status}: {body}");
    }
    let location = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("location:")
                .then(|| l[9..].trim().to_string())
        })
        .context("no Location")?;
    let session = location.rsplit('/').next().unwrap_or_default().to_string();
    let answer = SdpAnswer::from_sdp_string(&body).context("the answer does not parse")?;
    rtc.sdp_api()
        .accept_answer(pending, answer)
        .context("answer")?;
    let mut decoder: Option<VideoDecoder> = None;
    let mut opus = opus::Decoder::new(48_000, opus::Channels::Mono).context("opus decoder")?;
    let mut pcm = vec![0i16; 5760];
    let mut buf = vec![0u8; 2000];
    let mut connected_at = None;
    let mut sent = 0usize;
    let mut last_frame: Option<Instant> = None;
    let mut first_counted: Option<Instant> = None;
    // Onsets sent (when), waiting to be heard back; the voice comes back in order.
    let mut onsets_sent: std::collections::VecDeque<Instant> = Default::default();
    let mut quiet_back = true;
    while !stop.load(Ordering::Acquire) && Instant::now() < until {
        if let Some(t0) = connected_at {
            let due = (Instant::now().saturating_duration_since(t0).as_millis() as u64 / PACKET_MS)
                as usize;
            while sent < due {
                let i = sent % voice.packets.len();
                if voice.onsets.contains(&i) && Instant::now() >= count_from {
                    onsets_sent.push_back(Instant::now());
                }
                if let Some(w) = rtc.writer(audio) {
                    let pt = w
                        .payload_params()
                        .find(|p| p.spec().codec == Codec::Opus)
                        .map(|p| p.pt());
                    if let Some(pt) = pt {
                        let time = MediaTime::new(sent as u64 * 960, Frequency::FORTY_EIGHT_KHZ);
                        let _ = w.write(pt, Instant::now(), time, voice.packets[i].clone());
                    }
                }
                sent += 1;
            }
        }
        let timeout = loop {
            match rtc.poll_output() {
                Ok(Output::Timeout(t)) => break t,
                Ok(Output::Transmit(t)) => {
                    let _ = socket.send_to(&t.contents, t.destination);
                }
                Ok(Output::Event(e)) => match e {
                    Event::Connected => connected_at = connected_at.or(Some(Instant::now())),
                    Event::MediaData(d) if d.mid == audio => {
                        if let Ok(n) = opus.decode(&d.data, &mut pcm, false) {
                            let level = (pcm[..n].iter().map(|&s| (s as f64).powi(2)).sum::<f64>()
                                / n.max(1) as f64)
                                .sqrt();
                            if level > 1000.0 && quiet_back {
                                if let Some(at) = onsets_sent.pop_front() {
                                    seen.onset_ms.push(at.elapsed().as_secs_f64() * 1e3);
                                }
                            }
                            quiet_back = level < 200.0 || (quiet_back && level <= 1000.0);
                        }
                    }
                    Event::MediaData(d) => {
                        let now = Instant::now();
                        if now >= count_from {
                            first_counted.get_or_insert(now);
                            seen.frames += 1;
                            if let Some(prev) = last_frame.filter(|p| *p >= count_from) {
                                let gap = now.duration_since(prev).as_secs_f64() * 1e3;
                                seen.longest_gap_ms = seen.longest_gap_ms.max(gap);
                            }
                        }
                        last_frame = Some(now);
                        let codec = d.params.spec().codec;
                        seen.codec.get_or_insert_with(|| codec.to_string());
                        if decode && decoder.is_none() {
                            decoder = Some(VideoDecoder::new(codec)?);
                        }
                        if let Some(dec) = decoder.as_mut() {
                            match dec.decode(&d.data) {
                                Ok(true) => seen.decoded += 1,
                                Ok(false) => {}
                                Err(_) => seen.undecodable += 1,
                            }
                        }
                    }
                    _ => {}
                },
                Err(e) => bail!("WebRTC: {e}"),
            }
        };
        feed(&mut rtc, &socket, local, timeout, &mut buf)?;
    }
    if connected_at.is_none() {
        bail!("never connected");
    }
    let span = until.saturating_duration_since(count_from).as_secs_f64();
    seen.fps = seen.frames as f64 / span;
    // The gap from the end of the span back to the last frame counts too.
    if let Some(last) = last_frame {
        let tail = until.saturating_duration_since(last).as_secs_f64() * 1e3;
        seen.longest_gap_ms = seen.longest_gap_ms.max(tail);
    }
    if first_counted.is_none() {
        seen.longest_gap_ms = span * 1e3;
    }
    // The gateway's own latency figure, then the session ended.
    if let Ok((200, _, body)) = http(addr, "GET", &format!("/sessions/{session}"), token, b"") {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
            seen.gateway_latency_ms = (v["latency_ms_p50"].as_f64(), v["latency_ms_p99"].as_f64());
        }
    }
    let _ = http(addr, "DELETE", &format!("/sessions/{session}"), token, b"");
    Ok(())
}

fn http_post(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> Result<(u16, String, String)> {
    http(addr, "POST", path, token, body)
}

/// One HTTP/1.1 request with `Connection: close`: (status, head, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    let text = String::from_utf8_lossy(&reply).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP answer: {:?}", head.get(..60)))?;
    Ok((status, head.to_string(), body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_parse_and_bad_ones_are_refused() {
        assert_eq!(sweep_counts("2:8:2").unwrap(), vec![2, 4, 6, 8]);
        assert_eq!(sweep_counts("1:3").unwrap(), vec![1, 2, 3]);
        for bad in ["0:4", "5:3", "1:4:0", "a:b", "1"] {
            assert!(sweep_counts(bad).is_err(), "{bad}");
        }
        assert!(http_addr("https://x:1").is_err());
        assert_eq!(http_addr("http://127.0.0.1:9").unwrap().port(), 9);
    }

    /// A voice with speech then silence has its onset at the start and packets of 20 ms.
    #[test]
    fn the_voice_is_opus_packets_with_its_onsets() {
        let speech: Vec<i16> = (0..16_000)
            .map(|i| ((i as f32 * 0.05).sin() * 12_000.0) as i16)
            .collect();
        let v = voice_packets(16_000, &speech).unwrap();
        assert_eq!(v.onsets, vec![0]);
        // One second of speech and one of silence, 20 ms each.
        assert!((99..=102).contains(&v.packets.len()), "{}", v.packets.len());
    }
}

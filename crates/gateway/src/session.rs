//! One browser session: its WebRTC connection (str0m, sans-IO, driven by a UDP socket on an
//! OS thread of its own) and its `Render` audio session with the compositor (a tokio task).
//!
//! A session is in one of two modes ([`Mode`]). **Mirror**: the avatar lip-syncs the
//! browser's own microphone and plays that voice back:
//!
//! ```text
//!  browser ──Opus──▶ [session thread] ──PCM──▶ [render task] ──RenderRequest.audio──▶ compositor
//!  browser ◀─H.264/VP8─ [session thread] ◀─I420── [render task] ◀──RenderedFrame (I420)── compositor
//!  browser ◀─Opus─── [session thread]   (the browser's own voice, delayed to meet its frames)
//! ```
//!
//! **Agent**: the application speaks through the avatar ([`crate::speech`]: a speaker task
//! makes the voice, 20 ms at a time in real time, from the utterances the speech API queues,
//! and silence between them) and hears the user (the microphone, decoded and resampled to 16
//! kHz, goes to the microphone WebSocket):
//!
//! ```text
//!  application ──speech API──▶ [speaker] ──PCM──▶ [render task] ──▶ compositor ──I420──▶ [render task]
//!                              [speaker] ──Opus, marks──▶ [session thread] ◀──I420────────┘
//!  browser ◀─video, Opus── [session thread] ──events──▶ data channel, server-sent events
//!  browser ──Opus──▶ [session thread] ──16 kHz PCM──▶ microphone WebSocket ──▶ application
//! ```
//!
//! The thread owns everything of the connection (str0m is not thread-safe, and the encoder's
//! work is the session's own) and is the one that knows what the person sees: it reports
//! each utterance's start and end when their frames leave. Channels between the tasks and
//! the thread are bounded.

use crate::backgrounds::AvatarBackgrounds;
use crate::events::{Event as SessionEvent, Events};
use crate::idle_video::{Encoding, IdleVideo};
use crate::media::{VideoCodec, VideoEncoder, VoiceDecoder, VOICE_RATE};
use crate::metrics::Metrics;
use crate::pacing::{Pacer, Voice};
use crate::speech::{self, Speaker, ToCompositor, ToThread};
use crate::splice::{region_rect, RegionSplice};
use crate::video_out::{Frame, Made, VideoOut};
use crate::Compositor;
use bytes::Bytes;
use framecast_compositor::raw_frame::Rect;
use framecast_proto::compositor::v1::{
    AudioChunk, AudioFormat, ImageFormat, RenderRequest, RenderedFrame, SampleFormat,
};
use futures::StreamExt;
use parking_lot::Mutex;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::channel::ChannelId;
use str0m::format::{Codec, PayloadParams};
use str0m::media::{Frequency, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Event, IceConnectionState, Input, Output, Rtc};

/// Who the avatar's voice and lips follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The browser's own microphone, played back (a demo of lip-sync).
    Mirror,
    /// The application's speech (the speech API); the microphone goes to the application.
    Agent,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Mirror => "mirror",
            Mode::Agent => "agent",
        }
    }
}

/// What a session needs to know about its avatar and its limits.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub id: String,
    pub mode: Mode,
    /// Utterances an agent session holds waiting.
    pub max_utterances: usize,
    pub avatar: String,
    pub width: usize,
    pub height: usize,
    pub fps: f64,
    pub video_bitrate_bps: u32,
    /// What the frames are encoded to (chosen from the offer).
    pub video_codec: VideoCodec,
    /// The session ends when the browser sends nothing for this long.
    pub timeout: Duration,
    /// Margin between a frame's arrival and its play time (absorbs the compositor's bursts).
    pub jitter: Duration,
    /// Longest a frame may show after its voice reached the gateway; later ones are dropped.
    pub max_latency: Duration,
    /// Idle frames come from the avatar's shared idle stream ([`crate::idle_video`]), so the
    /// compositor sends them as JPEG.
    pub shared_idle: bool,
    /// The avatar's face region in macroblocks, where talking frames splice their region
    /// into the shared stream ([`crate::splice`]); `None`: each talking frame encoded whole.
    pub face_layout: Option<framecast_h264::Layout>,
    /// The avatar's background frames (`AvatarInfo.frame_count`).
    pub backgrounds: u32,
}

/// Shortest time between two `falling_behind` events of a session.
const BEHIND_EVERY: Duration = Duration::from_secs(2);

/// Figures of one session, for `GET /sessions/{id}` and the page.
#[derive(Default)]
pub struct Stats {
    pub state: Mutex<String>,
    /// The video codec's name, as SDP writes it.
    pub video_codec: Mutex<&'static str>,
    /// Why it ended, once it has.
    pub ended: Mutex<Option<String>>,
    pub frames_received: AtomicU64,
    pub frames_sent: AtomicU64,
    /// Arrived from the compositor but late for their moment (a later frame was due).
    pub frames_dropped: AtomicU64,
    /// Never reached the encoder: missing from the compositor's stream, or no room to queue.
    pub frames_lost: AtomicU64,
    pub voice_packets_in: AtomicU64,
    pub voice_packets_out: AtomicU64,
    /// Idle frames sent from their avatar's shared idle stream, not encoded by the session.
    pub idle_frames_shared: AtomicU64,
    /// Talking frames sent as the shared stream with the session's face region spliced in.
    pub frames_spliced: AtomicU64,
    /// Frames the session's own encoder made whole.
    pub frames_encoded: AtomicU64,
    /// CPU time of the session's stages, µs in all: video encode (or taking a shared idle
    /// frame), Opus decode, and the
    /// writes to str0m (RTP packetisation and SRTP).
    pub encode_us_total: AtomicU64,
    pub decode_us_total: AtomicU64,
    pub packetize_us_total: AtomicU64,
    /// From the answer to the first frame sent, ms (0 until then).
    pub first_frame_ms: AtomicU64,
    /// The browser's round-trip time as its receiver reports say, µs (0 until known; on
    /// loopback well under a millisecond).
    pub rtt_us: AtomicU64,
    /// Per frame sent (the last 2,000), ms from the voice of its moment reaching the gateway
    /// to the frame (and that voice) leaving it: the gateway's share of mouth-to-ear latency.
    pub latency_ms: Mutex<std::collections::VecDeque<f32>>,
}

impl Stats {
    fn set_state(&self, s: &str) {
        *self.state.lock() = s.to_string();
    }

    /// The figures as JSON.
    pub fn snapshot(&self) -> serde_json::Value {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let sent = n(&self.frames_sent);
        let mut latency: Vec<f32> = self.latency_ms.lock().iter().copied().collect();
        latency.sort_by(f32::total_cmp);
        let pct = |p: f64| {
            latency
                .get(((latency.len() as f64 - 1.0) * p).round().max(0.0) as usize)
                .copied()
        };
        serde_json::json!({
            "state": *self.state.lock(),
            "video_codec": *self.video_codec.lock(),
            "ended": *self.ended.lock(),
            "frames_received": n(&self.frames_received),
            "frames_sent": sent,
            "frames_dropped": n(&self.frames_dropped),
            "frames_lost": n(&self.frames_lost),
            "voice_packets_in": n(&self.voice_packets_in),
            "voice_packets_out": n(&self.voice_packets_out),
            "idle_frames_shared": n(&self.idle_frames_shared),
            "frames_spliced": n(&self.frames_spliced),
            "frames_encoded": n(&self.frames_encoded),
            "encode_ms_mean": n(&self.encode_us_total) as f64 / 1e3 / sent.max(1) as f64,
            "encode_ms_total": n(&self.encode_us_total) as f64 / 1e3,
            "decode_ms_total": n(&self.decode_us_total) as f64 / 1e3,
            "packetize_ms_total": n(&self.packetize_us_total) as f64 / 1e3,
            "first_frame_ms": n(&self.first_frame_ms),
            "rtt_ms": n(&self.rtt_us) as f64 / 1e3,
            "latency_ms_p50": pct(0.5),
            "latency_ms_p99": pct(0.99),
        })
    }
}

/// A running session, as the HTTP side holds it.
pub struct Session {
    pub config: SessionConfig,
    pub stats: Arc<Stats>,
    pub events: Events,
    /// The speech queue (agent sessions).
    pub speaker: Option<Speaker>,
    /// The microphone as 16 kHz PCM, for the one WebSocket that may hold it at a time
    /// (agent sessions).
    pub microphone: Option<Arc<Mutex<Option<tokio::sync::mpsc::Receiver<Bytes>>>>>,
    stop: Arc<AtomicBool>,
    finished: Arc<AtomicBool>,
    render: tokio::task::JoinHandle<()>,
}

impl Session {
    /// Asks the session to end (DELETE, shutdown); its thread closes the connection.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.render.abort();
    }

    /// Its thread has returned.
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }
}

/// Frames queued between the render task and the session thread (one second at 25 fps; the
/// pacer holds the rest).
const FRAME_CHANNEL: usize = 25;
/// Decoded voice packets queued for the compositor (two seconds of 20 ms packets).
const VOICE_CHANNEL: usize = 100;
/// What the speaker sends the thread: two seconds of voice packets and their marks.
const SPEAKER_CHANNEL: usize = 256;
/// Microphone packets (20 ms) held for the WebSocket: two seconds; older ones are dropped
/// when no one reads.
const MIC_CHANNEL: usize = 100;

/// A frame from the compositor as the session encodes it.
struct Picture {
    /// As it came: I420 (of the whole frame, or of `form`'s region), or (an idle frame, when
    /// the session asked for them so) the prepared JPEG.
    image: Bytes,
    form: Form,
    /// Which of the avatar's background frames it shows.
    background: u32,
    /// The background as it is: no speech in it.
    idle: bool,
}

/// What a [`Picture`]'s image is.
enum Form {
    I420,
    Jpeg,
    /// A talking frame as only its face region (`RenderRequest.frame_region`), over its
    /// background's prepared JPEG (CRC-32 `crc`): with the frame the first time the stream
    /// sends it, else one the avatar's sessions keep ([`crate::backgrounds`]).
    Region {
        rect: Rect,
        background: Option<Bytes>,
        crc: u32,
    },
}

/// A region frame's background JPEG is neither with it nor kept: the frame cannot be made.
const NO_BACKGROUND: &str = "its background JPEG is not held";

impl Picture {
    fn of(f: RenderedFrame) -> Picture {
        let form = match (f.region, f.format == ImageFormat::Jpeg as i32) {
            (Some(r), _) => Form::Region {
                rect: Rect::from(r),
                background: (!f.background.is_empty()).then_some(f.background),
                crc: f.background_crc32,
            },
            (None, true) => Form::Jpeg,
            (None, false) => Form::I420,
        };
        Picture {
            image: f.image,
            form,
            background: f.background_index,
            idle: f.timings.as_ref().is_some_and(|t| t.idle),
        }
    }

    /// The CRC-32 of its background's picture as it came, which names it in the shared
    /// stream ([`Frame::picture`]).
    fn picture(&self) -> u32 {
        match &self.form {
            Form::Region { crc, .. } => *crc,
            Form::I420 | Form::Jpeg => crc32fast::hash(&self.image),
        }
    }

    /// The I420 of its background's picture (`size`: the avatar's), a region frame's JPEG
    /// from `kept` where it did not come with it.
    fn background_raw(
        &self,
        (w, h): (u32, u32),
        kept: Option<&AvatarBackgrounds>,
    ) -> Result<Vec<u8>, String> {
        let jpeg = match &self.form {
            Form::I420 => return Ok(self.image.to_vec()),
            Form::Jpeg => self.image.clone(),
            Form::Region {
                background: Some(jpeg),
                ..
            } => jpeg.clone(),
            Form::Region { crc, .. } => kept
                .and_then(|k| k.get(self.background, *crc))
                .ok_or(NO_BACKGROUND)?,
        };
        framecast_compositor::raw_frame::from_jpeg(&jpeg, w, h)
            .map_err(|e| format!("background JPEG: {e}"))
    }

    /// Its whole I420: as it came, or the JPEG decoded (with the region put in).
    fn raw(
        &self,
        size: (u32, u32),
        kept: Option<&AvatarBackgrounds>,
    ) -> Result<std::borrow::Cow<'_, [u8]>, String> {
        match &self.form {
            Form::I420 => Ok(std::borrow::Cow::Borrowed(&self.image)),
            Form::Jpeg => self.background_raw(size, kept).map(std::borrow::Cow::Owned),
            Form::Region { rect, .. } => {
                let mut frame = self.background_raw(size, kept)?;
                let at = (size.0 as usize, size.1 as usize);
                framecast_compositor::raw_frame::put(&mut frame, at, *rect, &self.image)
                    .map_err(|e| format!("face region: {e}"))?;
                Ok(std::borrow::Cow::Owned(frame))
            }
        }
    }
}

/// The face layout a session splices with: H.264 sessions that share the idle stream.
fn splice_layout(config: &SessionConfig) -> Option<framecast_h264::Layout> {
    (config.shared_idle && config.video_codec == VideoCodec::H264)
        .then_some(config.face_layout)
        .flatten()
}

/// A frame from the compositor: its index and picture.
type RenderedI420 = (u64, Picture);

/// Starts a session whose answer has been made: `rtc` holds it, `socket` is its UDP port.
/// `local` is the address the browser sends to (the candidate's; behind NAT not the socket's).
pub fn start(
    config: SessionConfig,
    rtc: Rtc,
    socket: UdpSocket,
    local: std::net::SocketAddr,
    compositor: Compositor,
    metrics: Metrics,
    idle_video: &Arc<IdleVideo>,
) -> Result<Session, String> {
    let stats = Arc::new(Stats::default());
    stats.set_state("new");
    *stats.video_codec.lock() = config.video_codec.name();
    let events = Events::new(config.fps);
    let (voice_tx, voice_rx) = tokio::sync::mpsc::channel::<ToCompositor>(VOICE_CHANNEL);
    let (frame_tx, frame_rx) = std::sync::mpsc::sync_channel::<RenderedI420>(FRAME_CHANNEL);
    let (agent, speaker, microphone) = match config.mode {
        Mode::Mirror => (None, None, None),
        Mode::Agent => {
            let (to_thread, from_speaker) = std::sync::mpsc::sync_channel(SPEAKER_CHANNEL);
            let speaker = speech::start(
                config.fps,
                config.max_utterances,
                speech::Outputs {
                    compositor: voice_tx.clone(),
                    thread: to_thread,
                    events: events.clone(),
                },
            )?;
            let (mic_tx, mic_rx) = tokio::sync::mpsc::channel(MIC_CHANNEL);
            let agent = AgentIo {
                from_speaker,
                microphone: mic_tx,
                resampler: framecast_audio::Resampler::new(VOICE_RATE)
                    .map_err(|e| format!("microphone resampler: {e}"))?,
                marks: Vec::new(),
                started: Vec::new(),
            };
            (
                Some(agent),
                Some(speaker),
                Some(Arc::new(Mutex::new(Some(mic_rx)))),
            )
        }
    };
    let rate = match config.mode {
        Mode::Mirror => VOICE_RATE,
        Mode::Agent => crate::audio_in::RATE,
    };
    // Talking frames come as their face region, each background's JPEG once a stream: the
    // avatar's sessions keep them ([`crate::backgrounds`]).
    let kept = splice_layout(&config).map(|_| {
        idle_video
            .backgrounds
            .of(&config.avatar, config.backgrounds)
    });
    let render = tokio::spawn(render(
        compositor,
        config.clone(),
        rate,
        voice_rx,
        frame_tx,
        stats.clone(),
        kept.clone(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let mut worker = Worker {
        video: VideoOut {
            encoder: VideoEncoder::new(
                config.video_codec,
                config.width,
                config.height,
                config.fps,
                config.video_bitrate_bps,
            )?,
            idle: idle_video.follower(Encoding {
                codec: config.video_codec,
                avatar: config.avatar.clone(),
                width: config.width,
                height: config.height,
                fps_milli: (config.fps * 1000.0).round() as u64,
                bitrate_bps: config.video_bitrate_bps,
                layout: splice_layout(&config),
            }),
            splice: match splice_layout(&config) {
                Some(layout) => Some(RegionSplice::new(
                    layout,
                    (config.width, config.height),
                    config.fps,
                    config.video_bitrate_bps,
                )?),
                None => None,
            },
        },
        decoder: VoiceDecoder::new()?,
        pacer: Pacer::new(config.fps, config.jitter).with_max_latency(config.max_latency),
        config: config.clone(),
        rtc,
        socket,
        local,
        stats: stats.clone(),
        metrics,
        voice_tx,
        frame_rx,
        kept,
        asked_resend: None,
        stop: stop.clone(),
        agent,
        events: events.clone(),
        event_feed: events.subscribe(),
        channel: None,
        last_sent: 0,
        audio_mid: None,
        video_mid: None,
        voice_base: None,
        voice_arrivals: Default::default(),
        said_behind: None,
        answered: Instant::now(),
        last_heard: Instant::now(),
    };
    let done = finished.clone();
    let span = tracing::info_span!("session", id = %config.id, avatar = %config.avatar);
    std::thread::Builder::new()
        .name(format!("session-{}", config.id))
        .spawn(move || {
            let _entered = span.enter();
            let reason = match worker.run() {
                Ok(reason) => reason,
                Err(e) => format!("failed: {e}"),
            };
            tracing::info!(%reason, "session ended");
            worker.stats.set_state("closed");
            worker.events.send(SessionEvent::Closed {
                reason: reason.clone(),
            });
            worker.forward_events();
            *worker.stats.ended.lock() = Some(reason);
            worker.rtc.disconnect();
            done.store(true, Ordering::Release);
        })
        .map_err(|e| format!("cannot start the session thread: {e}"))?;
    Ok(Session {
        config,
        stats,
        events,
        speaker,
        microphone,
        stop,
        finished,
        render,
    })
}

/// The compositor side: one `Render` audio session fed with the session's voice (16-bit PCM
/// at `rate`: the browser's, or the speaker's), its I420 frames handed to the session thread.
async fn render(
    mut client: Compositor,
    config: SessionConfig,
    rate: u32,
    mut voice: tokio::sync::mpsc::Receiver<ToCompositor>,
    frames: SyncSender<RenderedI420>,
    stats: Arc<Stats>,
    kept: Option<Arc<AvatarBackgrounds>>,
) {
    // The session opens with the first voice, so its frame 0 is the voice's moment 0.
    let first = loop {
        match voice.recv().await {
            Some(ToCompositor::Pcm(pcm)) => break pcm,
            Some(ToCompositor::Cancel | ToCompositor::ResendBackgrounds) => continue,
            None => return,
        }
    };
    let opening = RenderRequest {
        request_id: config.id.clone(),
        avatar_id: config.avatar.clone(),
        start_frame: 0,
        frame_format: ImageFormat::I420 as i32,
        // Idle frames as their prepared JPEG: the shared idle stream needs a picture decoded
        // only when it encodes it, not 1.4 MB of I420 for every idle frame of every session.
        idle_frame_format: if config.shared_idle {
            ImageFormat::Jpeg as i32
        } else {
            ImageFormat::Unspecified as i32
        },
        // Talking frames as the face region only where they are spliced: the rest of the
        // frame is the shared stream's, so 1.4 MB a frame need not cross the socket.
        // Each background's JPEG once: the avatar's sessions keep them.
        backgrounds_once: kept.is_some(),
        frame_region: splice_layout(&config)
            .map(|layout| region_rect(&layout, (config.width, config.height)).into()),
        audio: Some(AudioChunk {
            format: Some(AudioFormat {
                sample_format: SampleFormat::S16le as i32,
                sample_rate: rate,
            }),
            pcm: first,
            ..Default::default()
        }),
        ..Default::default()
    };
    let rest = tokio_stream::wrappers::ReceiverStream::new(voice).map(|v| RenderRequest {
        resend_backgrounds: matches!(v, ToCompositor::ResendBackgrounds),
        audio: Some(match v {
            ToCompositor::Pcm(pcm) => AudioChunk {
                pcm,
                ..Default::default()
            },
            ToCompositor::Cancel => AudioChunk {
                cancel: true,
                ..Default::default()
            },
            ToCompositor::ResendBackgrounds => AudioChunk::default(),
        }),
        ..Default::default()
    });
    let requests = futures::stream::once(async { opening }).chain(rest);
    let mut stream = match client.render(requests).await {
        Ok(s) => s.into_inner(),
        Err(e) => {
            *stats.ended.lock() = Some(format!("compositor refused the session: {}", e.message()));
            return;
        }
    };
    let mut expected = 0u64;
    loop {
        match stream.message().await {
            Ok(Some(f)) => {
                stats.frames_received.fetch_add(1, Ordering::Relaxed);
                if f.frame_index > expected {
                    stats
                        .frames_lost
                        .fetch_add(f.frame_index - expected, Ordering::Relaxed);
                }
                expected = f.frame_index + 1;
                let index = f.frame_index;
                if let (Some(kept), Some(_), false) = (&kept, &f.region, f.background.is_empty()) {
                    // Kept here, not by the worker: a frame lost on the way below still
                    // brought its background, which the compositor sends once.
                    kept.keep(f.background_index, f.background_crc32, f.background.clone());
                }
                match frames.try_send((index, Picture::of(f))) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        stats.frames_lost.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(TrySendError::Disconnected(_)) => return,
                }
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e.message(), "render stream failed");
                *stats.ended.lock() = Some(format!("compositor: {}", e.message()));
                return;
            }
        }
    }
}

struct Worker {
    config: SessionConfig,
    rtc: Rtc,
    socket: UdpSocket,
    local: std::net::SocketAddr,
    /// Its encoders: its own, its place in the avatar's shared stream, its face region's.
    video: VideoOut,
    decoder: VoiceDecoder,
    pacer: Pacer<Picture>,
    stats: Arc<Stats>,
    metrics: Metrics,
    voice_tx: tokio::sync::mpsc::Sender<ToCompositor>,
    frame_rx: Receiver<RenderedI420>,
    /// The avatar's background JPEGs, where talking frames come as their region.
    kept: Option<Arc<AvatarBackgrounds>>,
    /// When the compositor was last asked to send background JPEGs again.
    asked_resend: Option<Instant>,
    stop: Arc<AtomicBool>,
    /// What an agent session has besides (`None` in mirror mode).
    agent: Option<AgentIo>,
    events: Events,
    /// The events, for the data channel.
    event_feed: tokio::sync::broadcast::Receiver<Arc<str>>,
    /// The page's data channel for events, once open.
    channel: Option<ChannelId>,
    /// The index of the last frame sent.
    last_sent: u64,
    audio_mid: Option<Mid>,
    video_mid: Option<Mid>,
    /// RTP time of the first voice packet: the session's moment 0.
    voice_base: Option<u64>,
    /// (moment in seconds, arrival) of the last ten seconds of voice packets: when the voice
    /// of a frame's moment reached the gateway, for the latency figure.
    voice_arrivals: std::collections::VecDeque<(f64, Instant)>,
    /// When `falling_behind` was last told.
    said_behind: Option<Instant>,
    answered: Instant,
    /// When the browser last proved it is there: the answer, the connection, then each of its
    /// voice packets (only the peer holding the DTLS keys can send one: datagrams from
    /// anyone else at the session's port never keep it alive).
    last_heard: Instant,
}

/// An agent session's side of the thread: the speaker's packets and marks in, the
/// microphone out.
struct AgentIo {
    from_speaker: Receiver<ToThread>,
    microphone: tokio::sync::mpsc::Sender<Bytes>,
    /// The microphone from Opus's 48 kHz to 16 kHz.
    resampler: framecast_audio::Resampler,
    /// Events to report when their frame leaves, in frame order.
    marks: Vec<(u64, SessionEvent)>,
    /// Utterances started on screen: (id, first frame).
    started: Vec<(String, u64)>,
}

impl Worker {
    /// Runs until the session ends; returns why.
    fn run(&mut self) -> Result<String, String> {
        let mut buf = vec![0u8; 2000];
        let local = self.local;
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok("ended by the client (DELETE) or shutdown".into());
            }
            if self.last_heard.elapsed() > self.config.timeout {
                return Ok(format!(
                    "reaped: nothing from the browser for {} s",
                    self.config.timeout.as_secs_f64()
                ));
            }
            self.take_frames()?;
            self.take_speech();
            let now = Instant::now();
            self.send_due(now)?;
            self.forward_events();
            let rtc_deadline = match self.poll()? {
                Some(t) => t,
                None => return Ok("the browser disconnected".into()),
            };
            let now = Instant::now();
            let wake = [Some(rtc_deadline), self.pacer.next()]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(now)
                .min(now + Duration::from_millis(10));
            let wait = wake.saturating_duration_since(now);
            if wait.is_zero() {
                self.rtc
                    .handle_input(Input::Timeout(now))
                    .map_err(|e| e.to_string())?;
                continue;
            }
            self.socket
                .set_read_timeout(Some(wait))
                .map_err(|e| e.to_string())?;
            buf.resize(2000, 0);
            match self.socket.recv_from(&mut buf) {
                Ok((n, source)) => {
                    let Ok(contents) = buf[..n].try_into() else {
                        continue; // not STUN, DTLS or RTP: ignored
                    };
                    let input = Input::Receive(
                        Instant::now(),
                        Receive {
                            proto: Protocol::Udp,
                            source,
                            destination: local,
                            contents,
                        },
                    );
                    if let Err(e) = self.rtc.handle_input(input) {
                        tracing::debug!(error = %e, "packet refused");
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    self.rtc
                        .handle_input(Input::Timeout(Instant::now()))
                        .map_err(|e| e.to_string())?;
                }
                Err(e) => return Err(format!("UDP: {e}")),
            }
        }
    }

    /// Drives str0m until it waits: sends its datagrams, handles its events. `None` once the
    /// connection is gone.
    fn poll(&mut self) -> Result<Option<Instant>, String> {
        loop {
            match self.rtc.poll_output().map_err(|e| e.to_string())? {
                Output::Timeout(t) => return Ok(Some(t)),
                Output::Transmit(t) => {
                    let _ = self.socket.send_to(&t.contents, t.destination);
                }
                Output::Event(e) => {
                    if !self.event(e)? {
                        return Ok(None);
                    }
                }
            }
            if !self.rtc.is_alive() {
                return Ok(None);
            }
        }
    }

    /// Handles one event; false when the connection is over.
    fn event(&mut self, e: Event) -> Result<bool, String> {
        match e {
            Event::Connected => {
                self.last_heard = Instant::now();
                self.stats.set_state("connected");
                tracing::info!("connected");
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => return Ok(false),
            Event::MediaAdded(m) => match m.kind {
                MediaKind::Audio => self.audio_mid = Some(m.mid),
                MediaKind::Video => self.video_mid = Some(m.mid),
            },
            Event::MediaData(d) if Some(d.mid) == self.audio_mid && self.agent.is_some() => {
                self.last_heard = Instant::now();
                self.stats.voice_packets_in.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                let decoded = self.decoder.decode(&d.data);
                self.stats
                    .decode_us_total
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                if let (Ok(pcm), Some(agent)) = (decoded, self.agent.as_mut()) {
                    agent.hear(&pcm);
                }
            }
            Event::MediaData(d) if Some(d.mid) == self.audio_mid => {
                self.last_heard = Instant::now();
                self.stats.voice_packets_in.fetch_add(1, Ordering::Relaxed);
                let rtp = d.time.rebase(Frequency::FORTY_EIGHT_KHZ).numer();
                let base = *self.voice_base.get_or_insert(rtp);
                let at = rtp.saturating_sub(base) as f64 / VOICE_RATE as f64;
                Self::voice_came(&mut self.voice_arrivals, at);
                let started = Instant::now();
                let decoded = self.decoder.decode(&d.data);
                self.stats
                    .decode_us_total
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                match decoded {
                    Ok(pcm) => {
                        // A compositor slower than the voice loses voice, never blocks here.
                        let _ = self.voice_tx.try_send(ToCompositor::Pcm(Bytes::from(pcm)));
                    }
                    Err(e) => tracing::debug!(error = %e, "voice packet not decoded"),
                }
                self.pacer.push_voice(Voice {
                    at,
                    rtp_time: rtp,
                    payload: d.data.clone(),
                });
            }
            Event::KeyframeRequest(_) => self.video.key_frame_asked(),
            Event::ChannelOpen(id, label) if label == EVENTS_CHANNEL => self.channel = Some(id),
            // The round trip from the browser's receiver reports (RTCP), or from transport-wide
            // congestion control feedback where the browser sends it.
            Event::MediaEgressStats(s) => self.rtt(s.rtt),
            Event::PeerStats(s) => self.rtt(s.rtt),
            _ => {}
        }
        Ok(true)
    }

    fn rtt(&self, rtt: Option<Duration>) {
        if let Some(rtt) = rtt {
            self.stats
                .rtt_us
                .store(rtt.as_micros() as u64, Ordering::Relaxed);
            self.metrics.rtt_seconds.observe(rtt.as_secs_f64());
        }
    }

    /// Moves the frames the render task has sent into the pacer.
    fn take_frames(&mut self) -> Result<(), String> {
        loop {
            match self.frame_rx.try_recv() {
                Ok((index, picture)) => {
                    let heard = self.heard(index);
                    let idle = picture.idle;
                    let dropped =
                        self.pacer
                            .push_frame(Instant::now(), index, picture, idle, heard);
                    self.count_dropped(dropped);
                    self.say_if_behind(dropped);
                }
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => {
                    let why = self.stats.ended.lock().clone();
                    return Err(why.unwrap_or_else(|| "the compositor ended the session".into()));
                }
            }
        }
    }

    /// When the voice of frame `index`'s moment reached the gateway (the browser's, or the
    /// speaker's as it made it), if it is still remembered.
    fn heard(&self, index: u64) -> Option<Instant> {
        let moment = index as f64 / self.config.fps;
        let at = self.voice_arrivals.partition_point(|(at, _)| *at < moment);
        self.voice_arrivals.get(at).map(|(_, t)| *t)
    }

    /// Remembers in `arrivals` when the voice of moment `at` came, for [`Self::heard`].
    fn voice_came(arrivals: &mut std::collections::VecDeque<(f64, Instant)>, at: f64) {
        arrivals.push_back((at, Instant::now()));
        if arrivals.len() > 500 {
            arrivals.pop_front();
        }
    }

    /// Takes what the speaker has sent: voice packets into the pacer, marks to report, cuts.
    fn take_speech(&mut self) {
        let Some(agent) = self.agent.as_mut() else {
            return;
        };
        while let Ok(m) = agent.from_speaker.try_recv() {
            match m {
                ToThread::Voice {
                    at,
                    rtp_time,
                    payload,
                } => {
                    Self::voice_came(&mut self.voice_arrivals, at);
                    self.pacer.push_voice(Voice {
                        at,
                        rtp_time,
                        payload,
                    })
                }
                ToThread::Mark { frame, event } => agent.marks.push((frame, event)),
                ToThread::Cut {
                    frame,
                    interrupted,
                    silence,
                } => {
                    self.pacer.cut(frame, Instant::now(), &silence);
                    let shown = self.last_sent;
                    if let Some(id) = interrupted {
                        // Its marks go (it will not start or end as planned).
                        agent.marks.retain(|(_, e)| !is_about(e, &id));
                        let first = agent.started.iter().position(|(s, _)| *s == id);
                        let (frame, frames) = match first {
                            Some(i) => {
                                let (_, first) = agent.started.swap_remove(i);
                                (Some(shown), shown.saturating_sub(first))
                            }
                            None => (None, 0),
                        };
                        self.events.send(SessionEvent::Ended {
                            id,
                            frame,
                            frames,
                            interrupted: true,
                        });
                    }
                }
            }
        }
    }

    /// Forwards the events published since the last call to the page's data channel.
    fn forward_events(&mut self) {
        use tokio::sync::broadcast::error::TryRecvError;
        loop {
            let json = match self.event_feed.try_recv() {
                Ok(json) => json,
                Err(TryRecvError::Lagged(n)) => {
                    Arc::from(format!("{{\"type\":\"events_missed\",\"count\":{n}}}"))
                }
                Err(_) => return,
            };
            if let Some(mut ch) = self.channel.and_then(|id| self.rtc.channel(id)) {
                let _ = ch.write(false, json.as_bytes());
            }
        }
    }

    /// Reports the marks due once frame `index` has left.
    fn report_marks(&mut self, index: u64) {
        let Some(agent) = self.agent.as_mut() else {
            return;
        };
        while agent.marks.first().is_some_and(|(f, _)| *f <= index) {
            let (_, event) = agent.marks.remove(0);
            let event = match event {
                SessionEvent::Started { id, .. } => {
                    agent.started.push((id.clone(), index));
                    SessionEvent::Started {
                        id,
                        frame: Some(index),
                    }
                }
                SessionEvent::Ended {
                    id, interrupted, ..
                } => {
                    let first = agent
                        .started
                        .iter()
                        .position(|(s, _)| *s == id)
                        .map(|i| agent.started.swap_remove(i).1)
                        .unwrap_or(index);
                    SessionEvent::Ended {
                        id,
                        frame: Some(index),
                        frames: index.saturating_sub(first),
                        interrupted,
                    }
                }
                other => other.at(index),
            };
            self.events.send(event);
        }
    }

    /// A session that cannot be held at its frame rate says so: `falling_behind` on its
    /// events, at most every [`BEHIND_EVERY`] while frames keep being dropped.
    fn say_if_behind(&mut self, dropped: u64) {
        let now = Instant::now();
        if dropped == 0 || self.said_behind.is_some_and(|t| now - t < BEHIND_EVERY) {
            return;
        }
        self.said_behind = Some(now);
        self.events.send(SessionEvent::Behind {
            dropped: self.stats.frames_dropped.load(Ordering::Relaxed),
        });
    }

    fn count_dropped(&self, n: u64) {
        if n > 0 {
            self.stats.frames_dropped.fetch_add(n, Ordering::Relaxed);
            self.metrics.frames_dropped.inc_by(n);
        }
    }

    /// The access unit of `picture` ([`crate::video_out`]), counted by where it came from;
    /// `None`: it cannot be made (a region frame whose background JPEG is not held, which a
    /// conforming compositor never causes): dropped, counted, and the compositor asked for
    /// its backgrounds again (at most once a second).
    fn video_frame(&mut self, picture: &Picture) -> Result<Option<Vec<u8>>, String> {
        let size = (self.config.width as u32, self.config.height as u32);
        let region = match &picture.form {
            Form::Region { rect, .. }
                if Some(*rect) == self.video.splice.as_ref().map(|s| s.rect()) =>
            {
                Some(&picture.image[..])
            }
            _ => None,
        };
        let frame = Frame {
            idle: picture.idle,
            background: picture.background,
            picture: picture.picture(),
            region,
        };
        let kept = self.kept.as_deref();
        let made = self.video.frame(
            &frame,
            || picture.background_raw(size, kept),
            || picture.raw(size, kept),
        );
        let (au, made) = match made {
            Err(e) if e == NO_BACKGROUND => {
                tracing::warn!(
                    background = picture.background,
                    "talking frame dropped: {e}"
                );
                self.count_dropped(1);
                let now = Instant::now();
                if self
                    .asked_resend
                    .is_none_or(|t| now - t >= Duration::from_secs(1))
                {
                    self.asked_resend = Some(now);
                    let _ = self.voice_tx.try_send(ToCompositor::ResendBackgrounds);
                }
                return Ok(None);
            }
            made => made?,
        };
        match made {
            Made::Shared => {
                self.stats
                    .idle_frames_shared
                    .fetch_add(1, Ordering::Relaxed);
            }
            Made::Spliced => {
                self.stats.frames_spliced.fetch_add(1, Ordering::Relaxed);
                self.metrics.frames_spliced.inc();
            }
            Made::Own => {
                self.stats.frames_encoded.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(Some(au))
    }

    /// Encodes and sends the frame and voice that are due.
    fn send_due(&mut self, now: Instant) -> Result<(), String> {
        let due = self.pacer.due(now);
        self.count_dropped(due.dropped);
        if let (Some(mid), false) = (self.audio_mid, due.voice.is_empty()) {
            for v in due.voice {
                let Some(writer) = self.rtc.writer(mid) else {
                    break;
                };
                let Some(pt) = writer
                    .payload_params()
                    .find(|p| p.spec().codec == Codec::Opus)
                    .map(|p| p.pt())
                else {
                    break;
                };
                let time = MediaTime::new(v.rtp_time, Frequency::FORTY_EIGHT_KHZ);
                let wallclock = self.pacer.voice_slot(v.at).unwrap_or(now).min(now);
                let started = Instant::now();
                if writer.write(pt, wallclock, time, v.payload).is_ok() {
                    self.stats.voice_packets_out.fetch_add(1, Ordering::Relaxed);
                }
                self.stats
                    .packetize_us_total
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
        }
        let (Some((index, picture)), Some(mid)) = (due.frame, self.video_mid) else {
            return Ok(());
        };
        let started = Instant::now();
        let Some(au) = self.video_frame(&picture)? else {
            return Ok(());
        };
        let took = started.elapsed();
        self.stats
            .encode_us_total
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.metrics.encode_seconds.observe(took.as_secs_f64());
        let Some(writer) = self.rtc.writer(mid) else {
            // Made, not sent: the browser does not hold the picture the next frame would
            // be predicted from.
            self.video.key_frame_asked();
            return Ok(());
        };
        let codec = match self.config.video_codec {
            VideoCodec::H264 => Codec::H264,
            VideoCodec::Vp8 => Codec::Vp8,
        };
        let mode_1 = |p: &PayloadParams| p.spec().format.packetization_mode == Some(1);
        let (pt, aggregate) = writer
            .payload_params()
            .find(|p| p.spec().codec == codec && (codec != Codec::H264 || mode_1(p)))
            .or_else(|| writer.payload_params().find(|p| p.spec().codec == codec))
            .map(|p| (p.pt(), codec == Codec::H264 && mode_1(p)))
            .ok_or_else(|| {
                format!(
                    "the browser accepted no {} payload type",
                    self.config.video_codec.name()
                )
            })?;
        let time = MediaTime::new(
            (index as f64 * 90_000.0 / self.config.fps) as u64,
            Frequency::NINETY_KHZ,
        );
        let wallclock = self.pacer.slot(index).unwrap_or(now).min(now);
        let started = Instant::now();
        // A spliced frame's many small slices in a few packets, where the browser takes STAP-A.
        let au = if aggregate {
            crate::stap_a::pack(&au, crate::stap_a::MAX_STAP_A_BYTES)
        } else {
            au
        };
        writer
            .write(pt, wallclock, time, au)
            .map_err(|e| format!("video write: {e}"))?;
        self.stats
            .packetize_us_total
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        // The voice of this frame's moment: when it reached the gateway.
        if let Some(arrived) = self.heard(index) {
            let mut latency = self.stats.latency_ms.lock();
            latency.push_back(now.saturating_duration_since(arrived).as_secs_f32() * 1e3);
            if latency.len() > 2000 {
                latency.pop_front();
            }
        }
        self.last_sent = index;
        self.report_marks(index);
        if self.stats.frames_sent.fetch_add(1, Ordering::Relaxed) == 0 {
            self.stats.first_frame_ms.store(
                self.answered.elapsed().as_millis() as u64,
                Ordering::Relaxed,
            );
        }
        self.metrics.frames_sent.inc();
        Ok(())
    }
}

/// The data channel a page opens for its session's events.
pub const EVENTS_CHANNEL: &str = "events";

/// Whether `e` is about utterance `id`.
fn is_about(e: &SessionEvent, id: &str) -> bool {
    match e {
        SessionEvent::Queued { id: i, .. }
        | SessionEvent::Started { id: i, .. }
        | SessionEvent::Ended { id: i, .. }
        | SessionEvent::Failed { id: i, .. } => i == id,
        _ => false,
    }
}

impl AgentIo {
    /// The browser's decoded voice (48 kHz, 16-bit little-endian) to the microphone
    /// WebSocket, at 16 kHz; dropped when no one reads it.
    fn hear(&mut self, pcm: &[u8]) {
        let samples: Vec<f32> = pcm
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0)
            .collect();
        let mut out = Vec::with_capacity(samples.len() / 3 + 8);
        self.resampler.push(&samples, &mut out);
        if out.is_empty() {
            return;
        }
        let bytes: Vec<u8> = out
            .iter()
            .flat_map(|&s| ((s * 32768.0).round().clamp(-32768.0, 32767.0) as i16).to_le_bytes())
            .collect();
        let _ = self.microphone.try_send(Bytes::from(bytes));
    }
}

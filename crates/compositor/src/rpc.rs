//! The `framecast.compositor.v1.Compositor` RPCs: the gRPC edge, where [`Error`]s become
//! statuses. The transport that serves them is [`crate::server`].

use crate::avatar::Avatar;
use crate::avatar_store::{AvatarStatus, AvatarStore};
use crate::error::{invalid, Error};
use crate::inference::InferenceClient;
use crate::inference::ModelInfo;
use crate::metrics::Metrics;
use crate::render::{self, RenderOptions};
use crate::speech::{Encoders, Session};
use framecast_proto::compositor::v1::{
    compositor_server::Compositor, AvatarInfo, FaceRegion, ListAvatarsRequest, ListAvatarsResponse,
    LoadAvatarRequest, LoadAvatarResponse, RenderRequest, RenderedFrame, UnloadAvatarRequest,
    UnloadAvatarResponse,
};
use framecast_proto::echo;
use framecast_telemetry::places::{Place, Places, Refused};
use framecast_telemetry::Drain;
use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

#[derive(Clone)]
pub struct CompositorService {
    store: Arc<AvatarStore>,
    inference: InferenceClient,
    opts: Arc<RenderOptions>,
    metrics: Arc<Metrics>,
    drain: Drain,
    /// Places under `--max-streams`, shared out per client.
    streams: Arc<Places>,
    /// Authentication is on: a client is its token, not its address.
    authenticated: bool,
    /// Numbers Render streams in logs (the `stream` field of the `render` span).
    next_stream: Arc<std::sync::atomic::AtomicU64>,
    /// Audio-encoder batches shared by every audio session.
    encoders: Encoders,
    /// Face-model batches shared by every session.
    clock: render::FrameClock,
    /// Why no stream may open now (admission by measured margin), if so.
    no_margin: Arc<parking_lot::Mutex<Option<String>>>,
    /// The CPU samples admission judges (held here: its sampler stops when the service goes).
    cpu_window: Option<Arc<parking_lot::Mutex<CpuWindow>>>,
}

/// The host's CPU a window back, for admission by margin: one sample a second.
struct CpuWindow {
    /// (when, CPU times, streams open then).
    samples: std::collections::VecDeque<(
        Instant,
        Option<framecast_telemetry::host_cpu::CpuTimes>,
        usize,
    )>,
    idle: framecast_telemetry::host_cpu::Idle,
}

/// Open Render streams a compositor accepts unless told otherwise.
pub const DEFAULT_MAX_STREAMS: usize = 64;

/// One client's share of `max` streams unless told otherwise: three quarters, so one front
/// end (or one address) cannot take every stream and others always have room.
pub fn default_streams_per_client(max: usize) -> usize {
    (max * 3).div_ceil(4).max(1)
}

/// Frames rendered ahead of the client, per stream: a client that stops reading holds at
/// most these (a 720p I420 frame is 1.4 MB).
const FRAMES_AHEAD: usize = 16;

/// Audio messages already waiting on a stream that join the one being handled (half a second
/// of 20 ms packets): while a render waits (for the frame clock, for inference) the client's
/// packets queue, and rendering after each one alone would fall behind real time by that wait
/// per packet. One render for all of them renders every frame they complete.
const AUDIO_JOINED: usize = 25;

/// Audio a session takes from joined messages before it renders what it has: joining never
/// holds more than this unrendered (nor nears `--max-audio-ahead-s`).
const JOINED_AHEAD_S: f64 = 0.5;

/// Whether the audio message `r` may take the messages waiting behind it: plain audio, not
/// the end of its speech (a cancel applies to what came before it).
fn takes_followers(r: &RenderRequest) -> bool {
    r.audio.as_ref().is_some_and(|a| !a.end_of_speech)
}

/// Whether `r` may join the audio message before it: audio that cancels nothing.
fn joins(r: &RenderRequest) -> bool {
    r.audio.as_ref().is_some_and(|a| !a.cancel)
}

impl CompositorService {
    pub fn new(
        store: Arc<AvatarStore>,
        inference: InferenceClient,
        opts: RenderOptions,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.streams_limit.set(DEFAULT_MAX_STREAMS as i64);
        let encoders = Encoders::new(
            inference.clone(),
            metrics.clone(),
            opts.max_batch,
            opts.encoder_batch_wait,
        );
        let clock = render::FrameClock::new(
            inference.clone(),
            metrics.clone(),
            opts.frame_tick,
            opts.max_batch,
        );
        CompositorService {
            encoders,
            clock,
            no_margin: Arc::default(),
            cpu_window: None,
            store,
            inference,
            opts: Arc::new(opts),
            metrics,
            drain: Drain::never(),
            streams: Places::new(
                DEFAULT_MAX_STREAMS,
                default_streams_per_client(DEFAULT_MAX_STREAMS),
            ),
            authenticated: false,
            next_stream: Arc::default(),
        }
    }

    /// The same service, admitting at most `n` open Render streams, and at most
    /// `per_client` of one client; more are refused with RESOURCE_EXHAUSTED instead of
    /// slowing every session down.
    pub fn with_max_streams(mut self, n: usize, per_client: usize) -> Self {
        self.streams = Places::new(n, per_client);
        self.metrics.streams_limit.set(n as i64);
        self
    }

    /// The same service telling clients apart by their credentials (authentication is on)
    /// instead of their addresses.
    pub fn with_authentication(mut self, on: bool) -> Self {
        self.authenticated = on;
        self
    }

    /// The same service refusing new Render streams (UNAVAILABLE, the reason) while the
    /// host's free cores are fewer than one open stream's measured share of the busy ones
    /// (above what the host keeps busy with none open) times `headroom`, over the last two
    /// seconds (a conservative estimate when other services share the host). Needs a Tokio runtime (it samples once a second).
    pub fn with_admission(mut self, headroom: f64) -> Self {
        use framecast_telemetry::host_cpu::{self, CpuTimes};
        let window = Arc::new(parking_lot::Mutex::new(CpuWindow {
            samples: Default::default(),
            idle: Default::default(),
        }));
        let (verdict, metrics) = (self.no_margin.clone(), self.metrics.clone());
        let cores = host_cpu::cores();
        framecast_telemetry::periodic::every(&window, Duration::from_secs(1), move |w| {
            let (verdict, metrics) = (verdict.clone(), metrics.clone());
            async move {
                let open = metrics.streams_active.get().max(0) as usize;
                let now = (Instant::now(), CpuTimes::now(), open);
                let mut w = w.lock();
                while w.samples.len() > 2 {
                    w.samples.pop_front();
                }
                let old = w.samples.front().copied();
                if let (Some((_, Some(a), was_open)), Some(b)) = (old, now.1) {
                    if let Some(busy) = b.busy_cores_since(&a, cores) {
                        // Idle only if no stream was open at either end of the span.
                        w.idle.observe(now.0, busy, open.max(was_open));
                    }
                }
                let idle = w.idle.cores();
                let old = old.and_then(|s| s.1);
                *verdict.lock() =
                    host_cpu::short_of(old, now.1, cores, open, headroom, idle, "stream");
                w.samples.push_back(now);
                true
            }
        });
        self.cpu_window = Some(window);
        self
    }

    /// The same service, ending its streams when `drain` starts.
    pub fn with_drain(mut self, drain: Drain) -> Self {
        self.drain = drain;
        self
    }
}

/// The union of the frames' face regions.
fn info(s: &AvatarStatus) -> AvatarInfo {
    let mut i = AvatarInfo {
        avatar_id: s.id.clone(),
        state: s.state.to_string(),
        reason: s.reason.clone(),
        ..Default::default()
    };
    let (m, frames) = match (&s.avatar, &s.on_disk) {
        (Some(a), _) => {
            i.resident_bytes = a.resident_bytes();
            i.face_region = a.face_region().map(FaceRegion::from);
            (&a.manifest, a.frames.len() as u32)
        }
        (None, Some((m, frames))) => (m, *frames),
        (None, None) => return i,
    };
    i.frame_count = frames;
    i.width = m.width;
    i.height = m.height;
    i.fps = m.fps;
    i.model = m.model.clone();
    i.speaks = Some(m.audio.is_some());
    i
}

/// What every request of one Render stream renders onto.
struct StreamOut {
    sink: render::FrameSink,
    /// The client's deadline for the stream (`grpc-timeout`), if it set one.
    deadline: Option<Instant>,
    stream: u64,
    sent: Arc<render::SentBackgrounds>,
}

impl CompositorService {
    async fn render_one(&self, req: RenderRequest, out: &StreamOut) -> Result<(), Error> {
        // Held until the render ends: the avatar cannot be evicted under it.
        let lease = self.store.get(&req.avatar_id).await?;
        let avatar = lease.value().clone();
        let model = self.model_of(&avatar).await?;
        render::render(req, avatar, model, &self.target(out), true, None).await
    }

    /// One message of an audio session: opens the session (its first), takes its audio and
    /// renders the frames it completes; the session ends with the frames of its last audio.
    async fn speak(
        &self,
        session: &mut Option<Session>,
        req: RenderRequest,
        joined: Vec<RenderRequest>,
        out: &StreamOut,
    ) -> Result<(), Error> {
        let Some(chunk) = &req.audio else {
            let open = session.as_ref().map(|s| s.request_id()).unwrap_or_default();
            return Err(invalid(format!(
                "audio: a request without audio arrived while audio session '{}' is open; end the session with audio.end_of_speech first",
                echo(open)
            )));
        };
        let s = match session {
            Some(s) => {
                s.check_continuation(&req, chunk)?;
                s
            }
            None => {
                let lease = self.store.get(&req.avatar_id).await?;
                let model = self.model_of(lease.value()).await?;
                let held = self.metrics.audio_mel_frames_held.clone();
                let opened =
                    Session::open(&req, chunk, lease, model, &self.inference, held).await?;
                session.insert(opened)
            }
        };
        if chunk.cancel {
            s.cancel();
        }
        s.push(chunk, &self.opts)?;
        for r in &joined {
            if let Some(chunk) = &r.audio {
                if s.audio_ahead() >= JOINED_AHEAD_S {
                    s.render_ready(&self.target(out), &self.encoders).await?;
                }
                s.check_continuation(r, chunk)?;
                s.push(chunk, &self.opts)?;
            }
        }
        s.render_ready(&self.target(out), &self.encoders).await?;
        if s.done() {
            *session = None;
        }
        Ok(())
    }

    /// The face model of `avatar`.
    async fn model_of(&self, avatar: &Avatar) -> Result<Arc<ModelInfo>, Error> {
        let m = &avatar.manifest;
        self.inference
            .model_info(&m.model)
            .await
            .map_err(|s| Error::inference(format!("model '{}' of avatar '{}'", m.model, m.id), s))
    }

    fn target<'a>(&'a self, out: &'a StreamOut) -> render::Target<'a> {
        render::Target {
            clock: &self.clock,
            stream: out.stream,
            opts: &self.opts,
            metrics: &self.metrics,
            sink: &out.sink,
            deadline: out.deadline,
            sent: &out.sent,
        }
    }
}

#[tonic::async_trait]
impl Compositor for CompositorService {
    type RenderStream = OutboxStream;

    async fn render(
        &self,
        req: Request<Streaming<RenderRequest>>,
    ) -> Result<Response<Self::RenderStream>, Status> {
        let client = framecast_proto::client::of(&req, self.authenticated);
        if let Some(why) = self.no_margin.lock().clone() {
            self.metrics
                .requests
                .with_label_values(&["no_margin"])
                .inc();
            return Err(Status::unavailable(why));
        }
        let place = self.streams.take(&client).map_err(|refused| {
            self.metrics
                .requests
                .with_label_values(&["resource_exhausted"])
                .inc();
            Status::resource_exhausted(match refused {
                Refused::Full { max } => format!(
                    "compositor at its limit of {max} open Render streams (--max-streams); retry later or use another instance"
                ),
                Refused::ClientFull { max } => format!(
                    "this client has {max} Render streams open, its share (--max-streams-per-client); end one first or use another instance"
                ),
            })
        })?;
        // A deadline on the call covers the whole stream: past it, nothing more is rendered
        // and the stream ends with DEADLINE_EXCEEDED.
        let deadline = framecast_proto::deadline::from_metadata(req.metadata());
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(FRAMES_AHEAD);
        // The stream's place and its unsent frames go together: when the client has read
        // them all, or idled past --stream-idle-timeout-s without reading.
        let outbox = Outbox::new(rx, place);
        let this = self.clone();
        let stream = self
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let held = outbox.clone();
        tokio::spawn(async move {
            this.metrics.streams_active.inc();
            let mut session: Option<Session> = None;
            let out = StreamOut {
                sink: tx.clone(),
                deadline,
                stream,
                sent: Arc::default(),
            };
            // Only progress keeps a stream: a request that renders frames (audio that
            // completes one, or frames asked for); empty keep-alive packets do not.
            let mut progress = tokio::time::Instant::now();
            // A message read while looking for audio to join, handled next.
            let mut carried = None;
            // Requests on one stream render one after another, so frames leave in the order
            // they were asked for.
            loop {
                // Draining: the request being rendered finishes (this loop awaits it); a
                // client still streaming is told to go elsewhere.
                let msg = if let Some(m) = carried.take() {
                    m
                } else {
                    tokio::select! {
                        biased;
                        _ = this.drain.started() => {
                            let bye = Status::unavailable("compositor shutting down: send further requests to another instance");
                            let _ = tx.send_timeout(Err(bye), this.opts.idle_timeout).await;
                            break;
                        }
                        _ = sleep_until_opt(deadline) => {
                            let late = Status::deadline_exceeded("the stream's deadline passed while waiting for the next request");
                            let _ = tx.send_timeout(Err(late), this.opts.idle_timeout).await;
                            break;
                        }
                        // No frame rendered for the idle timeout: the stream goes, whatever
                        // empty packets it sent meanwhile.
                        _ = tokio::time::sleep_until(progress + this.opts.idle_timeout) => {
                            this.metrics.requests.with_label_values(&["idle_timeout"]).inc();
                            let idle = Status::deadline_exceeded(format!(
                                "stream idle: no request for {} s (--stream-idle-timeout-s); open a new stream when there is more to render",
                                this.opts.idle_timeout.as_secs_f64()
                            ));
                            let _ = tx.send_timeout(Err(idle), this.opts.idle_timeout).await;
                            break;
                        }
                        msg = inbound.next() => msg,
                    }
                };
                let Some(req) = framecast_telemetry::next_request(msg, &tx).await else {
                    break;
                };
                let mut joined = Vec::new();
                if takes_followers(&req) {
                    while joined.len() < AUDIO_JOINED {
                        match inbound.next().now_or_never() {
                            Some(Some(Ok(r))) if joins(&r) => {
                                let last = !takes_followers(&r);
                                joined.push(r);
                                if last {
                                    break;
                                }
                            }
                            Some(other) => {
                                carried = Some(other);
                                break;
                            }
                            None => break,
                        }
                    }
                }
                let span = tracing::info_span!(
                    "render",
                    stream,
                    request = %echo(&req.request_id),
                    avatar = %echo(&req.avatar_id),
                    start = req.start_frame,
                    frames = req.frame_count,
                );
                let before = session.as_ref().map(Session::frames_rendered);
                if req.resend_backgrounds || joined.iter().any(|r| r.resend_backgrounds) {
                    out.sent.forget();
                }
                let result = if req.audio.is_some() || session.is_some() {
                    this.speak(&mut session, req, joined, &out)
                        .instrument(span)
                        .await
                } else {
                    this.render_one(req, &out).instrument(span).await
                };
                let rendered = match (&session, before) {
                    (Some(s), Some(b)) => s.frames_rendered() > b,
                    (Some(s), None) => s.frames_rendered() > 0,
                    // A session ended (its last frames rendered) or a request of frames.
                    (None, _) => true,
                };
                if result.is_ok() && rendered {
                    progress = tokio::time::Instant::now();
                }
                let result = result.map_err(Status::from);
                let outcome = match &result {
                    Ok(()) if tx.is_closed() => "cancelled",
                    Ok(()) => "ok",
                    Err(s) => framecast_proto::status::label(s.code()),
                };
                // An audio session counts once, when it ends (a packet is not a request).
                if result.is_err() || session.is_none() {
                    this.metrics.requests.with_label_values(&[outcome]).inc();
                }
                if let Err(status) = result {
                    tracing::debug!(code = ?status.code(), message = status.message(), "render failed");
                    // Bounded: a client that stopped reading must not hold the stream open.
                    let _ = tx.send_timeout(Err(status), this.opts.idle_timeout).await;
                    break;
                }
                if tx.is_closed() {
                    break;
                }
            }
            // The frames still queued are the client's to read, for at most the idle timeout.
            drop(tx);
            held.close_after(this.opts.idle_timeout).await;
            this.metrics.streams_active.dec();
        });
        Ok(Response::new(outbox.stream()))
    }

    async fn load_avatar(
        &self,
        req: Request<LoadAvatarRequest>,
    ) -> Result<Response<LoadAvatarResponse>, Status> {
        let id = req.into_inner().avatar_id;
        let avatar = self.store.load(&id).await.map_err(Error::from)?;
        Ok(Response::new(LoadAvatarResponse {
            avatar: Some(info(&AvatarStatus {
                id,
                state: "ready",
                reason: String::new(),
                avatar: Some(avatar),
                on_disk: None,
            })),
        }))
    }

    async fn unload_avatar(
        &self,
        req: Request<UnloadAvatarRequest>,
    ) -> Result<Response<UnloadAvatarResponse>, Status> {
        self.store
            .unload(&req.into_inner().avatar_id)
            .map_err(Error::from)?;
        Ok(Response::new(UnloadAvatarResponse {}))
    }

    async fn list_avatars(
        &self,
        _: Request<ListAvatarsRequest>,
    ) -> Result<Response<ListAvatarsResponse>, Status> {
        let list = self
            .store
            .list()
            .map_err(|e| Error::Internal(format!("reading the avatar root: {e}")))?;
        Ok(Response::new(ListAvatarsResponse {
            avatars: list.iter().map(info).collect(),
        }))
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// A Render stream's frames on their way to the client, and the stream's place under
/// `--max-streams`. The transport reads the frames through [`OutboxStream`]; the render task
/// keeps the [`Outbox`] and, once it has ended, gives the place back when the client has read
/// every frame, or has gone, or after `Outbox::close_after`'s wait (a client that stopped
/// reading holds neither its frames nor its place past it).
#[derive(Clone)]
pub struct Outbox(Arc<OutboxInner>);

struct OutboxInner {
    frames: Mutex<Option<mpsc::Receiver<Result<RenderedFrame, Status>>>>,
    place: Mutex<Option<Place>>,
    /// The transport's task, waiting for a frame: woken when the outbox closes, since
    /// dropping the receiver wakes no one (a clone of the sender may outlive the stream's
    /// own by a moment, so the channel's own wake-up on close may never come).
    waiting: Mutex<Option<std::task::Waker>>,
    /// Told each time the transport takes a frame or the frames go.
    taken: tokio::sync::Notify,
}

/// The transport's side of an [`Outbox`]: dropped (the client went away), it drops the
/// frames, so the render task sees its sink closed and stops.
pub struct OutboxStream(Outbox);

impl Outbox {
    fn new(frames: mpsc::Receiver<Result<RenderedFrame, Status>>, place: Place) -> Outbox {
        Outbox(Arc::new(OutboxInner {
            frames: Mutex::new(Some(frames)),
            place: Mutex::new(Some(place)),
            waiting: Mutex::new(None),
            taken: tokio::sync::Notify::new(),
        }))
    }

    fn stream(&self) -> OutboxStream {
        OutboxStream(self.clone())
    }

    /// Drops the frames not yet read and wakes the transport, which then ends the stream.
    fn drop_frames(&self) {
        drop(self.0.frames.lock().take());
        if let Some(w) = self.0.waiting.lock().take() {
            w.wake();
        }
        self.0.taken.notify_one();
    }

    /// Once the render task has ended: waits up to `idle` for the client to read what is
    /// queued (or to go), then drops what is left and gives the place back.
    async fn close_after(&self, idle: Duration) {
        let drained = async {
            loop {
                let taken = self.0.taken.notified();
                let empty = match &*self.0.frames.lock() {
                    Some(rx) => rx.is_empty(),
                    None => true,
                };
                if empty {
                    return;
                }
                taken.await;
            }
        };
        let _ = tokio::time::timeout(idle, drained).await;
        self.drop_frames();
        drop(self.0.place.lock().take());
    }
}

impl Drop for OutboxStream {
    fn drop(&mut self) {
        self.0.drop_frames();
    }
}

impl futures::Stream for OutboxStream {
    type Item = Result<RenderedFrame, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let inner = &self.0 .0;
        let mut frames = inner.frames.lock();
        let Some(rx) = frames.as_mut() else {
            return Poll::Ready(None);
        };
        let next = rx.poll_recv(cx);
        match next {
            Poll::Ready(None) => *frames = None,
            // Under the frames' lock: a close either comes before (no receiver: the end is
            // returned above) or after, and then sees this waker.
            Poll::Pending => *inner.waiting.lock() = Some(cx.waker().clone()),
            Poll::Ready(Some(_)) => {}
        }
        if next.is_ready() {
            inner.taken.notify_one();
        }
        next
    }
}

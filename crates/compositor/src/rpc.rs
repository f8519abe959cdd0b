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
    compositor_server::Compositor, AvatarInfo, ListAvatarsRequest, ListAvatarsResponse,
    LoadAvatarRequest, LoadAvatarResponse, RenderRequest, RenderedFrame, UnloadAvatarRequest,
    UnloadAvatarResponse,
};
use framecast_proto::echo;
use framecast_telemetry::Drain;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

#[derive(Clone)]
pub struct CompositorService {
    store: Arc<AvatarStore>,
    inference: InferenceClient,
    opts: Arc<RenderOptions>,
    metrics: Arc<Metrics>,
    drain: Drain,
    streams: Arc<Semaphore>,
    /// Numbers Render streams in logs (the `stream` field of the `render` span).
    next_stream: Arc<std::sync::atomic::AtomicU64>,
    /// Audio-encoder batches shared by every audio session.
    encoders: Encoders,
}

/// Open Render streams a compositor accepts unless told otherwise.
pub const DEFAULT_MAX_STREAMS: usize = 64;

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
        CompositorService {
            encoders,
            store,
            inference,
            opts: Arc::new(opts),
            metrics,
            drain: Drain::never(),
            streams: Arc::new(Semaphore::new(DEFAULT_MAX_STREAMS)),
            next_stream: Arc::default(),
        }
    }

    /// The same service, admitting at most `n` open Render streams; more are refused with
    /// RESOURCE_EXHAUSTED instead of slowing every session down.
    pub fn with_max_streams(mut self, n: usize) -> Self {
        self.streams = Arc::new(Semaphore::new(n));
        self.metrics.streams_limit.set(n as i64);
        self
    }

    /// The same service, ending its streams when `drain` starts.
    pub fn with_drain(mut self, drain: Drain) -> Self {
        self.drain = drain;
        self
    }
}

fn info(s: &AvatarStatus) -> AvatarInfo {
    let mut i = AvatarInfo {
        avatar_id: s.id.clone(),
        state: s.state.to_string(),
        reason: s.reason.clone(),
        ..Default::default()
    };
    if let Some(a) = &s.avatar {
        let m = &a.manifest;
        i.frame_count = a.frames.len() as u32;
        i.width = m.width;
        i.height = m.height;
        i.fps = m.fps;
        i.model = m.model.clone();
        i.resident_bytes = a.resident_bytes();
    }
    i
}

impl CompositorService {
    async fn render_one(
        &self,
        req: RenderRequest,
        sink: &render::FrameSink,
        deadline: Option<Instant>,
    ) -> Result<(), Error> {
        // Held until the render ends: the avatar cannot be evicted under it.
        let lease = self.store.get(&req.avatar_id).await?;
        let avatar = lease.value().clone();
        let model = self.model_of(&avatar).await?;
        render::render(req, avatar, model, &self.target(sink, deadline), true).await
    }

    /// One message of an audio session: opens the session (its first), takes its audio and
    /// renders the frames it completes; the session ends with the frames of its last audio.
    async fn speak(
        &self,
        session: &mut Option<Session>,
        req: RenderRequest,
        sink: &render::FrameSink,
        deadline: Option<Instant>,
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
        s.push(chunk, &self.opts)?;
        s.render_ready(&self.target(sink, deadline), &self.encoders)
            .await?;
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

    fn target<'a>(
        &'a self,
        sink: &'a render::FrameSink,
        deadline: Option<Instant>,
    ) -> render::Target<'a> {
        render::Target {
            client: &self.inference,
            opts: &self.opts,
            metrics: &self.metrics,
            sink,
            deadline,
        }
    }
}

#[tonic::async_trait]
impl Compositor for CompositorService {
    type RenderStream = ReceiverStream<Result<RenderedFrame, Status>>;

    async fn render(
        &self,
        req: Request<Streaming<RenderRequest>>,
    ) -> Result<Response<Self::RenderStream>, Status> {
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            self.metrics
                .requests
                .with_label_values(&["resource_exhausted"])
                .inc();
            Status::resource_exhausted(format!(
                "compositor at its limit of {} open Render streams (--max-streams); retry later or use another instance",
                self.metrics.streams_limit.get()
            ))
        })?;
        // A deadline on the call covers the whole stream: past it, nothing more is rendered
        // and the stream ends with DEADLINE_EXCEEDED.
        let deadline = framecast_proto::deadline::from_metadata(req.metadata());
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        let stream = self
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            let _permit = permit;
            this.metrics.streams_active.inc();
            let mut session: Option<Session> = None;
            // Requests on one stream render one after another, so frames leave in the order
            // they were asked for.
            loop {
                // Draining: the request being rendered finishes (this loop awaits it); a
                // client still streaming is told to go elsewhere.
                let msg = tokio::select! {
                    biased;
                    _ = this.drain.started() => {
                        let bye = Status::unavailable("compositor shutting down: send further requests to another instance");
                        let _ = tx.send(Err(bye)).await;
                        break;
                    }
                    _ = sleep_until_opt(deadline) => {
                        let late = Status::deadline_exceeded("the stream's deadline passed while waiting for the next request");
                        let _ = tx.send(Err(late)).await;
                        break;
                    }
                    // Every frame of the last request has been handed over: the stream is
                    // idle until the next request.
                    _ = tokio::time::sleep(this.opts.idle_timeout) => {
                        this.metrics.requests.with_label_values(&["idle_timeout"]).inc();
                        let idle = Status::deadline_exceeded(format!(
                            "stream idle: no request for {} s (--stream-idle-timeout-s); open a new stream when there is more to render",
                            this.opts.idle_timeout.as_secs_f64()
                        ));
                        let _ = tx.send(Err(idle)).await;
                        break;
                    }
                    msg = inbound.next() => msg,
                };
                let Some(req) = framecast_telemetry::next_request(msg, &tx).await else {
                    break;
                };
                let span = tracing::info_span!(
                    "render",
                    stream,
                    request = %echo(&req.request_id),
                    avatar = %echo(&req.avatar_id),
                    start = req.start_frame,
                    frames = req.frame_count,
                );
                let result = if req.audio.is_some() || session.is_some() {
                    this.speak(&mut session, req, &tx, deadline)
                        .instrument(span)
                        .await
                } else {
                    this.render_one(req, &tx, deadline).instrument(span).await
                };
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
            this.metrics.streams_active.dec();
        });
        Ok(Response::new(ReceiverStream::new(rx)))
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

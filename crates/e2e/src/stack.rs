//! A whole test stack on loopback: an inference server over the fixture model, a compositor
//! over it and a client, with the options the end-to-end tests vary; and small helpers to
//! drive it.

use crate::write_fixtures;
use framecast_compositor::avatar_store::AvatarStore;
use framecast_compositor::inference::{ClientOptions, InferenceClient};
use framecast_compositor::render::RenderOptions;
use framecast_compositor::rpc::{CompositorService, DEFAULT_MAX_STREAMS};
use framecast_compositor::server as comp_server;
use framecast_inference::server::{self as inf_server, ServeOptions};
use framecast_inference::tensor_cache::TensorLimits;
use framecast_proto::compositor::v1::{
    compositor_client::CompositorClient, RenderRequest, RenderedFrame,
};
use std::path::Path;
use std::sync::Arc;
use tokio_stream::StreamExt;

pub struct Stack {
    pub inference_server: inf_server::Running,
    pub compositor_server: comp_server::Running,
    pub client: CompositorClient<tonic::transport::Channel>,
    pub metrics: Arc<framecast_compositor::metrics::Metrics>,
    pub inference: InferenceClient,
}

pub async fn stack(root: &Path, batch: usize) -> Stack {
    stack_with(root, batch, Opts::default()).await
}

/// Settings of a test stack beyond the batch size.
pub struct Opts {
    pub budget: Option<u64>,
    pub shared_memory: bool,
    pub max_streams: usize,
    /// One client's share of them (`None`: all of them).
    pub streams_per_client: Option<usize>,
    /// A stream that renders nothing this long is ended (`--stream-idle-timeout-s`).
    pub idle_timeout: std::time::Duration,
    /// (inference token, compositor token)
    pub tokens: (Option<&'static str>, Option<&'static str>),
    /// How long the model waits for batch-mates (its max batch is 8).
    pub queue_delay_us: u64,
    /// The inference server's tensor cache limits (`--tensor-cache-mib` and its shares).
    pub tensor_cache: TensorLimits,
    /// Another token the inference server accepts besides the compositor's (`tokens.0`),
    /// for a second client of the replica.
    pub other_inference_token: Option<&'static str>,
    /// How long the compositor sends rows before registering a refused tensor again.
    pub tensor_retry: std::time::Duration,
    /// The inference server offers framecast's extensions (`--framecast-extensions`).
    pub framecast_extensions: bool,
    /// The compositor's frame clock (`--frame-tick-ms`).
    pub frame_tick: framecast_compositor::render::FrameTick,
    /// The compositor's admission by margin (`--admission-headroom`; `None`: off).
    pub admission: Option<f64>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            budget: None,
            shared_memory: true,
            max_streams: DEFAULT_MAX_STREAMS,
            streams_per_client: None,
            idle_timeout: RenderOptions::default().idle_timeout,
            tokens: (None, None),
            queue_delay_us: 1000,
            tensor_cache: ServeOptions::default().tensor_cache,
            other_inference_token: None,
            tensor_retry: ClientOptions::default().tensor_retry,
            framecast_extensions: true,
            frame_tick: RenderOptions::default().frame_tick,
            admission: None,
        }
    }
}

pub async fn stack_with_budget(root: &Path, batch: usize, budget: Option<u64>) -> Stack {
    stack_with(
        root,
        batch,
        Opts {
            budget,
            ..Default::default()
        },
    )
    .await
}

pub async fn stack_with(root: &Path, batch: usize, o: Opts) -> Stack {
    let (models, avatars) = write_fixtures(root, o.queue_delay_us);
    let server_opts = ServeOptions {
        auth_token: match (o.tokens.0, o.other_inference_token) {
            (Some(a), Some(b)) => Some(format!("{a},{b}")),
            (a, b) => a.or(b).map(String::from),
        },
        tensor_cache: o.tensor_cache,
        framecast_extensions: o.framecast_extensions,
        ..Default::default()
    };
    let inference = crate::spawn_inference(&models, server_opts).await;
    let metrics = Arc::new(framecast_compositor::metrics::Metrics::new());
    let client_opts = ClientOptions {
        shared_memory: o.shared_memory,
        token: o.tokens.0.map(String::from),
        hop_bytes: Some(metrics.inference_bytes.clone()),
        tensor_retry: o.tensor_retry,
        ..Default::default()
    };
    let client = InferenceClient::connect_lazy(&[inference.url()], &client_opts).unwrap();
    let svc = CompositorService::new(
        Arc::new(AvatarStore::new(&avatars, true, o.budget, metrics.clone()).unwrap()),
        client.clone(),
        RenderOptions {
            max_batch: batch,
            idle_timeout: o.idle_timeout,
            frame_tick: o.frame_tick,
            ..Default::default()
        },
        metrics.clone(),
    )
    .with_max_streams(o.max_streams, o.streams_per_client.unwrap_or(o.max_streams));
    let svc = match o.admission {
        Some(headroom) => svc.with_admission(headroom),
        None => svc,
    };
    let serve_opts = comp_server::ServeOptions {
        auth_token: o.tokens.1.map(String::from),
        ..Default::default()
    };
    let compositor = comp_server::spawn_on_loopback(svc, serve_opts)
        .await
        .unwrap();
    let compositor_url = compositor.url();
    Stack {
        inference_server: inference,
        compositor_server: compositor,
        client: CompositorClient::connect(compositor_url).await.unwrap(),
        metrics,
        inference: client,
    }
}

pub async fn render(
    client: &CompositorClient<tonic::transport::Channel>,
    reqs: Vec<RenderRequest>,
) -> Result<Vec<RenderedFrame>, tonic::Status> {
    let mut stream = client
        .clone()
        .render(tokio_stream::iter(reqs))
        .await?
        .into_inner();
    let mut frames = Vec::new();
    while let Some(f) = stream.next().await {
        frames.push(f?);
    }
    Ok(frames)
}

/// A Render stream the caller keeps open: `first` is sent at once, further requests through
/// the returned sender; the stream ends when the sender is dropped.
pub async fn open_render(
    client: &CompositorClient<tonic::transport::Channel>,
    first: RenderRequest,
) -> (
    tokio::sync::mpsc::Sender<RenderRequest>,
    tonic::Streaming<RenderedFrame>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(first).await.unwrap();
    let stream = client
        .clone()
        .render(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

/// Reads `read` every 50 ms until `done` holds of what it read or `within` has passed, and
/// returns the last value read for the caller to assert on.
pub async fn poll_until<T, F: std::future::Future<Output = T>>(
    within: std::time::Duration,
    mut read: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let until = std::time::Instant::now() + within;
    loop {
        let value = read().await;
        if done(&value) || std::time::Instant::now() >= until {
            return value;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

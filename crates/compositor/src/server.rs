//! The compositor's gRPC server: Render and avatar management, health and reflection.

use crate::rpc::CompositorService;
use framecast_proto::auth::BearerCheck;
use framecast_proto::compositor::v1::compositor_server::CompositorServer;
pub use framecast_telemetry::running::Running;
use framecast_telemetry::Drain;
use framecast_telemetry::{running, tls};
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub max_message_bytes: usize,
    /// After the shutdown signal, how long streams may take to finish their requests.
    pub grace: Duration,
    /// Serve over TLS (and require client certificates if it has a client CA).
    pub tls: Option<tls::ServerTls>,
    /// Bearer token every Render and avatar call must carry (health checks stay open).
    pub auth_token: Option<String>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_message_bytes: framecast_proto::DEFAULT_MAX_MESSAGE_BYTES,
            grace: Duration::from_secs(30),
            auth_token: None,
            tls: None,
        }
    }
}

/// The compositor's API as served: behind the bearer-token check.
type Served = InterceptedService<CompositorServer<CompositorService>, BearerCheck>;

/// Serves on `listener` until `shutdown` resolves, then stops accepting, lets each stream finish
/// the request it is rendering, and returns when all is done or after the grace period.
pub async fn serve(
    listener: TcpListener,
    svc: CompositorService,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grace = opts.grace;
    framecast_telemetry::serve_with_grace(shutdown, grace, |drain| {
        serve_draining(listener, svc.with_drain(drain.clone()), opts, drain)
    })
    .await
}

async fn serve_draining(
    listener: TcpListener,
    svc: CompositorService,
    opts: ServeOptions,
    drain: Drain,
) -> anyhow::Result<()> {
    let auth = BearerCheck::new(opts.auth_token.as_deref());
    let compositor = CompositorServer::new(svc.with_authentication(auth.is_on()))
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(opts.max_message_bytes);
    let compositor: Served = InterceptedService::new(compositor, auth);
    // Render requests carry a chunk's conditioning: 32 KB of audio features per frame.
    let windows = running::Windows {
        stream: 8 << 20,
        connection: 32 << 20,
    };
    let health = tonic_health::server::health_reporter();
    running::serve_grpc(
        listener,
        windows,
        opts.tls.as_ref(),
        compositor,
        None::<Served>,
        health,
        drain,
    )
    .await
}

/// Starts a server on an ephemeral loopback port (tests, benchmarks, embedding).
pub async fn spawn_on_loopback(
    svc: CompositorService,
    opts: ServeOptions,
) -> anyhow::Result<Running> {
    running::spawn(
        ([127, 0, 0, 1], 0).into(),
        "compositor",
        |listener, stop| serve(listener, svc, opts, stop),
    )
    .await
}

//! The compositor's gRPC server: Render and avatar management, health and reflection.

use crate::service::CompositorService;
use framecast_proto::compositor::v1::compositor_server::CompositorServer;
use framecast_telemetry::Drain;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

/// Serves on `listener` until `shutdown` resolves, then stops accepting, lets each stream finish
/// the request it is rendering, and returns when all is done or after `grace`.
pub async fn serve(
    listener: TcpListener,
    svc: CompositorService,
    max_message_bytes: usize,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    framecast_telemetry::serve_with_grace(shutdown, grace, |drain| {
        serve_draining(
            listener,
            svc.with_drain(drain.clone()),
            max_message_bytes,
            drain,
        )
    })
    .await
}

async fn serve_draining(
    listener: TcpListener,
    svc: CompositorService,
    max_message_bytes: usize,
    drain: Drain,
) -> anyhow::Result<()> {
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<CompositorServer<CompositorService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(framecast_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let compositor = CompositorServer::new(svc)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .max_frame_size(Some(1 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(compositor)
        .serve_with_incoming_shutdown(
            // The builder's tcp_nodelay only reaches listeners tonic binds itself: without it
            // here, Nagle and delayed ACKs hold small replies for ~40 ms.
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move { drain.started().await },
        )
        .await?;
    Ok(())
}

/// A server running on its own task; dropping the handle shuts it down.
pub struct Running {
    pub addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shuts the server down as SIGTERM would and waits until it has stopped.
    pub async fn shutdown(self) {
        drop(self.stop);
        let _ = self.done.await;
    }
}

/// Starts a server on an ephemeral loopback port (tests, benchmarks, embedding).
pub async fn spawn_on_loopback(svc: CompositorService) -> anyhow::Result<Running> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        let max = framecast_proto::DEFAULT_MAX_MESSAGE_BYTES;
        let grace = Duration::from_secs(5);
        if let Err(e) = serve(listener, svc, max, grace, async {
            let _ = stopped.await;
        })
        .await
        {
            tracing::error!(error = %e, "compositor server stopped");
        }
    });
    Ok(Running { addr, stop, done })
}

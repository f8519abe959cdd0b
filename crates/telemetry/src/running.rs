//! Listening and running a gRPC server on its own task, the same way for both services.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use tokio::net::TcpListener;
use tonic::codegen::http;
use tonic::transport::server::TcpIncoming;

/// Accepted connections of `listener`, with TCP_NODELAY: tonic's builder option only reaches
/// listeners tonic binds itself, and without it Nagle and delayed ACKs hold small replies
/// back (docs/performance.md has the measurement).
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// HTTP/2 flow-control windows of a gRPC server: how much a peer may send before it must
/// wait for an acknowledgement. Messages of several MB need windows of several MB, or every
/// message stalls on round trips.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    pub stream: u32,
    pub connection: u32,
}

/// The gRPC server builder both services use: `windows`, 1 MiB DATA frames (a 15 MB batch in
/// 15 frames instead of ~1000 of 16 KiB), HTTP/2 keepalive pings every 20 s, TLS when given,
/// and over-size messages answered RESOURCE_EXHAUSTED ([`crate::OversizeLayer`]).
pub fn grpc_server(
    windows: Windows,
    tls: Option<&crate::tls::ServerTls>,
) -> anyhow::Result<
    tonic::transport::Server<
        tower::layer::util::Stack<crate::OversizeLayer, tower::layer::util::Identity>,
    >,
> {
    let keepalive = std::time::Duration::from_secs(20);
    let server = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(windows.stream))
        .initial_connection_window_size(Some(windows.connection))
        .max_frame_size(Some(1 << 20))
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(keepalive));
    Ok(crate::tls::server(server, tls)?.layer(crate::OversizeLayer))
}

/// Serves `service` on `listener` over [`grpc_server`], beside the standard gRPC health
/// service (`health`, from `tonic_health::server::health_reporter`; the caller may report
/// more names on its reporter) and reflection, until `drain` starts.
///
/// Health reports the service (and the server, the empty name) SERVING, and NOT_SERVING as
/// soon as the drain starts, so load balancers stop sending before the port closes.
/// Reflection lists exactly what this port serves: `service`, the `extension` service when
/// there is one (same auth as `service`: wrap both), `grpc.health.v1.Health` and reflection
/// itself.
pub async fn serve_grpc<S, E>(
    listener: TcpListener,
    windows: Windows,
    tls: Option<&crate::tls::ServerTls>,
    service: S,
    extension: Option<E>,
    health: (
        tonic_health::server::HealthReporter,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ),
    drain: crate::Drain,
) -> anyhow::Result<()>
where
    S: tower::Service<http::Request<tonic::body::Body>, Error = std::convert::Infallible>
        + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Response: axum::response::IntoResponse,
    S::Future: Send + 'static,
    E: tower::Service<http::Request<tonic::body::Body>, Error = std::convert::Infallible>
        + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    E::Response: axum::response::IntoResponse,
    E::Future: Send + 'static,
{
    let (health, health_svc) = health;
    health.set_serving::<S>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let mut reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(framecast_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(S::NAME)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection");
    if extension.is_some() {
        reflection = reflection.with_service_name(E::NAME);
    }
    let reflection = reflection.build_v1()?;
    let draining = drain.clone();
    tokio::spawn(async move {
        draining.started().await;
        health.set_not_serving::<S>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    });
    grpc_server(windows, tls)?
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(service)
        .add_optional_service(extension)
        .serve_with_incoming_shutdown(incoming(listener), async move { drain.started().await })
        .await?;
    Ok(())
}

/// The future a spawned server is told to stop with.
pub type StopSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A server running on its own task; dropping the handle shuts it down.
pub struct Running {
    pub addr: SocketAddr,
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

/// Binds `addr` and runs `serve(listener, stop)` on its own task; `what` names the server in
/// the error log if it fails.
pub async fn spawn<S, F>(addr: SocketAddr, what: &'static str, serve: S) -> anyhow::Result<Running>
where
    S: FnOnce(TcpListener, StopSignal) -> F,
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = serve(
        listener,
        Box::pin(async {
            let _ = stopped.await;
        }),
    );
    let done = tokio::spawn(async move {
        if let Err(e) = serving.await {
            tracing::error!(error = %e, server = what, "server stopped");
        }
    });
    Ok(Running { addr, stop, done })
}

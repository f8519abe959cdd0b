//! The gRPC server: KServe service, health and reflection on one HTTP/2 port, tuned for large
//! tensor messages.

use crate::models::ModelManager;
use crate::rpc::InferenceService;
use crate::shared_memory::SharedMemory;
use crate::tensor_cache::{TensorCache, TensorCacheService, TensorLimits};
use framecast_proto::auth::BearerCheck;
use framecast_proto::kserve::grpc_inference_service_server::GrpcInferenceServiceServer;
use framecast_proto::tensorcache::v1::tensor_cache_server::TensorCacheServer;
pub use framecast_telemetry::running::Running;
use framecast_telemetry::Drain;
use framecast_telemetry::{running, tls};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// Transport settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub max_message_bytes: usize,
    pub slow_request: Duration,
    /// After the shutdown signal, how long in-flight work may take before connections close.
    pub grace: Duration,
    /// Serve over TLS (and require client certificates if it has a client CA).
    pub tls: Option<tls::ServerTls>,
    /// Bearer token every KServe call must carry (health checks stay open).
    pub auth_token: Option<String>,
    /// Accept the system shared-memory extension from clients on this host.
    pub shared_memory: bool,
    /// Regions registered at once, all clients together.
    pub max_shm_regions: usize,
    /// Host memory the tensor cache extension may hold, all clients together and each.
    pub tensor_cache: TensorLimits,
    /// Bytes of unanswered requests, and of answers not yet sent, each client's
    /// `ModelStreamInfer` streams may hold (each).
    pub stream_buffer: u64,
    /// Shared-memory regions one client may hold (its share of `max_shm_regions`).
    pub max_shm_regions_per_client: usize,
    /// Offer framecast's own extensions (tensor cache, I420 outputs). Off, the server looks
    /// like a plain KServe v2 server (tests and benchmarks of the fallback).
    pub framecast_extensions: bool,
}

/// How often regions whose object was removed or shrank, and abandoned tensor registrations
/// in parts, are forgotten.
const SHM_SWEEP: Duration = Duration::from_secs(10);

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_message_bytes: framecast_proto::DEFAULT_MAX_MESSAGE_BYTES,
            slow_request: Duration::from_millis(500),
            grace: Duration::from_secs(30),
            auth_token: None,
            tls: None,
            shared_memory: true,
            max_shm_regions: crate::shared_memory::DEFAULT_MAX_REGIONS,
            tensor_cache: TensorLimits::default(),
            framecast_extensions: true,
            stream_buffer: crate::stream_budget::DEFAULT_BYTES,
            max_shm_regions_per_client: crate::shared_memory::DEFAULT_MAX_REGIONS_PER_CLIENT,
        }
    }
}

/// Serves on `listener` until `shutdown` resolves, then stops accepting, ends open streams
/// once their in-flight requests are answered, and returns when all is done or after the
/// grace period.
pub async fn serve(
    listener: TcpListener,
    models: Arc<ModelManager>,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grace = opts.grace;
    framecast_telemetry::serve_with_grace(shutdown, grace, |drain| {
        serve_draining(listener, models, opts, drain)
    })
    .await
}

async fn serve_draining(
    listener: TcpListener,
    models: Arc<ModelManager>,
    opts: ServeOptions,
    drain: Drain,
) -> anyhow::Result<()> {
    let shm = Arc::new(SharedMemory::new(
        opts.max_shm_regions,
        opts.max_shm_regions_per_client,
    ));
    shm.sweep_every(SHM_SWEEP);
    let auth = BearerCheck::new(opts.auth_token.as_deref());
    let health = tonic_health::server::health_reporter();
    report_model_health(models.clone(), health.0.clone(), drain.clone());
    let tensors = Arc::new(TensorCache::new(
        opts.tensor_cache,
        models.metrics().tensor_cache_bytes.clone(),
    ));
    if let Some(budget) = models.device_budget() {
        tensors.share(budget);
    }
    tensors.sweep_every(SHM_SWEEP);
    let mut svc = InferenceService::new(models, opts.slow_request, drain.clone())
        .with_shared_memory(shm)
        .with_stream_buffer(opts.stream_buffer)
        .with_tensor_cache(tensors.clone());
    if !opts.shared_memory {
        svc = svc.without_shared_memory();
    }
    if !opts.framecast_extensions {
        svc = svc.without_framecast_extensions();
    }
    if auth.is_on() {
        svc = svc.scoped_by_token();
    }
    let kserve = GrpcInferenceServiceServer::new(svc)
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(opts.max_message_bytes);
    let cache = TensorCacheServer::new(TensorCacheService::new(tensors, auth.is_on()))
        .max_decoding_message_size(opts.max_message_bytes)
        .max_encoding_message_size(opts.max_message_bytes);
    let cache = InterceptedService::new(cache, auth.clone());
    let kserve = InterceptedService::new(kserve, auth);
    // A 24-frame batch is ~15 MB each way: wide windows keep it from stalling on acks.
    let windows = running::Windows {
        stream: 16 << 20,
        connection: 64 << 20,
    };
    running::serve_grpc(
        listener,
        windows,
        opts.tls.as_ref(),
        kserve,
        opts.framecast_extensions.then_some(cache),
        health,
        drain,
    )
    .await
}

/// How often model health names follow the models' states.
const MODEL_HEALTH_EVERY: Duration = Duration::from_secs(1);

/// Reports every model of the repository under its own name in the gRPC health service:
/// SERVING once loaded and warmed, NOT_SERVING before, after an unload or eviction, and from
/// the moment the drain begins. Follows the models every [`MODEL_HEALTH_EVERY`].
fn report_model_health(models: Arc<ModelManager>, health: HealthReporter, drain: Drain) {
    tokio::spawn(async move {
        let mut reported: HashMap<String, bool> = HashMap::new();
        loop {
            let m = models.clone();
            if let Ok(Ok(names)) = tokio::task::spawn_blocking(move || m.repository().list()).await
            {
                for name in names {
                    let ready = models.ready(&name).is_some() && !drain.is_draining();
                    if reported.insert(name.clone(), ready) != Some(ready) {
                        let status = if ready {
                            ServingStatus::Serving
                        } else {
                            ServingStatus::NotServing
                        };
                        health.set_service_status(&name, status).await;
                    }
                }
            }
            if drain.is_draining() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(MODEL_HEALTH_EVERY) => {}
                _ = drain.started() => {}
            }
        }
    });
}

/// Starts a server on an ephemeral loopback port (tests, benchmarks, embedding).
pub async fn spawn_on_loopback(
    models: Arc<ModelManager>,
    opts: ServeOptions,
) -> anyhow::Result<Running> {
    spawn(([127, 0, 0, 1], 0).into(), models, opts).await
}

/// Starts a server on `addr` on its own task.
pub async fn spawn(
    addr: std::net::SocketAddr,
    models: Arc<ModelManager>,
    opts: ServeOptions,
) -> anyhow::Result<Running> {
    running::spawn(addr, "inference", |listener, stop| {
        serve(listener, models, opts, stop)
    })
    .await
}

//! One inference endpoint: its connection, and the one long-lived `ModelStreamInfer` stream
//! that carries every batch sent to it, answers matched to callers by request id.

use super::tensors::ReplicaTensors;
use super::ClientOptions;
use crate::discovery::Dial;
use crate::shm_pool::ShmPool;
use framecast_proto::auth::authorize;
use framecast_proto::kserve::{
    grpc_inference_service_client::GrpcInferenceServiceClient, ModelInferRequest,
    ModelInferResponse,
};
use framecast_telemetry::tls;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Status};

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Result<ModelInferResponse, Status>>>>>;

/// One open `ModelStreamInfer` stream.
struct StreamConn {
    tx: mpsc::Sender<ModelInferRequest>,
    pending: Pending,
    alive: Arc<AtomicBool>,
}

/// One inference endpoint.
pub(crate) struct Replica {
    /// The URL configured (`--inference`).
    pub(crate) url: String,
    /// The address dialled, when `url`'s host is a name that was looked up.
    pub(crate) addr: Option<SocketAddr>,
    /// How logs and errors name it: the URL, and the address when there is one.
    pub(crate) label: String,
    pub(crate) client: GrpcInferenceServiceClient<Channel>,
    stream: tokio::sync::Mutex<Option<Arc<StreamConn>>>,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) healthy: AtomicBool,
    /// The tensors to hold ahead of the first batch ([`super::InferenceClient::register_ahead`])
    /// were handed to it since it last turned healthy (or are being so).
    pub(crate) ahead: AtomicBool,
    pub(crate) shm: Option<Arc<ShmPool>>,
    /// What its tensor cache holds of ours.
    pub(crate) tensors: ReplicaTensors,
    pub(crate) token: Option<String>,
}

/// Decrements a replica's in-flight count when a call ends, however it ends.
pub(super) struct InFlight<'a>(pub(super) &'a Replica);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Replica {
    /// A replica of `url`, dialling `addr` when given (else the URL's host); connects on
    /// first use.
    pub(crate) fn open(
        id: u64,
        url: &str,
        addr: Option<SocketAddr>,
        opts: &ClientOptions,
    ) -> Result<Arc<Replica>, String> {
        let endpoint = tls::endpoint(url, opts.tls.as_ref(), "inference-tls")
            .map_err(|e| format!("inference: {e:#}"))?
            .connect_timeout(opts.connect_timeout)
            .http2_keep_alive_interval(opts.keep_alive_interval)
            .keep_alive_timeout(opts.keep_alive_timeout)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(64 << 20))
            // Responses of several MB arrive in 1 MiB DATA frames, not 16 KiB ones.
            .max_frame_size(1u32 << 20)
            .tcp_nodelay(true);
        let (channel, label) = match addr {
            Some(a) => (
                endpoint.connect_with_connector_lazy(Dial(a)),
                format!("{url} ({a})"),
            ),
            None => (endpoint.connect_lazy(), url.to_string()),
        };
        let tensors = ReplicaTensors::new(channel.clone(), opts);
        let client = GrpcInferenceServiceClient::new(channel)
            .max_decoding_message_size(opts.max_message_bytes)
            .max_encoding_message_size(opts.max_message_bytes);
        let shm = opts.shared_memory.then(|| {
            let token = opts.token.clone();
            Arc::new(ShmPool::new(client.clone(), token, &label, id))
        });
        Ok(Arc::new(Replica {
            url: url.to_string(),
            addr,
            label,
            client,
            stream: tokio::sync::Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            ahead: AtomicBool::new(false),
            shm,
            tensors,
            token: opts.token.clone(),
        }))
    }

    async fn connection(&self) -> Result<Arc<StreamConn>, Status> {
        let mut guard = self.stream.lock().await;
        if let Some(c) = guard.as_ref() {
            if c.alive.load(Ordering::Acquire) && !c.tx.is_closed() {
                return Ok(c.clone());
            }
        }
        let (tx, rx) = mpsc::channel::<ModelInferRequest>(256);
        let mut inbound = self
            .client
            .clone()
            .model_stream_infer(authorize(
                Request::new(ReceiverStream::new(rx)),
                self.token.as_deref(),
            )?)
            .await?
            .into_inner();
        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let conn = Arc::new(StreamConn {
            tx,
            pending: pending.clone(),
            alive: alive.clone(),
        });
        let url = self.label.clone();
        tokio::spawn(async move {
            let why = loop {
                match inbound.message().await {
                    Ok(Some(msg)) => {
                        let id = msg.infer_response.as_ref().map(|r| r.id.as_str());
                        let Some(reply) = pending.lock().remove(id.unwrap_or_default()) else {
                            continue;
                        };
                        let result = match framecast_proto::status::from_stream_reply(&msg) {
                            None => Ok(msg.infer_response.unwrap_or_default()),
                            Some(status) => Err(status),
                        };
                        let _ = reply.send(result);
                    }
                    Ok(None) => break "stream closed by the server".to_string(),
                    Err(s) => break s.message().to_string(),
                }
            };
            alive.store(false, Ordering::Release);
            let orphans: Vec<_> = pending.lock().drain().collect();
            if !orphans.is_empty() {
                tracing::warn!(replica = %url, batches = orphans.len(), reason = %why, "inference stream lost");
            }
            for (_, reply) in orphans {
                let _ = reply.send(Err(Status::unavailable(format!(
                    "inference stream to {url} lost: {why}"
                ))));
            }
        });
        *guard = Some(conn.clone());
        Ok(conn)
    }

    pub(super) async fn infer(
        &self,
        mut req: ModelInferRequest,
        id: String,
        timeout: Duration,
    ) -> Result<ModelInferResponse, Status> {
        let conn = self.connection().await?;
        // On the wire: the caller's id (its Render request and first frame) and a counter that
        // makes it unique on this stream, so one id can be searched in both services' logs.
        let id = if req.id.is_empty() {
            id
        } else {
            format!("{}#{id}", req.id)
        };
        tracing::debug!(replica = %self.label, id = %id, "batch sent");
        let caller_id = std::mem::replace(&mut req.id, id.clone());
        let (reply, rx) = oneshot::channel();
        conn.pending.lock().insert(id.clone(), reply);
        if conn.tx.send(req).await.is_err() {
            conn.pending.lock().remove(&id);
            conn.alive.store(false, Ordering::Release);
            return Err(Status::unavailable(format!(
                "inference stream to {} closed",
                self.label
            )));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result.map(|mut r| {
                r.id = caller_id;
                r
            }),
            Ok(Err(_)) => Err(Status::unavailable(format!(
                "inference stream to {} lost",
                self.label
            ))),
            Err(_) => {
                conn.pending.lock().remove(&id);
                Err(Status::deadline_exceeded(format!(
                    "no answer from {} within {timeout:?}",
                    self.label
                )))
            }
        }
    }
}

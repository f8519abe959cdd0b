//! Client of the inference service: a pool of replicas, each reached over one kept-alive
//! HTTP/2 connection carrying a long-lived `ModelStreamInfer` stream on which many batches
//! are in flight at once (responses are matched by request id).
//!
//! Each batch goes to the less loaded of two healthy replicas picked at random
//! (power of two choices). A replica whose stream breaks is marked unhealthy, its in-flight
//! batches are retried once on another replica, and a background health check brings it back
//! when it answers again. A URL whose host is a DNS name stands for every address it resolves
//! to, looked up again and again, so operators add GPU workers without touching the
//! compositor (see [`crate::discovery`]).
//!
//! A replica on the same host gets the tensors through shared memory instead of the stream
//! (see [`crate::shm_pool`]); one that cannot map them gets them over gRPC.

use crate::discovery::{self, Dial, Named, Resolve, SystemResolver};
use crate::face_contract::{INPUT_CHANNELS, OUTPUT_CHANNELS};
use crate::shm_pool::{Lease, ShmPool};
use framecast_proto::auth::authorize;
use framecast_proto::deadline::{timeout_parameter, PARAM_TIMEOUT};
use framecast_proto::kserve::{
    grpc_inference_service_client::GrpcInferenceServiceClient,
    model_metadata_response::TensorMetadata, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ServerReadyRequest,
};
use framecast_proto::tensor::DataType;
use framecast_telemetry::prometheus::IntGaugeVec;
use framecast_telemetry::tls::{self, ClientTls};
use parking_lot::{Mutex, RwLock};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub keep_alive_interval: Duration,
    pub keep_alive_timeout: Duration,
    pub connect_timeout: Duration,
    /// Longest wait for one batch's response.
    pub request_timeout: Duration,
    pub health_interval: Duration,
    /// Time between DNS lookups of the URLs' host names; zero: no lookups, each URL is one
    /// replica reached by name.
    pub resolve_interval: Duration,
    pub max_message_bytes: usize,
    /// Try shared memory with each replica (used only where the replica can map it).
    pub shared_memory: bool,
    /// Bearer token the inference replicas require, if any.
    pub token: Option<String>,
    /// TLS to the replicas (their URLs are then https://).
    pub tls: Option<ClientTls>,
    /// Set after every health check to the replicas by health (`healthy`, `unhealthy`).
    pub replicas_gauge: Option<IntGaugeVec>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            keep_alive_interval: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            health_interval: Duration::from_secs(2),
            resolve_interval: Duration::from_secs(10),
            max_message_bytes: framecast_proto::DEFAULT_MAX_MESSAGE_BYTES,
            shared_memory: true,
            token: None,
            tls: None,
            replicas_gauge: None,
        }
    }
}

/// The output a batch wants back: its name and size, so it can be placed in shared memory.
#[derive(Debug, Clone)]
pub struct Expected {
    pub output: String,
    pub bytes: usize,
}

/// What the compositor needs to know of a model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    /// UINT8 [-1, 6, S, S] input.
    pub face_input: String,
    pub crop_size: u32,
    /// UINT8 [-1, 3, S, S] output.
    pub output: String,
    /// Every other input: supplied per frame by the render request.
    pub conditioning: Vec<TensorMetadata>,
}

impl ModelInfo {
    fn from_metadata(
        name: &str,
        inputs: Vec<TensorMetadata>,
        outputs: &[TensorMetadata],
    ) -> Result<Self, String> {
        let image = |t: &TensorMetadata, c: i64| {
            t.datatype == DataType::U8.as_str()
                && t.shape.len() == 4
                && t.shape[1] == c
                && t.shape[2] == t.shape[3]
        };
        let (inputs_c, outputs_c) = (INPUT_CHANNELS as i64, OUTPUT_CHANNELS as i64);
        let face = inputs
            .iter()
            .find(|t| image(t, inputs_c))
            .ok_or_else(|| {
                format!("model '{name}' has no UINT8 [-1, {inputs_c}, S, S] face input")
            })?
            .clone();
        let output = outputs
            .iter()
            .find(|t| image(t, outputs_c))
            .ok_or_else(|| format!("model '{name}' has no UINT8 [-1, {outputs_c}, S, S] output"))?;
        if output.shape[2] != face.shape[2] {
            return Err(format!(
                "model '{name}': output crop {} differs from input crop {}",
                output.shape[2], face.shape[2]
            ));
        }
        Ok(ModelInfo {
            name: name.to_string(),
            crop_size: face.shape[2] as u32,
            output: output.name.clone(),
            conditioning: inputs.into_iter().filter(|t| t.name != face.name).collect(),
            face_input: face.name,
        })
    }
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Result<ModelInferResponse, Status>>>>>;

/// One open `ModelStreamInfer` stream.
struct StreamConn {
    tx: mpsc::Sender<ModelInferRequest>,
    pending: Pending,
    alive: Arc<AtomicBool>,
}

/// One inference endpoint.
struct Replica {
    /// The URL configured (`--inference`).
    url: String,
    /// The address dialled, when `url`'s host is a name that was looked up.
    addr: Option<SocketAddr>,
    /// How logs and errors name it: the URL, and the address when there is one.
    label: String,
    client: GrpcInferenceServiceClient<Channel>,
    stream: tokio::sync::Mutex<Option<Arc<StreamConn>>>,
    in_flight: AtomicUsize,
    healthy: AtomicBool,
    shm: Option<Arc<ShmPool>>,
    token: Option<String>,
}

/// Decrements a replica's in-flight count when a call ends, however it ends.
struct InFlight<'a>(&'a Replica);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Replica {
    /// A replica of `url`, dialling `addr` when given (else the URL's host); connects on
    /// first use.
    fn open(
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
            shm,
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

    async fn infer(
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

/// Puts the result the server wrote into the slot where a gRPC response would carry it.
fn with_result(
    mut resp: ModelInferResponse,
    lease: Lease,
    offset: usize,
    expected: &Expected,
) -> Result<ModelInferResponse, Status> {
    let idx = resp
        .outputs
        .iter()
        .position(|o| o.name == expected.output)
        .ok_or_else(|| {
            Status::internal(format!(
                "inference response lacks output '{}'",
                expected.output
            ))
        })?;
    let data = lease
        .result(offset, expected.bytes)
        .map_err(|e| Status::internal(format!("shared-memory result: {e}")))?;
    if resp.raw_output_contents.len() <= idx {
        resp.raw_output_contents.resize(idx + 1, Default::default());
    }
    resp.raw_output_contents[idx] = data;
    Ok(resp)
}

/// The replicas batches may go to now; replaced whole when discovery changes it, so a
/// batch works on one consistent snapshot.
type Replicas = Arc<Vec<Arc<Replica>>>;

/// The pool of inference replicas.
#[derive(Clone)]
pub struct InferenceClient {
    replicas: Arc<RwLock<Replicas>>,
    info: Arc<Mutex<HashMap<String, Arc<ModelInfo>>>>,
    next_id: Arc<AtomicU64>,
    shm_batches: Arc<AtomicU64>,
    opts: ClientOptions,
}

impl InferenceClient {
    /// A pool over `urls` (e.g. `http://10.0.0.5:8001`); connects on first use, reconnects by
    /// itself, health-checks every replica in the background, and looks host names up with
    /// the system resolver. Call inside a tokio runtime.
    pub fn connect_lazy(urls: &[String], opts: &ClientOptions) -> Result<Self, String> {
        Self::connect_lazy_with(urls, opts, Arc::new(SystemResolver))
    }

    /// [`Self::connect_lazy`] with the host names looked up by `resolver`.
    pub fn connect_lazy_with(
        urls: &[String],
        opts: &ClientOptions,
        resolver: Arc<dyn Resolve>,
    ) -> Result<Self, String> {
        if urls.is_empty() {
            return Err("inference: at least one endpoint URL is required".into());
        }
        let mut names = Vec::new();
        for url in urls {
            if let Some(n) = discovery::named(url)? {
                names.push(n);
            }
        }
        let replicas = urls
            .iter()
            .enumerate()
            .map(|(i, url)| Replica::open(i as u64, url, None, opts))
            .collect::<Result<Vec<_>, String>>()?;
        let replicas = Arc::new(RwLock::new(Arc::new(replicas)));
        spawn_health_checks(
            Arc::downgrade(&replicas),
            opts.health_interval,
            opts.replicas_gauge.clone(),
        );
        if !opts.resolve_interval.is_zero() && !names.is_empty() {
            let discover = Discovery {
                replicas: Arc::downgrade(&replicas),
                names,
                resolver,
                opts: opts.clone(),
                next_replica: urls.len() as u64,
                failing: HashSet::new(),
            };
            tokio::spawn(discover.run());
        }
        Ok(InferenceClient {
            replicas,
            info: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
            shm_batches: Arc::default(),
            opts: opts.clone(),
        })
    }

    fn snapshot(&self) -> Replicas {
        self.replicas.read().clone()
    }

    /// Replicas and whether each is healthy.
    pub fn health(&self) -> Vec<(String, bool)> {
        self.snapshot()
            .iter()
            .map(|r| (r.label.clone(), r.healthy.load(Ordering::Acquire)))
            .collect()
    }

    /// Power of two choices among healthy replicas (all of them if none is healthy, so a
    /// recovered fleet is found without waiting for the health check), skipping `avoid`.
    fn pick(
        &self,
        replicas: &[Arc<Replica>],
        avoid: Option<&Arc<Replica>>,
    ) -> Option<Arc<Replica>> {
        let allowed = |r: &&Arc<Replica>| avoid.is_none_or(|a| !Arc::ptr_eq(a, r));
        let healthy: Vec<&Arc<Replica>> = replicas
            .iter()
            .filter(allowed)
            .filter(|r| r.healthy.load(Ordering::Acquire))
            .collect();
        let candidates = if healthy.is_empty() {
            replicas.iter().filter(allowed).collect()
        } else {
            healthy
        };
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0].clone()),
            n => {
                let r = self
                    .next_id
                    .fetch_add(1, Ordering::Relaxed)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let a = (r % n as u64) as usize;
                let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
                let load = |i: usize| candidates[i].in_flight.load(Ordering::Acquire);
                Some(candidates[if load(b) < load(a) { b } else { a }].clone())
            }
        }
    }

    /// Batches whose tensors went through shared memory so far.
    pub fn shared_memory_batches(&self) -> u64 {
        self.shm_batches.load(Ordering::Relaxed)
    }

    /// Runs one batch on the pool; a batch lost to a failing replica is retried once on
    /// another. The response carries `expected.output` in `raw_output_contents` however it
    /// travelled. A `deadline` travels with the request (its `timeout` parameter), so the
    /// server drops it unexecuted once it has passed, and bounds the wait here.
    pub async fn infer(
        &self,
        req: ModelInferRequest,
        expected: &Expected,
        deadline: Option<Instant>,
    ) -> Result<ModelInferResponse, Status> {
        let first = self
            .pick(&self.snapshot(), None)
            .ok_or_else(|| Status::unavailable("no inference replica configured"))?;
        let result = self.infer_on(&first, req.clone(), expected, deadline).await;
        if let Err(s) = &result {
            // The model refused the batch's shapes: it may have been reloaded with another
            // contract since its metadata was cached. Ask again next time.
            if matches!(s.code(), Code::InvalidArgument | Code::FailedPrecondition) {
                self.info.lock().remove(&req.model_name);
            }
        }
        match result {
            Err(s) if s.code() == Code::Unavailable => {
                // Another replica, from the pool as it is now (discovery may have changed it).
                let Some(second) = self.pick(&self.snapshot(), Some(&first)) else {
                    return Err(s);
                };
                first.healthy.store(false, Ordering::Release);
                tracing::warn!(from = %first.label, to = %second.label, "retrying batch on another replica");
                self.infer_on(&second, req, expected, deadline).await
            }
            other => other,
        }
    }

    async fn infer_on(
        &self,
        replica: &Replica,
        mut req: ModelInferRequest,
        expected: &Expected,
        deadline: Option<Instant>,
    ) -> Result<ModelInferResponse, Status> {
        let mut timeout = self.opts.request_timeout;
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Status::deadline_exceeded(
                    "the caller's deadline passed before the batch was sent",
                ));
            }
            timeout = timeout.min(left);
            req.parameters
                .insert(PARAM_TIMEOUT.to_string(), timeout_parameter(left));
        }
        replica.in_flight.fetch_add(1, Ordering::AcqRel);
        let _guard = InFlight(replica);
        if let Some(pool) = &replica.shm {
            let in_bytes: usize = req.raw_input_contents.iter().map(|b| b.len()).sum();
            if let Some(lease) = pool.lease(in_bytes + expected.bytes).await {
                let mut shm_req = req.clone();
                match lease.attach(&mut shm_req, &expected.output, expected.bytes) {
                    Ok(()) => {
                        let id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
                        match replica.infer(shm_req, id, timeout).await {
                            Ok(resp) => {
                                self.shm_batches.fetch_add(1, Ordering::Relaxed);
                                return with_result(resp, lease, in_bytes, expected);
                            }
                            // A restarted server forgot our regions: register anew next time,
                            // send this batch over gRPC.
                            Err(s)
                                if framecast_proto::status::reason(&s)
                                    == Some(framecast_proto::status::REASON_SHM_REGION_UNKNOWN) =>
                            {
                                tracing::warn!(replica = %replica.label, "shared-memory regions lost; registering again");
                                pool.reset();
                            }
                            Err(s) => return Err(s),
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "batch not placed in shared memory"),
                }
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        replica.infer(req, id, timeout).await
    }

    /// Metadata of `model`, cached after the first answer until a batch of it is refused
    /// as malformed (the model may have been reloaded with other shapes).
    pub async fn model_info(&self, model: &str) -> Result<Arc<ModelInfo>, Status> {
        if let Some(i) = self.info.lock().get(model) {
            return Ok(i.clone());
        }
        let mut last = Status::unavailable("no inference replica configured");
        let replicas = self.snapshot();
        for _ in 0..replicas.len() {
            let Some(replica) = self.pick(&replicas, None) else {
                break;
            };
            let request = ModelMetadataRequest {
                name: model.to_string(),
                version: String::new(),
            };
            let request = authorize(Request::new(request), replica.token.as_deref())?;
            match replica.client.clone().model_metadata(request).await {
                Ok(meta) => {
                    let meta = meta.into_inner();
                    let info = Arc::new(
                        ModelInfo::from_metadata(model, meta.inputs, &meta.outputs)
                            .map_err(Status::failed_precondition)?,
                    );
                    self.info.lock().insert(model.to_string(), info.clone());
                    return Ok(info);
                }
                Err(s) if s.code() == Code::Unavailable => last = s,
                Err(s) => return Err(s),
            }
        }
        Err(last)
    }
}

/// Probes every replica's `ServerReady` each `interval`, for as long as the pool exists.
fn spawn_health_checks(
    replicas: Weak<RwLock<Replicas>>,
    interval: Duration,
    gauge: Option<IntGaugeVec>,
) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let Some(replicas) = replicas.upgrade().map(|r| r.read().clone()) else {
                return;
            };
            for r in replicas.iter() {
                let mut client = r.client.clone();
                let probe = async {
                    let req = authorize(Request::new(ServerReadyRequest {}), r.token.as_deref())?;
                    client.server_ready(req).await
                };
                let ok = matches!(
                    tokio::time::timeout(interval, probe).await,
                    Ok(Ok(resp)) if resp.get_ref().ready
                );
                if ok != r.healthy.swap(ok, Ordering::AcqRel) {
                    tracing::info!(replica = %r.label, healthy = ok, "inference replica health changed");
                }
            }
            if let Some(gauge) = &gauge {
                let healthy = replicas
                    .iter()
                    .filter(|r| r.healthy.load(Ordering::Acquire))
                    .count();
                gauge.with_label_values(&["healthy"]).set(healthy as i64);
                gauge
                    .with_label_values(&["unhealthy"])
                    .set((replicas.len() - healthy) as i64);
            }
        }
    });
}

/// The task that looks the URLs' host names up and reshapes the pool to their answers.
struct Discovery {
    replicas: Weak<RwLock<Replicas>>,
    names: Vec<Named>,
    resolver: Arc<dyn Resolve>,
    opts: ClientOptions,
    next_replica: u64,
    /// URLs whose last lookup failed, so a lasting failure is logged once.
    failing: HashSet<String>,
}

impl Discovery {
    async fn run(mut self) {
        loop {
            let resolved = self.lookup_all().await;
            let Some(replicas) = self.replicas.upgrade() else {
                return;
            };
            self.apply(&replicas, &resolved);
            drop(replicas);
            tokio::time::sleep(self.opts.resolve_interval).await;
        }
    }

    /// The addresses of every name that answered with at least one.
    async fn lookup_all(&mut self) -> Vec<(String, Vec<SocketAddr>)> {
        let mut resolved = Vec::new();
        for n in &self.names {
            let wait = self.opts.connect_timeout;
            let why = match tokio::time::timeout(wait, self.resolver.lookup(&n.host, n.port)).await
            {
                Ok(Ok(mut addrs)) if !addrs.is_empty() => {
                    addrs.sort();
                    addrs.dedup();
                    if self.failing.remove(&n.url) {
                        tracing::info!(url = %n.url, "inference host name resolves again");
                    }
                    resolved.push((n.url.clone(), addrs));
                    continue;
                }
                Ok(Ok(_)) => "it has no address".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {wait:?}"),
            };
            if self.failing.insert(n.url.clone()) {
                tracing::warn!(url = %n.url, reason = %why, "inference host name not resolved; keeping the replicas known");
            }
        }
        resolved
    }

    /// Only this task changes the pool, so reading it and then replacing it is not a race.
    fn apply(&mut self, replicas: &RwLock<Replicas>, resolved: &[(String, Vec<SocketAddr>)]) {
        let current = replicas.read().clone();
        let keys: Vec<(&str, Option<SocketAddr>)> =
            current.iter().map(|r| (r.url.as_str(), r.addr)).collect();
        let plan = discovery::plan(&keys, resolved);
        if !plan.changes(current.len()) {
            return;
        }
        let mut next: Vec<Arc<Replica>> = plan.keep.iter().map(|&i| current[i].clone()).collect();
        for (url, addr) in &plan.add {
            match Replica::open(self.next_replica, url, Some(*addr), &self.opts) {
                Ok(r) => {
                    self.next_replica += 1;
                    tracing::info!(replica = %r.label, "inference replica joined");
                    next.push(r);
                }
                Err(e) => {
                    tracing::warn!(url = %url, addr = %addr, error = %e, "inference replica not added")
                }
            }
        }
        for (i, r) in current.iter().enumerate() {
            if !plan.keep.contains(&i) {
                tracing::info!(replica = %r.label, "inference replica left");
                if let Some(pool) = &r.shm {
                    pool.retire();
                }
            }
        }
        *replicas.write() = Arc::new(next);
    }
}

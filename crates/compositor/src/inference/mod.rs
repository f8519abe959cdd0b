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
//! (see [`crate::shm_pool`]); one that cannot map them gets them over gRPC. Either way, an
//! input the replica's tensor cache holds is named by its rows, not sent (`tensors`).
//!
//! One file each: `replica` (one endpoint and the requests multiplexed on its stream),
//! `health` (the background readiness probe), `model_info` (what the compositor needs
//! of a model's metadata); discovery's half that reshapes the pool is in
//! [`crate::discovery`]. This file is the pool: picking a replica, retrying, shared memory.
//!
//! The client speaks in the `tonic::Status`es it receives; the ones it makes itself (no
//! replica, a stream lost, no answer in time) are those gRPC would have given for the same
//! failure, so callers handle both alike.

mod health;
mod model_info;
mod replica;
mod tensors;

pub use model_info::{EncoderInfo, ModelInfo};
use replica::InFlight;
pub(crate) use replica::Replica;
pub use tensors::{AheadSources, CachedInput, RowSource};

use crate::discovery::{self, Resolve, SystemResolver};
use crate::shm_pool::Lease;
use framecast_proto::auth::authorize;
use framecast_proto::deadline::{timeout_parameter, PARAM_TIMEOUT};
use framecast_proto::i420;
use framecast_proto::kserve::infer_parameter::ParameterChoice;
use framecast_proto::kserve::model_infer_request::InferRequestedOutputTensor;
use framecast_proto::kserve::{
    InferParameter, ModelInferRequest, ModelInferResponse, ModelMetadataRequest,
    ModelMetadataResponse,
};
use framecast_telemetry::prometheus::{IntCounterVec, IntGaugeVec};
use framecast_telemetry::tls::ClientTls;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
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
    /// Counts the bytes sent over gRPC and received, by `direction` (`sent`, `received`)
    /// and `kind` (`batch`, `tensor_registration`): the hop's traffic, from the messages'
    /// encoded sizes.
    pub hop_bytes: Option<IntCounterVec>,
    /// After a replica's tensor cache refuses a tensor (full, or over this client's share),
    /// its rows travel with each batch for this long; then registering is tried again.
    pub tensor_retry: Duration,
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
            hop_bytes: None,
            tensor_retry: Duration::from_secs(30),
        }
    }
}

/// The output a batch wants back: its name and size, so it can be placed in shared memory.
#[derive(Debug, Clone)]
pub struct Expected {
    pub output: String,
    pub bytes: usize,
    /// The output is planar RGB images with even sides: a replica offering I420 answers is
    /// asked for them (half the bytes, over gRPC or in shared memory). The answer then says
    /// so on its output ([`i420::PARAM_FORMAT`]) and the caller takes them as they are.
    pub i420: bool,
}

/// The deadline of a batch of several callers' requests: it may wait for the most patient of
/// them (the latest deadline), and has none if one of them has none.
pub fn latest_deadline(mut deadlines: impl Iterator<Item = Option<Instant>>) -> Option<Instant> {
    deadlines
        .try_fold(None::<Instant>, |acc, d| {
            d.map(|d| Some(acc.map_or(d, |a| a.max(d))))
        })
        .flatten()
}

/// A call that failed on the way rather than on `replica` is the replica unavailable, said
/// with its address, and retried elsewhere like one: the replica reset it (Cancelled: killed
/// or shutting down), or the connection broke under it. tonic reports a broken connection as
/// UNKNOWN "transport error" (or whatever hyper said) and keeps the failure as the status's
/// source; a status the replica sent has none. The caller's own cancellation never comes
/// here: its future is dropped.
fn lost(replica: &str, s: Status) -> Status {
    if s.code() == Code::Cancelled || broke_in_transport(&s) {
        let code = s.code();
        Status::unavailable(format!(
            "inference replica {replica} dropped the call ({code:?}): {}",
            s.message()
        ))
    } else {
        s
    }
}

/// Whether `s` was made here from a failed connection or stream: its source chain holds
/// tonic's transport error, hyper's, or an I/O error.
fn broke_in_transport(s: &Status) -> bool {
    let mut next = std::error::Error::source(s);
    while let Some(e) = next {
        if e.is::<tonic::transport::Error>() || e.is::<hyper::Error>() || e.is::<std::io::Error>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// The output parameter asking for I420.
fn i420_format() -> (String, InferParameter) {
    let format = InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(i420::FORMAT_I420.into())),
    };
    (i420::PARAM_FORMAT.to_string(), format)
}

/// Puts the result the server wrote (`len` bytes at `offset`) into the slot where a gRPC
/// response would carry it.
fn with_result(
    mut resp: ModelInferResponse,
    lease: Lease,
    (offset, len): (usize, usize),
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
        .result(offset, len)
        .map_err(|e| Status::internal(format!("shared-memory result: {e}")))?;
    if resp.raw_output_contents.len() <= idx {
        resp.raw_output_contents.resize(idx + 1, Default::default());
    }
    resp.raw_output_contents[idx] = data;
    Ok(resp)
}

/// The replicas batches may go to now; replaced whole when discovery changes it, so a
/// batch works on one consistent snapshot.
pub(crate) type Replicas = Arc<Vec<Arc<Replica>>>;

/// The pool of inference replicas.
#[derive(Clone)]
pub struct InferenceClient {
    replicas: Arc<RwLock<Replicas>>,
    info: Arc<Mutex<HashMap<String, Arc<ModelInfo>>>>,
    encoders: Arc<Mutex<HashMap<String, Arc<EncoderInfo>>>>,
    next_id: Arc<AtomicU64>,
    shm_batches: Arc<AtomicU64>,
    /// What every replica should hold before a batch needs it.
    ahead: Arc<RwLock<Option<AheadSources>>>,
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
        let ahead = Arc::new(RwLock::new(None));
        health::spawn_checks(
            Arc::downgrade(&replicas),
            ahead.clone(),
            opts.health_interval,
            opts.replicas_gauge.clone(),
        );
        if !opts.resolve_interval.is_zero() && !names.is_empty() {
            discovery::spawn(
                Arc::downgrade(&replicas),
                names,
                resolver,
                opts.clone(),
                urls.len() as u64,
            );
        }
        Ok(InferenceClient {
            replicas,
            info: Arc::default(),
            encoders: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
            shm_batches: Arc::default(),
            ahead,
            opts: opts.clone(),
        })
    }

    /// Has every replica hold `sources`' tensors (a preloaded avatar's face inputs) in its
    /// tensor cache before a batch needs them: now for the replicas taken to be healthy, and
    /// again whenever one turns healthy (a replica found later, or back from a restart).
    /// Without it the first batch to need a tensor registers it, and every session's frames
    /// wait for that (the demo avatar's face inputs: 123 MB, computed and sent).
    pub fn register_ahead(&self, sources: AheadSources) {
        *self.ahead.write() = Some(sources.clone());
        for r in self.snapshot().iter() {
            if r.healthy.load(Ordering::Acquire) {
                health::register_ahead(r, sources.clone(), false);
            }
        }
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
        cached: Option<&CachedInput>,
        expected: &Expected,
        deadline: Option<Instant>,
    ) -> Result<ModelInferResponse, Status> {
        let first = self
            .pick(&self.snapshot(), None)
            .ok_or_else(|| Status::unavailable("no inference replica configured"))?;
        let result = self
            .infer_on(&first, req.clone(), cached, expected, deadline)
            .await
            .map_err(|s| lost(&first.label, s));
        if let Err(s) = &result {
            // The model refused the batch's shapes: it may have been reloaded with another
            // contract since its metadata was cached. Ask again next time.
            if matches!(s.code(), Code::InvalidArgument | Code::FailedPrecondition) {
                self.info.lock().remove(&req.model_name);
                self.encoders.lock().remove(&req.model_name);
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
                self.infer_on(&second, req, cached, expected, deadline)
                    .await
                    .map_err(|s| lost(&second.label, s))
            }
            other => other,
        }
    }

    /// Sends one batch to `replica` ([`Self::transmit`]: through shared memory where it can
    /// map it, else over gRPC), with `cached` rows named (the replica's tensor cache holds
    /// them, on the same host too) or sent.
    async fn infer_on(
        &self,
        replica: &Replica,
        mut req: ModelInferRequest,
        cached: Option<&CachedInput>,
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
        let Some(c) = cached else {
            return self.transmit(replica, req, expected, timeout).await;
        };
        if self.cache_holds(replica, c).await? {
            let mut named = req.clone();
            c.name_rows(&mut named);
            match self.transmit(replica, named, expected, timeout).await {
                // Evicted, or the replica restarted: register again, once.
                Err(s)
                    if framecast_proto::status::reason(&s)
                        == Some(framecast_proto::status::REASON_TENSOR_UNKNOWN) =>
                {
                    tracing::warn!(replica = %replica.label, tensor = %c.source.name(), "tensor gone from the replica's cache; registering again");
                    replica.tensors.forget(c.source.name());
                    if self.cache_holds(replica, c).await? {
                        c.name_rows(&mut req);
                        return self.transmit(replica, req, expected, timeout).await;
                    }
                }
                other => return other,
            }
        }
        c.send_rows(&mut req).await?;
        self.transmit(replica, req, expected, timeout).await
    }

    /// Whether `replica`'s tensor cache holds `c`'s tensor: it offers the extension and has
    /// the tensor registered (now, if it had not). False: send the rows.
    async fn cache_holds(&self, replica: &Replica, c: &CachedInput) -> Result<bool, Status> {
        Ok(replica
            .tensors
            .offers(&replica.client, framecast_proto::tensorcache::EXTENSION)
            .await
            && replica.tensors.ensure(&c.source).await?)
    }

    /// The batch through shared memory where the replica can map it, else over gRPC.
    async fn transmit(
        &self,
        replica: &Replica,
        req: ModelInferRequest,
        expected: &Expected,
        timeout: Duration,
    ) -> Result<ModelInferResponse, Status> {
        if let Some(pool) = &replica.shm {
            if pool.usable() {
                if let Some(resp) = self
                    .infer_shm(replica, pool, req.clone(), expected, timeout)
                    .await?
                {
                    return Ok(resp);
                }
            }
        }
        self.send(replica, req, expected, timeout).await
    }

    /// The batch through `pool`'s shared memory; `None` when it could not be placed there
    /// (it goes over gRPC then).
    async fn infer_shm(
        &self,
        replica: &Replica,
        pool: &Arc<crate::shm_pool::ShmPool>,
        req: ModelInferRequest,
        expected: &Expected,
        timeout: Duration,
    ) -> Result<Option<ModelInferResponse>, Status> {
        let in_bytes: usize = req.raw_input_contents.iter().map(|b| b.len()).sum();
        // An I420 answer is half the RGB one (even sides).
        let as_i420 = self.wants_i420(replica, expected).await;
        let out_bytes = if as_i420 {
            expected.bytes / 2
        } else {
            expected.bytes
        };
        let Some(lease) = pool.lease(in_bytes + out_bytes).await else {
            return Ok(None);
        };
        let mut shm_req = req;
        if let Err(e) = lease.attach(&mut shm_req, &expected.output, out_bytes) {
            tracing::warn!(error = %e, "batch not placed in shared memory");
            return Ok(None);
        }
        if as_i420 {
            shm_req.outputs[0].parameters.extend([i420_format()]);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        match replica.infer(shm_req, id, timeout).await {
            Ok(resp) => {
                self.shm_batches.fetch_add(1, Ordering::Relaxed);
                with_result(resp, lease, (in_bytes, out_bytes), expected).map(Some)
            }
            // A restarted server forgot our regions: register anew next time, send this
            // batch over gRPC.
            Err(s)
                if framecast_proto::status::reason(&s)
                    == Some(framecast_proto::status::REASON_SHM_REGION_UNKNOWN) =>
            {
                tracing::warn!(replica = %replica.label, "shared-memory regions lost; registering again");
                pool.reset();
                Ok(None)
            }
            Err(s) => Err(s),
        }
    }

    /// The batch over gRPC, its bytes each way counted; image outputs asked for as I420
    /// where the replica offers it.
    async fn send(
        &self,
        replica: &Replica,
        mut req: ModelInferRequest,
        expected: &Expected,
        timeout: Duration,
    ) -> Result<ModelInferResponse, Status> {
        if self.wants_i420(replica, expected).await {
            req.outputs = vec![InferRequestedOutputTensor {
                name: expected.output.clone(),
                parameters: HashMap::from([i420_format()]),
            }];
        }
        let sent = prost::Message::encoded_len(&req);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        let resp = replica.infer(req, id, timeout).await?;
        if let Some(c) = &self.opts.hop_bytes {
            c.with_label_values(&["sent", "batch"]).inc_by(sent as u64);
            c.with_label_values(&["received", "batch"])
                .inc_by(prost::Message::encoded_len(&resp) as u64);
        }
        Ok(resp)
    }

    /// Whether `expected` is asked of `replica` as I420: it is images and the replica offers
    /// the extension.
    async fn wants_i420(&self, replica: &Replica, expected: &Expected) -> bool {
        expected.i420
            && replica
                .tensors
                .offers(&replica.client, i420::EXTENSION)
                .await
    }

    /// Metadata of `model`, cached after the first answer until a batch of it is refused
    /// as malformed (the model may have been reloaded with other shapes).
    pub async fn model_info(&self, model: &str) -> Result<Arc<ModelInfo>, Status> {
        if let Some(i) = self.info.lock().get(model) {
            return Ok(i.clone());
        }
        let meta = self.metadata(model).await?;
        let mut info = ModelInfo::from_metadata(model, meta.inputs, &meta.outputs)
            .map_err(Status::failed_precondition)?;
        info.on_gpu = self.on_gpu(model).await;
        let info = Arc::new(info);
        self.info.lock().insert(model.to_string(), info.clone());
        Ok(info)
    }

    /// Whether a replica runs `model` on a GPU, from its `ModelConfig` (Triton's extension):
    /// an instance group of kind GPU, or none of kind CPU. A replica that does not answer it
    /// is taken for a GPU server.
    async fn on_gpu(&self, model: &str) -> bool {
        use framecast_proto::kserve::model_instance_group::Kind;
        let Some(replica) = self.pick(&self.snapshot(), None) else {
            return true;
        };
        let request = framecast_proto::kserve::ModelConfigRequest {
            name: model.to_string(),
            version: String::new(),
        };
        let Ok(request) = authorize(Request::new(request), replica.token.as_deref()) else {
            return true;
        };
        match replica.client.clone().model_config(request).await {
            Ok(r) => {
                let groups = r
                    .into_inner()
                    .config
                    .map(|c| c.instance_group)
                    .unwrap_or_default();
                let kind = |k: Kind| groups.iter().any(|g| g.kind == k as i32);
                kind(Kind::Gpu) || !kind(Kind::Cpu)
            }
            Err(_) => true,
        }
    }

    /// [`Self::model_info`] for an audio-encoder model.
    pub async fn encoder_info(&self, model: &str) -> Result<Arc<EncoderInfo>, Status> {
        if let Some(i) = self.encoders.lock().get(model) {
            return Ok(i.clone());
        }
        let meta = self.metadata(model).await?;
        let info = EncoderInfo::from_metadata(model, &meta.inputs, &meta.outputs)
            .map_err(Status::failed_precondition)?;
        let info = Arc::new(info);
        self.encoders.lock().insert(model.to_string(), info.clone());
        Ok(info)
    }

    /// `ModelMetadata` of `model` from the first replica that answers.
    async fn metadata(&self, model: &str) -> Result<ModelMetadataResponse, Status> {
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
                Ok(meta) => return Ok(meta.into_inner()),
                Err(s) if s.code() == Code::Unavailable => last = s,
                Err(s) => return Err(s),
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_broken_on_the_way_are_the_replica_lost_and_replies_are_kept() {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let broken = Status::from_error(Box::new(reset));
        assert_eq!(broken.code(), Code::Unknown);
        let s = lost("10.0.0.7:8001", broken);
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("10.0.0.7:8001"), "{}", s.message());

        let dropped = lost("r", Status::cancelled("stream reset"));
        assert_eq!(dropped.code(), Code::Unavailable);

        // What the replica answered stays as it was: UNKNOWN from the model, its own refusal.
        for sent in [
            Status::unknown("model raised"),
            Status::invalid_argument("shape"),
        ] {
            let code = sent.code();
            assert_eq!(lost("r", sent).code(), code);
        }
    }
}

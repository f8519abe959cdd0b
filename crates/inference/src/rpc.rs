//! The KServe v2 `GRPCInferenceService` RPCs over the [`ModelManager`]: the gRPC edge, where
//! [`Error`]s become statuses. The transport that serves them is [`crate::server`].

use crate::batcher::Delivery;
use crate::error::{invalid, Error};
use crate::models::{LoadedModel, ModelError, ModelManager};
use crate::shared_memory::{Owner, SharedMemory};
use crate::stream_budget::{Room, StreamBudgets};
use crate::tensor_cache::TensorCache;
use crate::validate::{self, Requested};
use framecast_proto::echo;
use framecast_proto::kserve::{
    self, grpc_inference_service_server::GrpcInferenceService,
    model_infer_response::InferOutputTensor, InferParameter, ModelInferRequest, ModelInferResponse,
};
use framecast_proto::shm;
use framecast_telemetry::Drain;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// Response parameter: nanoseconds the request waited in the batch queue.
pub const PARAM_QUEUE_NS: &str = "framecast_queue_ns";
/// Response parameter: nanoseconds of input conversion, forward and output conversion.
pub const PARAM_COMPUTE_NS: &str = "framecast_compute_ns";
/// Response parameter: elements in the batch the request was executed in.
pub const PARAM_BATCH_SIZE: &str = "framecast_batch_size";

/// Requests slower than this end to end are logged at WARN.
#[derive(Clone)]
pub struct InferenceService {
    models: Arc<ModelManager>,
    shm: Arc<SharedMemory>,
    tensors: Arc<TensorCache>,
    slow_request: Duration,
    drain: Drain,
    shm_allowed: bool,
    /// framecast's own extensions (tensor cache, I420 outputs) are offered.
    framecast_extensions: bool,
    /// Authentication is on: a caller's bearer token names the owner of its regions.
    scoped_by_token: bool,
    /// What each client's `ModelStreamInfer` streams may hold.
    stream_budgets: Arc<StreamBudgets>,
}

/// Who owns what a call registers (shared-memory regions, cached tensors): its verified
/// credentials (client certificate; bearer token when `scoped_by_token`), or the anonymous
/// owner on a server without authentication.
pub fn owner_of<T>(req: &Request<T>, scoped_by_token: bool) -> Owner {
    let c = framecast_proto::client::Credentials::of(req, scoped_by_token);
    Owner::from_credentials(
        [("cert", c.cert.as_deref()), ("token", c.token.as_deref())]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v))),
    )
}

impl InferenceService {
    pub fn new(models: Arc<ModelManager>, slow_request: Duration, drain: Drain) -> Self {
        InferenceService {
            models,
            shm: Arc::default(),
            tensors: Arc::new(TensorCache::unmetered(Default::default())),
            slow_request,
            drain,
            shm_allowed: true,
            framecast_extensions: true,
            scoped_by_token: false,
            stream_budgets: Arc::default(),
        }
    }

    /// The same service holding each client's streams to `bytes` of unanswered requests and
    /// `bytes` of answers not yet sent ([`crate::stream_budget`]).
    pub fn with_stream_buffer(mut self, bytes: u64) -> Self {
        self.stream_budgets = Arc::new(StreamBudgets::new(bytes));
        self
    }

    /// The same service keeping its regions in `shm`.
    pub fn with_shared_memory(mut self, shm: Arc<SharedMemory>) -> Self {
        self.shm = shm;
        self
    }

    /// The same service scoping shared-memory regions to the caller's bearer token (set when
    /// the server requires one). A client certificate always scopes them.
    pub fn scoped_by_token(mut self) -> Self {
        self.scoped_by_token = true;
        self
    }

    /// Who owns the regions this call may see: its verified credentials, or the anonymous
    /// owner on a server without authentication (Triton's global table).
    fn owner<T>(&self, req: &Request<T>) -> Owner {
        owner_of(req, self.scoped_by_token)
    }

    /// The same service taking inputs' rows from `tensors` (the tensor cache extension).
    pub fn with_tensor_cache(mut self, tensors: Arc<TensorCache>) -> Self {
        self.tensors = tensors;
        self
    }

    /// The same service refusing shared-memory registration: clients on this host then
    /// cannot have the server map their `/dev/shm` objects.
    pub fn without_shared_memory(mut self) -> Self {
        self.shm_allowed = false;
        self
    }

    /// The same service without framecast's own extensions (tensor cache, I420 outputs):
    /// to clients it looks like a plain KServe v2 server.
    pub fn without_framecast_extensions(mut self) -> Self {
        self.framecast_extensions = false;
        self
    }

    /// The config `name` runs with: a loaded model's (the file may have changed since), or
    /// the one on disk it would load with.
    fn config_of(&self, name: &str) -> Result<Arc<crate::config::ModelConfig>, Error> {
        let dir = self
            .models
            .repository()
            .model_dir(name)
            .map_err(|e| Error::Model(e.into()))?;
        match self.models.ready(name) {
            Some(m) => Ok(m.config.clone()),
            None => crate::config::ModelConfig::load(&dir)
                .map(Arc::new)
                .map_err(|e| Error::Precondition(format!("model '{name}': {e}"))),
        }
    }

    async fn infer(
        &self,
        mut req: ModelInferRequest,
        owner: &Owner,
        grpc_deadline: Option<Instant>,
    ) -> Result<ModelInferResponse, Status> {
        let started = Instant::now();
        check_version(&req.model_name, &req.model_version)?;
        let metrics = self.models.metrics().clone();
        let _named = self.tensors.hold(owner, &req);
        let model = match self.models.get(&req.model_name).await {
            Ok(m) => m,
            Err(e) => {
                let status = Status::from(Error::from(e));
                if status.code() != tonic::Code::NotFound
                    && status.code() != tonic::Code::InvalidArgument
                {
                    metrics
                        .requests
                        .with_label_values(&[
                            req.model_name.as_str(),
                            framecast_proto::status::label(status.code()),
                        ])
                        .inc();
                }
                return Err(status);
            }
        };
        let result = self
            .run(&model, &mut req, owner, grpc_deadline, started)
            .await
            .map_err(Status::from);
        let label = match &result {
            Ok(_) => "ok",
            Err(s) => framecast_proto::status::label(s.code()),
        };
        metrics
            .requests
            .with_label_values(&[model.name.as_str(), label])
            .inc();
        metrics
            .request_seconds
            .with_label_values(&[model.name.as_str()])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn run(
        &self,
        model: &LoadedModel,
        req: &mut ModelInferRequest,
        owner: &Owner,
        grpc_deadline: Option<Instant>,
        started: Instant,
    ) -> Result<ModelInferResponse, Error> {
        let sources = validate::Sources {
            shm: &self.shm,
            tensors: &self.tensors,
        };
        let prepared = validate::prepare(&model.name, &model.config, sources, owner, req)?;
        let deadline = [
            grpc_deadline,
            request_timeout(req)?.map(|t| started + t),
            (model.config.queue_timeout_us > 0)
                .then(|| started + Duration::from_micros(model.config.queue_timeout_us)),
        ]
        .into_iter()
        .flatten()
        .min();
        let mut deliver = vec![Delivery::default(); model.config.outputs.len()];
        for w in &prepared.outputs {
            deliver[w.index] = Delivery {
                window: w.shm.clone(),
                i420: w.i420,
            };
        }
        let out = model
            .infer(prepared.batch, prepared.inputs, deliver, deadline)
            .await
            .map_err(|source| Error::Job {
                model: model.name.clone(),
                source,
            });
        // A region shrunk while the batch read or wrote it was replaced with zeros: whatever
        // came of it is void, whichever way the request went.
        self.shm.check_used(&prepared.regions)?;
        let out = out?;
        let compute = out.compute.input + out.compute.infer + out.compute.output;
        let elapsed = started.elapsed();
        tracing::debug!(
            batch = prepared.batch,
            batch_size = out.batch_size,
            queue_ms = out.queue.as_secs_f64() * 1e3,
            compute_ms = compute.as_secs_f64() * 1e3,
            "answered"
        );
        if elapsed > self.slow_request {
            tracing::warn!(
                model = %model.name, id = %req.id, batch = prepared.batch,
                total_ms = elapsed.as_secs_f64() * 1e3,
                queue_ms = out.queue.as_secs_f64() * 1e3,
                compute_ms = compute.as_secs_f64() * 1e3,
                "slow request"
            );
        }
        let params = [
            (PARAM_QUEUE_NS, out.queue.as_nanos() as i64),
            (PARAM_COMPUTE_NS, compute.as_nanos() as i64),
            (PARAM_BATCH_SIZE, out.batch_size as i64),
        ]
        .into_iter()
        .map(|(k, v)| {
            let p = InferParameter {
                parameter_choice: Some(kserve::infer_parameter::ParameterChoice::Int64Param(v)),
            };
            (k.to_string(), p)
        })
        .collect();
        Ok(response(
            model,
            std::mem::take(&mut req.id),
            prepared.batch,
            &prepared.outputs,
            out.outputs,
            params,
        ))
    }

    /// The most bytes `req`'s answer can take, from its model's outputs and its batch
    /// (before it is validated, so that it waits for room holding nothing): 0 for a model
    /// not loaded yet.
    fn answer_bound(&self, req: &ModelInferRequest) -> usize {
        let Some(model) = self.models.ready(&req.model_name) else {
            return 0;
        };
        let max = model.config.max_batch_size.max(1) as i64;
        let batch = req
            .inputs
            .first()
            .and_then(|i| i.shape.first())
            .map_or(1, |&b| b.clamp(1, max)) as usize;
        let element: usize = model.config.outputs.iter().map(|o| o.element_bytes()).sum();
        batch.saturating_mul(element)
    }
}

/// The request's `timeout` parameter (microseconds, as Triton's clients send it).
fn request_timeout(req: &ModelInferRequest) -> Result<Option<Duration>, Error> {
    use kserve::infer_parameter::ParameterChoice;
    match req
        .parameters
        .get(framecast_proto::deadline::PARAM_TIMEOUT)
        .and_then(|p| p.parameter_choice.as_ref())
    {
        None => Ok(None),
        Some(ParameterChoice::Int64Param(us)) if *us > 0 => {
            Ok(Some(Duration::from_micros(*us as u64)))
        }
        Some(ParameterChoice::Uint64Param(us)) if *us > 0 => Ok(Some(Duration::from_micros(*us))),
        Some(other) => Err(invalid(format!(
            "parameters.timeout must be a positive int64 of microseconds, not {}",
            echo(&format!("{other:?}"))
        ))),
    }
}

/// The span of one request: its model and the caller's id (a compositor's id names its
/// Render request and first frame), so one grep follows a chunk across both services.
fn infer_span(req: &ModelInferRequest) -> tracing::Span {
    tracing::info_span!("infer", model = %echo(&req.model_name), id = %echo(&req.id))
}

/// The one version each model is served at.
const SERVED_VERSION: &str = "1";

/// A request's model version: empty (the served one) or the served one; any other is a
/// version this server does not have (NOT_FOUND, as Triton answers).
fn check_version(model: &str, version: &str) -> Result<(), Error> {
    if version.is_empty() || version == SERVED_VERSION {
        return Ok(());
    }
    Err(Error::NotFound(format!(
        "model_version: model '{}' has no version '{}' (this server serves version {SERVED_VERSION} only)",
        echo(model),
        echo(version)
    )))
}

/// Builds the response; outputs asked into shared memory (the worker has written them there)
/// leave an empty `raw_output_contents` entry, so entries stay aligned with `outputs`.
fn response(
    model: &LoadedModel,
    id: String,
    batch: usize,
    wanted: &[Requested],
    mut outputs: Vec<bytes::Bytes>,
    parameters: HashMap<String, InferParameter>,
) -> ModelInferResponse {
    let specs = &model.config.outputs;
    let mut tensors = Vec::with_capacity(wanted.len());
    let mut raw = Vec::with_capacity(wanted.len());
    for w in wanted {
        let spec = &specs[w.index];
        let data = std::mem::take(&mut outputs[w.index]);
        let mut tensor = InferOutputTensor {
            name: spec.name.clone(),
            datatype: spec.datatype.as_str().to_string(),
            shape: spec.batched_shape(batch),
            ..Default::default()
        };
        if let Some((h, w)) = w.i420 {
            use framecast_proto::i420::{FORMAT_I420, PARAM_FORMAT};
            tensor.shape = vec![batch as i64, (h * 3 / 2) as i64, w as i64];
            let format = InferParameter {
                parameter_choice: Some(kserve::infer_parameter::ParameterChoice::StringParam(
                    FORMAT_I420.into(),
                )),
            };
            tensor.parameters.insert(PARAM_FORMAT.into(), format);
        }
        match &w.shm {
            Some(slot) => {
                let len = match w.i420 {
                    Some((h, wd)) => framecast_proto::i420::len(batch, h, wd),
                    None => spec.element_bytes() * batch,
                };
                tensor
                    .parameters
                    .extend(shm::tensor_params(&slot.region.name, len, slot.offset));
                raw.push(bytes::Bytes::new());
            }
            None => raw.push(data),
        }
        tensors.push(tensor);
    }
    ModelInferResponse {
        model_name: model.name.clone(),
        model_version: SERVED_VERSION.to_string(),
        id,
        parameters,
        outputs: tensors,
        raw_output_contents: raw,
    }
}

/// What `model` holds on each device it runs on: measured around its loads on CUDA devices,
/// estimated from the model file and `--model-overhead-mib` elsewhere.
fn memory_usage(model: &LoadedModel) -> Vec<kserve::MemoryUsage> {
    model
        .memory
        .iter()
        .map(|&(d, byte_size)| {
            let (kind, id) = match d {
                tch::Device::Cuda(i) => ("GPU", i as i64),
                _ => ("CPU", 0),
            };
            kserve::MemoryUsage {
                r#type: kind.to_string(),
                id,
                byte_size,
            }
        })
        .collect()
}

/// `config` as Triton's `ModelConfig`: platform `pytorch_libtorch`, `TYPE_*` datatypes,
/// dims without the batch dimension, the dynamic batcher's delay, and one instance group per
/// kind of device the server runs on.
fn triton_config(
    name: &str,
    config: &crate::config::ModelConfig,
    exec: &crate::models::ExecOptions,
) -> kserve::ModelConfig {
    use kserve::model_instance_group::Kind;
    let data_type = |dt: framecast_proto::tensor::DataType| {
        kserve::DataType::from_str_name(&format!("TYPE_{}", dt.as_str()))
            .unwrap_or(kserve::DataType::TypeInvalid) as i32
    };
    let count = exec.instances.max(1) as i32;
    let gpus: Vec<i32> = exec
        .devices
        .iter()
        .filter_map(|d| match d {
            tch::Device::Cuda(i) => Some(*i as i32),
            _ => None,
        })
        .collect();
    let mut instance_group = Vec::new();
    let cpus = exec
        .devices
        .iter()
        .filter(|d| **d == tch::Device::Cpu)
        .count() as i32;
    if cpus > 0 {
        instance_group.push(kserve::ModelInstanceGroup {
            name: format!("{name}_cpu"),
            count: count * cpus,
            gpus: Vec::new(),
            kind: Kind::Cpu as i32,
        });
    }
    if !gpus.is_empty() {
        instance_group.push(kserve::ModelInstanceGroup {
            name: format!("{name}_gpu"),
            count,
            gpus,
            kind: Kind::Gpu as i32,
        });
    }
    kserve::ModelConfig {
        name: name.to_string(),
        platform: "pytorch_libtorch".to_string(),
        backend: "pytorch".to_string(),
        max_batch_size: config.max_batch_size as i32,
        input: config
            .inputs
            .iter()
            .map(|t| kserve::ModelInput {
                name: t.name.clone(),
                data_type: data_type(t.datatype),
                dims: t.dims.clone(),
            })
            .collect(),
        output: config
            .outputs
            .iter()
            .map(|t| kserve::ModelOutput {
                name: t.name.clone(),
                data_type: data_type(t.datatype),
                dims: t.dims.clone(),
            })
            .collect(),
        instance_group,
        scheduling_choice: Some(kserve::model_config::SchedulingChoice::DynamicBatching(
            kserve::ModelDynamicBatching {
                preferred_batch_size: config
                    .preferred_batch_sizes
                    .iter()
                    .map(|&b| b as i32)
                    .collect(),
                max_queue_delay_microseconds: config.max_queue_delay_us,
            },
        )),
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _: Request<kserve::ServerLiveRequest>,
    ) -> Reply<kserve::ServerLiveResponse> {
        Ok(Response::new(kserve::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<kserve::ServerReadyRequest>,
    ) -> Reply<kserve::ServerReadyResponse> {
        // Draining: the in-flight work finishes, but new work belongs elsewhere.
        Ok(Response::new(kserve::ServerReadyResponse {
            ready: !self.drain.is_draining(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<kserve::ModelReadyRequest>,
    ) -> Reply<kserve::ModelReadyResponse> {
        let req = req.into_inner();
        let name = req.name;
        crate::repository::check_name(&name).map_err(|e| Error::Model(e.into()))?;
        check_version(&name, &req.version)?;
        Ok(Response::new(kserve::ModelReadyResponse {
            ready: self.models.ready(&name).is_some() && !self.drain.is_draining(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<kserve::ServerMetadataRequest>,
    ) -> Reply<kserve::ServerMetadataResponse> {
        Ok(Response::new(kserve::ServerMetadataResponse {
            name: "framecast-inference".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extensions: [
                "model_configuration",
                "model_repository",
                "statistics",
                "streaming",
            ]
            .into_iter()
            .chain(self.shm_allowed.then_some("system_shared_memory"))
            .chain(
                [
                    framecast_proto::tensorcache::EXTENSION,
                    framecast_proto::i420::EXTENSION,
                ]
                .into_iter()
                .filter(|_| self.framecast_extensions),
            )
            .map(String::from)
            .collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<kserve::ModelMetadataRequest>,
    ) -> Reply<kserve::ModelMetadataResponse> {
        use kserve::model_metadata_response::TensorMetadata;
        let req = req.into_inner();
        let name = req.name;
        check_version(&name, &req.version)?;
        let config = self.config_of(&name)?;
        let meta = |specs: &[crate::config::TensorSpec]| {
            specs
                .iter()
                .map(|s| TensorMetadata {
                    name: s.name.clone(),
                    datatype: s.datatype.as_str().to_string(),
                    shape: s
                        .batched_shape(0)
                        .into_iter()
                        .enumerate()
                        .map(|(i, d)| if i == 0 { -1 } else { d })
                        .collect(),
                })
                .collect()
        };
        Ok(Response::new(kserve::ModelMetadataResponse {
            name,
            versions: vec![SERVED_VERSION.to_string()],
            platform: config.platform.clone(),
            inputs: meta(&config.inputs),
            outputs: meta(&config.outputs),
        }))
    }

    async fn model_config(
        &self,
        req: Request<kserve::ModelConfigRequest>,
    ) -> Reply<kserve::ModelConfigResponse> {
        let req = req.into_inner();
        check_version(&req.name, &req.version)?;
        let config = self.config_of(&req.name)?;
        Ok(Response::new(kserve::ModelConfigResponse {
            config: Some(triton_config(&req.name, &config, self.models.exec())),
        }))
    }

    async fn model_infer(&self, req: Request<ModelInferRequest>) -> Reply<ModelInferResponse> {
        let deadline = framecast_proto::deadline::from_metadata(req.metadata());
        let owner = self.owner(&req);
        let req = req.into_inner();
        let span = infer_span(&req);
        self.infer(req, &owner, deadline)
            .instrument(span)
            .await
            .map(Response::new)
    }

    type ModelStreamInferStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<kserve::ModelStreamInferResponse, Status>> + Send>,
    >;

    async fn model_stream_infer(
        &self,
        req: Request<Streaming<ModelInferRequest>>,
    ) -> Reply<Self::ModelStreamInferStream> {
        let deadline = framecast_proto::deadline::from_metadata(req.metadata());
        let owner = self.owner(&req);
        let budget = self
            .stream_budgets
            .of(&framecast_proto::client::of(&req, self.scoped_by_token));
        let mut inbound = req.into_inner();
        // Answers go out with the room they hold in the client's reply budget, given back
        // as the transport takes each one.
        let (tx, rx) = mpsc::channel::<(Result<_, Status>, Option<Room>)>(256);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                // Draining: take no new requests; the stream ends once those in flight are
                // answered (their tasks hold the last senders).
                let msg = tokio::select! {
                    biased;
                    _ = this.drain.started() => break,
                    msg = inbound.next() => msg,
                };
                let msg = match msg {
                    None => break,
                    Some(Ok(msg)) => msg,
                    Some(Err(status)) => {
                        let status = framecast_telemetry::oversize_as_exhausted(status);
                        let _ = tx.send((Err(status), None)).await;
                        break;
                    }
                };
                // Read no further while this client's unanswered requests fill its budget.
                let held = budget.request(prost::Message::encoded_len(&msg)).await;
                let (tx, this, owner, budget) =
                    (tx.clone(), this.clone(), owner.clone(), budget.clone());
                let span = infer_span(&msg);
                // Each request runs on its own task so many are in flight and batch together;
                // responses go back as they complete, matched by id.
                tokio::spawn(
                    async move {
                        let (id, model_name) = (msg.id.clone(), msg.model_name.clone());
                        // Room for the answer before anything is held for the request: a
                        // client not reading its answers waits here, holding no tensor.
                        let room = budget.reply(this.answer_bound(&msg));
                        let room = match deadline {
                            Some(d) => tokio::time::timeout_at(d.into(), room).await.ok(),
                            None => Some(room.await),
                        };
                        let result = match room {
                            None => Err(Status::deadline_exceeded(
                                "the stream's deadline passed while its answers waited to be read",
                            )),
                            Some(room) => {
                                this.infer(msg, &owner, deadline).await.map(|r| (r, room))
                            }
                        };
                        let (reply, room) = match result {
                            Ok((r, room)) => (
                                kserve::ModelStreamInferResponse {
                                    error_message: String::new(),
                                    infer_response: Some(r),
                                },
                                Some(room),
                            ),
                            Err(s) => (
                                framecast_proto::status::stream_error(&s, id, model_name),
                                None,
                            ),
                        };
                        let _ = tx.send((Ok(reply), room)).await;
                        drop(held);
                    }
                    .instrument(span),
                );
            }
        });
        let answers = ReceiverStream::new(rx).map(|(answer, room)| {
            drop(room);
            answer
        });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn model_statistics(
        &self,
        req: Request<kserve::ModelStatisticsRequest>,
    ) -> Reply<kserve::ModelStatisticsResponse> {
        let req = req.into_inner();
        let name = req.name;
        check_version(&name, &req.version)?;
        let models = if name.is_empty() {
            self.models.loaded()
        } else {
            let dir = self.models.repository().model_dir(&name);
            dir.map_err(|e| Error::Model(e.into()))?;
            vec![self
                .models
                .ready(&name)
                .ok_or_else(|| Error::Model(ModelError::NotLoaded(name.clone())))?]
        };
        Ok(Response::new(kserve::ModelStatisticsResponse {
            model_stats: models
                .iter()
                .map(|m| m.stats.snapshot(&m.name, memory_usage(m)))
                .collect(),
        }))
    }

    async fn repository_index(
        &self,
        req: Request<kserve::RepositoryIndexRequest>,
    ) -> Reply<kserve::RepositoryIndexResponse> {
        use kserve::repository_index_response::ModelIndex;
        let ready_only = req.into_inner().ready;
        let names = self
            .models
            .repository()
            .list()
            .map_err(|e| Error::Internal(format!("reading the repository: {e}")))?;
        let models = names
            .into_iter()
            .filter_map(|name| {
                let (state, reason) = self
                    .models
                    .state(&name)
                    .unwrap_or(("UNLOADED", String::new()));
                (!ready_only || state == "READY").then(|| ModelIndex {
                    name,
                    version: "1".to_string(),
                    state: state.to_string(),
                    reason,
                })
            })
            .collect();
        Ok(Response::new(kserve::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        req: Request<kserve::RepositoryModelLoadRequest>,
    ) -> Reply<kserve::RepositoryModelLoadResponse> {
        let name = req.into_inner().model_name;
        self.models.load(&name).await.map_err(Error::Model)?;
        Ok(Response::new(kserve::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<kserve::RepositoryModelUnloadRequest>,
    ) -> Reply<kserve::RepositoryModelUnloadResponse> {
        let name = req.into_inner().model_name;
        self.models.unload(&name).map_err(|e| match e {
            // Nothing to unload: asking again will not change that, so not UNAVAILABLE.
            ModelError::NotLoaded(_) => Error::Precondition(e.to_string()),
            e => Error::Model(e),
        })?;
        Ok(Response::new(kserve::RepositoryModelUnloadResponse {}))
    }

    async fn system_shared_memory_status(
        &self,
        req: Request<kserve::SystemSharedMemoryStatusRequest>,
    ) -> Reply<kserve::SystemSharedMemoryStatusResponse> {
        use kserve::system_shared_memory_status_response::RegionStatus;
        let owner = self.owner(&req);
        let regions = self.shm.status(&owner, &req.into_inner().name)?;
        Ok(Response::new(kserve::SystemSharedMemoryStatusResponse {
            regions: regions
                .into_iter()
                .map(|r| {
                    let status = RegionStatus {
                        name: r.name.clone(),
                        key: r.key.clone(),
                        offset: r.offset,
                        byte_size: r.mapping.len() as u64,
                    };
                    (r.name.clone(), status)
                })
                .collect(),
        }))
    }

    async fn system_shared_memory_register(
        &self,
        req: Request<kserve::SystemSharedMemoryRegisterRequest>,
    ) -> Reply<kserve::SystemSharedMemoryRegisterResponse> {
        if !self.shm_allowed {
            return Err(Status::from(Error::Precondition(
                "shared memory is disabled on this server (--shared-memory false); send tensors in raw_input_contents"
                    .into(),
            )));
        }
        let owner = self.owner(&req);
        let client = framecast_proto::client::of(&req, self.scoped_by_token);
        let r = req.into_inner();
        let shm = self.shm.clone();
        // Opening and mapping touch the file system: keep them off the async workers.
        tokio::task::spawn_blocking(move || {
            shm.register(&owner, &client, &r.name, &r.key, r.offset, r.byte_size)
        })
        .await
        .map_err(|e| Error::Internal(format!("registering shared memory: {e}")))??;
        Ok(Response::new(kserve::SystemSharedMemoryRegisterResponse {}))
    }

    async fn system_shared_memory_unregister(
        &self,
        req: Request<kserve::SystemSharedMemoryUnregisterRequest>,
    ) -> Reply<kserve::SystemSharedMemoryUnregisterResponse> {
        let owner = self.owner(&req);
        self.shm.unregister(&owner, &req.into_inner().name);
        Ok(Response::new(
            kserve::SystemSharedMemoryUnregisterResponse {},
        ))
    }
}

//! The compositor's side of the tensor cache extension (`framecast.tensorcache.v1`): an input
//! whose rows never change (an avatar's face inputs) is registered once with each replica
//! that offers the extension, and batches name its rows instead of carrying them: 600 KB a
//! frame at S = 320 becomes a few bytes, and the compositor computes each frame's face input
//! once per replica instead of once per frame. A replica without the extension (a plain
//! Triton) gets the rows themselves. On the same host the rest of a batch goes through shared
//! memory and the rows are named all the same.

use super::ClientOptions;
use bytes::Bytes;
use framecast_proto::auth::authorize;
use framecast_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use framecast_proto::kserve::infer_parameter::ParameterChoice;
use framecast_proto::kserve::{InferParameter, ModelInferRequest, ServerMetadataRequest};
use framecast_proto::tensor::DataType;
use framecast_proto::tensorcache::v1::tensor_cache_client::TensorCacheClient;
use framecast_proto::tensorcache::v1::RegisterRequest;
use framecast_proto::tensorcache::{PARAM_ROWS, PARAM_TENSOR};
use framecast_telemetry::prometheus::IntCounterVec;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// The longest a refused tensor waits to be registered again.
const MAX_RETRY: Duration = Duration::from_secs(600);

/// A refusal: when registering may be tried again, and the wait after another.
struct Refused {
    until: Instant,
    next: Duration,
}

/// Bytes per registration message: tensors larger than this are registered in parts.
const REGISTER_PART_BYTES: usize = 64 << 20;

/// A tensor whose rows a batch may name instead of sending. Its methods block (they may
/// compute the rows): they are called from blocking tasks.
pub trait RowSource: Send + Sync {
    /// A name unique to the tensor's content: the same name always means the same bytes.
    fn name(&self) -> &str;
    fn datatype(&self) -> DataType;
    /// The whole tensor's shape; the first dimension indexes rows.
    fn shape(&self) -> Vec<i64>;
    /// The whole tensor, row-major.
    fn all(&self) -> Result<Bytes, String>;
    /// `rows`, end to end.
    fn rows(&self, rows: &[usize]) -> Result<Bytes, String>;
}

/// The tensors every replica should hold before a batch needs them (a preloaded avatar's face
/// inputs), asked for afresh each time a replica turns healthy, so a source gone since (an
/// avatar unloaded) is not registered.
pub type AheadSources = Arc<dyn Fn() -> Vec<Arc<dyn RowSource>> + Send + Sync>;

/// One input of a batch given as rows of a [`RowSource`]: the request's `inputs[input]`
/// carries no payload until the replica is chosen.
#[derive(Clone)]
pub struct CachedInput {
    pub input: usize,
    pub source: Arc<dyn RowSource>,
    pub rows: Vec<usize>,
}

impl CachedInput {
    /// Names the rows on the request's input (the replica holds the tensor).
    pub(super) fn name_rows(&self, req: &mut ModelInferRequest) {
        let text = |s: String| InferParameter {
            parameter_choice: Some(ParameterChoice::StringParam(s)),
        };
        let rows: Vec<String> = self.rows.iter().map(|r| r.to_string()).collect();
        if let Some(input) = req.inputs.get_mut(self.input) {
            input
                .parameters
                .insert(PARAM_TENSOR.into(), text(self.source.name().to_string()));
            input
                .parameters
                .insert(PARAM_ROWS.into(), text(rows.join(",")));
        }
    }

    /// Puts the rows themselves into the request (`raw_input_contents`, in input order: the
    /// inputs before this one are all sent by value).
    pub(super) async fn send_rows(&self, req: &mut ModelInferRequest) -> Result<(), Status> {
        let (source, rows) = (self.source.clone(), self.rows.clone());
        let bytes = tokio::task::spawn_blocking(move || source.rows(&rows))
            .await
            .map_err(|e| Status::internal(format!("computing an input failed: {e}")))?
            .map_err(|e| Status::internal(format!("computing an input: {e}")))?;
        let at = self.input.min(req.raw_input_contents.len());
        req.raw_input_contents.insert(at, bytes);
        Ok(())
    }
}

/// What one replica's tensor cache holds of ours.
pub(crate) struct ReplicaTensors {
    client: TensorCacheClient<Channel>,
    token: Option<String>,
    /// The extensions the replica lists, once asked.
    extensions: tokio::sync::OnceCell<Vec<String>>,
    registered: Mutex<HashSet<String>>,
    /// Names the replica refused (its cache full of tensors in use, this client's share, or
    /// too large for its budget), when to try again and the wait after the next refusal:
    /// meanwhile their rows are sent with each batch instead of being registered again and
    /// again; a refusal may pass (room comes back), so it is never taken as final, and each
    /// refusal in a row doubles the wait, up to [`MAX_RETRY`].
    refused: Mutex<HashMap<String, Refused>>,
    retry: Duration,
    /// The hop's byte counter (`direction`, `kind`).
    hop_bytes: Option<IntCounterVec>,
    /// One registration at a time per replica (a large tensor is sent once, not by every
    /// batch that finds it missing).
    registering: tokio::sync::Mutex<()>,
}

impl ReplicaTensors {
    pub(crate) fn new(channel: Channel, opts: &ClientOptions) -> Self {
        ReplicaTensors {
            client: TensorCacheClient::new(channel)
                .max_decoding_message_size(opts.max_message_bytes)
                .max_encoding_message_size(opts.max_message_bytes),
            token: opts.token.clone(),
            extensions: tokio::sync::OnceCell::new(),
            registered: Mutex::new(HashSet::new()),
            refused: Mutex::new(HashMap::new()),
            retry: opts.tensor_retry,
            hop_bytes: opts.hop_bytes.clone(),
            registering: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether `name` was refused recently enough that its rows are still sent instead.
    fn refused_lately(&self, name: &str) -> bool {
        self.refused
            .lock()
            .get(name)
            .is_some_and(|r| Instant::now() < r.until)
    }

    /// Records a refusal of `name`: rows for a while, longer after each refusal in a row.
    fn refuse(&self, name: &str) -> Duration {
        let mut refused = self.refused.lock();
        let wait = refused.get(name).map_or(self.retry, |r| r.next);
        refused.insert(
            name.to_string(),
            Refused {
                until: Instant::now() + wait,
                next: (wait * 2).min(MAX_RETRY.max(self.retry)),
            },
        );
        wait
    }

    /// Whether the replica lists `extension` in its metadata (asked once; a failed ask is
    /// asked again next time).
    pub(crate) async fn offers(
        &self,
        kserve: &GrpcInferenceServiceClient<Channel>,
        extension: &str,
    ) -> bool {
        let ask = || async {
            let req = authorize(
                Request::new(ServerMetadataRequest {}),
                self.token.as_deref(),
            )?;
            let meta = kserve.clone().server_metadata(req).await?.into_inner();
            Ok::<_, Status>(meta.extensions)
        };
        self.extensions
            .get_or_try_init(ask)
            .await
            .is_ok_and(|list| list.iter().any(|e| e == extension))
    }

    /// Registers `source` unless the replica holds it already (as far as we know). False:
    /// the replica does not hold it (it refused it lately); send its rows instead.
    pub(crate) async fn ensure(&self, source: &Arc<dyn RowSource>) -> Result<bool, Status> {
        let name = source.name().to_string();
        if self.registered.lock().contains(&name) {
            return Ok(true);
        }
        if self.refused_lately(&name) {
            return Ok(false);
        }
        let _one = self.registering.lock().await;
        if self.registered.lock().contains(&name) {
            return Ok(true);
        }
        if self.refused_lately(&name) {
            return Ok(false);
        }
        let s = source.clone();
        let data = tokio::task::spawn_blocking(move || s.all())
            .await
            .map_err(|e| Status::internal(format!("computing a tensor failed: {e}")))?
            .map_err(|e| Status::internal(format!("computing a tensor: {e}")))?;
        let shape = source.shape();
        let rows = shape.first().copied().unwrap_or(1).max(1) as usize;
        let per_row = data.len() / rows;
        // Parts well under the message limit: a 523-frame avatar's 321 MB in six.
        let part_rows = (REGISTER_PART_BYTES / per_row.max(1)).max(1);
        for first in (0..rows).step_by(part_rows) {
            let end = (first + part_rows).min(rows);
            let request = RegisterRequest {
                name: name.clone(),
                datatype: source.datatype().as_str().to_string(),
                shape: shape.clone(),
                data: data.slice(first * per_row..end * per_row),
                first_row: first as u64,
            };
            let bytes = prost::Message::encoded_len(&request) as u64;
            let request = authorize(Request::new(request), self.token.as_deref())?;
            let outcome = self.client.clone().register(request).await;
            if let Some(c) = &self.hop_bytes {
                c.with_label_values(&["sent", "tensor_registration"])
                    .inc_by(bytes);
            }
            match outcome {
                Ok(_) => {}
                // No room now (full of tensors in use, or this client's share), or larger
                // than the budget or the message limit; or, past the first part, another
                // client on the same credential restarted the registration of this very name
                // (two compositors loading one avatar together): rows for a while, then again.
                Err(s)
                    if matches!(s.code(), Code::ResourceExhausted | Code::OutOfRange)
                        || (first > 0 && s.code() == Code::InvalidArgument) =>
                {
                    let wait = self.refuse(&name);
                    tracing::warn!(tensor = %name, error = %s.message(), retry_s = wait.as_secs_f64(), "the replica's tensor cache refused it; its rows travel with each batch until registering is tried again");
                    return Ok(false);
                }
                Err(s) => return Err(s),
            }
        }
        tracing::info!(tensor = %name, bytes = data.len(), "registered with the replica's tensor cache");
        self.refused.lock().remove(&name);
        self.registered.lock().insert(name);
        Ok(true)
    }

    /// Registers each of `sources` with the replica (`kserve`'s) unless it holds it, if it
    /// offers the extension. Refused ones are left to the first batch that needs them; an
    /// error (the replica went away) is returned, so the caller tries again.
    /// `again`: the replica was unhealthy since they were registered and may have restarted
    /// empty, so they are sent again whatever we think it holds.
    pub(crate) async fn register_ahead(
        &self,
        kserve: &GrpcInferenceServiceClient<Channel>,
        sources: &[Arc<dyn RowSource>],
        again: bool,
    ) -> Result<usize, Status> {
        if sources.is_empty() {
            return Ok(0);
        }
        if !self
            .offers(kserve, framecast_proto::tensorcache::EXTENSION)
            .await
        {
            // Not offered (a plain Triton), or not known yet: the replica did not answer.
            return match self.extensions.get() {
                Some(_) => Ok(0),
                None => Err(Status::unavailable(
                    "the replica did not answer ServerMetadata",
                )),
            };
        }
        let mut held = 0;
        for s in sources {
            if again {
                self.forget(s.name());
            }
            held += usize::from(self.ensure(s).await?);
        }
        Ok(held)
    }

    /// Forgets that the replica holds `name` (it said it does not).
    pub(crate) fn forget(&self, name: &str) {
        self.registered.lock().remove(name);
    }
}

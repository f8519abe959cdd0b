//! The seam under the batcher: what runs one batch of a model. The batcher (queueing, merging,
//! deadlines, delivery) knows nothing of libtorch; [`TorchModel`](crate::torch_model::TorchModel)
//! is one implementation, and the batcher's tests use plain Rust ones.

use crate::tensor_cache::Rows;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// One request's data for one input.
#[derive(Clone)]
pub enum Payload {
    /// Its bytes, as the request brought them (on the wire or in shared memory).
    Bytes(Bytes),
    /// Rows of a tensor in the tensor cache, by index. A backend gathers them where it holds
    /// the tensor (on its device), so they never cross the host-to-device copy again.
    Rows(Arc<Rows>),
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Payload::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Payload::Rows(r) => write!(f, "Rows('{}', {:?})", r.tensor().name, r.index),
        }
    }
}

impl Payload {
    /// Bytes of the data.
    pub fn len(&self) -> usize {
        match self {
            Payload::Bytes(b) => b.len(),
            Payload::Rows(r) => r.byte_len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The data on the host, end to end (rows are gathered: a copy).
    pub fn to_bytes(&self) -> Bytes {
        match self {
            Payload::Bytes(b) => b.clone(),
            Payload::Rows(r) => r.gather(),
        }
    }
}

/// Runs batches of one model on one device. Lives on its worker thread (libtorch modules
/// stay on the thread that built them), so it need not be `Send`.
pub trait Backend {
    /// Executes one batch of `batch` elements. `inputs[i]` holds, for config input `i`, the
    /// payloads of the requests in the batch, in order; their lengths sum to the batch's bytes.
    /// `i420[o]`: every request of the batch wants config output `o` as I420
    /// ([`framecast_proto::i420`]); a backend that can convert it where it runs says so in
    /// [`Executed::i420`]. Returns one host buffer per config output holding the whole batch,
    /// for the batcher to hand each request its share.
    fn execute(
        &self,
        batch: usize,
        inputs: &[Vec<Payload>],
        i420: &[bool],
    ) -> Result<Executed, BackendError>;
}

/// Time spent in each phase of one execution.
#[derive(Debug, Default, Clone, Copy)]
pub struct ExecTimings {
    pub input: Duration,
    pub infer: Duration,
    pub output: Duration,
}

/// A batch's output for one config output: contiguous bytes on the host.
pub trait HostBytes: Send {
    fn as_bytes(&self) -> &[u8];
}

impl HostBytes for Vec<u8> {
    fn as_bytes(&self) -> &[u8] {
        self
    }
}

/// One executed batch.
pub struct Executed {
    /// One buffer per config output.
    pub outputs: Vec<Box<dyn HostBytes>>,
    /// Per config output: converted to I420 by the backend (empty: none was).
    pub i420: Vec<bool>,
    pub timings: ExecTimings,
    /// Whatever else the backend allocated for the batch. It is dropped with the outputs,
    /// after the replies are sent and off the worker thread (freeing tens of MB of tensors
    /// takes milliseconds nobody should wait for).
    pub spent: Option<Box<dyn Send>>,
}

/// Why a batch failed. Every request of the batch gets a copy, so it is cheap to clone; the
/// backend's own error (libtorch's, with its C++ backtrace) stays reachable as the `source`
/// for logs while the message stays short enough for a client.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    message: String,
    #[source]
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl BackendError {
    pub fn new(message: impl Into<String>) -> Self {
        BackendError {
            message: message.into(),
            source: None,
        }
    }

    /// `message` for the client, caused by `source`.
    pub fn caused(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        BackendError {
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }
}

impl From<String> for BackendError {
    fn from(message: String) -> Self {
        BackendError::new(message)
    }
}

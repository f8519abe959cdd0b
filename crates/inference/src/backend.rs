//! The seam under the batcher: what runs one batch of a model. The batcher (queueing, merging,
//! deadlines, delivery) knows nothing of libtorch; [`TorchModel`](crate::torch_model::TorchModel)
//! is one implementation, and the batcher's tests use plain Rust ones.

use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// Runs batches of one model on one device. Lives on its worker thread (libtorch modules
/// stay on the thread that built them), so it need not be `Send`.
pub trait Backend {
    /// Executes one batch of `batch` elements. `inputs[i]` holds, for config input `i`, the
    /// payloads of the requests in the batch, in order; their lengths sum to the batch's bytes.
    /// Returns one host buffer per config output holding the whole batch, for the batcher to
    /// hand each request its share.
    fn execute(&self, batch: usize, inputs: &[Vec<Bytes>]) -> Result<Executed, BackendError>;
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

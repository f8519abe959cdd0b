//! The inference service's one error type, and the one place it becomes a gRPC status.
//!
//! Domain code (validation, shared memory, the model lifecycle, the batcher) returns
//! [`Error`]; only the RPC handlers in [`crate::rpc`] turn it into a `tonic::Status`, through
//! `From<Error> for Status`. Each variant says what the caller can do about it, which is
//! what a status code means; messages name the request field at fault.

use crate::batcher::JobError;
use crate::models::ModelError;
use crate::repository::RepoError;
use framecast_proto::status::{with_reason, REASON_SHM_REGION_UNKNOWN, REASON_TENSOR_UNKNOWN};
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed: fixing it is the caller's job. INVALID_ARGUMENT.
    #[error("{0}")]
    Invalid(String),
    /// Something the request names does not exist (a model version, a shared-memory key).
    /// NOT_FOUND.
    #[error("{0}")]
    NotFound(String),
    /// A shared-memory region the request names is not registered (never was, or a restarted
    /// server forgot it): register it again. NOT_FOUND, tagged
    /// [`REASON_SHM_REGION_UNKNOWN`] so clients can act without parsing the message.
    #[error("{0}")]
    RegionUnknown(String),
    /// A region of that name is registered already. ALREADY_EXISTS.
    #[error("{0}")]
    RegionExists(String),
    /// A tensor-cache name the server does not hold: the client registers it again.
    #[error("{0}")]
    TensorUnknown(String),
    /// The server is out of a bounded resource (regions, mappings): free some or retry later.
    /// RESOURCE_EXHAUSTED.
    #[error("{0}")]
    Exhausted(String),
    /// The request is well formed but the server is not in a state to serve it (a feature
    /// switched off, a model whose config does not load). FAILED_PRECONDITION.
    #[error("{0}")]
    Precondition(String),
    /// Loading, finding or unloading a model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A queued request of `model` produced no output.
    #[error("model '{model}': {source}")]
    Job {
        model: String,
        #[source]
        source: JobError,
    },
    /// A fault of this server, not of the request. INTERNAL.
    #[error("{0}")]
    Internal(String),
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let message = e.to_string();
        match e {
            Error::Invalid(_) => Status::invalid_argument(message),
            Error::NotFound(_) => Status::not_found(message),
            Error::RegionUnknown(_) => {
                with_reason(Status::not_found(message), REASON_SHM_REGION_UNKNOWN)
            }
            Error::RegionExists(_) => Status::already_exists(message),
            Error::TensorUnknown(_) => {
                with_reason(Status::not_found(message), REASON_TENSOR_UNKNOWN)
            }
            Error::Exhausted(_) => Status::resource_exhausted(message),
            Error::Precondition(_) => Status::failed_precondition(message),
            Error::Model(m) => match m {
                ModelError::Repo(RepoError::InvalidName { .. }) => {
                    Status::invalid_argument(format!("model_name: {message}"))
                }
                ModelError::Repo(RepoError::NotFound(_)) => Status::not_found(message),
                // Loading on demand may succeed on the next call.
                ModelError::NotLoaded(_) => Status::unavailable(message),
                ModelError::LoadFailed { .. } | ModelError::TooLarge { .. } => {
                    Status::failed_precondition(message)
                }
                ModelError::NoRoom { .. } => Status::resource_exhausted(message),
            },
            Error::Job { source, .. } => match source {
                JobError::Expired { .. } => Status::deadline_exceeded(message),
                JobError::QueueFull { .. } => Status::resource_exhausted(message),
                JobError::Stopped(_) | JobError::Failed(_) | JobError::Delivery { .. } => {
                    Status::internal(message)
                }
            },
            Error::Internal(_) => Status::internal(message),
        }
    }
}

/// Shorthand for the common case: a malformed request.
pub fn invalid(message: impl Into<String>) -> Error {
    Error::Invalid(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendError;
    use std::time::Duration;
    use tonic::Code;

    fn job(source: JobError) -> Error {
        Error::Job {
            model: "m".into(),
            source,
        }
    }

    #[test]
    fn each_error_has_its_code_and_its_message_unchanged() {
        let cases = [
            (invalid("inputs[0]: bad"), Code::InvalidArgument),
            (Error::NotFound("v".into()), Code::NotFound),
            (Error::RegionUnknown("r".into()), Code::NotFound),
            (Error::RegionExists("r".into()), Code::AlreadyExists),
            (Error::TensorUnknown("t".into()), Code::NotFound),
            (Error::Exhausted("x".into()), Code::ResourceExhausted),
            (Error::Precondition("p".into()), Code::FailedPrecondition),
            (ModelError::NotLoaded("m".into()).into(), Code::Unavailable),
            (
                job(JobError::Expired {
                    waited: Duration::from_millis(3),
                }),
                Code::DeadlineExceeded,
            ),
            (
                job(JobError::QueueFull { capacity: 4 }),
                Code::ResourceExhausted,
            ),
            (
                job(JobError::Failed(BackendError::new("forward failed"))),
                Code::Internal,
            ),
            (Error::Internal("i".into()), Code::Internal),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            let s = Status::from(e);
            assert_eq!(s.code(), code, "{text}");
            assert_eq!(s.message(), text);
        }
    }

    #[test]
    fn an_unknown_region_carries_its_reason_and_a_job_error_names_its_model() {
        let s = Status::from(Error::RegionUnknown("inputs[0]: region 'r'".into()));
        assert_eq!(
            framecast_proto::status::reason(&s),
            Some(REASON_SHM_REGION_UNKNOWN)
        );
        let s = Status::from(job(JobError::QueueFull { capacity: 4 }));
        assert!(s.message().starts_with("model 'm': queue full (4"), "{s:?}");
    }

    #[test]
    fn a_backend_error_keeps_its_cause() {
        let cause = std::io::Error::other("CUDA out of memory\n  at c10::...");
        let e = job(JobError::Failed(BackendError::caused(
            "forward failed",
            cause,
        )));
        let mut chain = Vec::new();
        let mut next: Option<&dyn std::error::Error> = Some(&e);
        while let Some(err) = next {
            chain.push(err.to_string());
            next = err.source();
        }
        assert!(chain.last().unwrap().contains("c10::"), "{chain:?}");
        assert_eq!(e.to_string(), "model 'm': forward failed");
    }
}

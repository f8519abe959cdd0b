//! The compositor's one error type, and the one place it becomes a gRPC status.
//!
//! Rendering and the avatar store return [`Error`]; only the RPC handlers in [`crate::rpc`]
//! turn it into a `tonic::Status`, through `From<Error> for Status`. A failure of the
//! inference service keeps the status it arrived with (its code, its reason) and gains the
//! context of what the compositor was doing.

use crate::avatar_store::AvatarError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed: fixing it is the caller's job. INVALID_ARGUMENT.
    #[error("{0}")]
    Invalid(String),
    /// The request is well formed but its avatar and model do not fit together.
    /// FAILED_PRECONDITION.
    #[error("{0}")]
    Mismatch(String),
    /// The client sent more than a bounded buffer holds (audio too far ahead of its frames).
    /// RESOURCE_EXHAUSTED.
    #[error("{0}")]
    Exhausted(String),
    /// The stream's deadline passed, or its client stopped taking frames. DEADLINE_EXCEEDED.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// Loading, finding or unloading an avatar failed.
    #[error(transparent)]
    Avatar(#[from] AvatarError),
    /// The inference service (or the way to it) failed: `status` is what the client got,
    /// relayed with its code; `context` says which call.
    #[error("{context}: {}", status.message())]
    Inference { context: String, status: Status },
    /// A fault of this process or of what the inference service returned, not of the
    /// request. INTERNAL.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// `status` from the inference service, while doing `context`.
    pub fn inference(context: impl Into<String>, status: Status) -> Error {
        Error::Inference {
            context: context.into(),
            status,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let message = e.to_string();
        match e {
            Error::Invalid(_) => Status::invalid_argument(message),
            Error::Mismatch(_) => Status::failed_precondition(message),
            Error::Exhausted(_) => Status::resource_exhausted(message),
            Error::DeadlineExceeded(_) => Status::deadline_exceeded(message),
            Error::Avatar(a) => match a {
                AvatarError::InvalidName(_) => Status::invalid_argument(message),
                AvatarError::NotFound(_) => Status::not_found(message),
                AvatarError::NotLoaded(_)
                | AvatarError::LoadFailed { .. }
                | AvatarError::TooLarge { .. } => Status::failed_precondition(message),
                AvatarError::NoRoom { .. } => Status::resource_exhausted(message),
            },
            Error::Inference { status, .. } => {
                let mut relayed = Status::new(status.code(), message);
                *relayed.metadata_mut() = status.metadata().clone();
                relayed
            }
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
    use framecast_proto::status::{reason, with_reason, REASON_SHM_REGION_UNKNOWN};
    use tonic::Code;

    #[test]
    fn each_error_has_its_code_and_its_message_unchanged() {
        let cases = [
            (invalid("frame_count 0"), Code::InvalidArgument),
            (Error::Mismatch("crop".into()), Code::FailedPrecondition),
            (
                Error::Exhausted("audio.pcm".into()),
                Code::ResourceExhausted,
            ),
            (
                Error::DeadlineExceeded("late".into()),
                Code::DeadlineExceeded,
            ),
            (
                AvatarError::InvalidName("..".into()).into(),
                Code::InvalidArgument,
            ),
            (AvatarError::NotFound("a".into()).into(), Code::NotFound),
            (
                AvatarError::NoRoom {
                    id: "a".into(),
                    need: 2,
                    free: 1,
                    budget: 3,
                }
                .into(),
                Code::ResourceExhausted,
            ),
            (Error::Internal("bug".into()), Code::Internal),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            let s = Status::from(e);
            assert_eq!(s.code(), code, "{text}");
            assert_eq!(s.message(), text);
        }
    }

    #[test]
    fn an_inference_failure_keeps_its_code_and_reason_and_gains_context() {
        let upstream = with_reason(
            Status::not_found("region 'r' is not registered"),
            REASON_SHM_REGION_UNKNOWN,
        );
        let s = Status::from(Error::inference("inference for frames 0..24", upstream));
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(
            s.message(),
            "inference for frames 0..24: region 'r' is not registered"
        );
        assert_eq!(reason(&s), Some(REASON_SHM_REGION_UNKNOWN));
    }
}

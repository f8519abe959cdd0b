//! Statuses as both services report them: one metric label per gRPC code, and a status
//! carried whole across `ModelStreamInfer`, where the protocol has only a text field.
//!
//! KServe's stream reply reports a failure in `error_message` alone. framecast keeps that
//! field plain text (any KServe client can show it) and adds the code, and when a client can
//! act on it a reason, as response parameters that [`from_stream_reply`] reads back.

use crate::kserve::infer_parameter::ParameterChoice;
use crate::kserve::{InferParameter, ModelInferResponse, ModelStreamInferResponse};
use tonic::{Code, Status};

/// Response parameter of a failed stream reply: the gRPC status code (int64).
pub const PARAM_STATUS_CODE: &str = "framecast_status_code";
/// Response parameter of a failed stream reply: why, when a client can act on it.
pub const PARAM_ERROR_REASON: &str = "framecast_error_reason";
/// The same reason on a unary call, as response metadata.
pub const REASON_HEADER: &str = "framecast-error-reason";

/// Reason: the request named a shared-memory region the server does not have (a restarted
/// server forgot it, or it was never registered): register it again.
pub const REASON_SHM_REGION_UNKNOWN: &str = "shared_memory_region_unknown";
/// Reason of a NOT_FOUND for a tensor-cache name the server does not hold (never registered,
/// evicted, or the server restarted): register it again and retry.
pub const REASON_TENSOR_UNKNOWN: &str = "tensor_cache_name_unknown";

/// The metric label of a status code (`ok`, `invalid_argument`, ...).
pub fn label(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// `status` tagged with a reason a client can act on.
pub fn with_reason(mut status: Status, reason: &'static str) -> Status {
    status.metadata_mut().insert(
        REASON_HEADER,
        tonic::metadata::MetadataValue::from_static(reason),
    );
    status
}

/// The reason `status` carries, if any.
pub fn reason(status: &Status) -> Option<&str> {
    status.metadata().get(REASON_HEADER)?.to_str().ok()
}

/// The stream reply reporting `status` for the request `id` of `model`.
pub fn stream_error(status: &Status, id: String, model_name: String) -> ModelStreamInferResponse {
    let param = |choice| InferParameter {
        parameter_choice: Some(choice),
    };
    let mut parameters = std::collections::HashMap::from([(
        PARAM_STATUS_CODE.to_string(),
        param(ParameterChoice::Int64Param(status.code() as i64)),
    )]);
    if let Some(r) = reason(status) {
        parameters.insert(
            PARAM_ERROR_REASON.to_string(),
            param(ParameterChoice::StringParam(r.to_string())),
        );
    }
    ModelStreamInferResponse {
        error_message: status.message().to_string(),
        infer_response: Some(ModelInferResponse {
            id,
            model_name,
            parameters,
            ..Default::default()
        }),
    }
}

/// The status a stream reply reports, or `None` for a success. A reply from a server that
/// sends no code (another KServe server) reads as UNKNOWN with its message.
pub fn from_stream_reply(reply: &ModelStreamInferResponse) -> Option<Status> {
    if reply.error_message.is_empty() {
        return None;
    }
    let params = reply.infer_response.as_ref().map(|r| &r.parameters);
    let get = |key| params.and_then(|p| p.get(key)?.parameter_choice.as_ref());
    let code = match get(PARAM_STATUS_CODE) {
        Some(ParameterChoice::Int64Param(c)) => Code::from_i32(*c as i32),
        _ => Code::Unknown,
    };
    let status = Status::new(code, reply.error_message.clone());
    // Only reasons this crate knows come back (metadata values must be static).
    let known = [REASON_SHM_REGION_UNKNOWN, REASON_TENSOR_UNKNOWN];
    Some(match get(PARAM_ERROR_REASON) {
        Some(ParameterChoice::StringParam(r)) => match known.iter().find(|k| *k == r) {
            Some(k) => with_reason(status, k),
            None => status,
        },
        _ => status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_reason_survives_the_stream_and_others_are_dropped() {
        for r in [REASON_SHM_REGION_UNKNOWN, REASON_TENSOR_UNKNOWN] {
            let sent = with_reason(Status::not_found("gone"), r);
            let back = from_stream_reply(&stream_error(&sent, "1".into(), "m".into())).unwrap();
            assert_eq!(reason(&back), Some(r));
        }
        let mut reply = stream_error(&Status::not_found("x"), "1".into(), "m".into());
        if let Some(resp) = reply.infer_response.as_mut() {
            resp.parameters.insert(
                PARAM_ERROR_REASON.into(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::StringParam("made-up".into())),
                },
            );
        }
        assert_eq!(reason(&from_stream_reply(&reply).unwrap()), None);
    }

    #[test]
    fn a_status_survives_the_stream_whole_and_its_message_stays_plain() {
        let sent = with_reason(
            Status::not_found("inputs[0]: region 'r' is not registered"),
            REASON_SHM_REGION_UNKNOWN,
        );
        let reply = stream_error(&sent, "7".into(), "m".into());
        assert_eq!(
            reply.error_message,
            "inputs[0]: region 'r' is not registered"
        );
        let back = from_stream_reply(&reply).unwrap();
        assert_eq!(back.code(), Code::NotFound);
        assert_eq!(back.message(), sent.message());
        assert_eq!(reason(&back), Some(REASON_SHM_REGION_UNKNOWN));

        let plain = stream_error(
            &Status::resource_exhausted("queue full"),
            "8".into(),
            "m".into(),
        );
        let back = from_stream_reply(&plain).unwrap();
        assert_eq!(back.code(), Code::ResourceExhausted);
        assert_eq!(reason(&back), None);

        // Another server's reply: text only.
        let foreign = ModelStreamInferResponse {
            error_message: "something broke".into(),
            infer_response: None,
        };
        assert_eq!(from_stream_reply(&foreign).unwrap().code(), Code::Unknown);
        assert!(from_stream_reply(&ModelStreamInferResponse::default()).is_none());
    }

    #[test]
    fn labels_are_distinct_snake_case() {
        let codes = (0..17).map(Code::from_i32);
        let labels: std::collections::HashSet<_> = codes.map(label).collect();
        assert_eq!(labels.len(), 17);
        assert!(labels
            .iter()
            .all(|l| l.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
    }
}

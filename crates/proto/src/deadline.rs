//! Deadlines as gRPC carries them: the `grpc-timeout` header a client sets on a call, and the
//! `timeout` request parameter (microseconds) Triton's clients put on each inference request.
//! The header covers a whole call, streams included; the parameter covers one request on a
//! `ModelStreamInfer` stream, where no per-message header exists.

use crate::kserve::{infer_parameter::ParameterChoice, InferParameter};
use std::time::{Duration, Instant};

/// Name of the per-request timeout parameter.
pub const PARAM_TIMEOUT: &str = "timeout";

/// The deadline a client set with the `grpc-timeout` header, if any (an unparsable header is
/// treated as absent, as tonic itself does).
pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<Instant> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(d)
}

/// The `timeout` parameter for a request that must be done within `left` (at least 1 µs, as
/// 0 would mean "no timeout").
pub fn timeout_parameter(left: Duration) -> InferParameter {
    let us = i64::try_from(left.as_micros()).unwrap_or(i64::MAX).max(1);
    InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(us)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_units_parse_and_garbage_is_ignored() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert!(from_metadata(&m).is_none());
        for (v, d) in [
            ("250m", Duration::from_millis(250)),
            ("3S", Duration::from_secs(3)),
            ("7u", Duration::from_micros(7)),
        ] {
            m.insert("grpc-timeout", v.parse().unwrap());
            let left = from_metadata(&m).unwrap() - Instant::now();
            assert!(
                left <= d && left + Duration::from_millis(100) > d,
                "{v}: {left:?}"
            );
        }
        for bad in ["", "m", "12x", "-1S", "99999999999999999999H"] {
            m.insert("grpc-timeout", bad.parse().unwrap());
            assert!(from_metadata(&m).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn timeout_parameter_is_positive_microseconds() {
        let us = |d| match timeout_parameter(d).parameter_choice {
            Some(ParameterChoice::Int64Param(us)) => us,
            other => panic!("{other:?}"),
        };
        assert_eq!(us(Duration::from_millis(3)), 3000);
        assert_eq!(us(Duration::ZERO), 1);
    }
}

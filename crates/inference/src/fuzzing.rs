//! Entry points for the fuzz targets in `fuzz/` and for the regression tests that replay what
//! they found (`tests/fuzz_regressions.rs`). Each takes arbitrary bytes and panics only when
//! an invariant breaks: the input parsers must reject bad input with an error, never panic,
//! and what they accept must be consistent.

use crate::config::{ModelConfig, TensorSpec};
use crate::shared_memory::{Owner, SharedMemory};
use crate::validate;
use framecast_proto::kserve::ModelInferRequest;
use framecast_proto::tensor::DataType;
use prost::Message;
use tonic::Code;

/// A model config's text: accepted configs survive a round trip through `to_toml`.
pub fn model_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = ModelConfig::parse(text) {
        let again = ModelConfig::parse(&config.to_toml())
            .unwrap_or_else(|e| panic!("to_toml of an accepted config is rejected: {e}"));
        assert_eq!(config, again, "config changed in a round trip");
    }
}

/// An encoded `ModelInferRequest` checked against a two-input model (u8 faces, f32 audio):
/// either it is refused with INVALID_ARGUMENT or NOT_FOUND and a short message, or every
/// input holds exactly `batch` frames of its declared shape.
pub fn infer_request(data: &[u8]) {
    let Ok(mut req) = ModelInferRequest::decode(data) else {
        return;
    };
    let spec = |name: &str, datatype, dims: &[i64]| TensorSpec {
        name: name.into(),
        datatype,
        dims: dims.to_vec(),
        normalize: crate::config::Normalize::Off,
        bgr: false,
    };
    let config = ModelConfig::new(
        8,
        vec![
            spec("face", DataType::U8, &[6, 8, 8]),
            spec("audio", DataType::F32, &[4, 2]),
        ],
        vec![spec("out", DataType::U8, &[3, 8, 8])],
    );
    let sources = validate::Sources {
        shm: &SharedMemory::default(),
        tensors: &crate::tensor_cache::TensorCache::unmetered(Default::default()),
    };
    match validate::prepare("fuzz", &config, sources, &Owner::anonymous(), &mut req) {
        Ok(p) => {
            assert!((1..=8).contains(&p.batch), "batch {}", p.batch);
            assert_eq!(p.inputs.len(), config.inputs.len());
            for (bytes, s) in p.inputs.iter().zip(&config.inputs) {
                let want = p.batch * s.element_bytes();
                assert_eq!(bytes.len(), want, "input '{}'", s.name);
            }
        }
        Err(e) => {
            let s = tonic::Status::from(e);
            assert!(
                matches!(s.code(), Code::InvalidArgument | Code::NotFound),
                "{s:?}"
            );
            assert!(!s.message().is_empty());
            // Client strings are echoed bounded: a status must stay far below the 16 KiB
            // of metadata standard clients accept.
            assert!(s.message().len() <= 1024, "{} bytes", s.message().len());
        }
    }
}

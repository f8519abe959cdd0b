//! Checks a `ModelInferRequest` against the model's config before it reaches a queue, so every
//! mistake comes back as INVALID_ARGUMENT naming the offending field.

use crate::config::ModelConfig;
use bytes::Bytes;
use framecast_proto::kserve::{InferTensorContents, ModelInferRequest};
use framecast_proto::tensor::{self, DataType, Element};
use tonic::Status;

/// A request ready for the batcher.
#[derive(Debug)]
pub struct Prepared {
    pub batch: usize,
    /// One payload per config input, in config order.
    pub inputs: Vec<Bytes>,
    /// Indices of the config outputs to return, in the order asked.
    pub outputs: Vec<usize>,
}

/// Validates `req` against `config` and takes its payloads.
pub fn prepare(
    model: &str,
    config: &ModelConfig,
    req: &mut ModelInferRequest,
) -> Result<Prepared, Status> {
    let raw = std::mem::take(&mut req.raw_input_contents);
    if !raw.is_empty() && raw.len() != req.inputs.len() {
        return Err(Status::invalid_argument(format!(
            "raw_input_contents has {} entries for {} inputs; send one per input",
            raw.len(),
            req.inputs.len()
        )));
    }
    let mut slots: Vec<Option<Bytes>> = vec![None; config.inputs.len()];
    let mut batch: Option<usize> = None;
    for (i, input) in req.inputs.iter_mut().enumerate() {
        let name = &input.name;
        let Some(idx) = config.inputs.iter().position(|s| &s.name == name) else {
            return Err(Status::invalid_argument(format!(
                "inputs[{i}]: '{name}' is not an input of model '{model}' (inputs: {})",
                names(config.inputs.iter().map(|s| s.name.as_str()))
            )));
        };
        if slots[idx].is_some() {
            return Err(Status::invalid_argument(format!(
                "input '{name}' is given twice"
            )));
        }
        let spec = &config.inputs[idx];
        let datatype = DataType::parse(&input.datatype)
            .map_err(|e| Status::invalid_argument(format!("input '{name}': datatype: {e}")))?;
        if datatype != spec.datatype {
            return Err(Status::invalid_argument(format!(
                "input '{name}': datatype is {datatype}; model '{model}' expects {}",
                spec.datatype
            )));
        }
        let expected_shape = spec.batched_shape(0);
        if input.shape.len() != expected_shape.len() || input.shape[1..] != expected_shape[1..] {
            return Err(Status::invalid_argument(format!(
                "input '{name}': shape {:?} does not match [-1{}] (batch first)",
                input.shape,
                spec.dims
                    .iter()
                    .map(|d| format!(", {d}"))
                    .collect::<String>()
            )));
        }
        let n = input.shape[0];
        if n < 1 || n as u64 > config.max_batch_size as u64 {
            return Err(Status::invalid_argument(format!(
                "input '{name}': batch dimension {n} is out of range 1..={}",
                config.max_batch_size
            )));
        }
        let n = n as usize;
        if let Some(b) = batch {
            if b != n {
                return Err(Status::invalid_argument(format!(
                    "input '{name}': batch dimension {n} differs from the other inputs' {b}"
                )));
            }
        }
        batch = Some(n);
        let payload = match raw.get(i) {
            Some(bytes) => bytes.clone(),
            None => match input.contents.take() {
                Some(c) => contents_bytes(datatype, &c).map_err(|e| {
                    Status::invalid_argument(format!("input '{name}': contents: {e}"))
                })?,
                None => {
                    return Err(Status::invalid_argument(format!(
                        "input '{name}' has no data (raw_input_contents or contents)"
                    )))
                }
            },
        };
        tensor::check_byte_len(datatype, &input.shape, payload.len())
            .map_err(|e| Status::invalid_argument(format!("input '{name}': {e}")))?;
        slots[idx] = Some(payload);
    }
    let mut inputs = Vec::with_capacity(slots.len());
    for (spec, slot) in config.inputs.iter().zip(slots) {
        match slot {
            Some(b) => inputs.push(b),
            None => {
                return Err(Status::invalid_argument(format!(
                    "input '{}' of model '{model}' is missing",
                    spec.name
                )))
            }
        }
    }
    let outputs = if req.outputs.is_empty() {
        (0..config.outputs.len()).collect()
    } else {
        req.outputs
            .iter()
            .map(|o| {
                config
                    .outputs
                    .iter()
                    .position(|s| s.name == o.name)
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "outputs: '{}' is not an output of model '{model}' (outputs: {})",
                            o.name,
                            names(config.outputs.iter().map(|s| s.name.as_str()))
                        ))
                    })
            })
            .collect::<Result<_, _>>()?
    };
    Ok(Prepared {
        batch: batch.unwrap_or(0),
        inputs,
        outputs,
    })
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    it.collect::<Vec<_>>().join(", ")
}

/// Typed `contents` (the protocol's element-wise form) to the raw little-endian form.
fn contents_bytes(datatype: DataType, c: &InferTensorContents) -> Result<Bytes, String> {
    fn narrow<S: Copy + std::fmt::Display, T: Element + TryFrom<S>>(
        v: &[S],
    ) -> Result<Bytes, String> {
        let converted = v
            .iter()
            .map(|&x| T::try_from(x).map_err(|_| format!("value {x} does not fit {}", T::DATATYPE)))
            .collect::<Result<Vec<T>, _>>()?;
        Ok(tensor::encode(&converted))
    }
    match datatype {
        DataType::Bool => Ok(tensor::encode(&c.bool_contents)),
        DataType::U8 => narrow::<u32, u8>(&c.uint_contents),
        DataType::U16 => narrow::<u32, u16>(&c.uint_contents),
        DataType::U32 => Ok(tensor::encode(&c.uint_contents)),
        DataType::U64 => Ok(tensor::encode(&c.uint64_contents)),
        DataType::I8 => narrow::<i32, i8>(&c.int_contents),
        DataType::I16 => narrow::<i32, i16>(&c.int_contents),
        DataType::I32 => Ok(tensor::encode(&c.int_contents)),
        DataType::I64 => Ok(tensor::encode(&c.int64_contents)),
        DataType::F32 => Ok(tensor::encode(&c.fp32_contents)),
        DataType::F64 => Ok(tensor::encode(&c.fp64_contents)),
        DataType::F16 | DataType::BF16 => Err(format!(
            "{datatype} has no element-wise form; send raw_input_contents"
        )),
    }
}

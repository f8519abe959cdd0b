//! Checks a `ModelInferRequest` against the model's config before it reaches a queue, so every
//! mistake comes back as INVALID_ARGUMENT naming the offending field.

use crate::backend::Payload;
use crate::config::ModelConfig;
use crate::error::{invalid, Error};
use crate::shared_memory::{Owner, Region, SharedMemory, Window};
use crate::tensor_cache::TensorCache;
use bytes::Bytes;
use framecast_proto::echo;
use framecast_proto::kserve::infer_parameter::ParameterChoice;
use framecast_proto::kserve::{InferParameter, InferTensorContents, ModelInferRequest};
use framecast_proto::shm::{PARAM_BYTE_SIZE, PARAM_OFFSET, PARAM_REGION};
use framecast_proto::tensor::{self, DataType, Element};
use framecast_proto::tensorcache::{PARAM_ROWS, PARAM_TENSOR};
use std::collections::HashMap;
use std::sync::Arc;

/// A request ready for the batcher.
#[derive(Debug)]
pub struct Prepared {
    pub batch: usize,
    /// One payload per config input, in config order.
    pub inputs: Vec<Payload>,
    /// The outputs to return, in the order asked.
    pub outputs: Vec<Requested>,
    /// Shared-memory regions the request reads or writes: checked once it is answered, since
    /// a client may shrink an object while the request uses it.
    pub regions: Vec<Arc<Region>>,
}

/// One output to return: which config output, and the shared-memory window to write it into
/// instead of `raw_output_contents`.
#[derive(Clone)]
pub struct Requested {
    pub index: usize,
    pub shm: Option<Window>,
    /// Answer it as I420 ([`framecast_proto::i420`]): (height, width) of its images.
    pub i420: Option<(usize, usize)>,
}

impl std::fmt::Debug for Requested {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requested")
            .field("index", &self.index)
            .field("shm", &self.shm.as_ref().map(|s| s.region.name.as_str()))
            .finish()
    }
}

/// Where an input's payload may come from besides the request itself.
#[derive(Clone, Copy)]
pub struct Sources<'a> {
    pub shm: &'a SharedMemory,
    pub tensors: &'a TensorCache,
}

/// An input's tensor-cache reference, if its parameters make one: (name, rows).
fn cached_rows(
    field: &str,
    params: &HashMap<String, InferParameter>,
) -> Result<Option<(String, String)>, Error> {
    let text = |key: &str| match params.get(key).and_then(|p| p.parameter_choice.as_ref()) {
        None => Ok(None),
        Some(ParameterChoice::StringParam(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid(format!(
            "{field}: parameter {key} must be a string"
        ))),
    };
    match (text(PARAM_TENSOR)?, text(PARAM_ROWS)?) {
        (None, None) => Ok(None),
        (Some(t), Some(r)) => Ok(Some((t, r))),
        _ => Err(invalid(format!(
            "{field}: {PARAM_TENSOR} and {PARAM_ROWS} go together"
        ))),
    }
}

/// Validates `req` against `config` and takes its payloads.
pub fn prepare(
    model: &str,
    config: &ModelConfig,
    sources: Sources<'_>,
    owner: &Owner,
    req: &mut ModelInferRequest,
) -> Result<Prepared, Error> {
    let Sources { shm, tensors } = sources;
    let raw = std::mem::take(&mut req.raw_input_contents);
    let in_shm: Vec<Option<Window>> = req
        .inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let field = format!("inputs[{i}] '{}'", echo(&t.name));
            shm_window(shm, owner, &field, &t.parameters)
        })
        .collect::<Result<_, _>>()?;
    let in_cache: Vec<Option<(String, String)>> = req
        .inputs
        .iter()
        .enumerate()
        .map(|(i, t)| cached_rows(&format!("inputs[{i}] '{}'", echo(&t.name)), &t.parameters))
        .collect::<Result<_, _>>()?;
    if let Some(i) = (0..in_shm.len()).find(|&i| in_shm[i].is_some() && in_cache[i].is_some()) {
        return Err(invalid(format!(
            "inputs[{i}]: names both a shared-memory region and a tensor-cache tensor; one source per input"
        )));
    }
    let mut regions: Vec<Arc<Region>> = in_shm.iter().flatten().map(|s| s.region.clone()).collect();
    // Like Triton and KServe: raw_input_contents and typed contents are exclusive.
    if !raw.is_empty() {
        if let Some((i, t)) = req
            .inputs
            .iter()
            .enumerate()
            .find(|(_, t)| t.contents.is_some())
        {
            return Err(invalid(format!(
                "inputs[{i}] '{}': has contents while the request has raw_input_contents; send every input one way",
                echo(&t.name)
            )));
        }
    }
    // Like Triton: one raw entry per input that does not come from shared memory, in order.
    let wire_inputs = (0..in_shm.len())
        .filter(|&i| in_shm[i].is_none() && in_cache[i].is_none())
        .count();
    if !raw.is_empty() && raw.len() != wire_inputs {
        return Err(invalid(format!(
            "raw_input_contents has {} entries for {wire_inputs} inputs not in shared memory or the tensor cache; send one per input",
            raw.len(),
        )));
    }
    let mut raw = raw.into_iter();
    let mut slots: Vec<Option<Payload>> = vec![None; config.inputs.len()];
    let mut batch: Option<usize> = None;
    for (i, ((input, slot), cached)) in req.inputs.iter_mut().zip(in_shm).zip(in_cache).enumerate()
    {
        let name = &echo(&input.name).into_owned();
        let Some(idx) = config.inputs.iter().position(|s| s.name == input.name) else {
            return Err(invalid(format!(
                "inputs[{i}]: '{name}' is not an input of model '{model}' (inputs: {})",
                names(config.inputs.iter().map(|s| s.name.as_str()))
            )));
        };
        if slots[idx].is_some() {
            return Err(invalid(format!("input '{name}' is given twice")));
        }
        let spec = &config.inputs[idx];
        let datatype = DataType::parse(&input.datatype).map_err(|e| {
            invalid(format!(
                "input '{name}': datatype: {}",
                echo(&e.to_string())
            ))
        })?;
        if datatype != spec.datatype {
            return Err(invalid(format!(
                "input '{name}': datatype is {datatype}; model '{model}' expects {}",
                spec.datatype
            )));
        }
        let expected_shape = spec.batched_shape(0);
        if input.shape.len() != expected_shape.len() || input.shape[1..] != expected_shape[1..] {
            return Err(invalid(format!(
                "input '{name}': shape {} does not match [-1{}] (batch first)",
                echo(&format!("{:?}", input.shape)),
                spec.dims
                    .iter()
                    .map(|d| format!(", {d}"))
                    .collect::<String>()
            )));
        }
        let n = input.shape[0];
        if n < 1 || n as u64 > config.max_batch_size as u64 {
            return Err(invalid(format!(
                "input '{name}': batch dimension {n} is out of range 1..={}",
                config.max_batch_size
            )));
        }
        let n = n as usize;
        if let Some(b) = batch {
            if b != n {
                return Err(invalid(format!(
                    "input '{name}': batch dimension {n} differs from the other inputs' {b}"
                )));
            }
        }
        batch = Some(n);
        let from_cache = match cached {
            Some((tensor, rows)) => Some(Payload::Rows(Arc::new(tensors.rows(
                owner,
                &format!("inputs[{i}] '{name}'"),
                &tensor,
                &rows,
                datatype,
                &input.shape,
            )?))),
            None => None,
        };
        let payload = match slot
            .map(|s| Payload::Bytes(s.bytes()))
            .or(from_cache)
            .or_else(|| raw.next().map(Payload::Bytes))
        {
            Some(payload) => payload,
            None => match input.contents.take() {
                Some(c) => Payload::Bytes(
                    contents_bytes(datatype, &c)
                        .map_err(|e| invalid(format!("input '{name}': contents: {e}")))?,
                ),
                None => {
                    return Err(invalid(format!(
                        "input '{name}' has no data (raw_input_contents or contents)"
                    )))
                }
            },
        };
        tensor::check_byte_len(datatype, &input.shape, payload.len())
            .map_err(|e| invalid(format!("input '{name}': {e}")))?;
        slots[idx] = Some(payload);
    }
    let mut inputs = Vec::with_capacity(slots.len());
    for (spec, slot) in config.inputs.iter().zip(slots) {
        match slot {
            Some(b) => inputs.push(b),
            None => {
                return Err(invalid(format!(
                    "input '{}' of model '{model}' is missing",
                    spec.name
                )))
            }
        }
    }
    let batch = batch.unwrap_or(0);
    let mut seen = vec![false; config.outputs.len()];
    let outputs: Vec<Requested> = if req.outputs.is_empty() {
        (0..config.outputs.len())
            .map(|index| Requested {
                index,
                shm: None,
                i420: None,
            })
            .collect()
    } else {
        req.outputs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let index = config
                    .outputs
                    .iter()
                    .position(|s| s.name == o.name)
                    .ok_or_else(|| {
                        invalid(format!(
                            "outputs[{i}]: '{}' is not an output of model '{model}' (outputs: {})",
                            echo(&o.name),
                            names(config.outputs.iter().map(|s| s.name.as_str()))
                        ))
                    })?;
                let field = format!("outputs[{i}] '{}'", echo(&o.name));
                if std::mem::replace(&mut seen[index], true) {
                    return Err(invalid(format!("{field}: output requested twice")));
                }
                let slot = shm_window(shm, owner, &field, &o.parameters)?;
                let i420 = i420_size(&field, &config.outputs[index], &o.parameters)?;
                let needed = match i420 {
                    Some((h, w)) => framecast_proto::i420::len(batch, h, w),
                    None => config.outputs[index].element_bytes() * batch,
                };
                if let Some(s) = &slot {
                    if s.len < needed {
                        return Err(invalid(format!(
                            "{field}: {PARAM_BYTE_SIZE} is {} bytes; the output needs {needed}",
                            s.len
                        )));
                    }
                }
                Ok(Requested {
                    index,
                    shm: slot,
                    i420,
                })
            })
            .collect::<Result<_, _>>()?
    };
    regions.extend(
        outputs
            .iter()
            .filter_map(|o| o.shm.as_ref().map(|s| s.region.clone())),
    );
    Ok(Prepared {
        batch,
        inputs,
        outputs,
        regions,
    })
}

/// The image size of an output asked for as I420, if it is: it must be UINT8 [3, H, W] with
/// H and W even.
fn i420_size(
    field: &str,
    spec: &crate::config::TensorSpec,
    params: &HashMap<String, InferParameter>,
) -> Result<Option<(usize, usize)>, Error> {
    use framecast_proto::i420::{FORMAT_I420, PARAM_FORMAT};
    let Some(p) = params.get(PARAM_FORMAT) else {
        return Ok(None);
    };
    match &p.parameter_choice {
        Some(ParameterChoice::StringParam(f)) if f == FORMAT_I420 => {}
        _ => {
            return Err(invalid(format!(
                "{field}: parameter {PARAM_FORMAT} must be the string \"{FORMAT_I420}\""
            )))
        }
    }
    match (spec.datatype, spec.dims.as_slice()) {
        (DataType::U8, &[3, h, w]) if h > 0 && w > 0 && h % 2 == 0 && w % 2 == 0 => {
            Ok(Some((h as usize, w as usize)))
        }
        _ => Err(invalid(format!(
            "{field}: only a UINT8 [3, H, W] output with even H and W can be answered as {FORMAT_I420}; this one is {} {:?}",
            spec.datatype, spec.dims
        ))),
    }
}

/// The shared-memory window a tensor's parameters name, if they name one.
fn shm_window(
    shm: &SharedMemory,
    owner: &Owner,
    field: &str,
    params: &HashMap<String, InferParameter>,
) -> Result<Option<Window>, Error> {
    let Some(region) = params.get(PARAM_REGION) else {
        return Ok(None);
    };
    let Some(ParameterChoice::StringParam(region)) = &region.parameter_choice else {
        return Err(invalid(format!(
            "{field}: parameter {PARAM_REGION} must be a string"
        )));
    };
    let int = |key: &str| match params.get(key).and_then(|p| p.parameter_choice.as_ref()) {
        None => Ok(None),
        Some(ParameterChoice::Int64Param(v)) if *v >= 0 => Ok(Some(*v as u64)),
        Some(ParameterChoice::Uint64Param(v)) => Ok(Some(*v)),
        Some(other) => Err(invalid(format!(
            "{field}: parameter {key} must be a non-negative integer, not {}",
            echo(&format!("{other:?}"))
        ))),
    };
    let len = int(PARAM_BYTE_SIZE)?.ok_or_else(|| {
        invalid(format!(
            "{field}: parameter {PARAM_BYTE_SIZE} is required with {PARAM_REGION}"
        ))
    })?;
    let offset = int(PARAM_OFFSET)?.unwrap_or(0);
    shm.window(owner, field, region, offset, len).map(Some)
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

//! The KServe side of a batch: the request sent to the inference service and the face crops
//! read back out of its answer, in the shapes of [`crate::face_contract`].

use super::plan::Plan;
use crate::error::Error;
use crate::face_contract;
use crate::inference::Expected;
use bytes::{Bytes, BytesMut};
use framecast_proto::echo;
use framecast_proto::kserve::{
    model_infer_request::InferInputTensor, ModelInferRequest, ModelInferResponse,
};
use framecast_proto::tensor::DataType;
use rayon::prelude::*;

/// The request for frames `lo..hi` of `plan`, and the output it expects back. Its id is the
/// caller's request id and first frame, so the inference service's logs name the chunk. The
/// face inputs are computed from the frames' face regions in parallel on the rayon pool
/// (blocking: call it off the async runtime).
pub(super) fn infer_request(
    plan: &Plan,
    lo: usize,
    hi: usize,
) -> Result<(ModelInferRequest, Expected), Error> {
    let n = hi - lo;
    let s = plan.model.crop_size as i64;
    let per_frame = face_contract::input_bytes(s as usize);
    let mut face = BytesMut::zeroed(n * per_frame);
    face.par_chunks_mut(per_frame)
        .enumerate()
        .try_for_each(|(i, out)| {
            let bg = plan.avatar.background_index(plan.start + (lo + i) as u64);
            plan.avatar.face_input(bg, out)
        })
        .map_err(|e| Error::Internal(format!("face input: {e}")))?;
    let mut inputs = vec![InferInputTensor::new(
        &plan.model.face_input,
        DataType::U8,
        face_contract::input_shape(n, s as usize),
    )];
    let mut raw = vec![face.freeze()];
    for (name, dt, shape, data) in &plan.conditioning {
        let per = data.len() / plan.count;
        let mut sh = shape.clone();
        sh[0] = n as i64;
        inputs.push(InferInputTensor::new(name, *dt, sh));
        raw.push(data.slice(lo * per..hi * per));
    }
    let request = ModelInferRequest {
        model_name: plan.model.name.clone(),
        id: format!("{}:{lo}", echo(&plan.request_id)),
        inputs,
        raw_input_contents: raw,
        ..Default::default()
    };
    let expected = Expected {
        output: plan.model.output.clone(),
        bytes: n * face_contract::output_bytes(s as usize),
    };
    Ok((request, expected))
}

/// The `n` face crops of a batch's answer, `3 x S x S` each, end to end.
pub(super) fn face_crops(
    plan: &Plan,
    response: ModelInferResponse,
    n: usize,
) -> Result<Bytes, Error> {
    let s = plan.model.crop_size as usize;
    let idx = response
        .outputs
        .iter()
        .position(|o| o.name == plan.model.output)
        .ok_or_else(|| {
            Error::Internal(format!(
                "inference response lacks output '{}'",
                plan.model.output
            ))
        })?;
    let crops = response
        .raw_output_contents
        .get(idx)
        .cloned()
        .ok_or_else(|| Error::Internal("inference response has no raw_output_contents".into()))?;
    let per = face_contract::output_bytes(s);
    if crops.len() != n * per {
        return Err(Error::Internal(format!(
            "inference output '{}' is {} bytes; {n} frames of 3x{s}x{s} need {}",
            plan.model.output,
            crops.len(),
            n * per
        )));
    }
    Ok(crops)
}

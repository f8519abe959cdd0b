//! The KServe side of a batch: the request sent to the inference service and the face crops
//! read back out of its answer, in the shapes of [`crate::face_contract`].

use super::plan::Plan;
use super::Crop;
use crate::avatar::Avatar;
use crate::encode::Subsampling;
use crate::error::Error;
use crate::face_contract;
use crate::inference::{CachedInput, Expected, RowSource};
use bytes::{Bytes, BytesMut};
use framecast_proto::echo;
use framecast_proto::i420;
use framecast_proto::kserve::infer_parameter::ParameterChoice;
use framecast_proto::kserve::{
    model_infer_request::InferInputTensor, ModelInferRequest, ModelInferResponse,
};
use framecast_proto::tensor::DataType;
use rayon::prelude::*;
use std::sync::Arc;

/// The request for frames `lo..hi` of `plan`, its face input as rows of the avatar's face
/// inputs (sent, or named where the replica caches them: [`CachedInput`]), and the output it
/// expects back. Its id is the caller's request id and first frame, so the inference
/// service's logs name the chunk.
pub(super) fn infer_request(
    plan: &Plan,
    lo: usize,
    hi: usize,
) -> (ModelInferRequest, CachedInput, Expected) {
    let n = hi - lo;
    let s = plan.model.crop_size as i64;
    let rows = (lo..hi)
        .map(|i| plan.avatar.background_index(plan.start + i as u64))
        .collect();
    let faces = CachedInput {
        input: 0,
        source: Arc::new(FaceInputs::new(plan.avatar.clone())),
        rows,
    };
    let mut inputs = vec![InferInputTensor::new(
        &plan.model.face_input,
        DataType::U8,
        face_contract::input_shape(n, s as usize),
    )];
    let mut raw = Vec::new();
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
        // Face crops as I420 where the replica offers it, for avatars kept at 4:2:0: half the
        // bytes, blended as they come (S is even in practice).
        i420: s % 2 == 0 && plan.avatar.params.subsampling == Subsampling::S420,
    };
    (request, faces, expected)
}

/// Changes whenever the face input computed from the same sources changes (2: computed from
/// regions kept as YCbCr planes), so a replica never serves a name registered by another
/// version with other bytes.
const FACE_INPUT_VERSION: u32 = 2;

/// An avatar's face inputs, one row per background frame, as a tensor the inference
/// service's tensor cache can hold. Its name is the content's: the avatar's fingerprint
/// (its manifest, boxes and frame files), so a name always means the same bytes, across
/// reloads and compositors.
pub struct FaceInputs {
    avatar: Arc<Avatar>,
    name: String,
}

impl FaceInputs {
    pub fn new(avatar: Arc<Avatar>) -> Self {
        let name = format!("faces-v{FACE_INPUT_VERSION}-{:016x}", avatar.fingerprint);
        FaceInputs { avatar, name }
    }

    fn per_row(&self) -> usize {
        face_contract::input_bytes(self.avatar.manifest.crop_size as usize)
    }
}

impl RowSource for FaceInputs {
    fn name(&self) -> &str {
        &self.name
    }

    fn datatype(&self) -> DataType {
        DataType::U8
    }

    fn shape(&self) -> Vec<i64> {
        let s = self.avatar.manifest.crop_size as usize;
        face_contract::input_shape(self.avatar.frames.len(), s)
    }

    fn all(&self) -> Result<Bytes, String> {
        let all: Vec<usize> = (0..self.avatar.frames.len()).collect();
        self.rows(&all)
    }

    fn rows(&self, rows: &[usize]) -> Result<Bytes, String> {
        let per = self.per_row();
        let mut out = BytesMut::zeroed(rows.len() * per);
        out.par_chunks_mut(per)
            .zip(rows.par_iter())
            .try_for_each(|(dst, &bg)| self.avatar.face_input(bg, dst))?;
        Ok(out.freeze())
    }
}

/// A batch's face crops as the inference service answered them: planar RGB, or I420 where
/// the replica offers it (half the bytes, and what a 4:2:0 avatar blends as it is).
pub(super) struct Crops {
    bytes: Bytes,
    i420: bool,
    per: usize,
}

impl Crops {
    /// The crops' format, as the `face_crops_total` metric names it.
    pub(super) fn format(&self) -> &'static str {
        if self.i420 {
            "i420"
        } else {
            "rgb"
        }
    }

    /// Frame `i`'s crop.
    pub(super) fn get(&self, i: usize) -> Crop<'_> {
        let crop = &self.bytes[i * self.per..(i + 1) * self.per];
        if self.i420 {
            Crop::I420(crop)
        } else {
            Crop::Rgb(crop)
        }
    }
}

/// The `n` face crops of a batch's answer, `3 x S x S` each end to end, or I420 when the
/// output says so (its `framecast_format` parameter).
pub(super) fn face_crops(
    plan: &Plan,
    response: ModelInferResponse,
    n: usize,
) -> Result<Crops, Error> {
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
    let i420 = response.outputs[idx]
        .parameters
        .get(i420::PARAM_FORMAT)
        .and_then(|p| p.parameter_choice.as_ref())
        .is_some_and(|c| matches!(c, ParameterChoice::StringParam(f) if f == i420::FORMAT_I420));
    let bytes = response
        .raw_output_contents
        .get(idx)
        .cloned()
        .ok_or_else(|| Error::Internal("inference response has no raw_output_contents".into()))?;
    let (per, what) = if i420 {
        (i420::len(1, s, s), "I420 images".to_string())
    } else {
        (face_contract::output_bytes(s), format!("3x{s}x{s} crops"))
    };
    if bytes.len() != n * per {
        return Err(Error::Internal(format!(
            "inference output '{}' is {} bytes; {n} {} of S = {s} need {}",
            plan.model.output,
            bytes.len(),
            what,
            n * per
        )));
    }
    Ok(Crops { bytes, i420, per })
}

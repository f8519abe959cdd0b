//! What the compositor needs of a model: its face input and output, per
//! [`crate::face_contract`], and every other input as conditioning the request supplies.

use crate::face_contract::{INPUT_CHANNELS, OUTPUT_CHANNELS};
use framecast_proto::kserve::model_metadata_response::TensorMetadata;
use framecast_proto::tensor::DataType;

/// What the compositor needs to know of a model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    /// UINT8 [-1, 6, S, S] input.
    pub face_input: String,
    pub crop_size: u32,
    /// UINT8 [-1, 3, S, S] output.
    pub output: String,
    /// Every other input: supplied per frame by the render request.
    pub conditioning: Vec<TensorMetadata>,
}

impl ModelInfo {
    pub(super) fn from_metadata(
        name: &str,
        inputs: Vec<TensorMetadata>,
        outputs: &[TensorMetadata],
    ) -> Result<Self, String> {
        let image = |t: &TensorMetadata, c: i64| {
            t.datatype == DataType::U8.as_str()
                && t.shape.len() == 4
                && t.shape[1] == c
                && t.shape[2] == t.shape[3]
        };
        let (inputs_c, outputs_c) = (INPUT_CHANNELS as i64, OUTPUT_CHANNELS as i64);
        let face = inputs
            .iter()
            .find(|t| image(t, inputs_c))
            .ok_or_else(|| {
                format!("model '{name}' has no UINT8 [-1, {inputs_c}, S, S] face input")
            })?
            .clone();
        let output = outputs
            .iter()
            .find(|t| image(t, outputs_c))
            .ok_or_else(|| format!("model '{name}' has no UINT8 [-1, {outputs_c}, S, S] output"))?;
        if output.shape[2] != face.shape[2] {
            return Err(format!(
                "model '{name}': output crop {} differs from input crop {}",
                output.shape[2], face.shape[2]
            ));
        }
        Ok(ModelInfo {
            name: name.to_string(),
            crop_size: face.shape[2] as u32,
            output: output.name.clone(),
            conditioning: inputs.into_iter().filter(|t| t.name != face.name).collect(),
            face_input: face.name,
        })
    }
}

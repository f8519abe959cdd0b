//! What the compositor needs of a model: for a face model its face input and output, per
//! [`crate::face_contract`], and every other input as conditioning the request supplies; for
//! an audio encoder, its mel-window input and embedding output.

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
    /// The replica runs it on a GPU (its `ModelConfig` instance group; true when it does not
    /// say): where one forward pass for many sessions' frames pays (the frame clock).
    pub on_gpu: bool,
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
            on_gpu: true,
        })
    }
}

/// What the compositor needs to know of an audio-encoder model: FP32 mel windows
/// [-1, 1, 80, 16] (any shape of 1280 elements) in, FP32 embeddings [-1, W] out.
#[derive(Debug, Clone)]
pub struct EncoderInfo {
    pub name: String,
    pub input: String,
    pub input_shape: Vec<i64>,
    pub output: String,
    /// Elements of one embedding.
    pub width: usize,
}

impl EncoderInfo {
    pub(super) fn from_metadata(
        name: &str,
        inputs: &[TensorMetadata],
        outputs: &[TensorMetadata],
    ) -> Result<Self, String> {
        let f32 = DataType::F32.as_str();
        let per = |t: &TensorMetadata| t.shape.iter().skip(1).product::<i64>();
        let window = (framecast_audio::N_MELS * framecast_audio::window::WINDOW) as i64;
        let [input] = inputs else {
            return Err(format!(
                "audio encoder '{name}' has {} inputs; it must take one mel window",
                inputs.len()
            ));
        };
        if input.datatype != f32
            || per(input) != window
            || input.shape.iter().skip(1).any(|&d| d < 1)
        {
            return Err(format!(
                "audio encoder '{name}': input '{}' is {} {:?}; a mel window is FP32 [-1, 1, 80, 16]",
                input.name, input.datatype, input.shape
            ));
        }
        let [output] = outputs else {
            return Err(format!(
                "audio encoder '{name}' has {} outputs; it must return one embedding",
                outputs.len()
            ));
        };
        if output.datatype != f32 || output.shape.len() != 2 || output.shape[1] < 1 {
            return Err(format!(
                "audio encoder '{name}': output '{}' is {} {:?}; an embedding is FP32 [-1, W]",
                output.name, output.datatype, output.shape
            ));
        }
        let mut input_shape = input.shape.clone();
        input_shape[0] = 1;
        Ok(EncoderInfo {
            name: name.to_string(),
            input: input.name.clone(),
            input_shape,
            output: output.name.clone(),
            width: output.shape[1] as usize,
        })
    }
}

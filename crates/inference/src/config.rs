//! A model's `config.toml`: its tensors, batching and on-device conversions.
//!
//! ```toml
//! max_batch_size = 24
//! max_queue_delay_us = 2000
//!
//! [[input]]
//! name = "face"
//! datatype = "UINT8"      # what travels on the wire
//! dims = [6, 320, 320]    # without the batch dimension
//! normalize = true        # u8 on the wire, float in [0, 1] inside the model ("-1..1": [-1, 1])
//! bgr = true              # the model's colour order is BGR (OpenCV frames); the wire's is RGB
//!
//! [[output]]
//! name = "output"
//! datatype = "UINT8"
//! dims = [3, 320, 320]
//! normalize = true        # model's float in [0, 1] clamped, scaled and rounded to u8 on device
//! ```
//!
//! Optional keys: `queue_timeout_us` (0: none), `pinned` (never evicted), `precision`
//! (`"fp32"` or `"fp16"`), `channels_last`, `cudnn_benchmark`, `preferred_batch_sizes`.
//!
//! Float inputs under `"fp32"`: FP16 and BF16 widen to FP32 (lossless), FP32 and FP64 reach the
//! model as declared. Under `"fp16"` every float input is cast to FP16. Float outputs are cast
//! back to the datatype the config declares.

use framecast_proto::tensor::DataType;
use serde::Deserialize;
use std::path::Path;

/// File name of a model's configuration inside its directory.
pub const CONFIG_FILE: &str = "config.toml";
/// File name of a model's TorchScript module inside its directory.
pub const MODEL_FILE: &str = "model.pt";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_platform")]
    platform: String,
    max_batch_size: usize,
    #[serde(default = "default_delay")]
    max_queue_delay_us: u64,
    #[serde(default)]
    queue_timeout_us: u64,
    #[serde(default)]
    pinned: bool,
    #[serde(default)]
    precision: Precision,
    #[serde(default)]
    channels_last: bool,
    #[serde(default)]
    cudnn_benchmark: bool,
    #[serde(default)]
    preferred_batch_sizes: Vec<usize>,
    #[serde(default)]
    input: Vec<RawTensor>,
    #[serde(default)]
    output: Vec<RawTensor>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    name: String,
    datatype: String,
    dims: Vec<i64>,
    #[serde(default)]
    normalize: RawNormalize,
    #[serde(default)]
    bgr: bool,
}

/// `normalize = true | false | "0..1" | "-1..1"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawNormalize {
    Flag(bool),
    Range(String),
}

impl Default for RawNormalize {
    fn default() -> Self {
        RawNormalize::Flag(false)
    }
}

/// How a UINT8 tensor on the wire maps to the model's floats (and back, for an output:
/// clamped to the range, scaled to 0..=255 and rounded, on the model's device).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Normalize {
    /// The wire's datatype is the model's.
    #[default]
    Off,
    /// [0, 1]: `x / 255` (Wav2Lip, SyncTalk_2D).
    Unit,
    /// [-1, 1]: `x / 127.5 - 1` (GAN generators with a tanh output, MuseTalk's VAE).
    Signed,
}

impl Normalize {
    pub fn is_on(self) -> bool {
        self != Normalize::Off
    }

    /// As `config.toml` writes it.
    fn to_toml(self) -> &'static str {
        match self {
            Normalize::Off => "false",
            Normalize::Unit => "true",
            Normalize::Signed => "\"-1..1\"",
        }
    }
}

fn default_platform() -> String {
    "torchscript".to_string()
}

fn default_delay() -> u64 {
    1000
}

/// Floating-point precision the model runs in on its device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Fp16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
        }
    }
}

/// One input or output tensor of a model, batch dimension excluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    /// Element type on the wire.
    pub datatype: DataType,
    pub dims: Vec<i64>,
    /// u8 on the wire, floats inside the model; converted on the model's device.
    pub normalize: Normalize,
    /// The model's colour channels are BGR, each group of three along the first dimension
    /// (`[6, S, S]`: two images); the wire's are RGB. Reordered on the model's device.
    pub bgr: bool,
}

impl TensorSpec {
    /// Bytes one batch element occupies on the wire.
    pub fn element_bytes(&self) -> usize {
        self.dims.iter().product::<i64>() as usize * self.datatype.size()
    }

    /// Shape with a leading batch dimension of `batch`.
    pub fn batched_shape(&self, batch: usize) -> Vec<i64> {
        let mut s = Vec::with_capacity(self.dims.len() + 1);
        s.push(batch as i64);
        s.extend_from_slice(&self.dims);
        s
    }
}

/// A validated model configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    pub platform: String,
    pub max_batch_size: usize,
    pub max_queue_delay_us: u64,
    /// Requests that waited longer than this in the queue fail with DEADLINE_EXCEEDED (0: never).
    pub queue_timeout_us: u64,
    /// Never evicted under memory pressure.
    pub pinned: bool,
    pub precision: Precision,
    /// Feed 4-D float inputs in NHWC memory order (faster convolutions on tensor cores).
    pub channels_last: bool,
    /// Let cuDNN pick the fastest convolution algorithms for the shapes it sees.
    pub cudnn_benchmark: bool,
    /// Batch sizes the batcher executes at once when it has gathered one, without waiting
    /// out `max_queue_delay_us` for more (Triton's `preferred_batch_size`); ascending.
    pub preferred_batch_sizes: Vec<usize>,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// Why a configuration was refused; the message names the field.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub reason: String,
}

impl ModelConfig {
    /// A TorchScript model with default batching, precision and lifecycle settings.
    pub fn new(max_batch_size: usize, inputs: Vec<TensorSpec>, outputs: Vec<TensorSpec>) -> Self {
        ModelConfig {
            platform: default_platform(),
            max_batch_size,
            max_queue_delay_us: default_delay(),
            queue_timeout_us: 0,
            pinned: false,
            precision: Precision::Fp32,
            channels_last: false,
            cudnn_benchmark: false,
            preferred_batch_sizes: Vec::new(),
            inputs,
            outputs,
        }
    }

    /// Reads and validates `dir/config.toml`.
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join(CONFIG_FILE);
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
            file: file.clone(),
            reason: format!("cannot read: {e}"),
        })?;
        Self::parse(&text).map_err(|reason| ConfigError { file, reason })
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if raw.platform != "torchscript" {
            return Err(format!(
                "platform: {:?} is not supported (only \"torchscript\")",
                raw.platform
            ));
        }
        if raw.max_batch_size == 0 || raw.max_batch_size > 4096 {
            return Err(format!(
                "max_batch_size: {} is out of range 1..=4096",
                raw.max_batch_size
            ));
        }
        if raw.max_queue_delay_us > 10_000_000 {
            return Err(format!(
                "max_queue_delay_us: {} exceeds 10 s",
                raw.max_queue_delay_us
            ));
        }
        if let Some(p) = raw
            .preferred_batch_sizes
            .iter()
            .find(|&&p| p == 0 || p > raw.max_batch_size)
        {
            return Err(format!(
                "preferred_batch_sizes: {p} is out of range 1..=max_batch_size ({})",
                raw.max_batch_size
            ));
        }
        let mut preferred_batch_sizes = raw.preferred_batch_sizes;
        preferred_batch_sizes.sort_unstable();
        preferred_batch_sizes.dedup();
        let inputs = tensors("input", raw.input)?;
        let outputs = tensors("output", raw.output)?;
        Ok(ModelConfig {
            platform: raw.platform,
            max_batch_size: raw.max_batch_size,
            max_queue_delay_us: raw.max_queue_delay_us,
            queue_timeout_us: raw.queue_timeout_us,
            pinned: raw.pinned,
            precision: raw.precision,
            channels_last: raw.channels_last,
            cudnn_benchmark: raw.cudnn_benchmark,
            preferred_batch_sizes,
            inputs,
            outputs,
        })
    }

    /// Serializes back to the TOML form `parse` reads.
    pub fn to_toml(&self) -> String {
        let mut s = format!(
            "platform = \"{}\"\nmax_batch_size = {}\nmax_queue_delay_us = {}\nqueue_timeout_us = {}\npinned = {}\nprecision = \"{}\"\nchannels_last = {}\ncudnn_benchmark = {}\npreferred_batch_sizes = {:?}\n",
            self.platform,
            self.max_batch_size,
            self.max_queue_delay_us,
            self.queue_timeout_us,
            self.pinned,
            self.precision.as_str(),
            self.channels_last,
            self.cudnn_benchmark,
            self.preferred_batch_sizes
        );
        for (kind, list) in [("input", &self.inputs), ("output", &self.outputs)] {
            for t in list {
                s += &format!(
                    "\n[[{kind}]]\nname = \"{}\"\ndatatype = \"{}\"\ndims = {:?}\nnormalize = {}\nbgr = {}\n",
                    t.name,
                    t.datatype,
                    t.dims,
                    t.normalize.to_toml(),
                    t.bgr
                );
            }
        }
        s
    }
}

fn tensors(kind: &str, raw: Vec<RawTensor>) -> Result<Vec<TensorSpec>, String> {
    if raw.is_empty() {
        return Err(format!("{kind}: at least one [[{kind}]] is required"));
    }
    let mut out: Vec<TensorSpec> = Vec::with_capacity(raw.len());
    for (i, t) in raw.into_iter().enumerate() {
        let at = format!("{kind}[{i}]");
        if t.name.is_empty() {
            return Err(format!("{at}.name is empty"));
        }
        if out.iter().any(|o| o.name == t.name) {
            return Err(format!("{at}.name {:?} is used twice", t.name));
        }
        let datatype = DataType::parse(&t.datatype).map_err(|e| format!("{at}.datatype: {e}"))?;
        if t.dims.iter().any(|&d| d <= 0) {
            return Err(format!(
                "{at}.dims {:?}: every dimension must be positive (the batch dimension is implied)",
                t.dims
            ));
        }
        framecast_proto::tensor::byte_len(datatype, &t.dims)
            .map_err(|e| format!("{at}.dims: {e}"))?;
        let normalize = match &t.normalize {
            RawNormalize::Flag(false) => Normalize::Off,
            RawNormalize::Flag(true) => Normalize::Unit,
            RawNormalize::Range(r) if r == "0..1" => Normalize::Unit,
            RawNormalize::Range(r) if r == "-1..1" => Normalize::Signed,
            RawNormalize::Range(r) => {
                return Err(format!(
                    "{at}.normalize {:?}: true (\"0..1\"), \"-1..1\" or false",
                    framecast_proto::echo(r)
                ))
            }
        };
        if normalize.is_on() && datatype != DataType::U8 {
            return Err(format!(
                "{at}.normalize needs datatype UINT8, not {datatype}"
            ));
        }
        if t.bgr && !(t.dims.len() == 3 && t.dims[0] % 3 == 0) {
            return Err(format!(
                "{at}.bgr needs dims [C, H, W] with C a multiple of 3, not {:?}",
                t.dims
            ));
        }
        out.push(TensorSpec {
            name: t.name,
            datatype,
            dims: t.dims,
            normalize,
            bgr: t.bgr,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
max_batch_size = 4
[[input]]
name = "x"
datatype = "UINT8"
dims = [3, 8, 8]
normalize = true
[[output]]
name = "y"
datatype = "FP32"
dims = [2]
"#;

    #[test]
    fn parses_and_round_trips() {
        let c = ModelConfig::parse(GOOD).unwrap();
        assert_eq!(c.max_batch_size, 4);
        assert_eq!(c.inputs[0].element_bytes(), 192);
        assert_eq!(c.outputs[0].batched_shape(3), vec![3, 2]);
        assert_eq!(ModelConfig::parse(&c.to_toml()).unwrap(), c);
        // The range and the colour order, each way of writing them.
        for (written, want) in [
            ("true", Normalize::Unit),
            ("\"0..1\"", Normalize::Unit),
            ("\"-1..1\"", Normalize::Signed),
            ("false", Normalize::Off),
        ] {
            let text = GOOD.replace(
                "normalize = true",
                &format!("normalize = {written}\nbgr = true"),
            );
            let c = ModelConfig::parse(&text).unwrap();
            assert_eq!((c.inputs[0].normalize, c.inputs[0].bgr), (want, true));
            assert_eq!(ModelConfig::parse(&c.to_toml()).unwrap(), c);
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (
                GOOD.replace("max_batch_size = 4", "max_batch_size = 0"),
                "max_batch_size",
            ),
            (GOOD.replace("\"UINT8\"", "\"INT4\""), "input[0].datatype"),
            (GOOD.replace("[3, 8, 8]", "[3, -1, 8]"), "input[0].dims"),
            (
                GOOD.replace("\"FP32\"", "\"FP32\"\nnormalize = true"),
                "output[0].normalize",
            ),
            (
                GOOD.replace("name = \"y\"", "name = \"\""),
                "output[0].name",
            ),
            (GOOD.replace("max_batch_size", "max_batch"), "max_batch"),
            (
                GOOD.replace(
                    "max_batch_size = 4",
                    "max_batch_size = 4\npreferred_batch_sizes = [2, 8]",
                ),
                "preferred_batch_sizes: 8",
            ),
            (
                GOOD.replace(
                    "max_batch_size = 4",
                    "max_batch_size = 4\nprecision = \"int3\"",
                ),
                "precision",
            ),
            (
                GOOD.replace("normalize = true", "normalize = \"0..255\""),
                "input[0].normalize \"0..255\"",
            ),
            (
                GOOD.replace("\"FP32\"", "\"FP32\"\nbgr = true"),
                "output[0].bgr",
            ),
        ];
        for (text, field) in cases {
            let err = ModelConfig::parse(&text).unwrap_err();
            assert!(err.contains(field), "{err:?} should name {field}");
        }
    }
}

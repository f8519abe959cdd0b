//! Built-in models, generated without any download: traced with `tch` and saved as
//! TorchScript beside a `config.toml`, exactly as an operator's own models would be stored.
//!
//! - `passthrough`: returns the reference face channels unchanged (tests check composites
//!   pixel for pixel).
//! - `lipsync-ref`: a UNet modelled on the public UNet-328 of SyncTalk_2D /
//!   Ultralight-Digital-Human (depthwise-separable double convs, an audio encoder fused at
//!   the bottleneck); deterministic weights. The reference workload for benchmarks.
//! - `talking-demo`: opens a dark mouth in the reference crop in proportion to the audio
//!   energy, so a person watching the demo sees the mouth move with the sound.
//! - `audio-encoder`: the audio encoder of Wav2Lip (13 conv blocks with batch norm, ReLU and
//!   residuals), one mel window `mel` `[B,1,80,16]` f32 to one `embedding` `[B,512]` f32; seeded
//!   weights. Lip-sync models of the SyncTalk_2D kind take 16 such embeddings per frame.
//!
//! - `wav2lip-arch`: Wav2Lip's generator architecture ([`wav2lip`]) with seeded weights, served
//!   as a user serves an exported Wav2Lip: `mel` `[B,1,80,16]` f32 and `face` `[B,6,96,96]` u8
//!   (the masked crop first; the model's floats in [0, 1] and BGR, converted by the server)
//!   to `output` `[B,3,96,96]` u8.
//!
//! The three other face models take `face` `[B,6,S,S]` u8 (reference crop and its masked copy) and
//! `audio` `[B,32,16,16]` f32, and return `[B,3,S,S]` u8.

use crate::config::{ModelConfig, Precision, TensorSpec, MODEL_FILE};
use anyhow::{Context, Result};
use framecast_proto::tensor::DataType;
use std::path::{Path, PathBuf};
use tch::nn::{self, ModuleT};
use tch::{CModule, Device, Kind, Tensor};

pub mod wav2lip;
use wav2lip::audio_encoder;

/// Crop size of `lipsync-ref`, fixed by its architecture.
pub const LIPSYNC_CROP: i64 = 320;
/// Audio feature shape every built-in face model takes per frame.
pub const AUDIO_DIMS: [i64; 3] = [32, 16, 16];
/// One mel window, the input of `audio-encoder`: 80 bands by 16 mel frames.
pub const MEL_DIMS: [i64; 3] = [1, 80, 16];
/// Width of one `audio-encoder` embedding.
pub const EMBEDDING: i64 = 512;

/// Which built-in model to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Builtin {
    Passthrough,
    LipsyncRef,
    TalkingDemo,
    AudioEncoder,
    #[value(name = "wav2lip-arch")]
    Wav2LipArch,
}

impl Builtin {
    pub const ALL: [Builtin; 5] = [
        Builtin::Passthrough,
        Builtin::LipsyncRef,
        Builtin::TalkingDemo,
        Builtin::AudioEncoder,
        Builtin::Wav2LipArch,
    ];

    /// What `framecast-inference models` writes unless told: all but `wav2lip-arch`.
    pub const DEFAULT: [Builtin; 4] = [
        Builtin::Passthrough,
        Builtin::LipsyncRef,
        Builtin::TalkingDemo,
        Builtin::AudioEncoder,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Builtin::Passthrough => "passthrough",
            Builtin::LipsyncRef => "lipsync-ref",
            Builtin::TalkingDemo => "talking-demo",
            Builtin::AudioEncoder => "audio-encoder",
            Builtin::Wav2LipArch => "wav2lip-arch",
        }
    }
}

/// Options for writing built-in models.
#[derive(Debug, Clone)]
pub struct ZooOptions {
    /// Crop size of `passthrough` and `talking-demo` (`lipsync-ref` is always 320).
    pub crop: i64,
    pub max_batch_size: usize,
    pub max_queue_delay_us: u64,
}

impl Default for ZooOptions {
    fn default() -> Self {
        ZooOptions {
            crop: LIPSYNC_CROP,
            max_batch_size: 24,
            max_queue_delay_us: 2000,
        }
    }
}

/// Writes `model` into `root/<name>/` and returns that directory.
pub fn write(root: &Path, model: Builtin, opts: &ZooOptions) -> Result<PathBuf> {
    write_with(root, model, opts, AUDIO_DIMS, Precision::Fp32)
}

/// [`write()`] with another per-frame shape for the `audio` input of `passthrough` and
/// `talking-demo` (a Wav2Lip-style model takes the mel window itself, [1, 80, 16]; the
/// architecture of `lipsync-ref` fixes its shape at [`AUDIO_DIMS`]), and in `precision`.
///
/// A built-in model is a traced closure: its weights are constants of the graph, which loading
/// in fp16 cannot convert (`CModule::to` converts parameters only). So an fp16 model is traced
/// in half, weights and all, and its config says `precision = "fp16"`.
pub fn write_with(
    root: &Path,
    model: Builtin,
    opts: &ZooOptions,
    audio_dims: [i64; 3],
    precision: Precision,
) -> Result<PathBuf> {
    anyhow::ensure!(
        model != Builtin::LipsyncRef || audio_dims == AUDIO_DIMS,
        "lipsync-ref takes audio {AUDIO_DIMS:?}, not {audio_dims:?}"
    );
    anyhow::ensure!(
        audio_dims.iter().all(|&d| (1..=4096).contains(&d)),
        "audio dims {audio_dims:?} must each be in 1..=4096"
    );
    let crop = match model {
        Builtin::LipsyncRef => LIPSYNC_CROP,
        Builtin::Wav2LipArch => wav2lip::CROP,
        _ => opts.crop,
    };
    anyhow::ensure!(
        (16..=1024).contains(&crop),
        "crop size {crop} is out of range 16..=1024"
    );
    let dir = root.join(model.name());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _no_grad = tch::no_grad_guard();
    let float = match precision {
        Precision::Fp32 => Kind::Float,
        Precision::Fp16 => Kind::Half,
    };
    let face = Tensor::zeros([1, 6, crop, crop], (float, Device::Cpu));
    let audio = Tensor::zeros(
        [1, audio_dims[0], audio_dims[1], audio_dims[2]],
        (float, Device::Cpu),
    );
    // Weights in the model's precision: they become constants of the traced graph.
    let in_precision = |vs: &mut nn::VarStore| {
        if precision == Precision::Fp16 {
            vs.half();
        }
    };
    let module = match model {
        Builtin::Passthrough => trace(model, &[face, audio], |x| vec![x[0].narrow(1, 0, 3)])?,
        Builtin::TalkingDemo => {
            trace(model, &[face, audio], |x| vec![talking(&x[0], &x[1], crop)])?
        }
        Builtin::LipsyncRef => {
            tch::manual_seed(328);
            let mut vs = nn::VarStore::new(Device::Cpu);
            let net = UNet::new(&vs.root());
            vs.freeze();
            in_precision(&mut vs);
            trace(model, &[face, audio], |x| vec![net.forward(&x[0], &x[1])])?
        }
        Builtin::AudioEncoder => {
            tch::manual_seed(80);
            let mut vs = nn::VarStore::new(Device::Cpu);
            let net = audio_encoder(&vs.root());
            vs.freeze();
            in_precision(&mut vs);
            let mel = Tensor::zeros(
                [1, MEL_DIMS[0], MEL_DIMS[1], MEL_DIMS[2]],
                (float, Device::Cpu),
            );
            trace(model, &[mel], |x| {
                vec![net.forward_t(&x[0], false).flatten(1, -1)]
            })?
        }
        Builtin::Wav2LipArch => {
            tch::manual_seed(96);
            let mut vs = nn::VarStore::new(Device::Cpu);
            let net = wav2lip::Wav2Lip::new(&vs.root());
            vs.freeze();
            in_precision(&mut vs);
            let mel = Tensor::zeros(
                [1, MEL_DIMS[0], MEL_DIMS[1], MEL_DIMS[2]],
                (float, Device::Cpu),
            );
            trace(model, &[mel, face], |x| vec![net.forward(&x[0], &x[1])])?
        }
    };
    let path = dir.join(MODEL_FILE);
    // Write beside and rename, so a reader never sees a half-written model.
    let tmp = dir.join(format!(".{MODEL_FILE}.tmp"));
    module
        .save(&tmp)
        .with_context(|| format!("saving {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)?;
    let mut config = match model {
        Builtin::AudioEncoder => encoder_config(opts),
        Builtin::Wav2LipArch => wav2lip_config(opts),
        _ => config(crop, opts, audio_dims),
    };
    config.precision = precision;
    std::fs::write(dir.join(crate::config::CONFIG_FILE), config.to_toml())?;
    Ok(dir)
}

fn trace(
    model: Builtin,
    inputs: &[Tensor],
    mut f: impl FnMut(&[Tensor]) -> Vec<Tensor>,
) -> Result<CModule> {
    // TorchScript class names must be identifiers: "lipsync-ref" becomes "lipsync_ref".
    let class = model.name().replace('-', "_");
    CModule::create_by_tracing(&class, "forward", inputs, &mut f)
        .with_context(|| format!("tracing {}", model.name()))
}

fn config(crop: i64, opts: &ZooOptions, audio_dims: [i64; 3]) -> ModelConfig {
    let u8_image = |name: &str, channels| TensorSpec {
        name: name.to_string(),
        datatype: DataType::U8,
        dims: vec![channels, crop, crop],
        normalize: crate::config::Normalize::Unit,
        bgr: false,
    };
    let audio = TensorSpec {
        name: "audio".to_string(),
        datatype: DataType::F32,
        dims: audio_dims.to_vec(),
        normalize: crate::config::Normalize::Off,
        bgr: false,
    };
    let mut config = ModelConfig::new(
        opts.max_batch_size,
        vec![u8_image("face", 6), audio],
        vec![u8_image("output", 3)],
    );
    config.max_queue_delay_us = opts.max_queue_delay_us;
    config
}

/// Wav2Lip as its `inference.py` runs it: the mel window first, the face as floats in [0, 1]
/// in OpenCV's BGR order, the answer likewise.
fn wav2lip_config(opts: &ZooOptions) -> ModelConfig {
    let image = |name: &str, channels| TensorSpec {
        name: name.to_string(),
        datatype: DataType::U8,
        dims: vec![channels, wav2lip::CROP, wav2lip::CROP],
        normalize: crate::config::Normalize::Unit,
        bgr: true,
    };
    let mel = TensorSpec {
        name: "mel".to_string(),
        datatype: DataType::F32,
        dims: MEL_DIMS.to_vec(),
        normalize: crate::config::Normalize::Off,
        bgr: false,
    };
    let mut config = ModelConfig::new(
        opts.max_batch_size,
        vec![mel, image("face", 6)],
        vec![image("output", 3)],
    );
    config.max_queue_delay_us = opts.max_queue_delay_us;
    config
}

fn encoder_config(opts: &ZooOptions) -> ModelConfig {
    let spec = |name: &str, dims: Vec<i64>| TensorSpec {
        name: name.to_string(),
        datatype: DataType::F32,
        dims,
        normalize: crate::config::Normalize::Off,
        bgr: false,
    };
    let mut config = ModelConfig::new(
        opts.max_batch_size,
        vec![spec("mel", MEL_DIMS.to_vec())],
        vec![spec("embedding", vec![EMBEDDING])],
    );
    config.max_queue_delay_us = opts.max_queue_delay_us;
    config
}

/// A dark, soft-edged mouth whose opening follows the mean absolute audio feature.
///
/// Every constant is derived from the input (coordinates as cumulative sums of ones shaped
/// like the input), never created on a device: the tracer records a device given to a factory
/// function, and the module would then only run there.
fn talking(face: &Tensor, audio: &Tensor, crop: i64) -> Tensor {
    let reference = face.narrow(1, 0, 3);
    let energy = audio
        .abs()
        .mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float)
        .clamp(0.0, 1.0)
        .view([-1, 1, 1, 1]);
    let s = crop as f64;
    let plane = face.narrow(0, 0, 1).narrow(1, 0, 1).ones_like();
    let ys = (plane.cumsum(2, None::<Kind>) - 1.0) / s;
    let xs = (plane.cumsum(3, None::<Kind>) - 1.0) / s;
    let ry = energy * 0.085 + 0.006;
    let dx = (xs - 0.5) / 0.15;
    let dy = (ys - 0.74) / ry;
    let d = &dx * &dx + &dy * &dy;
    let mask = (d.neg() + 1.0).g_mul_scalar(6.0).sigmoid();
    // The mouth colour (0.22, 0.04, 0.06) as a function of the channel index c = 0, 1, 2.
    let c = reference
        .narrow(0, 0, 1)
        .narrow(2, 0, 1)
        .narrow(3, 0, 1)
        .ones_like()
        .cumsum(1, None::<Kind>)
        - 1.0;
    let mouth = &c * &c * 0.1 - &c * 0.28 + 0.22;
    &reference * (1.0 - &mask) + mouth * &mask
}

/// Depthwise 3x3 (strided) then pointwise 1x1, each with batch norm and ReLU.
fn dw_conv(p: nn::Path, cin: i64, cout: i64, stride: i64) -> nn::SequentialT {
    let dw = nn::ConvConfig {
        stride,
        padding: 1,
        groups: cin,
        bias: false,
        ..Default::default()
    };
    let pw = nn::ConvConfig {
        bias: false,
        ..Default::default()
    };
    nn::seq_t()
        .add(nn::conv2d(&p / "dw", cin, cin, 3, dw))
        .add(nn::batch_norm2d(&p / "bn1", cin, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::conv2d(&p / "pw", cin, cout, 1, pw))
        .add(nn::batch_norm2d(&p / "bn2", cout, Default::default()))
        .add_fn(|x| x.relu())
}

fn double_conv(p: nn::Path, cin: i64, cout: i64, stride: i64) -> nn::SequentialT {
    nn::seq_t()
        .add(dw_conv(&p / "a", cin, cout, stride))
        .add(dw_conv(&p / "b", cout, cout, 1))
}

/// UNet-328-style lip-sync generator: 5-level encoder, audio features fused at 20x20.
struct UNet {
    down: Vec<nn::SequentialT>,
    audio: nn::SequentialT,
    fuse: nn::SequentialT,
    up: Vec<nn::SequentialT>,
    out: nn::Conv2D,
}

const WIDTHS: [i64; 5] = [32, 64, 128, 256, 512];

impl UNet {
    fn new(p: &nn::Path) -> Self {
        let mut down = vec![double_conv(p / "inc", 6, WIDTHS[0], 1)];
        for i in 1..WIDTHS.len() {
            down.push(double_conv(
                p / format!("down{i}"),
                WIDTHS[i - 1],
                WIDTHS[i],
                2,
            ));
        }
        let conv = |name: &str, cin, cout| {
            nn::seq_t()
                .add(nn::conv2d(
                    p / name,
                    cin,
                    cout,
                    3,
                    nn::ConvConfig {
                        padding: 1,
                        ..Default::default()
                    },
                ))
                .add_fn(|x| x.relu())
        };
        let audio = nn::seq_t()
            .add(conv("audio0", AUDIO_DIMS[0], 64))
            .add(conv("audio1", 64, 128))
            .add(conv("audio2", 128, 512));
        let fuse = double_conv(p / "fuse", 1024, 512, 1);
        let mut up = Vec::new();
        for i in (0..WIDTHS.len() - 1).rev() {
            up.push(double_conv(
                p / format!("up{i}"),
                WIDTHS[i + 1] + WIDTHS[i],
                WIDTHS[i],
                1,
            ));
        }
        let out = nn::conv2d(p / "outc", WIDTHS[0], 3, 1, Default::default());
        UNet {
            down,
            audio,
            fuse,
            up,
            out,
        }
    }

    fn forward(&self, face: &Tensor, audio: &Tensor) -> Tensor {
        let mut skips = Vec::new();
        let mut x = face.shallow_clone();
        for d in &self.down {
            x = d.forward_t(&x, false);
            skips.push(x.shallow_clone());
        }
        let bottleneck = LIPSYNC_CROP / 16;
        let a = self.audio.forward_t(audio, false).upsample_bilinear2d(
            [bottleneck, bottleneck].as_slice(),
            false,
            None,
            None,
        );
        x = self.fuse.forward_t(&Tensor::cat(&[x, a], 1), false);
        for (level, u) in self.up.iter().enumerate() {
            let skip = &skips[skips.len() - 2 - level];
            let size = LIPSYNC_CROP >> (WIDTHS.len() - 2 - level);
            let upsampled = x.upsample_bilinear2d([size, size].as_slice(), false, None, None);
            x = u.forward_t(&Tensor::cat(&[upsampled, skip.shallow_clone()], 1), false);
        }
        x.apply(&self.out).sigmoid()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// No built-in model's traced code pins a device, and the weightless ones carry no captured
    /// tensor constant: each runs on whatever device it is loaded on. (The weights of
    /// `lipsync-ref` and `audio-encoder` are captured as constants too; `load_on_device` maps
    /// every tensor of the archive, constants included, to the device it loads on.)
    #[test]
    fn no_built_in_model_is_pinned_to_a_device() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = ZooOptions {
            crop: 32,
            max_batch_size: 2,
            max_queue_delay_us: 0,
        };
        for model in Builtin::ALL {
            let dir = write(tmp.path(), model, &opts).unwrap();
            let file = std::fs::File::open(dir.join(MODEL_FILE)).unwrap();
            let mut zip = zip::ZipArchive::new(file).unwrap();
            let mut code = String::new();
            for i in 0..zip.len() {
                let mut entry = zip.by_index(i).unwrap();
                if entry.name().contains("/code/") && entry.name().ends_with(".py") {
                    entry.read_to_string(&mut code).unwrap();
                }
            }
            assert!(
                !code.is_empty(),
                "{}: no TorchScript code found",
                model.name()
            );
            let weightless = matches!(model, Builtin::Passthrough | Builtin::TalkingDemo);
            let pins: &[&str] = if weightless {
                &["torch.device(\"cpu\")", "CONSTANTS.c"]
            } else {
                &["torch.device(\"cpu\")"]
            };
            for pinned in pins {
                assert!(
                    !code.contains(pinned),
                    "{} pins {pinned}:\n{code}",
                    model.name()
                );
            }
        }
    }
}

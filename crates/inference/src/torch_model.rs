//! One TorchScript module on one device: turns batched wire bytes into tensors, runs the
//! forward, and turns the outputs back into wire bytes, with u8 <-> float conversion done on
//! the device so the wire carries u8 rather than float32.

use crate::backend::{Backend, BackendError, ExecTimings, Executed, HostBytes, Payload};
use crate::config::{ModelConfig, Normalize, Precision, TensorSpec, MODEL_FILE};
use bytes::Bytes;
use framecast_proto::tensor::DataType;
use std::path::Path;
use std::time::Instant;
use tch::{CModule, Device, IValue, Kind, Tensor};

/// Maps a wire datatype to the libtorch element kind, where libtorch has one.
pub fn kind_of(datatype: DataType) -> Option<Kind> {
    Some(match datatype {
        DataType::Bool => Kind::Bool,
        DataType::U8 => Kind::Uint8,
        DataType::I8 => Kind::Int8,
        DataType::I16 => Kind::Int16,
        DataType::I32 => Kind::Int,
        DataType::I64 => Kind::Int64,
        DataType::F16 => Kind::Half,
        DataType::BF16 => Kind::BFloat16,
        DataType::F32 => Kind::Float,
        DataType::F64 => Kind::Double,
        DataType::U16 | DataType::U32 | DataType::U64 => return None,
    })
}

/// A loaded module, owned by one worker thread.
pub struct TorchModel {
    module: CModule,
    device: Device,
    config: ModelConfig,
}

impl TorchModel {
    /// Loads `dir/model.pt` onto `device`. Errors name the file and the cause.
    pub fn load(dir: &Path, config: ModelConfig, device: Device) -> Result<Self, String> {
        for t in config.inputs.iter().chain(&config.outputs) {
            if kind_of(t.datatype).is_none() {
                return Err(format!(
                    "config: tensor '{}' has datatype {}, which libtorch cannot hold",
                    t.name, t.datatype
                ));
            }
        }
        let path = dir.join(MODEL_FILE);
        let mut module = CModule::load_on_device(&path, device).map_err(|e| {
            format!(
                "{}: cannot load TorchScript module: {}",
                path.display(),
                first_line(&e.to_string())
            )
        })?;
        module.set_eval();
        if config.precision == Precision::Fp16 {
            // Parameters and buffers to half, so inputs cast to half meet weights of the same
            // type. (Weights a traced closure captured are constants, which `to` leaves alone:
            // such a module must be traced in half to run in fp16.)
            module.to(device, Kind::Half, false);
        }
        if config.cudnn_benchmark && device.is_cuda() {
            // cuDNN has one switch per process: a model that asks for it turns it on for all.
            tch::Cuda::cudnn_set_benchmark(true);
        }
        Ok(TorchModel {
            module,
            device,
            config,
        })
    }

    /// The config the module was loaded with.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Runs one forward at `batch` with zero inputs and checks the outputs against the config.
    pub fn warm_up(&self, batch: usize) -> Result<(), String> {
        let parts: Vec<Vec<Payload>> = self
            .config
            .inputs
            .iter()
            .map(|t| {
                vec![Payload::Bytes(Bytes::from(vec![
                    0u8;
                    t.element_bytes() * batch
                ]))]
            })
            .collect();
        self.execute(batch, &parts, &[])
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn input_tensor(
        &self,
        spec: &TensorSpec,
        batch: usize,
        parts: &[Payload],
    ) -> Result<Tensor, String> {
        let kind = kind_of(spec.datatype).ok_or("unsupported datatype")?;
        let total: usize = parts.iter().map(Payload::len).sum();
        if total != spec.element_bytes() * batch {
            return Err(format!(
                "input '{}': {} bytes for a batch of {}",
                spec.name, total, batch
            ));
        }
        let on_host =
            self.device == Device::Cpu || parts.iter().all(|p| matches!(p, Payload::Bytes(_)));
        let t = if on_host {
            // One copy of every piece (rows of cached tensors straight from their registered
            // bytes) into one host tensor, then one copy to the device if there is one.
            let mut pieces: Vec<&[u8]> = Vec::with_capacity(parts.len());
            for p in parts {
                match p {
                    Payload::Bytes(b) => pieces.push(b),
                    Payload::Rows(r) => pieces.extend(r.slices()),
                }
            }
            host_tensor(spec.batched_shape(batch), kind, &pieces).to_device(self.device)
        } else {
            gathered_on(self.device, spec, kind, parts)?
        };
        let float = match self.config.precision {
            Precision::Fp32 => Kind::Float,
            Precision::Fp16 => Kind::Half,
        };
        // fp16 precision: the model's weights are half, so every float input must be too.
        // fp32 precision: half-width wire types widen (lossless; clients send FP16 to halve
        // bandwidth), FP32 and FP64 reach the model as declared, never narrowed.
        let cast = match self.config.precision {
            Precision::Fp16 => t.kind() != Kind::Half,
            Precision::Fp32 => matches!(t.kind(), Kind::Half | Kind::BFloat16),
        };
        let t = match spec.normalize {
            Normalize::Unit => t.to_kind(float) * (1.0 / 255.0),
            Normalize::Signed => t.to_kind(float) * (2.0 / 255.0) - 1.0,
            Normalize::Off if t.is_floating_point() && cast => t.to_kind(float),
            Normalize::Off => t,
        };
        let t = if spec.bgr { swap_red_blue(&t) } else { t };
        // NHWC strides under an NCHW shape: what PyTorch calls channels-last memory format.
        Ok(
            if self.config.channels_last && t.dim() == 4 && t.is_floating_point() {
                t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
            } else {
                t
            },
        )
    }
}

impl Backend for TorchModel {
    fn execute(
        &self,
        batch: usize,
        inputs: &[Vec<Payload>],
        i420: &[bool],
    ) -> Result<Executed, BackendError> {
        // Inference only: no autograd graph (a thread-local switch, cheap per batch).
        let _no_grad = tch::no_grad_guard();
        let t0 = Instant::now();
        let tensors = self
            .config
            .inputs
            .iter()
            .zip(inputs)
            .map(|(spec, parts)| self.input_tensor(spec, batch, parts))
            .collect::<Result<Vec<_>, _>>()?;
        let t1 = Instant::now();
        // The IValues share the tensors' storage; the tensors outlive them, to be freed later.
        let ivalues: Vec<IValue> = tensors
            .iter()
            .map(|t| IValue::Tensor(t.shallow_clone()))
            .collect();
        let out = self.module.forward_is(&ivalues).map_err(|e| {
            let summary = format!("forward failed: {}", first_line(&e.to_string()));
            BackendError::caused(summary, e)
        })?;
        let outs = flatten_outputs(out)?;
        if outs.len() != self.config.outputs.len() {
            return Err(format!(
                "model returned {} output tensors; config declares {}",
                outs.len(),
                self.config.outputs.len()
            )
            .into());
        }
        let t2 = Instant::now();
        let converted: Vec<bool> = (0..outs.len())
            .map(|o| i420.get(o).copied().unwrap_or(false))
            .collect();
        let host = self
            .config
            .outputs
            .iter()
            .zip(outs)
            .zip(&converted)
            .map(|((spec, t), &i420)| host_output(spec, batch, t, i420))
            .collect::<Result<Vec<_>, _>>()?;
        if self.device != Device::Cpu {
            tch::Cuda::synchronize(device_index(self.device));
        }
        let t3 = Instant::now();
        Ok(Executed {
            outputs: host
                .into_iter()
                .map(|h| Box::new(h) as Box<dyn HostBytes>)
                .collect(),
            i420: converted,
            timings: ExecTimings {
                input: t1 - t0,
                infer: t2 - t1,
                output: t3 - t2,
            },
            // The batch's model inputs are large (a 24-frame `lipsync-ref` face input is
            // 59 MB of floats): freed with the outputs, off this thread.
            spent: Some(Box::new(tensors)),
        })
    }
}

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double
    )
}

fn device_index(device: Device) -> i64 {
    match device {
        Device::Cuda(i) => i as i64,
        _ => 0,
    }
}

fn flatten_outputs(value: IValue) -> Result<Vec<Tensor>, String> {
    match value {
        IValue::Tensor(t) => Ok(vec![t]),
        IValue::Tuple(items) | IValue::GenericList(items) => items
            .into_iter()
            .map(|v| match v {
                IValue::Tensor(t) => Ok(t),
                other => Err(format!("model returned a non-tensor output: {other:?}")),
            })
            .collect(),
        IValue::TensorList(ts) => Ok(ts),
        other => Err(format!("model returned {other:?}, not tensors")),
    }
}

/// One output of a batch: contiguous on the host, in the datatype its config declares (or
/// as I420).
pub enum HostOutput {
    Tensor {
        tensor: Tensor,
        len: usize,
    },
    /// Converted to I420 on the host, the CPU being the model's device.
    Converted(Vec<u8>),
}

impl HostBytes for HostOutput {
    /// The batch's output bytes, without a copy.
    fn as_bytes(&self) -> &[u8] {
        let (tensor, len) = match self {
            HostOutput::Tensor { tensor, len } => (tensor, *len),
            HostOutput::Converted(v) => return v,
        };
        if len == 0 {
            return &[];
        }
        // SAFETY: `host_output` made the tensor contiguous on the CPU with `len` bytes of
        // elements at `data_ptr`; `self` owns the tensor, so the storage outlives the borrow,
        // and nothing writes to it once it is a `HostOutput`.
        unsafe { std::slice::from_raw_parts(tensor.data_ptr() as *const u8, len) }
    }
}

/// One output of the batch on the host; as I420 when `i420`: converted on a CUDA device (so
/// half the bytes cross back), or on the host where the CPU is the device (the fixed-point
/// loop there is several times faster than libtorch's elementwise kernels on the CPU).
fn host_output(
    spec: &TensorSpec,
    batch: usize,
    t: Tensor,
    i420: bool,
) -> Result<HostOutput, String> {
    let want_shape = spec.batched_shape(batch);
    if t.size() != want_shape {
        return Err(format!(
            "output '{}' has shape {:?}; config declares {:?}",
            spec.name,
            t.size(),
            want_shape
        ));
    }
    let kind = kind_of(spec.datatype).ok_or("unsupported datatype")?;
    let t = if spec.bgr { swap_red_blue(&t) } else { t };
    let t = if spec.normalize == Normalize::Unit {
        (t.clamp(0.0, 1.0) * 255.0).round().to_kind(Kind::Uint8)
    } else if spec.normalize == Normalize::Signed {
        ((t.clamp(-1.0, 1.0) + 1.0) * 127.5)
            .round()
            .to_kind(Kind::Uint8)
    } else if t.kind() != kind && t.is_floating_point() && is_float(kind) {
        // A model run in fp16 still answers in the datatype its config declares.
        t.to_kind(kind)
    } else if t.kind() != kind {
        return Err(format!(
            "output '{}' is {:?}; config declares {}",
            spec.name,
            t.kind(),
            spec.datatype
        ));
    } else {
        t
    };
    let on_cpu = t.device() == Device::Cpu;
    let t = if i420 && !on_cpu { to_i420(&t)? } else { t };
    let tensor = t.to_device(Device::Cpu).contiguous();
    let len = tensor.numel() * spec.datatype.size();
    if i420 && on_cpu {
        let (n, h, w) = image_dims(&tensor)?;
        let rgb = HostOutput::Tensor { tensor, len };
        let i420 = framecast_proto::i420::from_planar_rgb(rgb.as_bytes(), n, h, w);
        return Ok(HostOutput::Converted(i420));
    }
    Ok(HostOutput::Tensor { tensor, len })
}

/// `[n, C, H, W]` with each group of three channels reversed (RGB to BGR and back), on the
/// tensor's device; `C` is a multiple of 3 (the config checks it).
fn swap_red_blue(t: &Tensor) -> Tensor {
    let s = t.size();
    t.reshape([s[0], s[1] / 3, 3, s[2], s[3]])
        .flip([2])
        .reshape([s[0], s[1], s[2], s[3]])
}

/// (n, H, W) of a u8 `[n, 3, H, W]` tensor with H and W even: what I420 takes.
fn image_dims(rgb: &Tensor) -> Result<(usize, usize, usize), String> {
    match rgb.size()[..] {
        [n, 3, h, w] if h % 2 == 0 && w % 2 == 0 && rgb.kind() == Kind::Uint8 => {
            Ok((n as usize, h as usize, w as usize))
        }
        _ => Err(format!(
            "I420: the output is {:?} {:?}, not u8 [n, 3, H, W] with even H and W",
            rgb.kind(),
            rgb.size()
        )),
    }
}

/// `[n, 3, H, W]` u8 RGB to `[n, H * 3 / 2, W]` u8 I420, on the tensor's device, with the same
/// fixed-point arithmetic as [`framecast_proto::i420::from_planar_rgb`] (bit for bit).
fn to_i420(rgb: &Tensor) -> Result<Tensor, String> {
    use framecast_proto::i420::fixed::*;
    let (n, h, w) = image_dims(rgb)?;
    let (n, h, w) = (n as i64, h as i64, w as i64);
    let x = rgb.to_kind(Kind::Int);
    let c = |t: &Tensor, i: i64| t.select(1, i);
    let y = (c(&x, 0) * YR as i64 + c(&x, 1) * YG as i64 + c(&x, 2) * YB as i64 + HALF as i64)
        .bitwise_right_shift_tensor_scalar(16);
    // Each chroma sample from the sum of its 2 x 2 pixels.
    let s = x.reshape([n, 3, h / 2, 2, w / 2, 2]).sum_dim_intlist(
        [3i64, 5].as_slice(),
        false,
        Kind::Int,
    );
    let chroma = |kr: i32, kg: i32, kb: i32| {
        (c(&s, 0) * kr as i64 + c(&s, 1) * kg as i64 + c(&s, 2) * kb as i64 + CHROMA_BIAS as i64)
            .bitwise_right_shift_tensor_scalar(18)
            .clamp(0, 255)
            .reshape([n, -1])
    };
    let planes = [
        y.reshape([n, -1]),
        chroma(CBR, CBG, HALF),
        chroma(HALF, CRG, CRB),
    ];
    Ok(Tensor::cat(&planes, 1)
        .to_kind(Kind::Uint8)
        .reshape([n, h * 3 / 2, w]))
}

/// `parts` end to end as one tensor on `device`, rows of cached tensors gathered there from
/// the tensor's copy on it: only the requests' own bytes cross to the device.
fn gathered_on(
    device: Device,
    spec: &TensorSpec,
    kind: Kind,
    parts: &[Payload],
) -> Result<Tensor, String> {
    let pieces = parts
        .iter()
        .map(|p| match p {
            Payload::Bytes(b) => {
                let rows = b.len() / spec.element_bytes().max(1);
                Ok(host_tensor(spec.batched_shape(rows), kind, &[b]).to_device(device))
            }
            Payload::Rows(r) => {
                let on_device = r.tensor().on_device(device)?;
                let index = Tensor::from_slice(&r.index).to_device(device);
                Ok(on_device.index_select(0, &index))
            }
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Tensor::cat(&pieces, 0))
}

/// `parts` end to end in one new host tensor of `shape`: one copy, no intermediate Vec.
fn host_tensor(shape: Vec<i64>, kind: Kind, parts: &[&[u8]]) -> Tensor {
    let host = Tensor::empty(shape, (kind, Device::Cpu));
    // SAFETY: `host` was just allocated contiguous, and the caller checked that the parts
    // sum to its bytes; they are copied end to end without overlap.
    unsafe {
        let mut dst = host.data_ptr() as *mut u8;
        for p in parts {
            std::ptr::copy_nonoverlapping(p.as_ptr(), dst, p.len());
            dst = dst.add(p.len());
        }
    }
    host
}

/// libtorch errors carry a C++ backtrace after the first line; clients need the first line.
pub fn first_line(s: &str) -> &str {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s).trim()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_memory::Owner;
    use crate::tensor_cache::TensorCache;
    use crate::zoo::{self, Builtin, ZooOptions};
    use std::sync::Arc;

    fn output(model: &TorchModel, n: usize, inputs: &[Vec<Payload>], i420: bool) -> Vec<u8> {
        let done = model.execute(n, inputs, &[i420]).unwrap();
        assert_eq!(done.i420, [i420]);
        done.outputs[0].as_bytes().to_vec()
    }

    /// A batch mixing rows of a cached tensor (gathered from its device copy) with bytes
    /// from requests gives the output of the same data sent whole; asked for I420, the
    /// output is converted on the device exactly as the host converts it.
    #[tokio::test]
    async fn cached_rows_and_device_i420_match_bytes_and_the_host_conversion() {
        let tmp = tempfile::tempdir().unwrap();
        let crop = 16;
        let opts = ZooOptions {
            crop,
            max_batch_size: 4,
            max_queue_delay_us: 0,
        };
        let dir = zoo::write(tmp.path(), Builtin::Passthrough, &opts).unwrap();
        let config = crate::config::ModelConfig::load(&dir).unwrap();
        let face = config.inputs[0].element_bytes();
        let audio = Payload::Bytes(Bytes::from(vec![0u8; 4 * config.inputs[1].element_bytes()]));
        let model = TorchModel::load(&dir, config, Device::Cpu).unwrap();
        // Five random faces, registered.
        let mut state = 7u32;
        let faces: Vec<u8> = (0..5 * face)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 24) as u8
            })
            .collect();
        let cache = TensorCache::unmetered(Default::default());
        let owner = Owner::anonymous();
        let shape = [5, 6, crop, crop];
        cache
            .register(
                &owner,
                "local",
                "faces",
                "UINT8",
                shape.to_vec(),
                0,
                Bytes::from(faces.clone()),
            )
            .await
            .unwrap();
        let rows = |r: &str, n: i64| {
            let rows = cache
                .rows(&owner, "in", "faces", r, DataType::U8, &[n, 6, crop, crop])
                .unwrap();
            Payload::Rows(Arc::new(rows))
        };
        let row = |r: usize| Bytes::copy_from_slice(&faces[r * face..(r + 1) * face]);
        let mixed = vec![
            vec![rows("4,0", 2), Payload::Bytes(row(2)), rows("1", 1)],
            vec![audio.clone()],
        ];
        let whole = Bytes::from([row(4), row(0), row(2), row(1)].concat());
        let plain = vec![vec![Payload::Bytes(whole)], vec![audio]];
        let rgb = output(&model, 4, &plain, false);
        assert_eq!(output(&model, 4, &mixed, false), rgb);
        // The gather a CUDA device runs (from the tensor's copy there), here on the CPU.
        let spec = &model.config().inputs[0];
        let t = gathered_on(Device::Cpu, spec, Kind::Uint8, &mixed[0]).unwrap();
        let mut got = vec![0u8; 4 * face];
        t.copy_data_u8(&mut got, t.numel());
        assert_eq!(got, plain[0][0].to_bytes().to_vec());
        // Passthrough answers the first three channels: the rows really were gathered.
        assert_eq!(&rgb[..3 * face / 6], &row(4)[..3 * face / 6]);
        let (s, n) = (crop as usize, 4);
        let host = framecast_proto::i420::from_planar_rgb(&rgb, n, s, s);
        assert_eq!(output(&model, 4, &mixed, true), host);
        // The conversion a CUDA device runs, here on the CPU: the host's, bit for bit.
        let t = Tensor::from_slice(&rgb).reshape([n as i64, 3, crop, crop]);
        let on_device = to_i420(&t).unwrap();
        let mut got = vec![0u8; host.len()];
        on_device.copy_data_u8(&mut got, on_device.numel());
        assert_eq!(got, host);
    }
}

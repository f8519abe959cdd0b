//! One TorchScript module on one device: turns batched wire bytes into tensors, runs the
//! forward, and turns the outputs back into wire bytes, with u8 <-> float conversion done on
//! the device so the wire carries u8 rather than float32.

use crate::backend::{Backend, BackendError, ExecTimings, Executed, HostBytes};
use crate::config::{ModelConfig, Precision, TensorSpec, MODEL_FILE};
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
        let parts: Vec<Vec<Bytes>> = self
            .config
            .inputs
            .iter()
            .map(|t| vec![Bytes::from(vec![0u8; t.element_bytes() * batch])])
            .collect();
        self.execute(batch, &parts)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn input_tensor(
        &self,
        spec: &TensorSpec,
        batch: usize,
        parts: &[Bytes],
    ) -> Result<Tensor, String> {
        let kind = kind_of(spec.datatype).ok_or("unsupported datatype")?;
        let total: usize = parts.iter().map(Bytes::len).sum();
        if total != spec.element_bytes() * batch {
            return Err(format!(
                "input '{}': {} bytes for a batch of {}",
                spec.name, total, batch
            ));
        }
        let host = Tensor::empty(spec.batched_shape(batch), (kind, Device::Cpu));
        // SAFETY: `host` was just allocated contiguous with exactly `total` bytes, and the
        // parts are copied end to end without overlap; one copy, no intermediate Vec.
        unsafe {
            let mut dst = host.data_ptr() as *mut u8;
            for p in parts {
                std::ptr::copy_nonoverlapping(p.as_ptr(), dst, p.len());
                dst = dst.add(p.len());
            }
        }
        let t = host.to_device(self.device);
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
        let t = if spec.normalize {
            t.to_kind(float) * (1.0 / 255.0)
        } else if t.is_floating_point() && cast {
            t.to_kind(float)
        } else {
            t
        };
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
    fn execute(&self, batch: usize, inputs: &[Vec<Bytes>]) -> Result<Executed, BackendError> {
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
        let host = self
            .config
            .outputs
            .iter()
            .zip(outs)
            .map(|(spec, t)| host_output(spec, batch, t))
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

/// One output of a batch: contiguous on the host, in the datatype its config declares.
pub struct HostOutput {
    tensor: Tensor,
    len: usize,
}

impl HostBytes for HostOutput {
    /// The batch's output bytes, without a copy.
    fn as_bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `host_output` made the tensor contiguous on the CPU with `len` bytes of
        // elements at `data_ptr`; `self` owns the tensor, so the storage outlives the borrow,
        // and nothing writes to it once it is a `HostOutput`.
        unsafe { std::slice::from_raw_parts(self.tensor.data_ptr() as *const u8, self.len) }
    }
}

fn host_output(spec: &TensorSpec, batch: usize, t: Tensor) -> Result<HostOutput, String> {
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
    let t = if spec.normalize {
        (t.clamp(0.0, 1.0) * 255.0).round().to_kind(Kind::Uint8)
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
    let tensor = t.to_device(Device::Cpu).contiguous();
    let len = tensor.numel() * spec.datatype.size();
    Ok(HostOutput { tensor, len })
}

/// libtorch errors carry a C++ backtrace after the first line; clients need the first line.
pub fn first_line(s: &str) -> &str {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s).trim()
}

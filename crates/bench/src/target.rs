//! What a load run calls: a compositor `Render` stream or a KServe v2 inference server.

use crate::client::Authed;
use crate::report::Outcome;
use bytes::Bytes;
use framecast_proto::compositor::v1::{compositor_client::CompositorClient, RenderRequest, Tensor};
use framecast_proto::kserve::{
    grpc_inference_service_client::GrpcInferenceServiceClient,
    model_infer_request::InferInputTensor, ModelInferRequest, ModelMetadataRequest,
};
use framecast_proto::tensor::{self, DataType};
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Instant;
use tokio_stream::StreamExt;

/// One kind of call, made many times by the load engine.
pub trait Target: Send + Sync + 'static {
    /// Makes call number `seq` and reports how it went.
    fn call(self: Arc<Self>, seq: u64) -> BoxFuture<'static, Outcome>;
}

fn code_name(s: &tonic::Status) -> String {
    framecast_proto::status::label(s.code()).to_string()
}

/// Per-frame `audio` features [n, 32, 16, 16] (the shape the built-in models take).
pub fn audio(n: u32, seed: u64) -> Tensor {
    let per = 32 * 16 * 16;
    let v: Vec<f32> = (0..n as usize * per)
        .map(|i| ((i as u64 * 2654435761 + seed) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    Tensor {
        name: "audio".into(),
        datatype: DataType::F32.as_str().into(),
        shape: vec![n as i64, 32, 16, 16],
        data: tensor::encode(&v),
    }
}

/// `Render` requests of `chunk` frames on a fresh stream per call.
pub struct Compositor {
    pub client: CompositorClient<Authed>,
    pub avatar: String,
    pub chunk: u32,
    pub audio: Tensor,
    /// `RenderRequest.frame_format` (an `ImageFormat`; 0: JPEG).
    pub frame_format: i32,
}

impl Compositor {
    pub fn new(client: CompositorClient<Authed>, avatar: &str, chunk: u32) -> Self {
        Compositor {
            client,
            avatar: avatar.to_string(),
            chunk,
            audio: audio(chunk, 1),
            frame_format: 0,
        }
    }

    pub fn request(&self, id: String, start: u64) -> RenderRequest {
        RenderRequest {
            request_id: id,
            avatar_id: self.avatar.clone(),
            start_frame: start,
            frame_count: self.chunk,
            conditioning: vec![self.audio.clone()],
            jpeg_quality: 0,
            audio: None,
            idle: false,
            frame_format: self.frame_format,
            idle_frame_format: 0,
            frame_region: None,
            backgrounds_once: false,
            resend_backgrounds: false,
        }
    }
}

impl Target for Compositor {
    fn call(self: Arc<Self>, seq: u64) -> BoxFuture<'static, Outcome> {
        Box::pin(async move {
            let started = Instant::now();
            let req = self.request(format!("bench-{seq}"), seq * self.chunk as u64);
            let mut outcome = Outcome::default();
            let result = async {
                let mut stream = self
                    .client
                    .clone()
                    .render(tokio_stream::iter([req]))
                    .await?
                    .into_inner();
                while let Some(f) = stream.next().await {
                    let f = f?;
                    outcome.ttff.get_or_insert_with(|| started.elapsed());
                    outcome.frames += 1;
                    if let Some(t) = f.timings {
                        outcome.stage_frames += 1;
                        for (k, v) in [
                            ("queue", t.queue_us),
                            ("inference", t.inference_us),
                            ("blend", t.blend_us),
                            ("encode", t.encode_us),
                        ] {
                            match outcome.stages.iter_mut().find(|(n, _)| *n == k) {
                                Some((_, sum)) => *sum += v,
                                None => outcome.stages.push((k, v)),
                            }
                        }
                    }
                }
                Ok::<(), tonic::Status>(())
            }
            .await;
            outcome.latency = started.elapsed();
            if let Err(s) = result {
                outcome.error = Some(code_name(&s));
            } else if outcome.frames != self.chunk as u64 {
                outcome.error = Some(format!("ShortStream({} of {})", outcome.frames, self.chunk));
            }
            outcome
        })
    }
}

/// How to fill input tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fill {
    Zero,
    Random,
    /// Raw bytes repeated or cut to each input's size.
    File(std::path::PathBuf),
}

impl std::str::FromStr for Fill {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "zero" => Ok(Fill::Zero),
            "random" => Ok(Fill::Random),
            _ => s
                .strip_prefix("file:")
                .map(|p| Fill::File(p.into()))
                .ok_or_else(|| format!("data {s:?} is not zero, random or file:PATH")),
        }
    }
}

/// `ModelInfer` (or `ModelStreamInfer`) of one batch, shaped from the model's metadata.
pub struct Kserve {
    pub client: GrpcInferenceServiceClient<Authed>,
    pub request: ModelInferRequest,
    pub batch: u64,
    pub stream: bool,
}

impl Kserve {
    /// Reads the model's metadata and builds a batch-`batch` request with `fill` data.
    pub async fn new(
        mut client: GrpcInferenceServiceClient<Authed>,
        model: &str,
        batch: u64,
        fill: &Fill,
        stream: bool,
    ) -> anyhow::Result<Self> {
        let meta = client
            .model_metadata(ModelMetadataRequest {
                name: model.into(),
                version: String::new(),
            })
            .await?
            .into_inner();
        let file = match fill {
            Fill::File(p) => {
                Some(std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?)
            }
            _ => None,
        };
        let mut inputs = Vec::new();
        let mut raw = Vec::new();
        for (k, t) in meta.inputs.iter().enumerate() {
            let dt = DataType::parse(&t.datatype)
                .map_err(|e| anyhow::anyhow!("input '{}': {e}", t.name))?;
            let mut shape = t.shape.clone();
            if shape.first() == Some(&-1) {
                shape[0] = batch as i64;
            }
            if shape.iter().any(|&d| d < 0) {
                anyhow::bail!(
                    "input '{}' has variable dimensions {:?} beyond the batch",
                    t.name,
                    t.shape
                );
            }
            let n = tensor::byte_len(dt, &shape)?;
            let bytes: Vec<u8> = match (fill, &file) {
                (Fill::Zero, _) => vec![0; n],
                (_, Some(f)) if !f.is_empty() => f.iter().copied().cycle().take(n).collect(),
                // Floats get small finite values; integers any byte pattern.
                _ if dt == DataType::F32 => {
                    let v: Vec<f32> = (0..n / 4)
                        .map(|i| ((i * 7919 + k) % 1000) as f32 / 1000.0)
                        .collect();
                    tensor::encode(&v).to_vec()
                }
                _ => (0..n).map(|i| ((i * 31 + k * 7) % 251) as u8).collect(),
            };
            inputs.push(InferInputTensor::new(&t.name, dt, shape));
            raw.push(Bytes::from(bytes));
        }
        Ok(Kserve {
            client,
            request: ModelInferRequest {
                model_name: model.into(),
                inputs,
                raw_input_contents: raw,
                ..Default::default()
            },
            batch,
            stream,
        })
    }
}

impl Target for Kserve {
    fn call(self: Arc<Self>, seq: u64) -> BoxFuture<'static, Outcome> {
        Box::pin(async move {
            let started = Instant::now();
            let mut req = self.request.clone();
            req.id = seq.to_string();
            let result = if self.stream {
                // One request per stream keeps calls independent; the compositor's own client
                // is the one that multiplexes many on a long-lived stream.
                async {
                    let mut s = self
                        .client
                        .clone()
                        .model_stream_infer(tokio_stream::iter([req]))
                        .await?
                        .into_inner();
                    match s.next().await {
                        Some(Ok(r)) => match framecast_proto::status::from_stream_reply(&r) {
                            None => Ok(()),
                            Some(status) => Err(status),
                        },
                        Some(Err(e)) => Err(e),
                        None => Err(tonic::Status::unavailable(
                            "stream ended without a response",
                        )),
                    }
                }
                .await
            } else {
                self.client.clone().model_infer(req).await.map(|_| ())
            };
            let latency = started.elapsed();
            Outcome {
                latency,
                ttff: Some(latency),
                frames: if result.is_ok() { self.batch } else { 0 },
                error: result.err().map(|s| code_name(&s)),
                ..Default::default()
            }
        })
    }
}

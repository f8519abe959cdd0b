//! Client of the inference service: one kept-alive HTTP/2 channel (multiplexed, so batches in
//! flight share it), and the model metadata the compositor needs, fetched once per model.

use framecast_proto::kserve::{
    grpc_inference_service_client::GrpcInferenceServiceClient,
    model_metadata_response::TensorMetadata, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest,
};
use framecast_proto::tensor::DataType;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub keep_alive_interval: Duration,
    pub keep_alive_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_message_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            keep_alive_interval: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(5),
            max_message_bytes: framecast_proto::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

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
    fn from_metadata(
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
        let face = inputs
            .iter()
            .find(|t| image(t, 6))
            .ok_or_else(|| format!("model '{name}' has no UINT8 [-1, 6, S, S] face input"))?
            .clone();
        let output = outputs
            .iter()
            .find(|t| image(t, 3))
            .ok_or_else(|| format!("model '{name}' has no UINT8 [-1, 3, S, S] output"))?;
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

#[derive(Clone)]
pub struct InferenceClient {
    client: GrpcInferenceServiceClient<Channel>,
    info: Arc<Mutex<HashMap<String, Arc<ModelInfo>>>>,
}

impl InferenceClient {
    /// A client for `url` (e.g. `http://127.0.0.1:8001`); connects on first use and
    /// reconnects by itself.
    pub fn connect_lazy(url: &str, opts: &ClientOptions) -> Result<Self, String> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| format!("inference endpoint {url:?}: {e}"))?
            .connect_timeout(opts.connect_timeout)
            .http2_keep_alive_interval(opts.keep_alive_interval)
            .keep_alive_timeout(opts.keep_alive_timeout)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(64 << 20))
            .tcp_nodelay(true);
        let client = GrpcInferenceServiceClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(opts.max_message_bytes)
            .max_encoding_message_size(opts.max_message_bytes);
        Ok(InferenceClient {
            client,
            info: Arc::default(),
        })
    }

    /// Metadata of `model`, cached after the first call.
    pub async fn model_info(&self, model: &str) -> Result<Arc<ModelInfo>, Status> {
        if let Some(i) = self.info.lock().get(model) {
            return Ok(i.clone());
        }
        let meta = self
            .client
            .clone()
            .model_metadata(ModelMetadataRequest {
                name: model.to_string(),
                version: String::new(),
            })
            .await?
            .into_inner();
        let info = Arc::new(
            ModelInfo::from_metadata(model, meta.inputs, &meta.outputs)
                .map_err(Status::failed_precondition)?,
        );
        self.info.lock().insert(model.to_string(), info.clone());
        Ok(info)
    }

    pub async fn infer(&self, req: ModelInferRequest) -> Result<ModelInferResponse, Status> {
        Ok(self.client.clone().model_infer(req).await?.into_inner())
    }
}

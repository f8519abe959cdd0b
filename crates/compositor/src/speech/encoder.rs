//! Mel windows of every audio session embedded together: one task per encoder model collects
//! the windows sessions need, for up to `wait` or until `max_batch` windows, and sends them as
//! one inference request, so a GPU batch holds the windows of many sessions even when their
//! frames complete a few milliseconds apart.

use crate::inference::{EncoderInfo, Expected, InferenceClient};
use crate::metrics::Metrics;
use framecast_audio::window::WINDOW;
use framecast_audio::N_MELS;
use framecast_proto::kserve::{model_infer_request::InferInputTensor, ModelInferRequest};
use framecast_proto::tensor::{self, DataType};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

/// One session's windows to embed: `n` windows of 80 x 16 values, band-major.
struct Ask {
    windows: Vec<f32>,
    n: usize,
    deadline: Option<Instant>,
    reply: oneshot::Sender<Result<Vec<f32>, Status>>,
}

/// The encoder batchers of a compositor, one per encoder model, started on first use.
#[derive(Clone)]
pub struct Encoders {
    client: InferenceClient,
    metrics: Arc<Metrics>,
    max_batch: usize,
    wait: Duration,
    queues: Arc<Mutex<HashMap<String, mpsc::Sender<Ask>>>>,
}

impl Encoders {
    /// Batches of at most `max_batch` windows, collected for at most `wait`.
    pub fn new(
        client: InferenceClient,
        metrics: Arc<Metrics>,
        max_batch: usize,
        wait: Duration,
    ) -> Self {
        Encoders {
            client,
            metrics,
            max_batch: max_batch.max(1),
            wait,
            queues: Arc::default(),
        }
    }

    /// The embeddings of `n` windows (`n * info.width` values), computed in a batch shared
    /// with the other sessions asking at about the same time.
    pub async fn embed(
        &self,
        info: &Arc<EncoderInfo>,
        windows: Vec<f32>,
        n: usize,
        deadline: Option<Instant>,
    ) -> Result<Vec<f32>, Status> {
        let (reply, rx) = oneshot::channel();
        let ask = Ask {
            windows,
            n,
            deadline,
            reply,
        };
        self.queue(info)
            .send(ask)
            .await
            .map_err(|_| Status::internal("the audio-encoder batcher stopped"))?;
        rx.await
            .map_err(|_| Status::internal("the audio-encoder batcher dropped a request"))?
    }

    fn queue(&self, info: &Arc<EncoderInfo>) -> mpsc::Sender<Ask> {
        let mut queues = self.queues.lock();
        if let Some(q) = queues.get(&info.name).filter(|q| !q.is_closed()) {
            return q.clone();
        }
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(collect(self.clone(), info.clone(), rx));
        queues.insert(info.name.clone(), tx.clone());
        tx
    }
}

/// Gathers asks into batches and sends each on its own task.
async fn collect(enc: Encoders, info: Arc<EncoderInfo>, mut rx: mpsc::Receiver<Ask>) {
    let mut carried: Option<Ask> = None;
    loop {
        let first = match carried.take() {
            Some(a) => a,
            None => match rx.recv().await {
                Some(a) => a,
                None => return,
            },
        };
        let until = tokio::time::Instant::now() + enc.wait;
        let mut n = first.n;
        let mut batch = vec![first];
        while n < enc.max_batch {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(a)) if n + a.n > enc.max_batch => {
                    carried = Some(a);
                    break;
                }
                Ok(Some(a)) => {
                    n += a.n;
                    batch.push(a);
                }
                Ok(None) | Err(_) => break,
            }
        }
        tokio::spawn(run(enc.clone(), info.clone(), batch, n));
    }
}

/// One request for every window of `batch`; each ask gets its share or the error.
async fn run(enc: Encoders, info: Arc<EncoderInfo>, batch: Vec<Ask>, n: usize) {
    enc.metrics
        .encoder_batch_sessions
        .observe(batch.len() as f64);
    let mut data = Vec::with_capacity(n * N_MELS * WINDOW);
    for a in &batch {
        data.extend_from_slice(&a.windows);
    }
    let mut shape = info.input_shape.clone();
    shape[0] = n as i64;
    let request = ModelInferRequest {
        model_name: info.name.clone(),
        inputs: vec![InferInputTensor::new(&info.input, DataType::F32, shape)],
        raw_input_contents: vec![tensor::encode(&data)],
        ..Default::default()
    };
    let expected = Expected {
        output: info.output.clone(),
        bytes: n * info.width * 4,
        i420: false,
    };
    let deadline = crate::inference::latest_deadline(batch.iter().map(|a| a.deadline));
    let result = enc
        .client
        .infer(request, None, &expected, deadline)
        .await
        .and_then(|r| {
            let idx = r
                .outputs
                .iter()
                .position(|o| o.name == info.output)
                .ok_or_else(|| Status::internal(format!("no output '{}'", info.output)))?;
            let raw = r
                .raw_output_contents
                .get(idx)
                .ok_or_else(|| Status::internal("no raw output"))?;
            let values = tensor::decode::<f32>(DataType::F32, raw)
                .map_err(|e| Status::internal(e.to_string()))?;
            if values.len() != n * info.width {
                return Err(Status::internal(format!(
                    "{} values for {n} embeddings of {}",
                    values.len(),
                    info.width
                )));
            }
            Ok(values)
        });
    let mut at = 0;
    for a in batch {
        let share = match &result {
            Ok(v) => Ok(v[at * info.width..(at + a.n) * info.width].to_vec()),
            Err(s) => Err(Status::new(s.code(), s.message().to_string())),
        };
        at += a.n;
        let _ = a.reply.send(share);
    }
}

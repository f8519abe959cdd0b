//! Served throughput versus the same model in-process, and the transport cost of a batch.
//!
//! `cargo bench -p framecast-inference --bench served_vs_inprocess` (or `make bench`):
//! 1. in-process: `lipsync-ref` executed in a loop at batch B on one worker, frames/s;
//! 2. served: the same model behind gRPC with dynamic batching, C clients each sending
//!    batch-B requests back to back (saturation), frames/s; the ratio served / in-process;
//! 3. transport: one client, sequential batch-B requests; client round trip minus the
//!    server's compute time (the `framecast_compute_ns` response parameter), median;
//! 4. the same over system shared memory (client and server on one host): the client copies
//!    the batch into a registered object and the result out of it inside the timed round trip,
//!    gRPC carries only the request's description.
//!
//! Env: BENCH_MODEL (lipsync-ref, or passthrough to isolate transport from compute),
//! BENCH_BATCH (24), BENCH_SECONDS per phase (20), BENCH_CLIENTS (2), BENCH_OUT (file for the
//! JSON report). Under `cargo test` it runs a seconds-long smoke pass on a tiny model.

use bytes::Bytes;
use framecast_inference::backend::{Backend, Payload};
use framecast_inference::config::ModelConfig;
use framecast_inference::models::{ExecOptions, ModelManager};
use framecast_inference::repository::Repository;
use framecast_inference::rpc::{PARAM_COMPUTE_NS, PARAM_QUEUE_NS};
use framecast_inference::server::{self, ServeOptions};
use framecast_inference::torch_model::TorchModel;
use framecast_inference::zoo::{self, Builtin, ZooOptions};
use framecast_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use framecast_proto::kserve::infer_parameter::ParameterChoice;
use framecast_proto::kserve::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use framecast_proto::kserve::{ModelInferRequest, SystemSharedMemoryRegisterRequest};
use framecast_proto::shm::{tensor_params, OwnedObject};
use framecast_proto::tensor::DataType;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Medians of one sequential series, in ms.
struct Trip {
    /// Round trip minus server compute.
    transport: f64,
    rtt: f64,
    /// The part of `transport` spent in the server's batch queue (hand-off to a worker).
    queue: f64,
}

/// Sequential requests for about `seconds`. `before` and `after` run inside the timed span.
async fn transport(
    client: &GrpcInferenceServiceClient<Channel>,
    seconds: f64,
    mut before: impl FnMut() -> anyhow::Result<ModelInferRequest>,
    mut after: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Trip> {
    let (mut transport, mut rtts, mut queue) = (Vec::new(), Vec::new(), Vec::new());
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds || transport.len() < 3 {
        let t = Instant::now();
        let request = before()?;
        let resp = client.clone().model_infer(request).await?.into_inner();
        after()?;
        let rtt = t.elapsed();
        let param = |name: &str| match resp
            .parameters
            .get(name)
            .and_then(|p| p.parameter_choice.clone())
        {
            Some(ParameterChoice::Int64Param(ns)) => Ok(Duration::from_nanos(ns as u64)),
            _ => anyhow::bail!("response lacks {name}"),
        };
        let compute = param(PARAM_COMPUTE_NS)?;
        queue.push(param(PARAM_QUEUE_NS)?.as_secs_f64() * 1e3);

        transport.push((rtt.saturating_sub(compute)).as_secs_f64() * 1e3);
        rtts.push(rtt.as_secs_f64() * 1e3);
    }
    Ok(Trip {
        transport: median(&mut transport),
        rtt: median(&mut rtts),
        queue: median(&mut queue),
    })
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let (model, batch, seconds, clients) = if full {
        let model = match std::env::var("BENCH_MODEL").as_deref() {
            Ok("passthrough") => Builtin::Passthrough,
            _ => Builtin::LipsyncRef,
        };
        (
            model,
            env("BENCH_BATCH", 24usize),
            env("BENCH_SECONDS", 20.0f64),
            env("BENCH_CLIENTS", 2usize),
        )
    } else {
        (Builtin::Passthrough, 2, 0.5, 2)
    };
    let tmp = tempfile::tempdir()?;
    let opts = ZooOptions {
        // Every model at the lipsync crop, so payloads match the reference workload.
        crop: if full { 320 } else { 64 },
        max_batch_size: batch,
        max_queue_delay_us: 2000,
    };
    let dir = zoo::write(tmp.path(), model, &opts)?;
    let config = ModelConfig::load(&dir)?;
    let crop = config.inputs[0].dims[1];
    let b = batch as i64;
    let face = Bytes::from(
        (0..config.inputs[0].element_bytes() * batch)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<_>>(),
    );
    let audio = Bytes::from(vec![0u8; config.inputs[1].element_bytes() * batch]);
    println!(
        "model {} at batch {batch}, crop {crop}, {seconds} s per phase",
        model.name()
    );

    // 1. In-process loop on one worker thread, gradients off, as the server's workers run.
    let in_process_fps = {
        let _no_grad = tch::no_grad_guard();
        let m =
            TorchModel::load(&dir, config.clone(), tch::Device::Cpu).map_err(anyhow::Error::msg)?;
        m.warm_up(batch).map_err(anyhow::Error::msg)?;
        let inputs = vec![
            vec![Payload::Bytes(face.clone())],
            vec![Payload::Bytes(audio.clone())],
        ];
        let mut per_batch = Vec::new();
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < seconds || per_batch.len() < 3 {
            let t = Instant::now();
            m.execute(batch, &inputs, &[]).map_err(anyhow::Error::msg)?;
            per_batch.push(t.elapsed().as_secs_f64());
        }
        batch as f64 / median(&mut per_batch)
    };
    println!("in-process   {in_process_fps:>9.2} frames/s");

    let rt = tokio::runtime::Runtime::new()?;
    let out_bytes = batch * config.outputs[0].element_bytes();
    let (served_fps, grpc, shm, place) = rt.block_on(async {
        let models = Arc::new(ModelManager::new(
            Repository::open(tmp.path())?,
            ExecOptions::default(),
            true,
            Default::default(),
        ));
        let running = server::spawn_on_loopback(models, ServeOptions::default()).await?;
        let channel = tonic::transport::Endpoint::from_shared(running.url())?
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(64 << 20))
            .max_frame_size(1u32 << 20)
            .tcp_nodelay(true)
            .connect()
            .await?;
        let client = GrpcInferenceServiceClient::new(channel)
            .max_decoding_message_size(framecast_proto::DEFAULT_MAX_MESSAGE_BYTES)
            .max_encoding_message_size(framecast_proto::DEFAULT_MAX_MESSAGE_BYTES);
        let request = ModelInferRequest {
            model_name: model.name().into(),
            inputs: vec![
                InferInputTensor::new("face", DataType::U8, vec![b, 6, crop, crop]),
                InferInputTensor::new("audio", DataType::F32, vec![b, 32, 16, 16]),
            ],
            raw_input_contents: vec![face.clone(), audio.clone()],
            ..Default::default()
        };
        client.clone().model_infer(request.clone()).await?;

        // 2. Saturation: C clients back to back.
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (mut c, r) = (client.clone(), request.clone());
            tasks.push(tokio::spawn(async move {
                let mut frames = 0usize;
                while start.elapsed().as_secs_f64() < seconds || frames == 0 {
                    c.model_infer(r.clone()).await?;
                    frames += batch;
                }
                anyhow::Ok(frames)
            }));
        }
        let mut frames = 0;
        for t in tasks {
            frames += t.await??;
        }
        let served = frames as f64 / start.elapsed().as_secs_f64();

        // 3. Transport: sequential requests, round trip minus server compute.
        let grpc = transport(&client, seconds / 2.0, || Ok(request.clone()), || Ok(())).await?;

        // 4. The same through a registered shared-memory object.
        let in_bytes = face.len() + audio.len();
        let key = format!("/framecast_bench_{}", std::process::id());
        let object = OwnedObject::create(&key, (in_bytes + out_bytes) as u64)?;
        client
            .clone()
            .system_shared_memory_register(SystemSharedMemoryRegisterRequest {
                name: "bench".into(),
                key: key.clone(),
                offset: 0,
                byte_size: (in_bytes + out_bytes) as u64,
            })
            .await?;
        let mut shm_request = request.clone();
        shm_request.raw_input_contents.clear();
        shm_request.inputs[0].parameters = tensor_params("bench", face.len(), 0);
        shm_request.inputs[1].parameters = tensor_params("bench", audio.len(), face.len());
        shm_request.outputs = vec![InferRequestedOutputTensor {
            name: config.outputs[0].name.clone(),
            parameters: tensor_params("bench", out_bytes, in_bytes),
        }];
        let mut result = vec![0u8; out_bytes];
        let map = object.mapping();
        map.write(0, &face)?;
        map.write(face.len(), &audio)?;
        // A producer that builds crops straight into the region and a consumer that blends
        // straight out of it copy nothing: only the server's output write remains.
        let in_place = transport(
            &client,
            seconds / 2.0,
            || Ok(shm_request.clone()),
            || Ok(()),
        )
        .await?;
        let shm = transport(
            &client,
            seconds / 2.0,
            || {
                map.write(0, &face)?;
                map.write(face.len(), &audio)?;
                Ok(shm_request.clone())
            },
            || Ok(map.read(in_bytes, &mut result)?),
        )
        .await?;
        anyhow::Ok((served, grpc, shm, in_place))
    })?;
    let ratio = served_fps / in_process_fps;
    println!("served       {served_fps:>9.2} frames/s ({clients} clients)");
    println!("ratio        {ratio:>9.3} served / in-process (target >= 0.95)");
    let line = |t: &Trip, how: &str| {
        println!(
            "transport    {:>9.2} ms per {batch}-frame batch {how}, median (round trip {:.1} ms minus server compute; {:.2} ms of it in the batch queue)",
            t.transport, t.rtt, t.queue
        )
    };
    line(&grpc, "over gRPC");
    line(
        &shm,
        "over shared memory, client copies in and out included",
    );
    line(
        &place,
        "over shared memory, tensors produced and consumed in place",
    );
    println!("target       transport <= 5 ms");
    let bytes_each_way = (face.len() + audio.len(), out_bytes);
    println!(
        "payload      {:.1} MB in, {:.1} MB out",
        bytes_each_way.0 as f64 / 1e6,
        bytes_each_way.1 as f64 / 1e6
    );
    if let Ok(path) = std::env::var("BENCH_OUT") {
        let json = format!(
            "{{\"model\":\"{}\",\"batch\":{batch},\"clients\":{clients},\"seconds\":{seconds},\"in_process_fps\":{in_process_fps:.3},\"served_fps\":{served_fps:.3},\"ratio\":{ratio:.4},\"transport_ms_median\":{:.3},\"rtt_ms_median\":{:.3},\"queue_ms_median\":{:.3},\"shm_transport_ms_median\":{:.3},\"shm_rtt_ms_median\":{:.3},\"shm_in_place_transport_ms_median\":{:.3},\"shm_in_place_rtt_ms_median\":{:.3}}}\n",
            model.name(),
            grpc.transport,
            grpc.rtt,
            grpc.queue,
            shm.transport,
            shm.rtt,
            place.transport,
            place.rtt
        );
        std::fs::write(&path, json)?;
        println!("wrote {path}");
    }
    Ok(())
}

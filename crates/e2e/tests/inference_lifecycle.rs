//! Model lifecycle under a memory budget: LRU eviction, pinning, in-flight protection, and
//! models too large to ever fit. Real TorchScript models, real gRPC on loopback.

use bytes::Bytes;
use framecast_e2e::{kserve_client, spawn_inference_with};
use framecast_inference::metrics::Metrics;
use framecast_inference::models::ExecOptions;
use framecast_inference::server::Running;
use framecast_inference::zoo::{self, Builtin, ZooOptions};
use framecast_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use framecast_proto::kserve::model_infer_request::InferInputTensor;
use framecast_proto::kserve::{
    ModelInferRequest, ModelStatisticsRequest, RepositoryIndexRequest, RepositoryModelLoadRequest,
};
use framecast_proto::tensor::DataType;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::Code;

const CROP: i64 = 16;
const MIB: u64 = 1 << 20;

/// `passthrough` copied under each name; `delay_us` sets each copy's batching delay.
fn repo_with(root: &Path, models: &[(&str, u64)]) {
    let src = root.join("src");
    zoo::write(
        &src,
        Builtin::Passthrough,
        &ZooOptions {
            crop: CROP,
            max_batch_size: 4,
            max_queue_delay_us: 0,
        },
    )
    .unwrap();
    for (name, delay) in models {
        let dir = root.join("repo").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(src.join("passthrough/model.pt"), dir.join("model.pt")).unwrap();
        let config = std::fs::read_to_string(src.join("passthrough/config.toml"))
            .unwrap()
            .replace(
                "max_queue_delay_us = 0",
                &format!("max_queue_delay_us = {delay}"),
            );
        std::fs::write(dir.join("config.toml"), config).unwrap();
    }
}

async fn start(
    root: &Path,
    budget: u64,
    pinned: &[&str],
) -> (Running, GrpcInferenceServiceClient<Channel>, Arc<Metrics>) {
    let exec = ExecOptions {
        memory_budget: Some(budget),
        model_overhead: MIB,
        pinned: pinned.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    start_with(root, exec).await
}

/// A server over `root/repo` with `exec`.
async fn start_with(
    root: &Path,
    exec: ExecOptions,
) -> (Running, GrpcInferenceServiceClient<Channel>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let repo = root.join("repo");
    let running = spawn_inference_with(&repo, exec, metrics.clone(), Default::default()).await;
    let client = kserve_client(running.url()).await;
    (running, client, metrics)
}

fn request(model: &str) -> ModelInferRequest {
    request_at(model, CROP)
}

/// One frame of face crops of size `crop` and silent audio.
fn request_at(model: &str, crop: i64) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![
            InferInputTensor::new("face", DataType::U8, vec![1, 6, crop, crop]),
            InferInputTensor::new("audio", DataType::F32, vec![1, 32, 16, 16]),
        ],
        raw_input_contents: vec![
            Bytes::from(vec![9u8; 6 * (crop * crop) as usize]),
            Bytes::from(vec![0u8; 32 * 16 * 16 * 4]),
        ],
        ..Default::default()
    }
}

async fn states(client: &mut GrpcInferenceServiceClient<Channel>) -> Vec<(String, String)> {
    let index = client
        .repository_index(RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner();
    index
        .models
        .into_iter()
        .map(|m| (m.name, m.state))
        .collect()
}

fn state_of(states: &[(String, String)], name: &str) -> String {
    states
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_recently_used_is_evicted_and_pinned_survives() {
    let tmp = tempfile::tempdir().unwrap();
    repo_with(tmp.path(), &[("p", 0), ("a", 0), ("b", 0), ("c", 0)]);
    // Room for two models of ~1 MiB each.
    let (_s, mut client, metrics) = start(tmp.path(), 2 * MIB + MIB / 2, &["p"]).await;
    for m in ["p", "a"] {
        client.model_infer(request(m)).await.unwrap();
    }
    client.model_infer(request("b")).await.unwrap();
    let s = states(&mut client).await;
    assert_eq!(state_of(&s, "p"), "READY", "{s:?}");
    assert_eq!(state_of(&s, "a"), "UNLOADED", "{s:?}");
    assert_eq!(state_of(&s, "b"), "READY", "{s:?}");
    // Use b, then c must evict b (p is pinned even though it is the least recently used).
    client.model_infer(request("c")).await.unwrap();
    let s = states(&mut client).await;
    assert_eq!(state_of(&s, "p"), "READY", "{s:?}");
    assert_eq!(state_of(&s, "b"), "UNLOADED", "{s:?}");
    assert_eq!(metrics.evictions.get(), 2);

    // The same figures are on /metrics.
    let addr = framecast_telemetry::serve_metrics(
        "127.0.0.1:0".parse().unwrap(),
        metrics.registry.clone(),
        framecast_telemetry::MetricsAccess::new(None, None, false),
    )
    .await
    .unwrap();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).await.unwrap();
    assert!(
        body.contains("framecast_inference_evictions_total 2"),
        "{body}"
    );
    assert!(
        body.contains("framecast_inference_models_loaded 2"),
        "{body}"
    );
    assert!(
        body.contains("framecast_inference_requests_total{model=\"c\",outcome=\"ok\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("framecast_inference_request_seconds_count{model=\"c\"} 1"),
        "{body}"
    );
}

/// Two devices with two instances each: a model loads four workers on one queue and serves
/// concurrent requests (the batcher's unit tests show workers sharing a queue), and the budget
/// is per device and charges each copy of the module there: the two "devices" here are the
/// same CPU, so a model is charged four copies, and its statistics say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_devices_and_instances_serve_one_queue_under_a_per_device_budget() {
    let tmp = tempfile::tempdir().unwrap();
    repo_with(tmp.path(), &[("a", 0), ("b", 0), ("c", 0)]);
    let exec = ExecOptions {
        devices: vec![tch::Device::Cpu, tch::Device::Cpu],
        instances: 2,
        memory_budget: Some(10 * MIB),
        model_overhead: MIB,
        ..Default::default()
    };
    let (_s, mut client, metrics) = start_with(tmp.path(), exec).await;
    let calls = (0..16).map(|_| {
        let mut c = client.clone();
        async move { c.model_infer(request("a")).await.map(|_| ()) }
    });
    for r in futures::future::join_all(calls).await {
        r.unwrap();
    }
    let stats = client
        .model_statistics(framecast_proto::kserve::ModelStatisticsRequest {
            name: "a".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let usage = &stats.model_stats[0].memory_usage;
    assert_eq!(usage.len(), 1, "one device: {usage:?}");
    assert!(
        (4 * MIB..5 * MIB).contains(&(usage[0].byte_size as u64)),
        "four copies of a ~1 MiB model: {usage:?}"
    );
    // Two models of four ~1 MiB copies fit a 10 MiB budget per device; the third evicts the
    // first.
    client.model_infer(request("b")).await.unwrap();
    let s = states(&mut client).await;
    assert_eq!(
        (state_of(&s, "a"), state_of(&s, "b")),
        ("READY".into(), "READY".into()),
        "{s:?}"
    );
    client.model_infer(request("c")).await.unwrap();
    let s = states(&mut client).await;
    assert_eq!(state_of(&s, "a"), "UNLOADED", "{s:?}");
    assert_eq!(metrics.evictions.get(), 1);
}

/// Each model has a health name: NOT_SERVING until it is loaded and warmed, SERVING then,
/// NOT_SERVING again once unloaded; the server's own name stays SERVING throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_health_names_follow_the_models() {
    use framecast_proto::kserve::RepositoryModelUnloadRequest;
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};
    let tmp = tempfile::tempdir().unwrap();
    repo_with(tmp.path(), &[("a", 0)]);
    let (server, mut client, _) = start(tmp.path(), 64 * MIB, &[]).await;
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel);
    let status = |name: &'static str| {
        let mut h = health.clone();
        async move {
            h.check(tonic_health::pb::HealthCheckRequest {
                service: name.into(),
            })
            .await
            .map(|r| r.into_inner().status)
            .unwrap_or(-1)
        }
    };
    let within = Duration::from_secs(10);
    let serving = ServingStatus::Serving as i32;
    let not_serving = ServingStatus::NotServing as i32;
    let before =
        framecast_e2e::stack::poll_until(within, || status("a"), |s| *s == not_serving).await;
    assert_eq!(before, not_serving, "before loading");
    client.model_infer(request("a")).await.unwrap();
    let loaded = framecast_e2e::stack::poll_until(within, || status("a"), |s| *s == serving).await;
    assert_eq!(loaded, serving, "once loaded");
    client
        .repository_model_unload(RepositoryModelUnloadRequest {
            model_name: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let after =
        framecast_e2e::stack::poll_until(within, || status("a"), |s| *s == not_serving).await;
    assert_eq!(after, not_serving, "after unloading");
    assert_eq!(status("").await, serving, "the server itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_with_requests_in_flight_is_not_evicted() {
    let tmp = tempfile::tempdir().unwrap();
    // "slow" holds each request 1.5 s waiting for batch-mates: a request in flight.
    repo_with(tmp.path(), &[("slow", 1_500_000), ("a", 0)]);
    let (_s, mut client, _) = start(tmp.path(), MIB + MIB / 2, &[]).await;
    client.model_infer(request("slow")).await.unwrap();
    let mut c = client.clone();
    let in_flight = tokio::spawn(async move { c.model_infer(request("slow")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = client.model_infer(request("a")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("pinned or in use"), "{}", e.message());
    in_flight.await.unwrap().unwrap();
    // Idle now: "slow" gives way.
    client.model_infer(request("a")).await.unwrap();
    let s = states(&mut client).await;
    assert_eq!(state_of(&s, "slow"), "UNLOADED", "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_cannot_fit_alone_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    repo_with(tmp.path(), &[("a", 0)]);
    let (_s, mut client, metrics) = start(tmp.path(), MIB / 2, &[]).await;
    let e = client
        .repository_model_load(RepositoryModelLoadRequest {
            model_name: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("budget"), "{}", e.message());
    assert_eq!(metrics.loads.with_label_values(&["refused"]).get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_past_their_timeout_are_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    repo_with(tmp.path(), &[("slow", 1_000_000)]);
    let (_s, mut client, _) = start(tmp.path(), 64 * MIB, &[]).await;
    client.model_infer(request("slow")).await.unwrap();
    // The first request waits up to 1 s for batch-mates; the second, with a 100 ms timeout,
    // joins its batch and has expired by the time the batch is ready to run.
    let mut c = client.clone();
    let first = tokio::spawn(async move { c.model_infer(request("slow")).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut r = request("slow");
    r.parameters.insert(
        "timeout".into(),
        framecast_proto::kserve::InferParameter {
            parameter_choice: Some(
                framecast_proto::kserve::infer_parameter::ParameterChoice::Int64Param(100_000),
            ),
        },
    );
    let e = client.model_infer(r).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    first.await.unwrap().unwrap();
}

/// Admission: with room for one waiting request, a third request while one runs and one waits
/// is refused at once with RESOURCE_EXHAUSTED; the two admitted ones complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    // lipsync-ref on CPU takes most of a second per frame: a worker busy long enough.
    let opts = ZooOptions {
        crop: zoo::LIPSYNC_CROP,
        max_batch_size: 1,
        max_queue_delay_us: 0,
    };
    zoo::write(&repo, Builtin::LipsyncRef, &opts).unwrap();
    let exec = ExecOptions {
        max_queue: 1,
        ..Default::default()
    };
    let (_s, client, metrics) = start_with(tmp.path(), exec).await;
    let lipsync = || request_at("lipsync-ref", zoo::LIPSYNC_CROP);
    client
        .clone()
        .repository_model_load(RepositoryModelLoadRequest {
            model_name: "lipsync-ref".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Each step waits for the server to reach the state the next one needs, rather than
    // sleeping: a fixed sleep raced the model (~0.3 s a frame) on a busy machine.
    let started_batches = || {
        let mut c = client.clone();
        async move {
            let req = ModelStatisticsRequest {
                name: "lipsync-ref".into(),
                version: String::new(),
            };
            let stats = c.model_statistics(req).await.unwrap().into_inner();
            let queue = stats.model_stats[0]
                .inference_stats
                .as_ref()
                .unwrap()
                .queue
                .as_ref();
            queue.map_or(0, |q| q.count)
        }
    };
    let before = started_batches().await;
    let (mut a, mut b) = (client.clone(), client.clone());
    let (ra, rb) = (lipsync(), lipsync());
    let running = tokio::spawn(async move { a.model_infer(ra).await });
    let until = Instant::now() + Duration::from_secs(10);
    while started_batches().await == before && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let waiting = tokio::spawn(async move { b.model_infer(rb).await });
    let depth = metrics.queue_depth.with_label_values(&["lipsync-ref"]);
    while depth.get() != 1 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let e = client.clone().model_infer(lipsync()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("queue full"), "{}", e.message());
    assert_eq!(depth.get(), 1, "one request waits behind the running one");
    running.await.unwrap().unwrap();
    waiting.await.unwrap().unwrap();
    assert_eq!(depth.get(), 0, "nothing waits once both ran");
    assert_eq!(metrics.queue_capacity.get(), 1);
    assert_eq!(
        metrics
            .requests
            .with_label_values(&["lipsync-ref", "resource_exhausted"])
            .get(),
        1
    );
}

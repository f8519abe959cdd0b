//! The services as real processes, for the faults a process can suffer: an inference replica
//! killed with SIGKILL under load, the only replica restarted under an open stream, and SIGTERM ending both services with exit status 0 once
//! their in-flight work is done; and the one-shot subcommands' exit when their reader leaves.

use framecast_compositor::inference::{ClientOptions, InferenceClient};
use framecast_e2e::{count_in_order, passthrough_stats, request, spawn_compositor, write_fixtures};
use framecast_proto::compositor::v1::compositor_client::CompositorClient;
use framecast_proto::compositor::v1::RenderedFrame;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};

const INFERENCE: &str = env!("CARGO_BIN_EXE_inference-process");
const COMPOSITOR: &str = env!("CARGO_BIN_EXE_compositor-process");

/// A loopback address nothing listens on at the moment.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
}

/// A service process; killed if the test ends without stopping it.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn start(name: &'static str, bin: &str, args: &[String]) -> Proc {
        Proc::start_logging(name, bin, args, "warn", Stdio::inherit())
    }

    /// A process logging at `level` to `stderr`.
    fn start_logging(
        name: &'static str,
        bin: &str,
        args: &[String],
        level: &str,
        stderr: Stdio,
    ) -> Proc {
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", level)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {bin}: {e}"));
        Proc { name, child }
    }

    /// An inference process on `addr`, once it answers health checks.
    async fn serving_inference(models: &Path, addr: SocketAddr) -> Proc {
        let mut p = Proc::inference(models, addr);
        p.wait_serving(addr).await;
        p
    }

    fn inference(models: &Path, addr: SocketAddr) -> Proc {
        Proc::start("inference", INFERENCE, &inference_args(models, addr))
    }

    /// Waits until the process's gRPC health service answers SERVING.
    async fn wait_serving(&mut self, addr: SocketAddr) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("{} exited before serving: {status}", self.name);
            }
            let url = format!("http://{addr}");
            if let Ok(channel) = tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .connect()
                .await
            {
                let status = HealthClient::new(channel)
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await;
                if status.is_ok_and(|s| s.into_inner().status == ServingStatus::Serving as i32) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{} not serving on {addr} after 60 s", self.name);
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.name);
    }

    /// The exit status, waiting at most `limit` (a hang fails the test rather than CI).
    async fn exit_within(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "{} still running {limit:?} after the signal",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn inference_args(models: &Path, addr: SocketAddr) -> Vec<String> {
    let args = [
        "serve",
        "--repository",
        &models.display().to_string(),
        "--listen",
        &addr.to_string(),
        "--metrics-listen",
        "127.0.0.1:0",
        "--torch-threads",
        "1",
    ];
    args.map(String::from).to_vec()
}

/// `serve` of the avatars under `avatars` over the replica at `inference`, on `addr`, with
/// `extra` flags.
fn compositor_args(
    avatars: &Path,
    inference: &str,
    addr: SocketAddr,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "serve",
        "--avatars",
        &avatars.display().to_string(),
        "--inference",
        inference,
        "--listen",
        &addr.to_string(),
        "--metrics-listen",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A Render stream asking for frames `0..n` of the `small` avatar.
async fn render_small(
    client: &CompositorClient<Channel>,
    n: u32,
) -> tonic::Streaming<RenderedFrame> {
    client
        .clone()
        .render(tokio_stream::iter(vec![request("small", 0, n)]))
        .await
        .unwrap()
        .into_inner()
}

/// How many batches a server has executed for `passthrough`.
async fn executions(addr: SocketAddr) -> u64 {
    passthrough_stats(format!("http://{addr}")).await.0
}

/// SIGKILL to one of two replicas while 200 frames render: every frame arrives once and in
/// order (the dead replica's batches are retried on the other), and the replica is used again
/// once a new process listens on its address.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_inference_process_killed_under_load_loses_no_frames() {
    let tmp = tempfile::tempdir().unwrap();
    let (models, avatars) = write_fixtures(tmp.path(), 1000);
    let a_addr = free_addr();
    let mut a = Proc::serving_inference(&models, a_addr).await;
    let b = framecast_e2e::spawn_inference(&models, Default::default()).await;
    let client_opts = ClientOptions {
        health_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let urls = [format!("http://{a_addr}"), b.url()];
    let inference = InferenceClient::connect_lazy(&urls, &client_opts).unwrap();
    let compositor = spawn_compositor(&avatars, inference.clone(), 2, Default::default()).await;
    let client = CompositorClient::connect(compositor.url()).await.unwrap();

    let served_before_kill = {
        let mut frames = render_small(&client, 200).await;
        let mut next = 0u64;
        let mut served = 0;
        while let Some(f) = frames.message().await.unwrap() {
            assert_eq!(f.frame_index, next, "frame out of order or sent twice");
            next += 1;
            if next == 20 {
                served = executions(a_addr).await;
                a.child.kill().unwrap();
            }
        }
        assert_eq!(next, 200, "frames lost when a replica was killed");
        served
    };
    assert!(
        served_before_kill > 0,
        "the killed replica had served nothing: the test did not exercise it"
    );
    assert!(!a.child.wait().unwrap().success());

    let _restarted = Proc::serving_inference(&models, a_addr).await;
    let started = Instant::now();
    while !inference.health().iter().all(|(_, ok)| *ok) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "restarted replica never reported healthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut frames = render_small(&client, 40).await;
    assert_eq!(count_in_order(&mut frames, 0).await, 40);
    assert!(
        executions(a_addr).await > 0,
        "the restarted replica got no batch"
    );
}

/// The only inference process killed and restarted while a Render stream is open: the stream
/// ends with UNAVAILABLE naming the replica (there is no other to retry on), the frames sent
/// before are in order and never repeated, and the next stream is served by the new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_sole_inference_process_ends_the_stream_cleanly_then_serves_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (models, avatars) = write_fixtures(tmp.path(), 1000);
    let addr = free_addr();
    let mut server = Proc::serving_inference(&models, addr).await;
    let client_opts = ClientOptions {
        health_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let inference =
        InferenceClient::connect_lazy(&[format!("http://{addr}")], &client_opts).unwrap();
    let compositor = spawn_compositor(&avatars, inference.clone(), 2, Default::default()).await;
    let client = CompositorClient::connect(compositor.url()).await.unwrap();

    const ASKED: u64 = 2000;
    let mut frames = render_small(&client, ASKED as u32).await;
    let mut next = 0u64;
    let end = loop {
        match frames.message().await {
            Ok(Some(f)) => {
                assert_eq!(f.frame_index, next, "frame out of order or sent twice");
                next += 1;
                if next == 20 {
                    server.child.kill().unwrap();
                }
            }
            Ok(None) => break None,
            Err(s) => break Some(s),
        }
    };
    let status = end.expect("the stream ended without a status after losing its only replica");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&addr.to_string()),
        "the status does not name the lost replica: {status:?}"
    );
    assert!(
        next < ASKED,
        "every frame arrived: the kill came too late to test anything"
    );
    assert!(!server.child.wait().unwrap().success());

    let _restarted = Proc::serving_inference(&models, addr).await;
    let mut frames = render_small(&client, 40).await;
    assert_eq!(count_in_order(&mut frames, 0).await, 40);
    assert!(executions(addr).await > 0, "the new process got no batch");
}

/// SIGTERM to both processes while a request waits at the model: the request is finished and
/// its frames delivered, then both exit with status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_then_both_processes_exit_0() {
    let tmp = tempfile::tempdir().unwrap();
    // The model waits 1.5 s for batch-mates: the request is still queued at the signal.
    let (models, avatars) = write_fixtures(tmp.path(), 1_500_000);
    let inf_addr = free_addr();
    let mut inference = Proc::serving_inference(&models, inf_addr).await;
    let comp_addr = free_addr();
    let args = compositor_args(
        &avatars,
        &format!("http://{inf_addr}"),
        comp_addr,
        &["--batch", "4", "--shutdown-grace-s", "20"],
    );
    let mut compositor = Proc::start("compositor", COMPOSITOR, &args);
    compositor.wait_serving(comp_addr).await;

    let mut client = CompositorClient::connect(format!("http://{comp_addr}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(request("small", 0, 4)).await.unwrap();
    let mut frames = client
        .render(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(500)).await;
    compositor.signal(libc::SIGTERM);
    inference.signal(libc::SIGTERM);

    let mut got = Vec::new();
    let end = loop {
        match frames.message().await {
            Ok(Some(f)) => got.push(f.frame_index),
            Ok(None) => break None,
            Err(s) => break Some(s),
        }
    };
    assert_eq!(got, [0, 1, 2, 3], "the request in flight was not finished");
    if let Some(s) = end {
        assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
    }
    drop(tx);
    let limit = Duration::from_secs(30);
    let status = compositor.exit_within(limit).await;
    assert!(status.success(), "compositor: {status}");
    let status = inference.exit_within(limit).await;
    assert!(status.success(), "inference: {status}");
}

/// `--log-format json` writes one JSON object per line, and the id of a Render request
/// reaches the inference service's log: one search follows a chunk across both services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_render_request_id_into_the_inference_service() {
    let tmp = tempfile::tempdir().unwrap();
    let (models, avatars) = write_fixtures(tmp.path(), 500);
    let addr = free_addr();
    let log_path = tmp.path().join("inference.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut args = inference_args(&models, addr);
    args.extend(["--log-format", "json"].map(String::from));
    let mut inference = Proc::start_logging(
        "inference",
        INFERENCE,
        &args,
        "framecast_inference=debug,warn",
        Stdio::from(log),
    );
    inference.wait_serving(addr).await;
    let pool =
        InferenceClient::connect_lazy(&[format!("http://{addr}")], &ClientOptions::default())
            .unwrap();
    let compositor = spawn_compositor(&avatars, pool, 4, Default::default()).await;
    let client = CompositorClient::connect(compositor.url()).await.unwrap();
    let mut req = request("small", 0, 4);
    req.request_id = "greppable-chunk-17".into();
    let mut stream = client
        .clone()
        .render(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(count_in_order(&mut stream, 0).await, 4);
    inference.signal(libc::SIGTERM);
    inference.exit_within(Duration::from_secs(30)).await;

    let text = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty(), "no log lines");
    let spans_with_id = lines
        .iter()
        .filter_map(|l| l["spans"].as_array())
        .flatten()
        .filter(|span| {
            span["name"] == "infer"
                && span["model"] == "passthrough"
                && span["id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("greppable-chunk-17:0#"))
        })
        .count();
    assert!(spans_with_id > 0, "no line names the request id:\n{text}");
}

/// A one-shot subcommand whose reader goes away (`| grep -q`, `| head`) ends quietly, as a
/// Unix tool does, instead of panicking on the closed pipe (exit 101, which `set -o pipefail`
/// scripts read as a failure).
#[test]
fn one_shot_subcommands_end_quietly_when_stdout_closes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("avatars");
    let models = dir.path().join("models");
    let runs: [(&str, Vec<String>); 2] = [
        (
            COMPOSITOR,
            [
                "avatar",
                "make-demo",
                "--root",
                root.to_str().unwrap(),
                "--frames",
                "2",
            ]
            .map(String::from)
            .to_vec(),
        ),
        (
            INFERENCE,
            [
                "models",
                "--out",
                models.to_str().unwrap(),
                "--only",
                "passthrough",
            ]
            .map(String::from)
            .to_vec(),
        ),
    ];
    for (bin, args) in runs {
        let mut child = Command::new(bin)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader leaves before the first line is written (the work comes first).
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_ne!(out.status.code(), Some(101), "{args:?}: {stderr}");
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {:?} {stderr}",
            out.status
        );
    }
}

/// The resident memory of process `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// The highest resident memory of `pid` seen every 200 ms for `span`, KiB.
async fn peak_rss_kib(pid: u32, span: Duration) -> u64 {
    let until = Instant::now() + span;
    let mut peak = 0;
    while Instant::now() < until {
        peak = peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    peak
}

/// `--tensor-cache-mib 0` once meant "unlimited", which let one registration's declared
/// size abort the process: it is refused at start, saying why.
#[test]
fn a_tensor_cache_of_zero_mib_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let (models, _) = write_fixtures(tmp.path(), 0);
    let mut args = inference_args(&models, free_addr());
    args.extend(["--tensor-cache-mib", "0"].map(String::from));
    let out = Command::new(INFERENCE).args(&args).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tensor-cache-mib") && err.contains("finite"),
        "{err}"
    );
}

/// 40 clients that send `ModelStreamInfer` requests (rows named from the tensor cache, a
/// few hundred bytes each, 98 KB answers) and never read the answers: the server stops
/// reading their requests once their budget of unsent answers is full, so its memory stays
/// within that budget instead of growing with every request sent (400 MB here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_a_client_never_reads_are_bounded() {
    use framecast_proto::kserve::infer_parameter::ParameterChoice;
    use framecast_proto::kserve::model_infer_request::InferInputTensor;
    use framecast_proto::kserve::{InferParameter, ModelInferRequest};
    use framecast_proto::tensor::DataType;
    use framecast_proto::tensorcache::v1::tensor_cache_client::TensorCacheClient;
    use framecast_proto::tensorcache::v1::RegisterRequest;
    use framecast_proto::tensorcache::{PARAM_ROWS, PARAM_TENSOR};
    let tmp = tempfile::tempdir().unwrap();
    let (models, _) = write_fixtures(tmp.path(), 0);
    let addr = free_addr();
    let mut args = inference_args(&models, addr);
    args.extend(["--stream-buffer-mib", "8", "--load", "passthrough"].map(String::from));
    let mut inference = Proc::start("inference", INFERENCE, &args);
    inference.wait_serving(addr).await;
    let url = format!("http://{addr}");
    let crop = framecast_e2e::CROP as i64;
    let mut cache = TensorCacheClient::connect(url.clone()).await.unwrap();
    for (name, datatype, shape, bytes) in [
        (
            "faces",
            "UINT8",
            vec![8, 6, crop, crop],
            8 * 6 * crop * crop,
        ),
        ("audio", "FP32", vec![8, 32, 16, 16], 8 * 32 * 16 * 16 * 4),
    ] {
        cache
            .register(RegisterRequest {
                name: name.into(),
                datatype: datatype.into(),
                shape,
                data: vec![0u8; bytes as usize].into(),
                first_row: 0,
            })
            .await
            .unwrap();
    }
    let named = |input: &str, tensor: &str, datatype, shape: Vec<i64>| {
        let mut i = InferInputTensor::new(input, datatype, shape);
        for (k, v) in [(PARAM_TENSOR, tensor), (PARAM_ROWS, "0,1,2,3,4,5,6,7")] {
            let p = InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam(v.into())),
            };
            i.parameters.insert(k.into(), p);
        }
        i
    };
    let request = ModelInferRequest {
        model_name: "passthrough".into(),
        inputs: vec![
            named("face", "faces", DataType::U8, vec![8, 6, crop, crop]),
            named("audio", "audio", DataType::F32, vec![8, 32, 16, 16]),
        ],
        ..Default::default()
    };
    let mut kserve = framecast_e2e::kserve_client(url.clone()).await;
    kserve.model_infer(request.clone()).await.unwrap();
    let before = rss_kib(inference.child.id());
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut client = framecast_e2e::kserve_client(url.clone()).await;
        let requests = tokio_stream::iter(vec![request.clone(); 100]);
        held.push(client.model_stream_infer(requests).await.unwrap());
    }
    let peak = peak_rss_kib(inference.child.id(), Duration::from_secs(12)).await;
    let grew_mib = peak.saturating_sub(before) / 1024;
    println!("inference RSS {before} KiB before, peak {peak} KiB with 40 unread streams");
    assert!(
        grew_mib < 150,
        "the server's memory grew {grew_mib} MiB for answers nobody reads"
    );
    drop(held);
    // Still serving.
    kserve.model_infer(request).await.unwrap();
}

/// 40 clients that open I420 Render streams of 64 frames and never read them, against
/// `--max-streams 8`: a stream keeps its place while its frames wait, so 8 streams each hold
/// at most a few frames and the other 32 are refused; nothing piles up past the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn frames_a_client_never_reads_hold_their_stream_and_are_bounded() {
    use framecast_proto::compositor::v1::ImageFormat;
    let tmp = tempfile::tempdir().unwrap();
    let (models, avatars) = write_fixtures(tmp.path(), 0);
    let inference = framecast_e2e::spawn_inference(&models, Default::default()).await;
    let comp_addr = free_addr();
    let extra = [
        "--batch",
        "8",
        "--max-streams",
        "8",
        "--max-streams-per-client",
        "8",
        "--preload",
        "small",
    ];
    let args = compositor_args(&avatars, &inference.url(), comp_addr, &extra);
    let mut compositor = Proc::start("compositor", COMPOSITOR, &args);
    compositor.wait_serving(comp_addr).await;
    let url = format!("http://{comp_addr}");
    // Warm: one stream read to its end.
    let client = CompositorClient::connect(url.clone()).await.unwrap();
    let mut warm = request("small", 0, 8);
    warm.frame_format = ImageFormat::I420 as i32;
    let mut s = client
        .clone()
        .render(tokio_stream::iter(vec![warm]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(count_in_order(&mut s, 0).await, 8);
    let before = rss_kib(compositor.child.id());
    let (mut admitted, mut refused) = (Vec::new(), 0);
    for _ in 0..40 {
        let mut c = CompositorClient::connect(url.clone()).await.unwrap();
        let mut req = request("small", 0, 64);
        req.frame_format = ImageFormat::I420 as i32;
        match c.render(tokio_stream::iter(vec![req])).await {
            Ok(stream) => admitted.push(stream),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                refused += 1;
            }
        }
        // Room for a stream that finished rendering to give its place back (it must not).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let peak = peak_rss_kib(compositor.child.id(), Duration::from_secs(4)).await;
    assert_eq!((admitted.len(), refused), (8, 32));
    let grew_mib = peak.saturating_sub(before) / 1024;
    println!("compositor RSS {before} KiB before, peak {peak} KiB with 40 unread streams");
    assert!(
        grew_mib < 100,
        "the compositor's memory grew {grew_mib} MiB for frames nobody reads"
    );
}

/// A prepared file whose JPEG lengths were all set to 0xFFFFFFFF (85 GB, with the header
/// and fingerprint intact) is a problem `avatar check` reports, not an abort.
#[test]
fn avatar_check_reports_a_tampered_prepared_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, avatars) = write_fixtures(tmp.path(), 0);
    let dir = avatars.join("small");
    let run = |cmd: &str| {
        Command::new(COMPOSITOR)
            .args(["avatar", cmd, dir.to_str().unwrap()])
            .output()
            .unwrap()
    };
    assert!(run("prepare").status.success());
    let path = dir.join("prepared.fcp");
    let mut bytes = std::fs::read(&path).unwrap();
    let lens = framecast_compositor::prepared::FIXED;
    bytes[lens..lens + 4 * framecast_e2e::FRAMES as usize].fill(0xFF);
    std::fs::write(&path, &bytes).unwrap();
    let out = run("check");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("impossible"), "{text}");
}

/// A preloaded avatar's face inputs reach the replica's tensor cache before any session asks
/// for a frame, so the first session does not wait while they are computed and sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preloaded_avatars_faces_are_registered_before_the_first_session() {
    let tmp = tempfile::tempdir().unwrap();
    let (models, avatars) = write_fixtures(tmp.path(), 0);
    let metrics = std::sync::Arc::new(framecast_inference::metrics::Metrics::new());
    let inference = framecast_e2e::spawn_inference_with(
        &models,
        Default::default(),
        metrics.clone(),
        Default::default(),
    )
    .await;
    assert_eq!(metrics.tensor_cache_bytes.get(), 0);
    let comp_addr = free_addr();
    let args = compositor_args(
        &avatars,
        &inference.url(),
        comp_addr,
        &["--preload", "small"],
    );
    let mut compositor = Proc::start("compositor", COMPOSITOR, &args);
    compositor.wait_serving(comp_addr).await;
    let started = Instant::now();
    while metrics.tensor_cache_bytes.get() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nothing registered 30 s after the compositor served, with no session open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The small avatar's face inputs: one row (6 x S x S bytes) per frame, at least.
    let per_row =
        framecast_compositor::face_contract::input_bytes(framecast_e2e::CROP as usize) as i64;
    assert!(
        metrics.tensor_cache_bytes.get() >= per_row * framecast_e2e::FRAMES as i64,
        "{} bytes held",
        metrics.tensor_cache_bytes.get()
    );
}

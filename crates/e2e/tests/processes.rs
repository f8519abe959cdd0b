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
    let args = [
        "serve",
        "--avatars",
        &avatars.display().to_string(),
        "--inference",
        &format!("http://{inf_addr}"),
        "--listen",
        &comp_addr.to_string(),
        "--metrics-listen",
        "127.0.0.1:0",
        "--batch",
        "4",
        "--shutdown-grace-s",
        "20",
    ];
    let mut compositor = Proc::start("compositor", COMPOSITOR, &args.map(String::from));
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

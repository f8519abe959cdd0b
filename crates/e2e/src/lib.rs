//! Fixtures the end-to-end tests share (see tests/), and, as binaries, the two services' own
//! `main`s so those tests can run them as processes.

pub mod stack;

use framecast_compositor::avatar_store::AvatarStore;
use framecast_compositor::demo::{self, DemoOptions};
use framecast_compositor::inference::InferenceClient;
use framecast_compositor::render::RenderOptions;
use framecast_compositor::rpc::CompositorService;
use framecast_compositor::server::{self as comp_server, ServeOptions};
use framecast_inference::zoo::{self, Builtin, ZooOptions};
use framecast_proto::compositor::v1::{RenderRequest, RenderedFrame, Tensor};
use framecast_proto::kserve::{
    grpc_inference_service_client::GrpcInferenceServiceClient, ModelStatisticsRequest,
};
use framecast_proto::tensor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Face crop side of the fixture model and avatars.
pub const CROP: u32 = 64;
/// Size of the `small` avatar's frames.
pub const W: u32 = 320;
pub const H: u32 = 180;
/// Background frames per fixture avatar.
pub const FRAMES: u32 = 6;

/// Writes the `passthrough` model (max batch 8, waiting up to `queue_delay_us` for
/// batch-mates) and the `small` (320x180) and `tall` (144x256) avatars under `root`; returns
/// the model repository and the avatar root.
pub fn write_fixtures(root: &Path, queue_delay_us: u64) -> (PathBuf, PathBuf) {
    let models = root.join("models");
    let zoo_opts = ZooOptions {
        crop: CROP as i64,
        max_batch_size: 8,
        max_queue_delay_us: queue_delay_us,
    };
    zoo::write(&models, Builtin::Passthrough, &zoo_opts).expect("writing the fixture model");
    let avatars = root.join("avatars");
    for (id, w, h) in [("small", W, H), ("tall", 144, 256)] {
        let opts = DemoOptions {
            id: id.into(),
            width: w,
            height: h,
            frames: FRAMES,
            fps: 25.0,
            crop_size: CROP,
            model: "passthrough".into(),
        };
        demo::write_demo(&avatars, &opts).expect("writing a fixture avatar");
    }
    (models, avatars)
}

/// `root/from` copied as `root/to`, its `[audio]` table replaced by `audio` (removed with
/// None).
pub fn copy_avatar(root: &Path, from: &str, to: &str, audio: Option<&str>) {
    let (src, dst) = (root.join(from), root.join(to));
    std::fs::create_dir_all(dst.join("frames")).unwrap();
    for e in std::fs::read_dir(src.join("frames")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join("frames").join(e.file_name())).unwrap();
    }
    std::fs::copy(src.join("boxes.json"), dst.join("boxes.json")).unwrap();
    let manifest = std::fs::read_to_string(src.join("avatar.toml")).unwrap();
    let head = manifest.split("[audio]").next().unwrap();
    let manifest = head.replace(&format!("id = \"{from}\""), &format!("id = \"{to}\""))
        + audio.unwrap_or_default();
    std::fs::write(dst.join("avatar.toml"), manifest).unwrap();
}

/// `seconds` of a voiced buzz at 16 kHz, 16-bit little-endian: 120 Hz and its harmonics, four
/// syllables a second; loud enough in every 200 ms window to make talking frames.
pub fn voiced_pcm16(seconds: f64) -> bytes::Bytes {
    let n = (16_000.0 * seconds) as usize;
    (0..n)
        .flat_map(|i| {
            let t = i as f64 / 16_000.0;
            let voiced: f64 = (1..10)
                .map(|h| (2.0 * std::f64::consts::PI * 120.0 * h as f64 * t).sin() / h as f64)
                .sum();
            let v = 0.3 * (std::f64::consts::PI * 4.0 * t).sin().abs() * voiced;
            ((v * 32767.0) as i16).to_le_bytes()
        })
        .collect::<Vec<u8>>()
        .into()
}

/// A whole speech session in one message: `voiced_pcm16(seconds)` to `avatar`, then the end of
/// speech.
pub fn speech_session(avatar: &str, seconds: f64) -> RenderRequest {
    use framecast_proto::compositor::v1::{AudioChunk, AudioFormat, SampleFormat};
    RenderRequest {
        request_id: format!("speech-{avatar}"),
        avatar_id: avatar.into(),
        audio: Some(AudioChunk {
            format: Some(AudioFormat {
                sample_format: SampleFormat::S16le as i32,
                sample_rate: 16_000,
            }),
            pcm: voiced_pcm16(seconds),
            end_of_speech: true,
            cancel: false,
        }),
        ..Default::default()
    }
}

/// One HTTP/1.1 request with `headers` on a fresh connection to `addr` (`Host: gateway`):
/// (status, head, body).
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: gateway\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    // A body past a limit may be refused before it is all read: the answer still comes.
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    http_response(&out)
}

/// An HTTP/1.1 response as read from the socket: (status, head, body).
pub fn http_response(raw: &[u8]) -> (u16, String, String) {
    let text = String::from_utf8_lossy(raw).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

/// Silent audio conditioning for `n` frames.
pub fn zero_audio(n: u32) -> Tensor {
    Tensor {
        name: "audio".into(),
        datatype: "FP32".into(),
        shape: vec![n as i64, 32, 16, 16],
        data: tensor::encode(&vec![0f32; n as usize * 32 * 16 * 16]),
    }
}

/// A request for frames `start..start + n` of `avatar`, with silent audio.
pub fn request(avatar: &str, start: u64, n: u32) -> RenderRequest {
    RenderRequest {
        request_id: format!("{avatar}-{start}"),
        avatar_id: avatar.into(),
        start_frame: start,
        frame_count: n,
        conditioning: vec![zero_audio(n)],
        jpeg_quality: 0,
        audio: None,
        idle: false,
        frame_format: 0,
        idle_frame_format: 0,
        frame_region: None,
        backgrounds_once: false,
        resend_backgrounds: false,
    }
}

/// Certificates for TLS tests, as PEM: a CA, a server certificate it signed for `localhost`
/// and `127.0.0.1`, a client certificate it signed, and a client certificate from another CA.
pub struct TestPki {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
    pub stranger_cert: String,
    pub stranger_key: String,
}

impl TestPki {
    pub fn new() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let ca_params = || {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p
        };
        let key = || KeyPair::generate().expect("key pair");
        let ca = CertifiedIssuer::self_signed(ca_params(), key()).expect("CA");
        let other_ca = CertifiedIssuer::self_signed(ca_params(), key()).expect("other CA");
        let leaf = |names: &[&str], issuer: &CertifiedIssuer<'_, KeyPair>| {
            let k = key();
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let cert = CertificateParams::new(names)
                .and_then(|p| p.signed_by(&k, issuer))
                .expect("leaf certificate");
            (cert.pem(), k.serialize_pem())
        };
        let (server_cert, server_key) = leaf(&["localhost", "127.0.0.1"], &ca);
        let (client_cert, client_key) = leaf(&["compositor"], &ca);
        let (stranger_cert, stranger_key) = leaf(&["stranger"], &other_ca);
        TestPki {
            ca: ca.pem(),
            server_cert,
            server_key,
            client_cert,
            client_key,
            stranger_cert,
            stranger_key,
        }
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// An inference server on a loopback port serving the repository `models` on CPU.
pub async fn spawn_inference(
    models: &Path,
    opts: framecast_inference::server::ServeOptions,
) -> framecast_inference::server::Running {
    spawn_inference_with(models, Default::default(), Default::default(), opts).await
}

/// [`spawn_inference`] with execution options (devices, budget, pins, queue) and the metrics
/// the server records into.
pub async fn spawn_inference_with(
    models: &Path,
    exec: framecast_inference::models::ExecOptions,
    metrics: Arc<framecast_inference::metrics::Metrics>,
    opts: framecast_inference::server::ServeOptions,
) -> framecast_inference::server::Running {
    framecast_inference::server::spawn_on_loopback(model_manager(models, exec, metrics), opts)
        .await
        .expect("inference start")
}

/// The model manager of an inference server over the repository `models` (models load on
/// demand), for tests that serve it themselves (on a chosen address, say).
pub fn model_manager(
    models: &Path,
    exec: framecast_inference::models::ExecOptions,
    metrics: Arc<framecast_inference::metrics::Metrics>,
) -> Arc<framecast_inference::models::ModelManager> {
    let repo = framecast_inference::repository::Repository::open(models).expect("repository");
    Arc::new(framecast_inference::models::ModelManager::new(
        repo, exec, true, metrics,
    ))
}

/// A KServe client of the server at `url`, taking messages of up to 64 MiB.
pub async fn kserve_client(url: String) -> GrpcInferenceServiceClient<tonic::transport::Channel> {
    GrpcInferenceServiceClient::connect(url)
        .await
        .expect("connect to the inference server")
        .max_decoding_message_size(64 << 20)
}

/// Inference (`passthrough`), a compositor with the fixture avatars and a gateway over them
/// with `opts`, each on a loopback port: what the gateway tests talk to.
pub struct GatewayStack {
    _tmp: tempfile::TempDir,
    _servers: (framecast_inference::server::Running, comp_server::Running),
    pub gateway: Arc<framecast_gateway::Gateway>,
    pub addr: std::net::SocketAddr,
}

/// Starts a [`GatewayStack`].
pub async fn gateway_stack(opts: framecast_gateway::GatewayOptions) -> GatewayStack {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let (models, avatars) = write_fixtures(tmp.path(), 0);
    let inference = spawn_inference(&models, Default::default()).await;
    let pool = InferenceClient::connect_lazy(&[inference.url()], &Default::default())
        .expect("an inference URL");
    let compositor = spawn_compositor(&avatars, pool, 8, Default::default()).await;
    let (gateway, addr) = spawn_gateway(compositor.url(), opts).await;
    GatewayStack {
        _tmp: tmp,
        _servers: (inference, compositor),
        gateway,
        addr,
    }
}

impl GatewayStack {
    /// Where the models and avatars are (`models/`, `avatars/`).
    pub fn root(&self) -> &Path {
        self._tmp.path()
    }

    /// Sessions still open once the gateway has had up to 10 s to end them.
    pub async fn settled(&self) -> usize {
        stack::poll_until(
            std::time::Duration::from_secs(10),
            || async { self.gateway.open_sessions() },
            |&n| n == 0,
        )
        .await
    }
}

/// A gateway over the compositor at `compositor_url`, serving HTTP on a loopback port:
/// the gateway (to look into) and its address.
pub async fn spawn_gateway(
    compositor_url: String,
    opts: framecast_gateway::GatewayOptions,
) -> (Arc<framecast_gateway::Gateway>, std::net::SocketAddr) {
    spawn_gateway_with(&compositor_url, None, None, opts).await
}

/// [`spawn_gateway`] over TLS: `compositor_tls` to reach an https:// compositor, `tls` to
/// serve the page over HTTPS.
pub async fn spawn_gateway_with(
    compositor_url: &str,
    compositor_tls: Option<&framecast_telemetry::tls::ClientTls>,
    tls: Option<framecast_telemetry::tls::ServerTls>,
    opts: framecast_gateway::GatewayOptions,
) -> (Arc<framecast_gateway::Gateway>, std::net::SocketAddr) {
    let client =
        framecast_gateway::connect(compositor_url, compositor_tls, None).expect("a compositor URL");
    let gateway = framecast_gateway::Gateway::new(client, opts);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(framecast_gateway::serve(
        listener,
        gateway.clone(),
        tls,
        std::future::pending(),
    ));
    (gateway, addr)
}

/// A compositor on a loopback port over `inference`, with the avatars under `avatars`,
/// batches of `max_batch` frames and `serve` options.
pub async fn spawn_compositor(
    avatars: &Path,
    inference: InferenceClient,
    max_batch: usize,
    serve: ServeOptions,
) -> comp_server::Running {
    let opts = RenderOptions {
        max_batch,
        ..Default::default()
    };
    spawn_compositor_with(avatars, inference, opts, None, serve).await
}

/// [`spawn_compositor`] with every render option and an admission limit (`None`: the
/// default).
pub async fn spawn_compositor_with(
    avatars: &Path,
    inference: InferenceClient,
    opts: RenderOptions,
    max_streams: Option<usize>,
    serve: ServeOptions,
) -> comp_server::Running {
    let metrics = Arc::new(framecast_compositor::metrics::Metrics::new());
    let store = AvatarStore::new(avatars, true, None, metrics.clone()).expect("avatar store");
    let mut svc = CompositorService::new(Arc::new(store), inference, opts, metrics);
    if let Some(n) = max_streams {
        svc = svc.with_max_streams(n, n);
    }
    comp_server::spawn_on_loopback(svc, serve)
        .await
        .expect("compositor start")
}

/// Reads a Render stream to its end, checking that frames come in order from `first` with
/// no gap or repeat; returns how many came. Panics on a stream error.
pub async fn count_in_order(stream: &mut tonic::Streaming<RenderedFrame>, first: u64) -> u64 {
    let mut n = 0;
    while let Some(f) = stream.message().await.expect("render stream") {
        assert_eq!(
            f.frame_index,
            first + n,
            "frame out of order, missing or repeated"
        );
        n += 1;
    }
    n
}

/// The inference server's statistics of `passthrough`: (batches executed, requests failed).
pub async fn passthrough_stats(url: String) -> (u64, u64) {
    let stats = GrpcInferenceServiceClient::connect(url)
        .await
        .expect("connect for statistics")
        .model_statistics(ModelStatisticsRequest {
            name: "passthrough".into(),
            version: String::new(),
        })
        .await
        .expect("model statistics")
        .into_inner()
        .model_stats;
    stats.first().map_or((0, 0), |s| {
        let fail = s.inference_stats.as_ref().and_then(|i| i.fail.as_ref());
        (s.execution_count, fail.map_or(0, |f| f.count))
    })
}

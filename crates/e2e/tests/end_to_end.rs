//! Both real servers on loopback, frames through `passthrough`: the composite is checked
//! against a reference computed here, and pixels away from the face against the
//! background's own JPEG round trip.

use framecast_compositor::avatar::{ping_pong, Avatar};
use framecast_compositor::avatar_store::AvatarStore;
use framecast_compositor::demo::{self, DemoOptions};
use framecast_compositor::discovery::Resolve;
use framecast_compositor::encode::{self, Subsampling};
use framecast_compositor::inference::{ClientOptions, InferenceClient};
use framecast_compositor::render::RenderOptions;
use framecast_compositor::service::{CompositorService, DEFAULT_MAX_STREAMS};
use framecast_compositor::{mask, server as comp_server};
use framecast_e2e::{
    count_in_order, passthrough_stats, request, spawn_compositor, write_fixtures, CROP, FRAMES, H,
    W,
};
use framecast_inference::models::{ExecOptions, ModelManager};
use framecast_inference::repository::Repository;
use framecast_inference::server::{self as inf_server, ServerOptions};
use framecast_proto::compositor::v1::{
    compositor_client::CompositorClient, RenderRequest, RenderedFrame,
};
use framecast_proto::tensor::DataType;
use std::path::Path;
use std::sync::Arc;
use tokio_stream::StreamExt;
use tonic::Code;

struct Stack {
    inference_server: inf_server::Running,
    compositor_server: comp_server::Running,
    client: CompositorClient<tonic::transport::Channel>,
    metrics: Arc<framecast_compositor::metrics::Metrics>,
    inference: InferenceClient,
}

async fn stack(root: &Path, batch: usize) -> Stack {
    stack_with(root, batch, Opts::default()).await
}

/// Settings of a test stack beyond the batch size.
struct Opts {
    budget: Option<u64>,
    shared_memory: bool,
    max_streams: usize,
    /// (inference token, compositor token)
    tokens: (Option<&'static str>, Option<&'static str>),
    /// How long the model waits for batch-mates (its max batch is 8).
    queue_delay_us: u64,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            budget: None,
            shared_memory: true,
            max_streams: DEFAULT_MAX_STREAMS,
            tokens: (None, None),
            queue_delay_us: 1000,
        }
    }
}

async fn stack_with_budget(root: &Path, batch: usize, budget: Option<u64>) -> Stack {
    stack_with(
        root,
        batch,
        Opts {
            budget,
            ..Default::default()
        },
    )
    .await
}

async fn stack_with(root: &Path, batch: usize, o: Opts) -> Stack {
    let (models, avatars) = write_fixtures(root, o.queue_delay_us);
    let repo = Repository::open(&models).unwrap();
    let exec = ExecOptions::default();
    let manager = Arc::new(ModelManager::new(repo, exec, true, Default::default()));
    let server_opts = ServerOptions {
        auth_token: o.tokens.0.map(String::from),
        ..Default::default()
    };
    let inference = inf_server::spawn_on_loopback(manager, server_opts)
        .await
        .unwrap();
    let client_opts = ClientOptions {
        shared_memory: o.shared_memory,
        token: o.tokens.0.map(String::from),
        ..Default::default()
    };
    let client = InferenceClient::connect_lazy(&[inference.url()], &client_opts).unwrap();
    let metrics = Arc::new(framecast_compositor::metrics::Metrics::new());
    let svc = CompositorService::new(
        Arc::new(AvatarStore::new(&avatars, true, o.budget, metrics.clone()).unwrap()),
        client.clone(),
        RenderOptions {
            max_batch: batch,
            ..Default::default()
        },
        metrics.clone(),
    )
    .with_max_streams(o.max_streams);
    let serve_opts = comp_server::ServeOptions {
        auth_token: o.tokens.1.map(String::from),
        ..Default::default()
    };
    let compositor = comp_server::spawn_on_loopback(svc, serve_opts)
        .await
        .unwrap();
    let compositor_url = compositor.url();
    Stack {
        inference_server: inference,
        compositor_server: compositor,
        client: CompositorClient::connect(compositor_url).await.unwrap(),
        metrics,
        inference: client,
    }
}

async fn render(
    client: &CompositorClient<tonic::transport::Channel>,
    reqs: Vec<RenderRequest>,
) -> Result<Vec<RenderedFrame>, tonic::Status> {
    let mut stream = client
        .clone()
        .render(tokio_stream::iter(reqs))
        .await?
        .into_inner();
    let mut frames = Vec::new();
    while let Some(f) = stream.next().await {
        frames.push(f?);
    }
    Ok(frames)
}

/// A Render stream the caller keeps open: `first` is sent at once, further requests through
/// the returned sender; the stream ends when the sender is dropped.
async fn open_render(
    client: &CompositorClient<tonic::transport::Channel>,
    first: RenderRequest,
) -> (
    tokio::sync::mpsc::Sender<RenderRequest>,
    tonic::Streaming<RenderedFrame>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(first).await.unwrap();
    let stream = client
        .clone()
        .render(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

fn face_region(img: &[u8], width: u32, b: &framecast_compositor::manifest::FaceBox) -> Vec<u8> {
    (b.y..b.y + b.h)
        .flat_map(|y| {
            let i = ((y * width + b.x) * 3) as usize;
            img[i..i + (b.w * 3) as usize].to_vec()
        })
        .collect()
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10()
}

/// The composite computed independently of the compositor's blend path: crop → S x S →
/// back to the box (the `image` crate's triangle filter), blended with the mask as floats.
fn reference_composite(
    bg: &[u8],
    width: u32,
    b: &framecast_compositor::manifest::FaceBox,
    masked: bool,
) -> Vec<u8> {
    use image::imageops::{resize, FilterType};
    let height = (bg.len() / (width as usize * 3)) as u32;
    let frame = image::RgbImage::from_raw(width, height, bg.to_vec()).unwrap();
    let face = image::imageops::crop_imm(&frame, b.x, b.y, b.w, b.h).to_image();
    let mut small = resize(&face, CROP, CROP, FilterType::Triangle);
    if masked {
        // The masked copy: lower half black.
        for y in CROP / 2..CROP {
            for x in 0..CROP {
                small.put_pixel(x, y, image::Rgb([0, 0, 0]));
            }
        }
    }
    let back = resize(&small, b.w, b.h, FilterType::Triangle);
    let m = image::GrayImage::from_raw(CROP, CROP, mask::lower_face(CROP, 0.25)).unwrap();
    let alpha = resize(&m, b.w, b.h, FilterType::Triangle);
    let mut out = bg.to_vec();
    for y in 0..b.h {
        for x in 0..b.w {
            let a = alpha.get_pixel(x, y).0[0] as f64 / 255.0;
            let i = (((b.y + y) * width + b.x + x) * 3) as usize;
            for c in 0..3 {
                let v = back.get_pixel(x, y).0[c] as f64 * a + bg[i + c] as f64 * (1.0 - a);
                out[i + c] = v.round() as u8;
            }
        }
    }
    out
}

/// Same host: batches travel through shared memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passthrough_frames_match_the_reference_composite() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 4).await;
    check_reference_composite(tmp.path(), &s).await;
    assert_eq!(
        s.inference.shared_memory_batches(),
        3,
        "11 frames in batches of 4"
    );
}

/// Shared memory off: the same frames over the gRPC stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passthrough_frames_match_the_reference_composite_over_grpc() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = Opts {
        shared_memory: false,
        ..Default::default()
    };
    let s = stack_with(tmp.path(), 4, opts).await;
    check_reference_composite(tmp.path(), &s).await;
    assert_eq!(s.inference.shared_memory_batches(), 0);
}

async fn check_reference_composite(root: &Path, s: &Stack) {
    let avatar = Avatar::load(&root.join("avatars/small")).unwrap();
    // 11 frames over 6 backgrounds: ping-pong wraps, and 4-frame batches leave a remainder.
    let frames = render(&s.client, vec![request("small", 3, 11)])
        .await
        .unwrap();
    assert_eq!(frames.len(), 11);
    for (k, f) in frames.iter().enumerate() {
        assert_eq!(f.frame_index, 3 + k as u64, "frames out of order");
        let bg_index = ping_pong(f.frame_index, FRAMES as usize);
        assert_eq!(f.background_index as usize, bg_index);
        assert_eq!(f.last_in_request, k == 10);
        assert_eq!((f.width, f.height), (W, H));
        let t = f.timings.as_ref().unwrap();
        assert!(t.total_us >= t.inference_us);
        let (pixels, w, h) = encode::decode_rgb(&f.image).unwrap();
        assert_eq!((w, h), (W, H), "decoded JPEG size");

        let bg = avatar.frames[bg_index].to_vec();
        let b = avatar.boxes[bg_index];
        let want = reference_composite(&bg, W, &b, false);
        let p = psnr(&face_region(&pixels, W, &b), &face_region(&want, W, &b));
        assert!(
            p > 28.0,
            "frame {}: face region PSNR {p:.1} dB",
            f.frame_index
        );

        // Away from the box (two MCUs of margin for chroma upsampling), the frame must be
        // exactly the background's own JPEG round trip at the same settings.
        let jpeg = encode::encode_rgb(&bg, W, H, 75, Subsampling::S420).unwrap();
        let (round_trip, ..) = encode::decode_rgb(&jpeg).unwrap();
        let margin = 32i64;
        let mut compared = 0;
        for y in 0..H as i64 {
            for x in 0..W as i64 {
                let near = x >= b.x as i64 - margin
                    && x < (b.x + b.w) as i64 + margin
                    && y >= b.y as i64 - margin
                    && y < (b.y + b.h) as i64 + margin;
                if !near {
                    let i = ((y * W as i64 + x) * 3) as usize;
                    assert_eq!(
                        &pixels[i..i + 3],
                        &round_trip[i..i + 3],
                        "frame {} pixel ({x},{y})",
                        f.frame_index
                    );
                    compared += 1;
                }
            }
        }
        assert!(
            compared > (W * H / 4) as usize,
            "too few pixels outside the box to compare"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_on_two_avatars_run_in_parallel_and_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 3).await;
    let a = render(
        &s.client,
        vec![request("small", 0, 5), request("small", 5, 4)],
    );
    let b = render(&s.client, vec![request("tall", 100, 7)]);
    let (a, b) = tokio::join!(a, b);
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.iter().map(|f| f.frame_index).collect::<Vec<_>>(),
        (0..9).collect::<Vec<_>>()
    );
    assert_eq!(
        b.iter().map(|f| f.frame_index).collect::<Vec<_>>(),
        (100..107).collect::<Vec<_>>()
    );
    assert!(b.iter().all(|f| (f.width, f.height) == (144, 256)));
    assert_eq!(a.iter().filter(|f| f.last_in_request).count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_render_requests_get_precise_statuses() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 4).await;
    let err = |r: RenderRequest| {
        let c = s.client.clone();
        async move { render(&c, vec![r]).await.unwrap_err() }
    };
    let e = err(request("nobody", 0, 2)).await;
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let e = err(request("../small", 0, 2)).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("avatar_id"));

    let e = err(request("small", 0, 0)).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("frame_count"), "{}", e.message());

    let mut r = request("small", 0, 2);
    r.conditioning[0].shape[0] = 3;
    let e = err(r).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("'audio'") && e.message().contains("shape"),
        "{}",
        e.message()
    );

    let mut r = request("small", 0, 2);
    r.conditioning.clear();
    let e = err(r).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("'audio'") && e.message().contains("missing"),
        "{}",
        e.message()
    );

    let mut r = request("small", 0, 2);
    r.conditioning[0].datatype = DataType::F64.as_str().into();
    let e = err(r).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("datatype"), "{}", e.message());
}

#[tokio::test]
async fn avatar_check_names_the_file_and_the_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = DemoOptions {
        id: "x".into(),
        width: 96,
        height: 64,
        frames: 3,
        crop_size: 32,
        ..Default::default()
    };
    let dir = demo::write_demo(tmp.path(), &opts).unwrap();
    assert!(Avatar::load(&dir).is_ok());
    std::fs::write(dir.join("frames/000001.jpg"), b"garbage").unwrap();
    std::fs::write(
        dir.join("boxes.json"),
        "[[0,0,10,10],[90,0,10,10],[0,0,10,10]]",
    )
    .unwrap();
    let problems = Avatar::load(&dir).err().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("boxes.json") && p.contains("box 1")),
        "{problems:?}"
    );
    std::fs::write(
        dir.join("boxes.json"),
        "[[0,0,10,10],[0,0,10,10],[0,0,10,10]]",
    )
    .unwrap();
    let problems = Avatar::load(&dir).err().unwrap();
    assert!(
        problems.iter().any(|p| p.contains("000001.jpg")),
        "{problems:?}"
    );
}

/// A hand-made bundle: odd frame size, boxes touching every edge, a non-square box.
fn write_edge_bundle(root: &Path) -> Vec<framecast_compositor::manifest::FaceBox> {
    let (w, h) = (161u32, 97u32);
    let dir = root.join("avatars/edges");
    std::fs::create_dir_all(dir.join("frames")).unwrap();
    let boxes = [
        [0u32, 0, 40, 40],
        [121, 57, 40, 40],
        [0, 50, 33, 47],
        [128, 0, 33, 97],
    ];
    for (i, _) in boxes.iter().enumerate() {
        // Texture in luma, slow gradients in chroma: what 4:2:0 is designed for.
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let t = 40.0 * (x as f64 / 6.0).sin() * (y as f64 / 8.0).cos();
            let base = [
                90.0 + x as f64 * 0.6 + i as f64 * 8.0,
                80.0 + y as f64 * 0.8,
                120.0,
            ];
            image::Rgb(base.map(|c| (c + t).clamp(0.0, 255.0) as u8))
        });
        img.save(dir.join(format!("frames/{i:03}.png"))).unwrap();
    }
    std::fs::write(dir.join("boxes.json"), serde_json_like(&boxes)).unwrap();
    std::fs::write(
        dir.join("avatar.toml"),
        // Masked copy first: passthrough then returns a crop with a black lower half, so the
        // composite differs visibly from the background where the mask pastes it.
        format!("id = \"edges\"\nfps = 25.0\nwidth = {w}\nheight = {h}\ncrop_size = {CROP}\nmodel = \"passthrough\"\nchannel_order = [\"masked\", \"reference\"]\n"),
    )
    .unwrap();
    boxes.iter().map(|&b| b.into()).collect()
}

fn serde_json_like(boxes: &[[u32; 4]]) -> String {
    let items: Vec<String> = boxes
        .iter()
        .map(|b| format!("[{},{},{},{}]", b[0], b[1], b[2], b[3]))
        .collect();
    format!("[{}]", items.join(","))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn boxes_on_the_edges_of_odd_sized_frames_composite_correctly() {
    let tmp = tempfile::tempdir().unwrap();
    let boxes = write_edge_bundle(tmp.path());
    let s = stack(tmp.path(), 4).await;
    let avatar = Avatar::load(&tmp.path().join("avatars/edges")).unwrap();
    let frames = render(&s.client, vec![request("edges", 0, 4)])
        .await
        .unwrap();
    assert_eq!(frames.len(), 4);
    for f in &frames {
        let (pixels, w, h) = encode::decode_rgb(&f.image).unwrap();
        assert_eq!((w, h), (161, 97));
        let i = f.background_index as usize;
        let b = boxes[i];
        let bg = avatar.frames[i].to_vec();
        let want = reference_composite(&bg, 161, &b, true);
        let p = psnr(&face_region(&pixels, 161, &b), &face_region(&want, 161, &b));
        assert!(p > 28.0, "frame {i} box {b:?}: PSNR {p:.1} dB");
        let unchanged = psnr(&face_region(&pixels, 161, &b), &face_region(&bg, 161, &b));
        assert!(
            unchanged < 20.0,
            "frame {i}: the darkened crop must show ({unchanged:.1} dB vs background)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn avatars_are_evicted_under_a_small_budget() {
    let tmp = tempfile::tempdir().unwrap();
    // Written by the first stack; sized here so exactly one avatar fits.
    let probe = stack(tmp.path(), 4).await;
    drop(probe);
    let fp = |id: &str| {
        framecast_compositor::avatar_store::footprint(&tmp.path().join("avatars").join(id)).unwrap()
    };
    let budget = fp("small").max(fp("tall")) + 1;
    assert!(budget < fp("small") + fp("tall"));
    let s = stack_with_budget(tmp.path(), 4, Some(budget)).await;
    render(&s.client, vec![request("small", 0, 2)])
        .await
        .unwrap();
    render(&s.client, vec![request("tall", 0, 2)])
        .await
        .unwrap();
    render(&s.client, vec![request("small", 0, 2)])
        .await
        .unwrap();
    assert_eq!(s.metrics.avatar_evictions.get(), 2);
    let list = s
        .client
        .clone()
        .list_avatars(framecast_proto::compositor::v1::ListAvatarsRequest {})
        .await
        .unwrap()
        .into_inner();
    let state = |id: &str| {
        list.avatars
            .iter()
            .find(|a| a.avatar_id == id)
            .unwrap()
            .state
            .clone()
    };
    assert_eq!(state("small"), "ready");
    assert_eq!(state("tall"), "available");
    assert!(s.metrics.avatar_bytes.get() as u64 <= budget);
}

#[tokio::test]
async fn an_avatar_in_use_is_not_evicted() {
    let tmp = tempfile::tempdir().unwrap();
    for (id, w) in [("a", 96), ("b", 112)] {
        let opts = DemoOptions {
            id: id.into(),
            width: w,
            height: 64,
            frames: 2,
            crop_size: 32,
            ..Default::default()
        };
        demo::write_demo(tmp.path(), &opts).unwrap();
    }
    let fp =
        |id: &str| framecast_compositor::avatar_store::footprint(&tmp.path().join(id)).unwrap();
    let store = AvatarStore::new(tmp.path(), true, Some(fp("b") + 1), Default::default()).unwrap();
    let held = store.get("a").await.unwrap();
    assert_eq!(held.resident_bytes(), fp("a"), "footprint must be exact");
    let e = store.get("b").await.err().unwrap();
    assert!(
        matches!(
            e,
            framecast_compositor::avatar_store::AvatarError::NoRoom { .. }
        ),
        "{e}"
    );
    drop(held);
    store.get("b").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_avatar_that_fails_to_load_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 4).await;
    std::fs::write(
        tmp.path().join("avatars/tall/frames/000002.jpg"),
        b"not a jpeg",
    )
    .unwrap();
    let e = render(&s.client, vec![request("tall", 0, 2)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("000002.jpg"), "{}", e.message());
    // The other avatar is unaffected.
    render(&s.client, vec![request("small", 0, 2)])
        .await
        .unwrap();
}

/// Shutdown while a stream renders: the request in flight completes, in order, then the stream
/// ends with UNAVAILABLE; the inference service, whose stream from the compositor stays open,
/// still stops at once rather than waiting out its grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_finishes_the_request_in_flight_then_ends_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 2).await;
    let (req_tx, mut stream) = open_render(&s.client, request("small", 0, 30)).await;
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.frame_index, 0);
    let stopping = tokio::spawn(s.compositor_server.shutdown());
    let mut next = 1;
    let end = loop {
        match stream.message().await {
            Ok(Some(f)) => {
                assert_eq!(
                    f.frame_index, next,
                    "frames out of order after shutdown began"
                );
                next += 1;
            }
            other => break other,
        }
    };
    assert_eq!(next, 30, "frames of the request in flight were lost");
    match end {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(None) => {}
        Ok(Some(_)) => unreachable!(),
    }
    tokio::time::timeout(std::time::Duration::from_secs(10), stopping)
        .await
        .expect("compositor did not stop")
        .unwrap();
    drop(req_tx);
    let started = std::time::Instant::now();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.inference_server.shutdown(),
    )
    .await
    .expect("inference server did not stop");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

/// Admission: past `--max-streams` open Render streams, a new one is refused at once with
/// RESOURCE_EXHAUSTED; when one closes, the next is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_past_the_limit_are_refused_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = Opts {
        max_streams: 1,
        ..Default::default()
    };
    let s = stack_with(tmp.path(), 4, opts).await;
    let (req_tx, mut open) = open_render(&s.client, request("small", 0, 2)).await;
    assert!(open.message().await.unwrap().is_some());
    let e = render(&s.client, vec![request("small", 0, 2)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--max-streams"), "{}", e.message());
    assert_eq!(s.metrics.streams_limit.get(), 1);
    drop(req_tx);
    while open.message().await.unwrap().is_some() {}
    // The first stream's task releases its slot as it ends; allow it a moment.
    let mut admitted = false;
    for _ in 0..50 {
        if render(&s.client, vec![request("small", 0, 2)])
            .await
            .is_ok()
        {
            admitted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(admitted, "a stream was refused after the open one closed");
}

/// Bearer tokens on both services: the compositor authenticates its clients and itself to the
/// inference service; calls without the right token get UNAUTHENTICATED; health stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_services_require_their_bearer_token() {
    use framecast_proto::auth::authorize;
    use framecast_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
    use tonic::Request;
    let tmp = tempfile::tempdir().unwrap();
    let opts = Opts {
        tokens: (Some("inference-secret"), Some("compositor-secret")),
        ..Default::default()
    };
    let s = stack_with(tmp.path(), 4, opts).await;
    let call = |token: Option<&str>| {
        let req = tokio_stream::iter(vec![request("small", 0, 3)]);
        authorize(Request::new(req), token).unwrap()
    };
    for bad in [None, Some("inference-secret"), Some("wrong")] {
        let e = s.client.clone().render(call(bad)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{bad:?}: {e:?}");
    }
    let mut frames = s
        .client
        .clone()
        .render(call(Some("compositor-secret")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        count_in_order(&mut frames, 0).await,
        3,
        "an authenticated render must reach inference with its token"
    );

    let url = s.inference_server.url();
    let mut kserve = GrpcInferenceServiceClient::connect(url.clone())
        .await
        .unwrap();
    let e = kserve
        .server_ready(framecast_proto::kserve::ServerReadyRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

/// Reads `read` every 50 ms until `done` holds of what it read or `within` has passed, and
/// returns the last value read for the caller to assert on.
async fn poll_until<T, F: std::future::Future<Output = T>>(
    within: std::time::Duration,
    mut read: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let until = std::time::Instant::now() + within;
    loop {
        let value = read().await;
        if done(&value) || std::time::Instant::now() >= until {
            return value;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// An inference replica's model manager over the fixture models in `models`, counting into
/// `metrics`.
fn replica(
    models: &Path,
    metrics: Arc<framecast_inference::metrics::Metrics>,
) -> Arc<ModelManager> {
    let repo = Repository::open(models).unwrap();
    Arc::new(ModelManager::new(
        repo,
        ExecOptions::default(),
        true,
        metrics,
    ))
}

/// Shared-memory regions the inference server at `url` holds registered.
async fn shm_regions(url: String) -> usize {
    use framecast_proto::kserve::{
        grpc_inference_service_client::GrpcInferenceServiceClient, SystemSharedMemoryStatusRequest,
    };
    GrpcInferenceServiceClient::connect(url)
        .await
        .unwrap()
        .system_shared_memory_status(SystemSharedMemoryStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .regions
        .len()
}

/// A replica that stops under load: the render loses no frame and keeps its order (batches
/// bound for the stopped replica go to the other), and the replica is used again once it is
/// back on the same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_stops_under_load_loses_no_frames_and_is_used_when_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (models, avatars) = write_fixtures(tmp.path(), 1000);
    let spawn = |addr, metrics| {
        inf_server::spawn(addr, replica(&models, metrics), ServerOptions::default())
    };
    let mut a = Some(
        spawn(([127, 0, 0, 1], 0).into(), Default::default())
            .await
            .unwrap(),
    );
    let b = spawn(([127, 0, 0, 1], 0).into(), Default::default())
        .await
        .unwrap();
    let (a_addr, a_url) = a.as_ref().map(|a| (a.addr, a.url())).unwrap();
    let client_opts = ClientOptions {
        health_interval: std::time::Duration::from_millis(100),
        ..Default::default()
    };
    let inference = InferenceClient::connect_lazy(&[a_url, b.url()], &client_opts).unwrap();
    let compositor = spawn_compositor(&avatars, inference.clone(), 2, Default::default()).await;
    let client = CompositorClient::connect(compositor.url()).await.unwrap();

    let mut frames = client
        .clone()
        .render(tokio_stream::iter(vec![request("small", 0, 200)]))
        .await
        .unwrap()
        .into_inner();
    let mut next = 0u64;
    let mut stopping = None;
    while let Some(f) = frames.message().await.unwrap() {
        assert_eq!(f.frame_index, next, "frames out of order");
        next += 1;
        if next == 10 {
            stopping = a.take().map(|a| tokio::spawn(a.shutdown()));
        }
    }
    assert_eq!(next, 200, "frames lost when a replica stopped");
    stopping.unwrap().await.unwrap();

    // Back on the same address, with fresh state: health checks find it, batches reach it.
    let back_metrics = Arc::new(framecast_inference::metrics::Metrics::new());
    let _a = spawn(a_addr, back_metrics.clone()).await.unwrap();
    let all_healthy = |h: &Vec<(String, bool)>| h.iter().all(|(_, ok)| *ok);
    let health = poll_until(
        std::time::Duration::from_secs(5),
        || async { inference.health() },
        all_healthy,
    )
    .await;
    assert!(
        all_healthy(&health),
        "restarted replica never reported healthy: {health:?}"
    );
    let frames = render(&client, vec![request("small", 0, 40)])
        .await
        .unwrap();
    assert_eq!(frames.len(), 40);
    let served = back_metrics
        .requests
        .with_label_values(&["passthrough", "ok"])
        .get();
    assert!(served > 0, "the restarted replica got no batch");
    // It forgot the old shared-memory regions; the compositor noticed and registered anew.
    assert!(
        shm_regions(format!("http://{a_addr}")).await > 0,
        "no shared memory registered with the restarted replica"
    );
    drop(b);
}

/// The answer a test's resolver gives for every name, changed by the test as it goes.
struct Dns(std::sync::Mutex<std::io::Result<Vec<std::net::SocketAddr>>>);

impl Dns {
    fn answer(&self, a: std::io::Result<Vec<std::net::SocketAddr>>) {
        *self.0.lock().unwrap() = a;
    }
}

impl Resolve for Dns {
    fn lookup(
        &self,
        _host: &str,
        _port: u16,
    ) -> futures::future::BoxFuture<'static, std::io::Result<Vec<std::net::SocketAddr>>> {
        let a = match &*self.0.lock().unwrap() {
            Ok(addrs) => Ok(addrs.clone()),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        };
        Box::pin(async move { a })
    }
}

/// Waits up to 5 s for the pool to list exactly `want` (labels), in any order.
async fn wait_for_replicas(inference: &InferenceClient, want: &[String]) {
    let mut want = want.to_vec();
    want.sort();
    let seen = poll_until(
        std::time::Duration::from_secs(5),
        || async {
            let mut seen: Vec<String> = inference.health().into_iter().map(|(l, _)| l).collect();
            seen.sort();
            seen
        },
        |seen| seen == &want,
    )
    .await;
    assert_eq!(seen, want, "replicas in the pool");
}

/// Replicas behind one host name: each address it resolves to joins the pool and gets
/// batches; a failed lookup keeps the pool; an address that leaves the answer gets no more
/// batches, its shared-memory regions are unregistered, and no frame is lost on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_behind_a_host_name_join_and_leave_as_its_addresses_change() {
    let tmp = tempfile::tempdir().unwrap();
    let (models, avatars) = write_fixtures(tmp.path(), 1000);
    let spawn = |metrics| {
        inf_server::spawn_on_loopback(replica(&models, metrics), ServerOptions::default())
    };
    let (a_metrics, b_metrics) = (Arc::default(), Arc::default());
    let a = spawn(Arc::clone(&a_metrics)).await.unwrap();
    let b = spawn(Arc::clone(&b_metrics)).await.unwrap();
    // Batches each replica served.
    let served = |m: &framecast_inference::metrics::Metrics| {
        m.requests.with_label_values(&["passthrough", "ok"]).get()
    };
    let name = "http://inference.test:8001".to_string();
    let label = |addr| format!("{name} ({addr})");
    let dns = Arc::new(Dns(std::sync::Mutex::new(Ok(vec![a.addr]))));
    let gauge = framecast_compositor::metrics::Metrics::new().inference_replicas;
    let client_opts = ClientOptions {
        resolve_interval: std::time::Duration::from_millis(50),
        health_interval: std::time::Duration::from_millis(100),
        replicas_gauge: Some(gauge.clone()),
        ..Default::default()
    };
    // Waits up to 5 s for the exported gauge to count `n` healthy replicas and no other.
    let gauge_reads = |n: i64| {
        let gauge = gauge.clone();
        async move {
            let read = |h| gauge.with_label_values(&[h]).get();
            let counts = poll_until(
                std::time::Duration::from_secs(5),
                || async { (read("healthy"), read("unhealthy")) },
                |c| *c == (n, 0),
            )
            .await;
            assert_eq!(counts, (n, 0), "gauge (healthy, unhealthy)");
        }
    };
    let inference =
        InferenceClient::connect_lazy_with(std::slice::from_ref(&name), &client_opts, dns.clone())
            .unwrap();
    wait_for_replicas(&inference, &[label(a.addr)]).await;
    let compositor = spawn_compositor(&avatars, inference.clone(), 2, Default::default()).await;
    let client = CompositorClient::connect(compositor.url()).await.unwrap();
    let render_in_order = |n: u32| {
        let client = client.clone();
        async move {
            let mut frames = client
                .clone()
                .render(tokio_stream::iter(vec![request("small", 0, n)]))
                .await
                .unwrap()
                .into_inner();
            count_in_order(&mut frames, 0).await
        }
    };

    assert_eq!(render_in_order(20).await, 20);
    assert!(
        served(&a_metrics) > 0,
        "the one address resolved got no batch"
    );
    assert_eq!(served(&b_metrics), 0);

    // The name now resolves to both: the new address joins and shares the batches.
    dns.answer(Ok(vec![a.addr, b.addr]));
    wait_for_replicas(&inference, &[label(a.addr), label(b.addr)]).await;
    gauge_reads(2).await;
    assert_eq!(render_in_order(200).await, 200);
    assert!(
        served(&b_metrics) > 0,
        "the address that joined got no batch"
    );

    // A failed lookup changes nothing.
    dns.answer(Err(std::io::Error::other("SERVFAIL")));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    wait_for_replicas(&inference, &[label(a.addr), label(b.addr)]).await;

    // `a` leaves the answer: it gets no more batches, and forgets our shared memory.
    dns.answer(Ok(vec![b.addr]));
    wait_for_replicas(&inference, &[label(b.addr)]).await;
    gauge_reads(1).await;
    let a_left = served(&a_metrics);
    assert_eq!(render_in_order(40).await, 40);
    assert_eq!(
        served(&a_metrics),
        a_left,
        "a replica that left got a batch"
    );
    let regions = poll_until(
        std::time::Duration::from_secs(5),
        || shm_regions(a.url()),
        |r| *r == 0,
    )
    .await;
    assert_eq!(regions, 0, "the replica that left still holds our regions");
}

/// A deadline on the Render call reaches the inference queue: the batch still waiting there
/// when it passes is dropped before the model runs, and the client gets DEADLINE_EXCEEDED.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_render_deadline_drops_queued_work_before_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    // Batches of 4 frames wait up to 3 s at the model for batch-mates.
    let opts = Opts {
        queue_delay_us: 3_000_000,
        ..Default::default()
    };
    let s = stack_with(tmp.path(), 4, opts).await;
    // Load the avatar and the model first, so the deadline is spent in the queue.
    s.client
        .clone()
        .load_avatar(framecast_proto::compositor::v1::LoadAvatarRequest {
            avatar_id: "small".into(),
        })
        .await
        .unwrap();
    let url = s.inference_server.url();
    framecast_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient::connect(
        url.clone(),
    )
    .await
    .unwrap()
    .repository_model_load(framecast_proto::kserve::RepositoryModelLoadRequest {
        model_name: "passthrough".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (executions_before, _) = passthrough_stats(url.clone()).await;

    let mut req = tonic::Request::new(tokio_stream::iter(vec![request("small", 0, 4)]));
    req.set_timeout(std::time::Duration::from_millis(500));
    let started = std::time::Instant::now();
    let outcome = async {
        let mut stream = s.client.clone().render(req).await?.into_inner();
        while stream.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    }
    .await;
    let e = outcome.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_millis(2500),
        "DEADLINE_EXCEEDED came only after the batch window: {:?}",
        started.elapsed()
    );
    // Once the batch window has closed the inference server has judged the request: failed
    // as expired, and the model never ran it.
    let stats = poll_until(
        std::time::Duration::from_secs(10),
        || passthrough_stats(url.clone()),
        |s| s.1 > 0,
    )
    .await;
    assert_eq!(stats, (executions_before, 1), "(executions, failures)");
}

/// A client that closes its Render stream stops the work for it: of a 40-batch request, only
/// the batches already at the inference service when the client left are executed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closed_render_stream_stops_further_inference() {
    let tmp = tempfile::tempdir().unwrap();
    // Each 4-frame batch waits 200 ms at the model, so the request takes ~4 s at depth 2.
    let opts = Opts {
        queue_delay_us: 200_000,
        ..Default::default()
    };
    let s = stack_with(tmp.path(), 4, opts).await;
    let url = s.inference_server.url();
    let (tx, mut frames) = open_render(&s.client, request("small", 0, 160)).await;
    let first = frames.message().await.unwrap().unwrap();
    assert_eq!(first.frame_index, 0);
    let (executed_then, _) = passthrough_stats(url.clone()).await;
    drop(frames);
    drop(tx);
    // Long enough for the whole request to have run had it gone on.
    tokio::time::sleep(std::time::Duration::from_millis(4500)).await;
    let (executed, _) = passthrough_stats(url).await;
    assert!(
        executed <= executed_then + 2,
        "{executed} batches executed after the client left at {executed_then} (depth 2)"
    );
    let frames_sent = s.metrics.frames.get();
    assert!(
        frames_sent < 40,
        "{frames_sent} frames composited for a client that left"
    );
}

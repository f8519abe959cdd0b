//! Frames through both real servers on loopback, checked pixel by pixel: the composite
//! against a reference computed here (over shared memory and over gRPC), faces on the edges
//! of odd-sized frames (as JPEG and as raw I420), sessions in parallel, and bad requests.

use framecast_compositor::avatar::{ping_pong, Avatar};
use framecast_compositor::encode::{self, Subsampling};
use framecast_compositor::mask;
use framecast_compositor::raw_frame;
use framecast_compositor::testing::psnr;
use framecast_e2e::stack::{render, stack, stack_with, Opts, Stack};
use framecast_e2e::{request, CROP, FRAMES, H, W};
use framecast_proto::compositor::v1::{ImageFormat, RenderRequest};
use framecast_proto::tensor::DataType;
use framecast_proto::tensorcache::v1::tensor_cache_client::TensorCacheClient;
use framecast_proto::tensorcache::v1::StatusRequest;
use std::path::Path;
use tonic::Code;

fn face_region(img: &[u8], width: u32, b: &framecast_compositor::manifest::FaceBox) -> Vec<u8> {
    (b.y..b.y + b.h)
        .flat_map(|y| {
            let i = ((y * width + b.x) * 3) as usize;
            img[i..i + (b.w * 3) as usize].to_vec()
        })
        .collect()
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
    // The crops came as I420 through shared memory too, and the face inputs were named from
    // the replica's tensor cache (registered once) rather than written into it per batch.
    let crops = |f: &str| s.metrics.face_crops.with_label_values(&[f]).get();
    assert_eq!((crops("i420"), crops("rgb")), (11, 0));
    let held = TensorCacheClient::connect(s.inference_server.url())
        .await
        .unwrap()
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.tensors.len(), 1, "{held:?}");
    assert_eq!(held.tensors[0].shape[0], FRAMES as i64);
    // Lost from the cache (eviction, restart): registered again through the same host's
    // path, every frame comes.
    let mut cache = TensorCacheClient::connect(s.inference_server.url())
        .await
        .unwrap();
    let name = held.tensors[0].name.clone();
    cache
        .unregister(framecast_proto::tensorcache::v1::UnregisterRequest { name })
        .await
        .unwrap();
    let again = render(&s.client, vec![request("small", 0, 8)])
        .await
        .unwrap();
    assert_eq!(again.len(), 8);
    let held = cache.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(held.tensors.len(), 1, "not registered again: {held:?}");
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

/// A bundle's frame `i` as its source file holds it (the avatar keeps only its encode and
/// the face region).
fn source_frame(dir: &Path, i: usize, w: u32, h: u32) -> Vec<u8> {
    let files = framecast_compositor::manifest::frame_files(dir).unwrap();
    framecast_compositor::avatar::decode_frame(&files[i], w, h).unwrap()
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

        let bg = source_frame(&root.join("avatars/small"), bg_index, W, H);
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

    let mut r = request("small", 0, 2);
    r.frame_format = 7;
    let e = err(r).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("frame_format 7"), "{}", e.message());

    let mut r = request("small", 0, 2);
    r.frame_format = ImageFormat::I420 as i32;
    r.jpeg_quality = 80;
    let e = err(r).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("jpeg_quality 80"), "{}", e.message());
}

/// Talking frames asked for as a rectangle holding the avatar's face region (what the face
/// changes) come back as that rectangle, byte for byte the whole raw frame's, and their
/// background's prepared JPEG, which is the rest of the frame as a client decodes it (the
/// whole frame keeps each frame's region kept decoded as its original pixels, which the
/// JPEG approximates); the rectangle is checked, field named.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn talking_frames_cut_to_the_face_region_rebuild_the_whole_frame() {
    use framecast_proto::compositor::v1::{FaceRegion, ListAvatarsRequest};
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 4).await;
    let mut whole = request("small", 3, 6);
    whole.frame_format = ImageFormat::I420 as i32;
    let whole = render(&s.client, vec![whole]).await.unwrap();
    let listed = s
        .client
        .clone()
        .list_avatars(ListAvatarsRequest {})
        .await
        .unwrap()
        .into_inner();
    let small = listed
        .avatars
        .iter()
        .find(|a| a.avatar_id == "small")
        .unwrap();
    let face = small.face_region.expect("a ready avatar's face region");
    let (x, y) = (face.x & !1, face.y & !1);
    let rect = FaceRegion {
        x,
        y,
        width: (face.x + face.width).next_multiple_of(2).min(W) - x,
        height: (face.y + face.height).next_multiple_of(2).min(H) - y,
    };
    let mut cut = request("small", 3, 6);
    cut.frame_format = ImageFormat::I420 as i32;
    cut.frame_region = Some(rect);
    let cut = render(&s.client, vec![cut]).await.unwrap();
    assert_eq!(cut.len(), whole.len());
    let r = raw_frame::Rect::from(rect);
    let (w, h) = (W as usize, H as usize);
    for (c, f) in cut.iter().zip(&whole) {
        assert_eq!(c.region, Some(rect), "frame {}", c.frame_index);
        assert_eq!(c.format, ImageFormat::I420 as i32);
        assert_eq!(c.image.len(), raw_frame::len(r.w as usize, r.h as usize));
        assert!(c.image.len() < f.image.len(), "a region, not the frame");
        let mut want = Vec::new();
        raw_frame::crop(&f.image, (w, h), r, &mut want).unwrap();
        assert!(c.image == want, "frame {}", c.frame_index);
        let mut rebuilt = raw_frame::from_jpeg(&c.background, W, H).unwrap();
        raw_frame::put(&mut rebuilt, (w, h), r, &c.image).unwrap();
        let db = psnr(&rebuilt, &f.image);
        assert!(db > 40.0, "frame {}: {db:.1} dB", c.frame_index);
    }

    // Each background's JPEG once a stream: frames 3..9 show backgrounds 3, 4, 5, 4, 3, 2;
    // the second 4 and 3 carry only its CRC, until the client asks for them again.
    let mut once = request("small", 3, 6);
    once.frame_format = ImageFormat::I420 as i32;
    once.frame_region = Some(rect);
    once.backgrounds_once = true;
    let again = RenderRequest {
        request_id: "again".into(),
        resend_backgrounds: true,
        ..once.clone()
    };
    let frames = render(&s.client, vec![once, again]).await.unwrap();
    assert_eq!(frames.len(), 12);
    let mut seen = std::collections::HashSet::new();
    for (i, f) in frames.iter().enumerate() {
        let jpeg = &cut[i % 6].background;
        assert_eq!(f.background_crc32, crc32fast::hash(jpeg), "frame {i}");
        assert_eq!(f.image, cut[i % 6].image);
        if i == 6 {
            seen.clear(); // resend_backgrounds
        }
        let first = seen.insert(f.background_index);
        assert_eq!(
            f.background.is_empty(),
            !first,
            "frame {i}, background {}",
            f.background_index
        );
    }

    let err = |r: RenderRequest| {
        let c = s.client.clone();
        async move { render(&c, vec![r]).await.unwrap_err() }
    };
    for (bad, says) in [
        (FaceRegion { x: 1, ..rect }, "even"),
        (
            FaceRegion {
                width: W + 2,
                ..rect
            },
            "not inside",
        ),
        (FaceRegion { height: 0, ..rect }, "empty"),
    ] {
        let mut r = request("small", 0, 2);
        r.frame_format = ImageFormat::I420 as i32;
        r.frame_region = Some(bad);
        let e = err(r).await;
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains("frame_region") && e.message().contains(says),
            "{}",
            e.message()
        );
    }
    let mut r = request("small", 0, 2);
    r.frame_region = Some(rect);
    let e = err(r).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("frame_region"), "{}", e.message());
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
    let frames = render(&s.client, vec![request("edges", 0, 4)])
        .await
        .unwrap();
    // The same frames raw, for a video encoder: odd width and height round the chroma up.
    let mut raw = request("edges", 0, 4);
    raw.frame_format = ImageFormat::I420 as i32;
    let raw = render(&s.client, vec![raw]).await.unwrap();
    assert_eq!((frames.len(), raw.len()), (4, 4));
    for (f, r) in frames.iter().zip(&raw) {
        let (pixels, w, h) = encode::decode_rgb(&f.image).unwrap();
        assert_eq!((w, h), (161, 97));
        assert_eq!(r.format, ImageFormat::I420 as i32);
        assert_eq!((r.width, r.height), (161, 97));
        assert_eq!(r.image.len(), 161 * 97 + 2 * 81 * 49);
        let raw_pixels = raw_frame::to_rgb(&r.image, 161, 97).unwrap();
        let agree = psnr(&raw_pixels, &pixels);
        assert!(agree > 30.0, "I420 vs JPEG frame: PSNR {agree:.1} dB");
        let i = f.background_index as usize;
        assert_eq!(r.background_index as usize, i);
        let b = boxes[i];
        let bg = source_frame(&tmp.path().join("avatars/edges"), i, 161, 97);
        let want = reference_composite(&bg, 161, &b, true);
        for (format, pixels) in [("JPEG", &pixels), ("I420", &raw_pixels)] {
            let p = psnr(&face_region(pixels, 161, &b), &face_region(&want, 161, &b));
            assert!(p > 28.0, "{format} frame {i} box {b:?}: PSNR {p:.1} dB");
            let unchanged = psnr(&face_region(pixels, 161, &b), &face_region(&bg, 161, &b));
            assert!(
                unchanged < 20.0,
                "{format} frame {i}: the darkened crop must show ({unchanged:.1} dB vs background)"
            );
        }
    }
}

/// Over gRPC, the compositor registers the avatar's face inputs with the replica's tensor
/// cache once and sends row indices instead, and asks for the crops as I420: the hop carries
/// the conditioning and half-size answers, not the faces (counted from the real message
/// sizes). A tensor the replica lost is registered again, with no frame lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_grpc_face_inputs_travel_as_indices_and_come_back_when_lost() {
    use framecast_proto::tensorcache::v1::UnregisterRequest;
    let tmp = tempfile::tempdir().unwrap();
    let opts = Opts {
        shared_memory: false,
        ..Default::default()
    };
    let s = stack_with(tmp.path(), 4, opts).await;
    let frames = render(&s.client, vec![request("small", 0, 8)])
        .await
        .unwrap();
    assert_eq!(frames.len(), 8);
    let sent = s
        .metrics
        .inference_bytes
        .with_label_values(&["sent", "batch"])
        .get();
    let received = s
        .metrics
        .inference_bytes
        .with_label_values(&["received", "batch"])
        .get();
    let face = 6 * CROP as u64 * CROP as u64;
    let audio = 32 * 16 * 16 * 4;
    // The crops come back as I420: half of their 3 x S x S bytes.
    let output = framecast_proto::i420::len(1, CROP as usize, CROP as usize) as u64;
    assert_eq!(2 * output, 3 * CROP as u64 * CROP as u64);
    assert!(
        sent < 8 * (audio + 1024),
        "{} bytes sent per frame: the face inputs ({face} B a frame) were sent",
        sent / 8
    );
    assert!(
        received >= 8 * output && received < 8 * (output + 1024),
        "{received}"
    );
    let mut cache = TensorCacheClient::connect(s.inference_server.url())
        .await
        .unwrap();
    let held = cache.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(held.tensors.len(), 1, "{held:?}");
    let name = held.tensors[0].name.clone();
    assert_eq!(held.tensors[0].shape[0], FRAMES as i64);
    // The replica loses it (as after an eviction or a restart): the next batch registers it
    // again and every frame comes.
    cache
        .unregister(UnregisterRequest { name: name.clone() })
        .await
        .unwrap();
    let again = render(&s.client, vec![request("small", 8, 8)])
        .await
        .unwrap();
    assert_eq!(again.len(), 8);
    let held = cache.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(held.tensors.len(), 1);
    assert_eq!(held.tensors[0].name, name);
}

/// A replica whose tensor cache refuses the avatar's face inputs (too large for its budget)
/// gets the rows with each batch instead: every frame comes, correct.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tensor_the_replica_refuses_travels_as_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = Opts {
        shared_memory: false,
        tensor_cache: framecast_inference::tensor_cache::TensorLimits::new(1024),
        ..Default::default()
    };
    let s = stack_with(tmp.path(), 4, opts).await;
    for start in [0, 8] {
        let frames = render(&s.client, vec![request("small", start, 8)])
            .await
            .unwrap();
        assert_eq!(frames.len(), 8);
    }
    let sent = s
        .metrics
        .inference_bytes
        .with_label_values(&["sent", "batch"])
        .get();
    let face = 6 * CROP as u64 * CROP as u64;
    assert!(sent >= 16 * face, "{sent} bytes: the rows did not travel");
}

/// Against a server without framecast's extensions (as a plain Triton is), the compositor
/// sends the face inputs and takes the crops as RGB: the same frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_extensions_the_rows_and_rgb_travel() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = Opts {
        shared_memory: false,
        framecast_extensions: false,
        ..Default::default()
    };
    let s = stack_with(tmp.path(), 4, opts).await;
    check_reference_composite(tmp.path(), &s).await;
    let sent = s
        .metrics
        .inference_bytes
        .with_label_values(&["sent", "batch"])
        .get();
    let received = s
        .metrics
        .inference_bytes
        .with_label_values(&["received", "batch"])
        .get();
    let (face, output) = (6 * (CROP * CROP) as u64, 3 * (CROP * CROP) as u64);
    assert!(sent >= 11 * face, "{sent}: the face inputs must travel");
    assert!(
        received >= 11 * output,
        "{received}: the crops must come as RGB"
    );
    let crops = |f: &str| s.metrics.face_crops.with_label_values(&[f]).get();
    assert_eq!((crops("i420"), crops("rgb")), (0, 11));
}

/// Tenants of one replica cannot push each other out: another token's tensors, held within
/// its fair share, are not evicted for the compositor's, and the compositor, refused while
/// the cache is full, sends rows meanwhile and registers again once room comes back (it
/// does not give up on the cache for good). Registrations count in the hop's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_tensor_is_registered_again_once_room_comes_back() {
    use framecast_inference::tensor_cache::{TensorLimits, ENTRY_OVERHEAD};
    use framecast_proto::tensorcache::v1::{RegisterRequest, UnregisterRequest};
    let face = FRAMES as u64 * 6 * (CROP * CROP) as u64 + ENTRY_OVERHEAD;
    // Two tenants' fair share is one byte short of the face tensor.
    let budget = 2 * face - 2;
    let tmp = tempfile::tempdir().unwrap();
    let opts = Opts {
        shared_memory: false,
        tokens: (Some("comp"), None),
        other_inference_token: Some("other"),
        tensor_cache: TensorLimits {
            budget,
            client_bytes: budget,
            client_names: 16,
        },
        tensor_retry: std::time::Duration::from_millis(300),
        ..Default::default()
    };
    let s = stack_with(tmp.path(), 4, opts).await;
    let channel = tonic::transport::Channel::from_shared(s.inference_server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let as_token = |token: &'static str| {
        move |mut r: tonic::Request<()>| {
            let v = format!("Bearer {token}").parse().unwrap();
            r.metadata_mut().insert("authorization", v);
            Ok(r)
        }
    };
    let mut other = TensorCacheClient::with_interceptor(channel.clone(), as_token("other"));
    let mut comp = TensorCacheClient::with_interceptor(channel, as_token("comp"));
    // The other client holds exactly its fair share: the face tensor does not fit beside it.
    let held = (budget / 2 - ENTRY_OVERHEAD) as usize;
    other
        .register(RegisterRequest {
            name: "theirs".into(),
            datatype: "UINT8".into(),
            shape: vec![held as i64],
            data: vec![7u8; held].into(),
            first_row: 0,
        })
        .await
        .unwrap();
    let frames = render(&s.client, vec![request("small", 0, 8)])
        .await
        .unwrap();
    assert_eq!(frames.len(), 8, "rows travel while the tensor is refused");
    let theirs = other.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        theirs.tensors.len(),
        1,
        "the other client's tensor was evicted"
    );
    let mine = comp.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(mine.tensors.is_empty(), "{mine:?}");
    let registered = || {
        s.metrics
            .inference_bytes
            .with_label_values(&["sent", "tensor_registration"])
            .get()
    };
    let refused_bytes = registered();
    assert!(
        refused_bytes > 0,
        "the refused registration was not counted"
    );
    // Room comes back: after the retry period the next batches register it again.
    other
        .unregister(UnregisterRequest {
            name: "theirs".into(),
        })
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let frames = render(&s.client, vec![request("small", 8, 8)])
        .await
        .unwrap();
    assert_eq!(frames.len(), 8);
    let mine = comp.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        mine.tensors.len(),
        1,
        "the compositor gave up on the cache: {mine:?}"
    );
    assert!(registered() > refused_bytes);
}

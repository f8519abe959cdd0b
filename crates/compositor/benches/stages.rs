//! Per-stage cost of compositing one frame at 1280x720 and 1920x1080, 4:2:0, the avatar's
//! quality (75), a 320 x 320 face box, and what a prepared avatar costs to hold and to load.
//!
//! `cargo bench -p framecast-compositor --bench stages`
//!
//! Criterion measures each stage alone: `face_input` (the model's input, computed from the
//! face region at render time), `paste` (an I420 crop resized per plane to the face box and
//! alpha-blended into a copy of the region's YCbCr planes), `compose` (as the server runs it
//! with an I420 crop: paste, encode the region from its planes with restart markers, splice
//! it into the prepared frame), `compose_rgb_crop` (the same from an RGB crop, as a replica
//! without framecast's I420 outputs sends it), `compose_whole` (a
//! request at another quality: decode, paste, encode the whole frame), `idle` (the prepared
//! frame itself) and `encode` (a bare full-frame turbojpeg encode of the composited frame,
//! no restart markers: the cost every frame paid before).
//!
//! Then, side by side in one run and interleaved so machine noise hits both alike, over more
//! frames than the L3 cache holds: `compose` against the bare encode of the same output
//! frames (targets: <= 25% at 1280x720, <= 20% at 1920x1080), the RAM per prepared frame
//! (target <= 0.6 MiB at 1280x720), and the load of the bundle from its prepared file
//! against the load framecast did before (every frame decoded, its face input computed; the
//! target is 5x faster). Medians.

use criterion::Criterion;
use framecast_compositor::avatar::{self, Avatar, Source};
use framecast_compositor::blend::{self, BlendScratch};
use framecast_compositor::demo::{self, DemoOptions};
use framecast_compositor::encode::{self, Subsampling};
use framecast_compositor::manifest::{self, FaceBox};
use framecast_compositor::planes::{CropPlanes, Planes};
use framecast_compositor::{face_contract, render};
use framecast_proto::i420;
use rayon::prelude::*;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Instant;

const FACE: u32 = 320;

/// A demo bundle whose boxes are `FACE` px squares centred on the demo's faces.
fn bundle(root: &Path, width: u32, height: u32, frames: u32) -> PathBuf {
    let opts = DemoOptions {
        id: format!("a{width}"),
        width,
        height,
        frames,
        crop_size: 320,
        ..Default::default()
    };
    let dir = demo::write_demo(root, &opts).expect("demo avatar");
    let boxes: Vec<FaceBox> = manifest::load_boxes(&dir)
        .expect("boxes")
        .iter()
        .map(|b| {
            let (cx, cy) = (b.x + b.w / 2, b.y + b.h / 2);
            FaceBox {
                x: cx.saturating_sub(FACE / 2).min(width - FACE),
                y: cy.saturating_sub(FACE / 2).min(height - FACE),
                w: FACE,
                h: FACE,
            }
        })
        .collect();
    let json = serde_json::to_string(&boxes).expect("boxes json");
    std::fs::write(dir.join(manifest::BOXES_FILE), json).expect("write boxes");
    dir
}

/// What framecast's load did before prepared avatars: every frame decoded and kept whole,
/// and its face input computed.
fn legacy_load(dir: &Path, a: &Avatar) -> usize {
    let files = manifest::frame_files(dir).expect("frames");
    let m = &a.manifest;
    let per = face_contract::input_bytes(m.crop_size as usize);
    files
        .par_iter()
        .zip(&a.boxes)
        .map(|(f, b)| {
            let rgb = avatar::decode_frame(f, m.width, m.height).expect("decode");
            let mut input = vec![0u8; per];
            avatar::face_input(&rgb, m.width, b, m.crop_size, &m.channel_order, &mut input)
                .expect("face input");
            black_box(rgb.len() + input.len())
        })
        .sum()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut c = Criterion::default().configure_from_args();
    let quick = !std::env::args().any(|a| a == "--bench");
    let mut report = Vec::new();
    for (w, h) in [(1280u32, 720u32), (1920, 1080)] {
        let dir = bundle(tmp.path(), w, h, if quick { 8 } else { 48 });
        let a = Avatar::load(&dir).expect("load avatar");
        let q = a.params.quality;
        let s = a.manifest.crop_size;
        let n = (s * s) as usize;
        // The model's output for frame i: the reference face channels, as passthrough gives,
        // in RGB and as the inference service sends it (I420).
        let rgb_crops: Vec<Vec<u8>> = (0..a.frames.len())
            .map(|i| {
                let mut input = vec![0u8; face_contract::input_bytes(s as usize)];
                a.face_input(i, &mut input).expect("face input");
                input[..3 * n].to_vec()
            })
            .collect();
        let crops: Vec<Vec<u8>> = rgb_crops
            .iter()
            .map(|c| i420::from_planar_rgb(c, 1, s as usize, s as usize))
            .collect();
        let crop = |i: usize| render::Crop::I420(&crops[i]);
        // The output frames whole, for the bare encode: the source frame with the face pasted.
        let files = manifest::frame_files(&dir).expect("frames");
        let mut scratch = BlendScratch::default();
        let outputs: Vec<Vec<u8>> = (0..a.frames.len())
            .map(|i| {
                let mut f = avatar::decode_frame(&files[i], w, h).expect("decode");
                let (b, mask) = (&a.boxes[i], &a.box_masks[i]);
                blend::paste(&mut f, w, b, &rgb_crops[i], s, mask, &mut scratch).expect("paste");
                f
            })
            .collect();
        let mut g = c.benchmark_group(format!("{w}x{h}"));
        let mut input = vec![0u8; face_contract::input_bytes(s as usize)];
        g.bench_function("face_input", |b| {
            b.iter(|| a.face_input(0, &mut input).expect("face input"))
        });
        let frame = &a.frames[0];
        let mut region = frame.pixels.bytes().to_vec();
        let local = frame.region.local(&a.boxes[0]);
        let planes = Planes::new(frame.region.w, frame.region.h);
        g.bench_function("paste", |b| {
            b.iter(|| {
                region.copy_from_slice(frame.pixels.bytes());
                blend::paste_planes(
                    &mut region,
                    &planes,
                    &local,
                    &CropPlanes::i420(&crops[0], s).expect("crop"),
                    &a.box_masks[0],
                    &mut scratch,
                )
                .expect("paste")
            })
        });
        g.bench_function("compose", |b| {
            b.iter(|| render::compose(&a, 1, crop(1), jpeg(q), None).expect("compose"))
        });
        g.bench_function("compose_rgb_crop", |b| {
            let c = render::Crop::Rgb(&rgb_crops[1]);
            b.iter(|| render::compose(&a, 1, c, jpeg(q), None).expect("compose"))
        });
        g.bench_function("compose_i420", |b| {
            b.iter(|| render::compose(&a, 1, crop(1), render::Output::I420, None).expect("compose"))
        });
        g.bench_function("compose_whole", |b| {
            b.iter(|| render::compose(&a, 1, crop(1), jpeg(q + 1), None).expect("compose"))
        });
        g.bench_function("idle", |b| {
            b.iter(|| render::idle(&a, 1, jpeg(q), None).expect("idle"))
        });
        // A raw idle frame made from the prepared JPEG each time, and kept.
        g.bench_function("idle_i420", |b| {
            b.iter(|| render::idle(&a, 1, render::Output::I420, None).expect("idle"))
        });
        let kept = framecast_compositor::idle_frames::IdleBudget::new(1 << 30, None);
        g.bench_function("idle_i420_kept", |b| {
            b.iter(|| render::idle(&a, 1, render::Output::I420, Some(&kept)).expect("idle"))
        });
        g.bench_function("encode", |b| {
            b.iter(|| {
                encode::encode_rgb(black_box(&outputs[0]), w, h, q, Subsampling::S420)
                    .expect("encode")
            })
        });
        g.finish();

        let rounds = if quick { 5 } else { 600 };
        let frames = a.frames.len();
        let (mut composed, mut bare) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
        for r in 0..rounds {
            let i = r % frames;
            let t = Instant::now();
            black_box(render::compose(&a, i, crop(i), jpeg(q), None).expect("compose"));
            composed.push(t.elapsed().as_secs_f64());
            let j = (i + frames / 2) % frames;
            let t = Instant::now();
            black_box(encode::encode_rgb(&outputs[j], w, h, q, Subsampling::S420).expect("encode"));
            bare.push(t.elapsed().as_secs_f64());
        }
        let (composed, bare) = (median(composed), median(bare));
        let target = if w == 1280 { 25 } else { 20 };
        let region = &a.frames[0].region;
        report.push(format!(
            "{w}x{h}: compose (blend + region encode + splice) {:.3} ms, bare full-frame encode {:.3} ms: {:.1}% (target <= {target}%); {:.0} frames/s per core; region {}x{} for a {FACE}x{FACE} face, restart every {} MCUs",
            composed * 1e3,
            bare * 1e3,
            composed / bare * 100.0,
            1.0 / composed,
            region.w,
            region.h,
            a.params.restart_mcus,
        ));
        // What the restart markers cost: the prepared JPEGs against plain encodes.
        let (mut with, mut without) = (0usize, 0usize);
        for (i, f) in files.iter().enumerate() {
            let rgb = avatar::decode_frame(f, w, h).expect("decode");
            with += a.frames[i].jpeg.len();
            without += encode::encode_rgb(&rgb, w, h, q, Subsampling::S420)
                .expect("encode")
                .len();
        }
        report.push(format!(
            "{w}x{h}: prepared JPEG {:.0} KB a frame, {:+.2}% for the restart markers",
            with as f64 / frames as f64 / 1e3,
            (with as f64 / without as f64 - 1.0) * 100.0
        ));
        report.push(format!(
            "{w}x{h}: RAM per prepared frame {:.3} MiB, all included (raw RGB alone was {:.2} MiB)",
            a.resident_bytes() as f64 / frames as f64 / (1 << 20) as f64,
            (w * h * 3) as f64 / (1 << 20) as f64
        ));

        Avatar::prepare(&dir, Subsampling::S420).expect("prepare");
        let loads = if quick { 1 } else { 5 };
        let (mut prepared, mut legacy) = (Vec::new(), Vec::new());
        for _ in 0..loads {
            let t = Instant::now();
            let p = Avatar::load(&dir).expect("load prepared");
            prepared.push(t.elapsed().as_secs_f64());
            assert_eq!(p.source, Source::PreparedFile);
            let t = Instant::now();
            black_box(legacy_load(&dir, &a));
            legacy.push(t.elapsed().as_secs_f64());
        }
        let (prepared, legacy) = (median(prepared), median(legacy));
        report.push(format!(
            "{w}x{h}: load of {frames} frames: prepared file {:.1} ms, decode-everything load {:.1} ms: {:.1}x faster (target >= 5x)",
            prepared * 1e3,
            legacy * 1e3,
            legacy / prepared
        ));
    }
    c.final_summary();
    println!("\nside by side, medians:");
    for line in report {
        println!("  {line}");
    }
}

/// The JPEG output at `quality`, 4:2:0.
fn jpeg(quality: u8) -> render::Output {
    render::Output::Jpeg {
        quality,
        subsampling: Subsampling::S420,
    }
}

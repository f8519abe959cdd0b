//! Per-stage cost of compositing one frame, at 1280x720 and 1920x1080, JPEG quality 75, 4:2:0.
//!
//! `cargo bench -p framecast-compositor --bench stages`
//!
//! Criterion measures each stage alone: `paste` (crop + mask interleave, SIMD resize to the
//! face box, alpha blend), `encode` (libjpeg-turbo on the composited frame) and `compose` (as
//! the server runs it: lock the background, save the face rectangle, paste, encode, restore).
//! Then a side-by-side pass interleaves `compose` and a bare turbojpeg encode of the same
//! output frames, and prints the median overhead: the target is <= 15% of the encode.

use criterion::Criterion;
use framecast_compositor::avatar::Avatar;
use framecast_compositor::blend::{self, BlendScratch};
use framecast_compositor::demo::{self, DemoOptions};
use framecast_compositor::encode::{self, Subsampling};
use framecast_compositor::render;
use std::hint::black_box;
use std::time::Instant;

const QUALITY: u8 = 75;

fn avatar(root: &std::path::Path, width: u32, height: u32) -> Avatar {
    let opts = DemoOptions {
        id: format!("a{width}"),
        width,
        height,
        frames: 16,
        crop_size: 320,
        ..Default::default()
    };
    let dir = demo::write_demo(root, &opts).expect("demo avatar");
    Avatar::load(&dir).expect("load avatar")
}

/// The model's output for frame `i`: the reference face channels, as `passthrough` returns.
fn crop(a: &Avatar, i: usize) -> Vec<u8> {
    let n = (a.manifest.crop_size * a.manifest.crop_size) as usize;
    a.face_inputs[i][..3 * n].to_vec()
}

fn main() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut c = Criterion::default().configure_from_args();
    let quick = !std::env::args().any(|a| a == "--bench");
    let mut report = Vec::new();
    for (w, h) in [(1280u32, 720u32), (1920, 1080)] {
        let a = avatar(tmp.path(), w, h);
        let crops: Vec<Vec<u8>> = (0..a.frames.len()).map(|i| crop(&a, i)).collect();
        let m = &a.manifest;
        let mut scratch = BlendScratch::default();
        let mut frame = a.frames[0].to_vec();
        let mut g = c.benchmark_group(format!("{w}x{h}"));
        g.bench_function("paste", |b| {
            b.iter(|| {
                blend::paste(
                    &mut frame,
                    m.width,
                    &a.boxes[0],
                    &crops[0],
                    m.crop_size,
                    &a.box_masks[0],
                    &mut scratch,
                )
                .expect("paste")
            })
        });
        g.bench_function("encode", |b| {
            b.iter(|| {
                encode::encode_rgb(black_box(&frame), w, h, QUALITY, Subsampling::S420)
                    .expect("encode")
            })
        });
        g.bench_function("compose", |b| {
            b.iter(|| {
                render::compose(&a, 1, &crops[1], QUALITY, Subsampling::S420).expect("compose")
            })
        });
        g.finish();

        // Side by side, interleaved so machine noise hits both alike, over more frames than the
        // L3 cache holds so both sides read cold memory as a server does: the full compose
        // against a bare encode of the same output frames. The compositing overhead is their
        // difference.
        let outputs: Vec<Vec<u8>> = (0..a.frames.len())
            .map(|i| {
                let mut f = a.frames[i].to_vec();
                blend::paste(
                    &mut f,
                    m.width,
                    &a.boxes[i],
                    &crops[i],
                    m.crop_size,
                    &a.box_masks[i],
                    &mut scratch,
                )
                .expect("paste");
                f
            })
            .collect();
        let rounds = if quick { 5 } else { 600 };
        let n = a.frames.len();
        let (mut composed, mut bare) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
        for r in 0..rounds {
            let i = r % n;
            let t = Instant::now();
            black_box(
                render::compose(&a, i, &crops[i], QUALITY, Subsampling::S420).expect("compose"),
            );
            composed.push(t.elapsed().as_secs_f64());
            let j = (i + n / 2) % n;
            let t = Instant::now();
            black_box(
                encode::encode_rgb(&outputs[j], w, h, QUALITY, Subsampling::S420).expect("encode"),
            );
            bare.push(t.elapsed().as_secs_f64());
        }
        composed.sort_by(f64::total_cmp);
        bare.sort_by(f64::total_cmp);
        let (composed, bare) = (composed[rounds / 2], bare[rounds / 2]);
        let overhead = composed - bare;
        report.push(format!(
            "{w}x{h}: compose {:.3} ms, bare encode {:.3} ms, compositing overhead {:.3} ms = {:.1}% of the encode (target <= 15%); {:.0} frames/s per core",
            composed * 1e3,
            bare * 1e3,
            overhead * 1e3,
            overhead / bare * 100.0,
            1.0 / composed
        ));
    }
    c.final_summary();
    println!("\nside by side, medians:");
    for line in report {
        println!("  {line}");
    }
}

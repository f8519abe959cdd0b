//! H.264 (OpenH264) against VP8 (libvpx) as a session encodes them: the demo avatar at
//! 1280x720, its mouth opening and closing in the face box as a talking frame's does, 25
//! frames a second, each codec at several target bitrates. Per codec and bitrate: the encode
//! time per frame (median), the bitrate it made, and the luma PSNR of what a browser decodes
//! (OpenH264's and libvpx's decoders). Then the bitrate each needs for the quality H.264 has
//! at the gateway's default 2 Mbit/s (interpolated on the measured points). The codecs take
//! turns frame by frame so machine noise hits both alike. Last, OpenH264's complexities and
//! libvpx's real-time speeds at the default bitrate, side by side the same way (how the
//! defaults were chosen).
//!
//! `cargo bench -p framecast-gateway --bench codecs` (`make bench-codecs`); `-- --quick`
//! runs fewer frames.

use framecast_compositor::avatar;
use framecast_compositor::demo::{self, DemoOptions};
use framecast_compositor::manifest;
use framecast_compositor::raw_frame;
use framecast_gateway::media::{
    Complexity, H264Encoder, VideoCodec, VideoEncoder, H264_COMPLEXITY,
};
use openh264::formats::YUVSource;
use std::time::Instant;

const W: usize = 1280;
const H: usize = 720;
const FPS: f64 = 25.0;
const BITRATES_KBPS: [u32; 4] = [500, 1000, 2000, 3000];
/// The gateway's default `--video-kbps`.
const DEFAULT_KBPS: u32 = 2000;

/// The demo loop as I420 frames, a dark mouth in each face box opening and closing over an
/// 8-frame cycle (the talking part of a frame is its face; the rest is the loop).
fn frames(count: usize) -> Vec<Vec<u8>> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let opts = DemoOptions {
        id: "codecs".into(),
        width: W as u32,
        height: H as u32,
        frames: 50,
        ..Default::default()
    };
    let dir = demo::write_demo(tmp.path(), &opts).expect("demo avatar");
    let files = manifest::frame_files(&dir).expect("frames");
    let boxes = manifest::load_boxes(&dir).expect("boxes");
    let loop_frames: Vec<Vec<u8>> = files
        .iter()
        .map(|f| avatar::decode_frame(f, W as u32, H as u32).expect("decode"))
        .collect();
    (0..count)
        .map(|t| {
            let i = avatar::ping_pong(t as u64, loop_frames.len());
            let mut rgb = loop_frames[i].clone();
            let b = &boxes[i];
            let open =
                ((t as f64 * std::f64::consts::TAU / 8.0).sin().abs() * 0.12 + 0.02) * b.h as f64;
            let (cx, cy) = (
                b.x as f64 + b.w as f64 / 2.0,
                b.y as f64 + b.h as f64 * 0.72,
            );
            let rx = b.w as f64 * 0.18;
            for y in b.y..(b.y + b.h).min(H as u32) {
                for x in b.x..(b.x + b.w).min(W as u32) {
                    let (dx, dy) = ((x as f64 - cx) / rx, (y as f64 - cy) / open.max(1.0));
                    if dx * dx + dy * dy <= 1.0 {
                        let p = (y as usize * W + x as usize) * 3;
                        rgb[p..p + 3].copy_from_slice(&[70, 25, 30]);
                    }
                }
            }
            let mut i420 = Vec::new();
            raw_frame::from_rgb(&rgb, W, H, &mut i420).expect("i420");
            i420
        })
        .collect()
}

enum Browser {
    H264(openh264::decoder::Decoder),
    Vp8(framecast_vp8::Decoder),
}

impl Browser {
    /// The decoded luma, rows packed.
    fn luma(&mut self, frame: &[u8]) -> Vec<u8> {
        match self {
            Browser::H264(d) => {
                let yuv = d.decode(frame).expect("H.264 decodes").expect("a picture");
                let stride = yuv.strides().0;
                let y = yuv.y();
                (0..H)
                    .flat_map(|r| y[r * stride..r * stride + W].to_vec())
                    .collect()
            }
            Browser::Vp8(d) => {
                let pic = d.decode(frame).expect("VP8 decodes").expect("a picture");
                pic.i420[..W * H].to_vec()
            }
        }
    }
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

/// One codec at one bitrate.
struct Run {
    codec: VideoCodec,
    encoder: VideoEncoder,
    browser: Browser,
    encode_ms: Vec<f64>,
    bytes: usize,
    psnr: Vec<f64>,
}

/// (target kbps, made kbps, PSNR dB, encode ms median) of each bitrate.
type Curve = Vec<(u32, f64, f64, f64)>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The bitrate at which `curve` reaches `db`, interpolated between its points.
fn kbps_at(curve: &Curve, db: f64) -> Option<f64> {
    curve.windows(2).find_map(|w| {
        let ((_, k0, p0, _), (_, k1, p1, _)) = (w[0], w[1]);
        ((p0..=p1).contains(&db) && p1 > p0).then(|| k0 + (k1 - k0) * (db - p0) / (p1 - p0))
    })
}

fn main() {
    let quick =
        std::env::args().any(|a| a == "--quick") || !std::env::args().any(|a| a == "--bench");
    let n = if quick { 50 } else { 250 };
    let frames = frames(n);
    let mut curves: Vec<(VideoCodec, Curve)> =
        vec![(VideoCodec::H264, vec![]), (VideoCodec::Vp8, vec![])];
    println!("{n} frames of the demo avatar at {W}x{H}, {FPS} fps, the codecs interleaved frame by frame");
    println!(
        "{:<5} {:>7} {:>9} {:>9} {:>11}",
        "codec", "target", "made", "Y-PSNR", "encode ms"
    );
    for kbps in BITRATES_KBPS {
        let mut runs: Vec<Run> = [VideoCodec::H264, VideoCodec::Vp8]
            .into_iter()
            .map(|codec| Run {
                codec,
                encoder: VideoEncoder::new(codec, W, H, FPS, kbps * 1000).expect("encoder"),
                browser: match codec {
                    VideoCodec::H264 => {
                        Browser::H264(openh264::decoder::Decoder::new().expect("decoder"))
                    }
                    VideoCodec::Vp8 => {
                        Browser::Vp8(framecast_vp8::Decoder::new().expect("decoder"))
                    }
                },
                encode_ms: Vec::new(),
                bytes: 0,
                psnr: Vec::new(),
            })
            .collect();
        for f in &frames {
            for r in runs.iter_mut() {
                let started = Instant::now();
                let out = r.encoder.encode(f).expect("encode");
                r.encode_ms.push(started.elapsed().as_secs_f64() * 1e3);
                r.bytes += out.len();
                let y = r.browser.luma(&out);
                r.psnr.push(psnr(&f[..W * H], &y));
            }
        }
        for (r, (_, curve)) in runs.into_iter().zip(curves.iter_mut()) {
            let made = r.bytes as f64 * 8.0 * FPS / n as f64 / 1000.0;
            let db = r.psnr.iter().sum::<f64>() / r.psnr.len() as f64;
            let ms = median(r.encode_ms);
            println!(
                "{:<5} {:>7} {:>9.0} {:>9.2} {:>11.2}",
                r.codec.name(),
                kbps,
                made,
                db,
                ms
            );
            curve.push((kbps, made, db, ms));
        }
    }
    let h264 = &curves[0].1;
    let reference = h264
        .iter()
        .find(|c| c.0 == DEFAULT_KBPS)
        .map(|c| c.2)
        .expect("the default bitrate");
    println!("\nbitrate for the quality H.264 has at {DEFAULT_KBPS} kbit/s ({reference:.2} dB):");
    for (codec, curve) in &curves {
        match kbps_at(curve, reference) {
            Some(k) => println!("  {:<5} {k:>6.0} kbit/s", codec.name()),
            None => println!("  {:<5} outside the measured bitrates", codec.name()),
        }
    }

    let mut h264: Vec<(Complexity, H264Encoder, Browser)> =
        [Complexity::High, Complexity::Medium, Complexity::Low]
            .into_iter()
            .map(|c| {
                let e = H264Encoder::with_complexity(W, H, FPS, DEFAULT_KBPS * 1000, c)
                    .expect("encoder");
                (
                    c,
                    e,
                    Browser::H264(openh264::decoder::Decoder::new().expect("decoder")),
                )
            })
            .collect();
    let mut figures = vec![(Vec::new(), 0usize, 0.0f64); h264.len()];
    for f in &frames {
        for ((_, e, d), (ms, bytes, db)) in h264.iter_mut().zip(figures.iter_mut()) {
            let started = Instant::now();
            let out = e.encode(f).expect("encode");
            ms.push(started.elapsed().as_secs_f64() * 1e3);
            *bytes += out.len();
            *db += psnr(&f[..W * H], &d.luma(&out));
        }
    }
    println!(
        "\nOpenH264 complexities at {DEFAULT_KBPS} kbit/s (the gateway's: {H264_COMPLEXITY:?}):"
    );
    println!(
        "{:>10} {:>9} {:>9} {:>11}",
        "complexity", "made", "Y-PSNR", "encode ms"
    );
    for ((c, _, _), (ms, bytes, db)) in h264.iter().zip(figures) {
        let made = bytes as f64 * 8.0 * FPS / n as f64 / 1000.0;
        println!(
            "{:>10} {made:>9.0} {:>9.2} {:>11.2}",
            format!("{c:?}"),
            db / n as f64,
            median(ms)
        );
    }

    let speeds = [-4, -6, -8, -10, -12, -14, -16];
    let mut encoders: Vec<(i32, framecast_vp8::Encoder, framecast_vp8::Decoder)> = speeds
        .iter()
        .map(|&speed| {
            let mut config = framecast_vp8::EncoderConfig::new(W, H, FPS, DEFAULT_KBPS * 1000);
            config.speed = speed;
            let e = framecast_vp8::Encoder::new(config).expect("encoder");
            (speed, e, framecast_vp8::Decoder::new().expect("decoder"))
        })
        .collect();
    let mut figures = vec![(Vec::new(), 0usize, 0.0f64); speeds.len()];
    for f in &frames {
        for ((_, e, d), (ms, bytes, db)) in encoders.iter_mut().zip(figures.iter_mut()) {
            let started = Instant::now();
            let out = e.encode(f).expect("encode");
            ms.push(started.elapsed().as_secs_f64() * 1e3);
            *bytes += out.len();
            let pic = d.decode(&out).expect("decodes").expect("a picture");
            *db += psnr(&f[..W * H], &pic.i420[..W * H]);
        }
    }
    println!(
        "\nVP8 speeds at {DEFAULT_KBPS} kbit/s (default {}):",
        framecast_vp8::EncoderConfig::DEFAULT_SPEED
    );
    println!(
        "{:>6} {:>9} {:>9} {:>11}",
        "speed", "made", "Y-PSNR", "encode ms"
    );
    for ((speed, _, _), (ms, bytes, db)) in encoders.iter().zip(figures) {
        let made = bytes as f64 * 8.0 * FPS / n as f64 / 1000.0;
        println!(
            "{speed:>6} {made:>9.0} {:>9.2} {:>11.2}",
            db / n as f64,
            median(ms)
        );
    }
}

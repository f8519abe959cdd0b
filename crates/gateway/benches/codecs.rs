//! H.264 (OpenH264) against VP8 (libvpx) as a session encodes them: the demo avatar at
//! 1280x720, its mouth opening and closing in the face box as a talking frame's does, 25
//! frames a second, each codec at several target bitrates. Per codec and bitrate: the encode
//! time per frame (median), the bitrate it made, and the luma PSNR of what a browser decodes
//! (OpenH264's and libvpx's decoders). Then the bitrate each needs for the quality H.264 has
//! at the gateway's default 2 Mbit/s (interpolated on the measured points). The codecs take
//! turns frame by frame so machine noise hits both alike. Last, OpenH264's complexities and
//! libvpx's real-time speeds at the default bitrate, side by side the same way (how the
//! defaults were chosen). And talking frames as a spliced session makes them (its face
//! region encoded and put into the shared stream's frame: `framecast_gateway::splice`)
//! against the same frames encoded whole, per frame what the session spends.
//!
//! `cargo bench -p framecast-gateway --bench codecs` (`make bench-codecs`); `-- --quick`
//! runs fewer frames, `-- --splice-only` only the last comparison.

use framecast_compositor::avatar;
use framecast_compositor::demo::{self, DemoOptions};
use framecast_compositor::encode::Subsampling;
use framecast_compositor::manifest;
use framecast_compositor::raw_frame;
use framecast_compositor::testing::psnr;
use framecast_gateway::idle_video::Base;
use framecast_gateway::media::{
    is_key_frame, Complexity, H264Encoder, MosaicEncoder, VideoCodec, VideoEncoder, H264_COMPLEXITY,
};
use framecast_gateway::splice::RegionSplice;
use framecast_gateway::stap_a;
use framecast_h264::Layout;
use openh264::formats::YUVSource;
use std::sync::Arc;
use std::time::Instant;

const W: usize = 1280;
const H: usize = 720;
const FPS: f64 = 25.0;
const BITRATES_KBPS: [u32; 4] = [500, 1000, 2000, 3000];
/// The gateway's default `--video-kbps`.
const DEFAULT_KBPS: u32 = 2000;

/// A rectangle of the frame: x, y, w, h.
type Area = (u32, u32, u32, u32);

/// Talking frames, their backgrounds, and two face regions: what the face changes (what the
/// compositor reports) and the union of the frames' regions kept decoded (what it reported
/// before).
type Talking = (Vec<Vec<u8>>, Vec<Vec<u8>>, [Area; 2]);

/// The demo loop as I420 frames, a dark mouth in each face box opening and closing over an
/// 8-frame cycle (the talking part of a frame is its face; the rest is the loop); with each
/// frame's background as it is, and the face regions.
fn frames(count: usize) -> Talking {
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
    let prepared = avatar::Avatar::load_with(&dir, Subsampling::S420).expect("avatar");
    let area = |r: raw_frame::Rect| (r.x, r.y, r.w, r.h);
    let changed = area(prepared.face_region().expect("a face region"));
    let kept = area(prepared.kept_region().expect("frames"));
    let backgrounds = (0..count)
        .map(|t| {
            let mut i420 = Vec::new();
            let i = avatar::ping_pong(t as u64, loop_frames.len());
            raw_frame::from_rgb(&loop_frames[i], W, H, &mut i420).expect("i420");
            i420
        })
        .collect();
    let talking = (0..count)
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
        .collect();
    (talking, backgrounds, [changed, kept])
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

/// An I420 frame to an encoded one.
type Encode = Box<dyn FnMut(&[u8]) -> Vec<u8>>;

/// One contender of a side-by-side run: an encoder and the browser that decodes its frames.
struct Contender {
    encode: Encode,
    browser: Browser,
}

impl Contender {
    fn new(
        mut encode: impl FnMut(&[u8]) -> Result<Vec<u8>, String> + 'static,
        codec: VideoCodec,
    ) -> Contender {
        Contender {
            encode: Box::new(move |f| encode(f).expect("encode")),
            browser: match codec {
                VideoCodec::H264 => {
                    Browser::H264(openh264::decoder::Decoder::new().expect("decoder"))
                }
                VideoCodec::Vp8 => Browser::Vp8(framecast_vp8::Decoder::new().expect("decoder")),
            },
        }
    }
}

/// What a contender made: kbit/s, mean luma PSNR (dB), median encode ms a frame, and for
/// H.264 the RTP packets a frame (each NAL unit a packet, or FU-A fragments of one too large
/// for str0m's payload budget) as sent and with small slices packed into STAP-A units.
#[derive(Clone, Copy)]
struct Figures {
    kbps: f64,
    db: f64,
    ms: f64,
    packets: Option<(f64, f64)>,
}

/// RTP payload bytes str0m gives a packet at its default MTU (1150, less SRTP's 16-byte tag,
/// rounded down to 16).
const RTP_PAYLOAD: usize = 1120;

/// The H.264 packets `au` goes out as: a NAL unit that fits the payload budget is one packet,
/// a larger one its FU-A fragments.
fn packets(au: &[u8]) -> usize {
    framecast_h264::nal_units(au)
        .iter()
        .map(|u| {
            if u.len() <= RTP_PAYLOAD {
                1
            } else {
                (u.len() - 1).div_ceil(RTP_PAYLOAD - 2)
            }
        })
        .sum()
}

/// Every frame through every contender, the contenders taking turns frame by frame so noise
/// on the machine hits them alike.
fn side_by_side(frames: &[Vec<u8>], contenders: &mut [Contender]) -> Vec<Figures> {
    let mut ms = vec![Vec::new(); contenders.len()];
    let mut bytes = vec![0usize; contenders.len()];
    let mut db = vec![0.0f64; contenders.len()];
    let mut sent = vec![(0usize, 0usize); contenders.len()];
    for f in frames {
        for (i, c) in contenders.iter_mut().enumerate() {
            let started = Instant::now();
            let out = (c.encode)(f);
            ms[i].push(started.elapsed().as_secs_f64() * 1e3);
            bytes[i] += out.len();
            if matches!(c.browser, Browser::H264(_)) {
                let packed = stap_a::pack(&out, stap_a::MAX_STAP_A_BYTES);
                sent[i].0 += packets(&out);
                sent[i].1 += packets(&packed);
            }
            db[i] += psnr(&f[..W * H], &c.browser.luma(&out));
        }
    }
    let n = frames.len() as f64;
    (0..contenders.len())
        .map(|i| Figures {
            kbps: bytes[i] as f64 * 8.0 * FPS / n / 1000.0,
            db: db[i] / n,
            ms: median(std::mem::take(&mut ms[i])),
            packets: matches!(contenders[i].browser, Browser::H264(_))
                .then(|| (sent[i].0 as f64 / n, sent[i].1 as f64 / n)),
        })
        .collect()
}

/// (target kbps, what was made) of each bitrate.
type Curve = Vec<(u32, Figures)>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The bitrate at which `curve` reaches `db`, interpolated between its points.
fn kbps_at(curve: &Curve, db: f64) -> Option<f64> {
    curve.windows(2).find_map(|w| {
        let (a, b) = (w[0].1, w[1].1);
        ((a.db..=b.db).contains(&db) && b.db > a.db)
            .then(|| a.kbps + (b.kbps - a.kbps) * (db - a.db) / (b.db - a.db))
    })
}

fn main() {
    let quick =
        std::env::args().any(|a| a == "--quick") || !std::env::args().any(|a| a == "--bench");
    let n = if quick { 50 } else { 250 };
    let (frames, backgrounds, regions) = frames(n);
    if std::env::args().any(|a| a == "--splice-only") {
        spliced_against_whole(&frames, &backgrounds, regions);
        return;
    }
    let codecs = [VideoCodec::H264, VideoCodec::Vp8];
    let mut curves: Vec<Curve> = vec![Vec::new(); codecs.len()];
    println!("{n} frames of the demo avatar at {W}x{H}, {FPS} fps, the codecs interleaved frame by frame");
    println!(
        "{:<5} {:>7} {:>9} {:>9} {:>11}",
        "codec", "target", "made", "Y-PSNR", "encode ms"
    );
    for kbps in BITRATES_KBPS {
        let mut contenders: Vec<Contender> = codecs
            .iter()
            .map(|&codec| {
                let mut e = VideoEncoder::new(codec, W, H, FPS, kbps * 1000).expect("encoder");
                Contender::new(move |f| e.encode(f), codec)
            })
            .collect();
        for ((codec, f), curve) in codecs
            .iter()
            .zip(side_by_side(&frames, &mut contenders))
            .zip(curves.iter_mut())
        {
            println!(
                "{:<5} {kbps:>7} {:>9.0} {:>9.2} {:>11.2}",
                codec.name(),
                f.kbps,
                f.db,
                f.ms
            );
            curve.push((kbps, f));
        }
    }
    let reference = curves[0]
        .iter()
        .find(|(k, _)| *k == DEFAULT_KBPS)
        .map(|(_, f)| f.db)
        .expect("the default bitrate");
    println!("\nbitrate for the quality H.264 has at {DEFAULT_KBPS} kbit/s ({reference:.2} dB):");
    for (codec, curve) in codecs.iter().zip(&curves) {
        match kbps_at(curve, reference) {
            Some(k) => println!("  {:<5} {k:>6.0} kbit/s", codec.name()),
            None => println!("  {:<5} outside the measured bitrates", codec.name()),
        }
    }

    let complexities = [Complexity::High, Complexity::Medium, Complexity::Low];
    let mut contenders: Vec<Contender> = complexities
        .iter()
        .map(|&c| {
            let mut e =
                H264Encoder::with_complexity(W, H, FPS, DEFAULT_KBPS * 1000, c).expect("encoder");
            Contender::new(move |f| e.encode(f), VideoCodec::H264)
        })
        .collect();
    println!(
        "\nOpenH264 complexities at {DEFAULT_KBPS} kbit/s (the gateway's: {H264_COMPLEXITY:?}):"
    );
    println!(
        "{:>10} {:>9} {:>9} {:>11}",
        "complexity", "made", "Y-PSNR", "encode ms"
    );
    for (c, f) in complexities
        .iter()
        .zip(side_by_side(&frames, &mut contenders))
    {
        println!(
            "{:>10} {:>9.0} {:>9.2} {:>11.2}",
            format!("{c:?}"),
            f.kbps,
            f.db,
            f.ms
        );
    }

    let speeds = [-4, -6, -8, -10, -12, -14, -16];
    let mut contenders: Vec<Contender> = speeds
        .iter()
        .map(|&speed| {
            let mut config = framecast_vp8::EncoderConfig::new(W, H, FPS, DEFAULT_KBPS * 1000);
            config.speed = speed;
            let mut e = framecast_vp8::Encoder::new(config).expect("encoder");
            Contender::new(
                move |f| e.encode(f).map_err(|e| e.to_string()),
                VideoCodec::Vp8,
            )
        })
        .collect();
    println!(
        "\nVP8 speeds at {DEFAULT_KBPS} kbit/s (default {}):",
        framecast_vp8::EncoderConfig::DEFAULT_SPEED
    );
    println!(
        "{:>6} {:>9} {:>9} {:>11}",
        "speed", "made", "Y-PSNR", "encode ms"
    );
    for (speed, f) in speeds.iter().zip(side_by_side(&frames, &mut contenders)) {
        println!("{speed:>6} {:>9.0} {:>9.2} {:>11.2}", f.kbps, f.db, f.ms);
    }

    spliced_against_whole(&frames, &backgrounds, regions);
}

/// Talking frames: encoded whole by the session at the default bitrate, against the shared
/// stream's frame (encoded beforehand, once for every session) with the session's region
/// encoded and spliced in, at the default bitrate and at 1.5 times it (for the bitrate at
/// the same quality), for the region of what the face changes and, at the default bitrate,
/// for the frames' regions kept decoded (the region spliced before); taking turns frame by
/// frame. The session's cost is what the closure times: for a spliced one the region's
/// encode and the splice.
fn spliced_against_whole(frames: &[Vec<u8>], backgrounds: &[Vec<u8>], [changed, kept]: [Area; 2]) {
    let layout = |area| Layout::around(W as u32, H as u32, area).expect("a layout");
    let runs = [
        ("changed", layout(changed), DEFAULT_KBPS),
        ("changed", layout(changed), DEFAULT_KBPS * 3 / 2),
        ("regions", layout(kept), DEFAULT_KBPS),
    ];
    let mut e = H264Encoder::new(W, H, FPS, DEFAULT_KBPS * 1000).expect("encoder");
    let mut contenders = vec![Contender::new(move |f| e.encode(f), VideoCodec::H264)];
    for (_, layout, kbps) in runs {
        contenders.push(spliced(layout, backgrounds, kbps * 1000));
    }
    println!("\ntalking frames, whole or with a face region spliced in:");
    println!(
        "{:>8} {:>20} {:>7} {:>9} {:>9} {:>11} {:>17}",
        "session", "region", "target", "made", "Y-PSNR", "encode ms", "packets (STAP-A)"
    );
    let figures = side_by_side(frames, &mut contenders);
    let whole = ("whole", format!("{W}x{H} (100%)"), DEFAULT_KBPS);
    let rows = std::iter::once(whole).chain(runs.map(|(name, layout, kbps)| {
        let (_, _, w, h) = layout.region_pixels();
        let share = (w * h) as f64 * 100.0 / (W * H) as f64;
        (name, format!("{w}x{h} ({share:.0}%)"), kbps)
    }));
    for ((name, region, kbps), f) in rows.zip(figures) {
        println!(
            "{name:>8} {region:>20} {kbps:>7} {:>9.0} {:>9.2} {:>11.2} {:>8.1} ({:>5.1})",
            f.kbps,
            f.db,
            f.ms,
            f.packets.map_or(0.0, |p| p.0),
            f.packets.map_or(0.0, |p| p.1)
        );
    }
}

/// A spliced session at `bitrate` over its own shared stream, encoded before the run.
fn spliced(layout: Layout, backgrounds: &[Vec<u8>], bitrate: u32) -> Contender {
    let mut shared = MosaicEncoder::new(layout, W, H, FPS, bitrate).expect("mosaic");
    let parameter_sets: Option<Arc<[u8]>> = Some(shared.parameter_sets().into());
    let bases: Vec<Base> = backgrounds
        .iter()
        .map(|b| {
            let au = shared.encode(b).expect("shared frame");
            Base {
                key: is_key_frame(&au),
                au: au.into(),
                parameter_sets: parameter_sets.clone(),
            }
        })
        .collect();
    let mut session = RegionSplice::new(layout, (W, H), FPS, bitrate).expect("region");
    let mut region = Vec::new();
    let mut t = 0;
    Contender::new(
        move |f: &[u8]| {
            t += 1;
            // The compositor sends only the region; cut here, and counted, to stay on the
            // safe side.
            raw_frame::crop(f, (W, H), session.rect(), &mut region)?;
            session.splice_onto(&bases[t - 1], &region)
        },
        VideoCodec::H264,
    )
}

//! Real OpenH264 streams spliced and decoded.

use framecast_h264::{Layout, MbRect, Mosaic, Splicer, TileSlicing};
use openh264::decoder::Decoder;
use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, IntraFramePeriod, RateControlMode,
    UsageType,
};
use openh264::formats::{YUVSlices, YUVSource};
use openh264::OpenH264API;
use openh264_sys2::{SEncParamExt, ENCODER_OPTION_SVC_ENCODE_PARAM_EXT, SM_RASTER_SLICE};

const W: usize = 1280;
const H: usize = 720;
/// A region as tall as the demo avatar's face region (22 macroblock rows) at 720p.
const DEMO_REGION: MbRect = MbRect {
    x0: 24,
    y0: 7,
    x1: 52,
    y1: 29,
};

/// `slicing`: None, OpenH264 as the gateway's sessions have it (one slice, deblocked
/// throughout); else sliced for a mosaic, deblocking stopping at slice edges.
fn encoder(w: usize, h: usize, kbps: u32, slicing: Option<TileSlicing>) -> Encoder {
    let config = EncoderConfig::new()
        .usage_type(UsageType::CameraVideoRealTime)
        .bitrate(BitRate::from_bps(kbps * 1000))
        .max_frame_rate(FrameRate::from_hz(25.0))
        .rate_control_mode(RateControlMode::Bitrate)
        .skip_frames(false)
        .scene_change_detect(false)
        .complexity(Complexity::Low)
        .intra_frame_period(IntraFramePeriod::from_num_frames(50));
    let mut enc = Encoder::with_api_config(OpenH264API::from_source(), config).unwrap();
    let Some(slicing) = slicing else {
        return enc;
    };
    let blank = vec![128u8; w * h * 3 / 2];
    enc.encode(&slices_of(&blank, w, h)).unwrap();
    unsafe {
        let raw = enc.raw_api();
        let mut p = SEncParamExt::default();
        assert_eq!(
            raw.get_option(ENCODER_OPTION_SVC_ENCODE_PARAM_EXT, (&raw mut p).cast()),
            0
        );
        p.iLoopFilterDisableIdc = 2;
        p.iNumRefFrame = 1;
        p.uiIntraPeriod = 0;
        let s = &mut p.sSpatialLayers[0].sSliceArgument;
        let counts = slicing.slice_counts(((w / 16) * (h / 16)) as u32);
        s.uiSliceMode = SM_RASTER_SLICE;
        s.uiSliceNum = counts.len() as u32;
        s.uiSliceMbNum = [0; 35];
        s.uiSliceMbNum[..counts.len()].copy_from_slice(&counts);
        assert_eq!(
            raw.set_option(ENCODER_OPTION_SVC_ENCODE_PARAM_EXT, (&raw mut p).cast()),
            0
        );
    }
    enc.force_intra_frame();
    enc
}

fn slices_of(i420: &[u8], w: usize, h: usize) -> YUVSlices<'_> {
    let (y, c) = i420.split_at(w * h);
    let (u, v) = c.split_at(w * h / 4);
    YUVSlices::new((y, u, v), (w, h), (w, w / 2, w / 2))
}

/// A moving textured background with noise, frame `t`.
fn background(t: usize) -> Vec<u8> {
    let mut f = vec![0u8; W * H * 3 / 2];
    let mut seed = (t as u32).wrapping_mul(2_654_435_761) | 1;
    for y in 0..H {
        for x in 0..W {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let xs = x as f64 + t as f64 * 1.5;
            let v = 128.0 + 50.0 * (xs / 23.0).sin() * (y as f64 / 31.0).cos() + (seed % 7) as f64;
            f[y * W + x] = v as u8;
        }
    }
    for (i, c) in f.iter_mut().enumerate().skip(W * H) {
        *c = 128 + ((i / 97) % 9) as u8;
    }
    f
}

/// The crop `r` of a frame.
fn crop(frame: &[u8], r: MbRect) -> Vec<u8> {
    let (x0, y0, w, h) = r.pixels();
    let mut out = Vec::with_capacity(w * h * 3 / 2);
    for y in 0..h {
        out.extend_from_slice(&frame[(y0 + y) * W + x0..(y0 + y) * W + x0 + w]);
    }
    for plane in 0..2 {
        let base = W * H + plane * W * H / 4;
        for y in 0..h / 2 {
            let row = base + (y0 / 2 + y) * (W / 2) + x0 / 2;
            out.extend_from_slice(&frame[row..row + w / 2]);
        }
    }
    out
}

/// The crop `r` of a frame with a "mouth" drawn for frame `t`.
fn crop_with_mouth(frame: &[u8], r: MbRect, t: usize) -> Vec<u8> {
    let (_, _, w, h) = r.pixels();
    let mut out = crop(frame, r);
    let open = 4.0 + 14.0 * ((t as f64) * 0.8).sin().abs();
    for y in 0..h {
        for x in 0..w {
            let (dx, dy) = (
                (x as f64 - w as f64 / 2.0) / 40.0,
                (y as f64 - h as f64 * 0.7) / open,
            );
            if dx * dx + dy * dy <= 1.0 {
                out[y * w + x] = 40;
            }
        }
    }
    out
}

fn paste(frame: &mut [u8], crop: &[u8], r: MbRect) {
    let (x0, y0, w, h) = (
        r.x0 as usize * 16,
        r.y0 as usize * 16,
        r.width() as usize * 16,
        r.height() as usize * 16,
    );
    for y in 0..h {
        frame[(y0 + y) * W + x0..(y0 + y) * W + x0 + w].copy_from_slice(&crop[y * w..(y + 1) * w]);
    }
    for plane in 0..2 {
        let base = W * H + plane * W * H / 4;
        let cbase = w * h + plane * w * h / 4;
        for y in 0..h / 2 {
            let row = base + (y0 / 2 + y) * (W / 2) + x0 / 2;
            frame[row..row + w / 2]
                .copy_from_slice(&crop[cbase + y * w / 2..cbase + (y + 1) * w / 2]);
        }
    }
}

fn luma(d: &mut Decoder, au: &[u8]) -> Vec<u8> {
    let yuv = d.decode(au).expect("decodes").expect("a picture");
    let stride = yuv.strides().0;
    let y = yuv.y();
    (0..H)
        .flat_map(|r| y[r * stride..r * stride + W].to_vec())
        .collect()
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10()
}

/// The shared stream as the gateway makes it: each tile of `layout` encoded on its own and
/// the tiles assembled.
struct Shared {
    tiles: Vec<(MbRect, Encoder)>,
    mosaic: Mosaic,
}

impl Shared {
    fn new(layout: Layout, kbps: u32) -> Shared {
        let mut whole = encoder(W, H, kbps, Some(TileSlicing::Whole));
        let sets = whole
            .encode(&slices_of(&background(0), W, H))
            .unwrap()
            .to_vec();
        let frame = (W * H) as f64;
        let tiles = layout
            .tiles()
            .into_iter()
            .map(|(t, slicing)| {
                let (_, _, w, h) = t.pixels();
                let share = (w * h) as f64 / frame;
                (
                    t,
                    encoder(w, h, (kbps as f64 * share).max(32.0) as u32, Some(slicing)),
                )
            })
            .collect();
        Shared {
            tiles,
            mosaic: Mosaic::new(layout, &sets).unwrap(),
        }
    }

    fn encode(&mut self, frame: &[u8], key: bool) -> Vec<u8> {
        let aus: Vec<Vec<u8>> = self
            .tiles
            .iter_mut()
            .map(|(t, e)| {
                if key {
                    e.force_intra_frame();
                }
                let (_, _, w, h) = t.pixels();
                e.encode(&slices_of(&crop(frame, *t), w, h))
                    .unwrap()
                    .to_vec()
            })
            .collect();
        let refs: Vec<&[u8]> = aus.iter().map(Vec::as_slice).collect();
        self.mosaic.assemble(&refs).unwrap()
    }
}

fn is_key(au: &[u8]) -> bool {
    framecast_h264::nal_units(au)
        .iter()
        .any(|n| n[0] & 0x1f == 5)
}

/// Sessions' talking frames: the shared stream of the background with each session's own
/// region spliced in, decoded as a browser would, against the same frames encoded whole
/// (today's sessions) at the same bitrate; and the shared stream itself decoded (idle
/// sessions). A region as tall as the demo avatar's (22 macroblock rows).
#[test]
fn a_region_spliced_into_a_shared_frame_decodes_as_the_composite() {
    let region = DEMO_REGION;
    let layout = Layout::new(80, 45, region).unwrap();
    let kbps = 2000;
    let mut shared = Shared::new(layout, kbps);
    let (_, _, cw, ch) = region.pixels();
    let region_kbps = (kbps as f64 * (cw * ch) as f64 / (W * H) as f64 * 1.0) as u32;
    let mut own = encoder(cw, ch, region_kbps, Some(TileSlicing::Rows));
    let mut whole = encoder(W, H, kbps, None);
    let mut splicer = Splicer::new(layout);
    let (mut d_splice, mut d_whole, mut d_idle) = (
        Decoder::new().unwrap(),
        Decoder::new().unwrap(),
        Decoder::new().unwrap(),
    );
    let (mut db_splice, mut db_whole, mut db_idle, mut bytes_splice, mut bytes_whole) =
        (0.0, 0.0, 0.0, 0, 0);
    let mut worst_region: f64 = 99.0;
    let frames = 75;
    for t in 0..frames {
        let bg = background(t);
        let shared_au = shared.encode(&bg, t % 50 == 0);
        let face = crop_with_mouth(&bg, region, t);
        if is_key(&shared_au) {
            own.force_intra_frame();
        }
        let own_au = own.encode(&slices_of(&face, cw, ch)).unwrap().to_vec();
        let spliced = splicer.splice(&shared_au, &own_au).unwrap();
        let mut composite = bg.clone();
        paste(&mut composite, &face, region);
        let whole_au = whole.encode(&slices_of(&composite, W, H)).unwrap().to_vec();
        let got = luma(&mut d_splice, &spliced);
        let a = psnr(&composite[..W * H], &got);
        let b = psnr(&composite[..W * H], &luma(&mut d_whole, &whole_au));
        let c = psnr(&bg[..W * H], &luma(&mut d_idle, &shared_au));
        let (x0, y0, _, _) = region.pixels();
        let rows = |f: &[u8]| -> Vec<u8> {
            (0..ch)
                .flat_map(|y| f[(y0 + y) * W + x0..(y0 + y) * W + x0 + cw].to_vec())
                .collect()
        };
        worst_region = worst_region.min(psnr(&rows(&composite), &rows(&got)));
        println!(
            "frame {t}: spliced {a:.2} dB ({} B), whole {b:.2} dB ({} B), shared {c:.2} dB",
            spliced.len(),
            whole_au.len()
        );
        db_splice += a;
        db_whole += b;
        db_idle += c;
        bytes_splice += spliced.len();
        bytes_whole += whole_au.len();
    }
    let n = frames as f64;
    println!(
        "mean: spliced {:.2} dB {} kbit/s, whole {:.2} dB {} kbit/s, shared {:.2} dB; region worst {worst_region:.2} dB",
        db_splice / n,
        bytes_splice * 8 * 25 / frames / 1000,
        db_whole / n,
        bytes_whole * 8 * 25 / frames / 1000,
        db_idle / n,
    );
    assert!(
        db_splice / n > db_whole / n - 1.0,
        "spliced frames lose more than 1 dB"
    );
    assert!(
        db_idle / n > db_whole / n - 1.0,
        "the shared stream loses more than 1 dB"
    );
    assert!(
        worst_region > 35.0,
        "the region's worst frame {worst_region:.2} dB"
    );
}

/// Access units cut short or with bytes changed, in either place of a splice and in a
/// mosaic: an error or a splice, never a panic or a hang.
#[test]
fn damaged_access_units_are_refused_not_trusted() {
    let region = DEMO_REGION;
    let layout = Layout::new(80, 45, region).unwrap();
    let mut shared = Shared::new(layout, 2000);
    let (_, _, cw, ch) = region.pixels();
    let mut own = encoder(cw, ch, 300, Some(TileSlicing::Rows));
    let mut frames = Vec::new();
    for t in 0..3 {
        let bg = background(t);
        let frame = shared.encode(&bg, t == 0);
        let face = own
            .encode(&slices_of(&crop_with_mouth(&bg, region, t), cw, ch))
            .unwrap()
            .to_vec();
        frames.push((frame, face));
    }
    let mut seed = 0x2545_f491_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut refused, mut made) = (0, 0);
    for round in 0..400 {
        let (frame, face) = &frames[round % 3];
        let (mut frame, mut face) = (frame.clone(), face.clone());
        let victim = if round % 2 == 0 {
            &mut frame
        } else {
            &mut face
        };
        match next() % 3 {
            0 => victim.truncate((next() as usize) % victim.len()),
            _ => {
                for _ in 0..1 + next() % 8 {
                    let at = (next() as usize) % victim.len();
                    victim[at] = next() as u8;
                }
            }
        }
        let mut splicer = Splicer::new(layout);
        // A fresh splicer sees the parameter sets of the key frame first.
        let _ = splicer.splice(&frames[0].0, &frames[0].1);
        match splicer.splice(&frame, &face) {
            Ok(_) => made += 1,
            Err(_) => refused += 1,
        }
    }
    println!("{made} spliced, {refused} refused");
    assert!(refused > 100, "{refused} of 400 damaged units refused");
}

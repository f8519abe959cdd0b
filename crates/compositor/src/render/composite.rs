//! One frame: a generated face crop blended into a copy of its background's face region,
//! and the frame's JPEG made from the prepared background's by encoding only that region and
//! splicing its restart segments in ([`crate::segments`]). The background is read-only:
//! sessions rendering the same frame at once never wait for each other.
//!
//! A request at another quality or subsampling than the avatar's prepared one takes the whole
//! frame path: the prepared JPEG decoded, the region's original pixels put back, the face
//! blended and the frame encoded. Outside the region that frame has been through one more
//! JPEG generation at the prepared quality. Raw I420 frames ([`Output::I420`]) take the same
//! path with a conversion ([`crate::raw_frame`]) instead of the encode.

use crate::avatar::Avatar;
use crate::blend::{self, BlendScratch};
use crate::encode::{self, Rgb, Subsampling};
use crate::raw_frame;
use crate::segments;
use bytes::Bytes;
use std::cell::RefCell;
use std::time::{Duration, Instant};

/// Per rayon thread: blend buffers, the region being composited and its encode, reused frame
/// after frame so the hot path allocates only the output.
#[derive(Default)]
struct Scratch {
    blend: BlendScratch,
    region: Vec<u8>,
    part: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// What a request's frames are made into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Jpeg {
        quality: u8,
        subsampling: Subsampling,
    },
    /// Raw frames for a video encoder ([`crate::raw_frame`]).
    I420,
}

/// A composed frame and where its time went.
pub struct Composed {
    /// The frame in the request's [`Output`] format.
    pub image: Bytes,
    pub blend: Duration,
    pub encode: Duration,
}

/// Whether frames made into `output` can be spliced from `avatar`'s prepared ones.
pub fn splices(avatar: &Avatar, output: Output) -> bool {
    output
        == Output::Jpeg {
            quality: avatar.params.quality,
            subsampling: avatar.params.subsampling,
        }
}

/// Blends one frame and makes it into `output` on the calling (rayon) thread.
pub fn compose(
    avatar: &Avatar,
    background: usize,
    crop_chw: &[u8],
    output: Output,
) -> Result<Composed, String> {
    let frame = &avatar.frames[background];
    let region = &frame.region;
    SCRATCH.with(|cell| {
        let scratch = &mut *cell.borrow_mut();
        let t0 = Instant::now();
        scratch.region.clear();
        scratch.region.extend_from_slice(&frame.pixels);
        blend::paste(
            &mut scratch.region,
            region.w,
            &region.local(&avatar.boxes[background]),
            crop_chw,
            avatar.manifest.crop_size,
            &avatar.box_masks[background],
            &mut scratch.blend,
        )?;
        let t1 = Instant::now();
        let image = if splices(avatar, output) {
            let pixels = Rgb::packed(&scratch.region, region.w, region.h);
            encode::encode_into(pixels, avatar.params, &mut scratch.part)?;
            let part_layout = segments::parse(&scratch.part)?;
            let mut out = Vec::new();
            segments::splice(
                &frame.jpeg,
                &frame.layout,
                region,
                &scratch.part,
                &part_layout,
                &mut out,
            )?;
            out
        } else {
            whole(avatar, background, &scratch.region, output)?
        };
        Ok(Composed {
            image: Bytes::from(image),
            blend: t1 - t0,
            encode: t1.elapsed(),
        })
    })
}

/// An idle frame (no speech, so no face to paste): the prepared JPEG itself when the settings
/// match, with no encode at all; otherwise the background made whole into `output`.
pub fn idle(avatar: &Avatar, background: usize, output: Output) -> Result<Composed, String> {
    let t = Instant::now();
    let frame = &avatar.frames[background];
    let image = if splices(avatar, output) {
        frame.jpeg.clone()
    } else {
        Bytes::from(whole(avatar, background, &frame.pixels, output)?)
    };
    Ok(Composed {
        image,
        blend: Duration::ZERO,
        encode: t.elapsed(),
    })
}

/// The whole-frame path: the prepared JPEG decoded, `region` (the face region's pixels)
/// written over it, the frame made into `output`.
fn whole(
    avatar: &Avatar,
    background: usize,
    region_pixels: &[u8],
    output: Output,
) -> Result<Vec<u8>, String> {
    let frame = &avatar.frames[background];
    let r = &frame.region;
    let (w, h) = (avatar.grid.width, avatar.grid.height);
    // Odd sizes: libjpeg pads the luma plane of a 4:2:0 decode to even, which I420's
    // layout does not; those take the RGB path.
    let even = w.is_multiple_of(2) && h.is_multiple_of(2);
    if output == Output::I420 && avatar.params.subsampling == Subsampling::S420 && even {
        // The JPEG's own 4:2:0 planes are I420 already (full range): decoded without colour
        // conversion or upsampling, rescaled to limited range, the region put in. About a
        // half of decoding to RGB and converting back (docs/performance.md).
        let mut out = vec![0u8; raw_frame::len(w as usize, h as usize)];
        encode::decode_yuv420(&frame.jpeg, w, h, &mut out)?;
        raw_frame::full_to_limited(&mut out, w as usize, h as usize);
        let mut scratch = Vec::new();
        raw_frame::put_rgb(
            &mut out,
            (w as usize, h as usize),
            (r.x as usize, r.y as usize),
            region_pixels,
            (r.w as usize, r.h as usize),
            &mut scratch,
        )?;
        return Ok(out);
    }
    let (mut rgb, width, height) = encode::decode_rgb(&frame.jpeg)?;
    if (width, height) != (avatar.grid.width, avatar.grid.height) {
        return Err(format!(
            "prepared frame {background} is {width}x{height}; the avatar is {}x{}",
            avatar.grid.width, avatar.grid.height
        ));
    }
    let stride = width as usize * 3;
    for (row, src) in region_pixels.chunks_exact(r.w as usize * 3).enumerate() {
        let at = (r.y as usize + row) * stride + r.x as usize * 3;
        rgb[at..at + src.len()].copy_from_slice(src);
    }
    match output {
        Output::Jpeg {
            quality,
            subsampling,
        } => encode::encode_rgb(&rgb, width, height, quality, subsampling),
        Output::I420 => {
            let mut out = Vec::new();
            raw_frame::from_rgb(&rgb, width as usize, height as usize, &mut out)?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{self, DemoOptions};
    use crate::manifest;
    use rayon::prelude::*;

    fn avatar(root: &std::path::Path) -> Avatar {
        let opts = DemoOptions {
            id: "a".into(),
            width: 96,
            height: 64,
            frames: 3,
            crop_size: 32,
            ..Default::default()
        };
        Avatar::load(&demo::write_demo(root, &opts).unwrap()).unwrap()
    }

    fn jpeg(quality: u8, subsampling: Subsampling) -> Output {
        Output::Jpeg {
            quality,
            subsampling,
        }
    }

    /// The bundle's own frame `bg`, decoded from its source file.
    fn source(root: &std::path::Path, a: &Avatar, bg: usize) -> Vec<u8> {
        let files = manifest::frame_files(&root.join("a")).unwrap();
        crate::avatar::decode_frame(&files[bg], a.manifest.width, a.manifest.height).unwrap()
    }

    /// What `compose` must produce: the crop pasted into the source frame, encoded whole with
    /// the avatar's parameters.
    fn expected(root: &std::path::Path, a: &Avatar, bg: usize, crop: &[u8]) -> Vec<u8> {
        let m = &a.manifest;
        let mut frame = source(root, a, bg);
        let before = frame.clone();
        let mut scratch = BlendScratch::default();
        let (b, mask) = (&a.boxes[bg], &a.box_masks[bg]);
        blend::paste(
            &mut frame,
            m.width,
            b,
            crop,
            m.crop_size,
            mask,
            &mut scratch,
        )
        .unwrap();
        assert_ne!(frame, before, "the paste changed nothing");
        let mut out = Vec::new();
        encode::encode_into(Rgb::packed(&frame, m.width, m.height), a.params, &mut out).unwrap();
        out
    }

    #[test]
    fn compose_equals_a_whole_frame_encode_of_the_composite() {
        let tmp = tempfile::tempdir().unwrap();
        let a = avatar(tmp.path());
        let crop = vec![250u8; 3 * 32 * 32];
        let out = jpeg(a.params.quality, Subsampling::S420);
        let c = compose(&a, 1, &crop, out).unwrap();
        assert!(c.image == expected(tmp.path(), &a, 1, &crop));
        // The idle frame is the prepared background itself.
        let idle = idle(&a, 1, out).unwrap();
        assert!(idle.image == a.frames[1].jpeg);
        let mut plain = Vec::new();
        let src = source(tmp.path(), &a, 1);
        let rgb = Rgb::packed(&src, a.manifest.width, a.manifest.height);
        encode::encode_into(rgb, a.params, &mut plain).unwrap();
        assert!(
            idle.image == plain,
            "the prepared frame is not an encode of the source"
        );
    }

    /// Another quality takes the whole-frame path: a valid frame of the right size whose face
    /// region holds the face.
    #[test]
    fn another_quality_encodes_the_whole_frame() {
        let tmp = tempfile::tempdir().unwrap();
        let a = avatar(tmp.path());
        let crop = vec![250u8; 3 * 32 * 32];
        let c = compose(&a, 0, &crop, jpeg(97, Subsampling::S444)).unwrap();
        let (rgb, w, h) = encode::decode_rgb(&c.image).unwrap();
        assert_eq!((w, h), (a.manifest.width, a.manifest.height));
        let want = expected(tmp.path(), &a, 0, &crop);
        let (want, ..) = encode::decode_rgb(&want).unwrap();
        let diff = rgb
            .iter()
            .zip(&want)
            .map(|(a, b)| a.abs_diff(*b) as u64)
            .sum::<u64>();
        assert!(
            diff / (rgb.len() as u64) < 4,
            "mean difference {}",
            diff / rgb.len() as u64
        );
    }

    /// Many workers compositing different faces into the same background at once each get
    /// their own face, with no lock.
    #[test]
    fn concurrent_composes_of_one_background_do_not_mix() {
        let tmp = tempfile::tempdir().unwrap();
        let a = avatar(tmp.path());
        let crops = [vec![250u8; 3 * 32 * 32], vec![5u8; 3 * 32 * 32]];
        let want = [
            expected(tmp.path(), &a, 2, &crops[0]),
            expected(tmp.path(), &a, 2, &crops[1]),
        ];
        let out = jpeg(a.params.quality, Subsampling::S420);
        (0..64usize).into_par_iter().for_each(|i| {
            let c = compose(&a, 2, &crops[i % 2], out).unwrap();
            assert!(
                c.image == want[i % 2],
                "compose {i} saw another worker's face"
            );
        });
    }

    /// An I420 frame is the JPEG path's frame before its encode: its conversion back to RGB
    /// is close to the spliced JPEG's decode, the face is in it, and an idle I420 frame is
    /// the background.
    #[test]
    fn i420_frames_hold_the_composite_and_idle_ones_the_background() {
        let tmp = tempfile::tempdir().unwrap();
        let a = avatar(tmp.path());
        let (w, h) = (a.manifest.width as usize, a.manifest.height as usize);
        let crop = vec![250u8; 3 * 32 * 32];
        let raw = compose(&a, 1, &crop, Output::I420).unwrap();
        assert_eq!(raw.image.len(), raw_frame::len(w, h));
        let rgb = raw_frame::to_rgb(&raw.image, w, h).unwrap();
        let (want, ..) = encode::decode_rgb(&expected(tmp.path(), &a, 1, &crop)).unwrap();
        let psnr = |a: &[u8], b: &[u8]| {
            let mse = a
                .iter()
                .zip(b)
                .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
                .sum::<f64>()
                / a.len() as f64;
            10.0 * (255.0f64.powi(2) / mse.max(1e-9)).log10()
        };
        assert!(psnr(&rgb, &want) > 30.0, "PSNR {:.1} dB", psnr(&rgb, &want));
        // The 4:2:0 fast path (the JPEG's own planes) against decoding to RGB, putting the
        // composite region in and converting the whole frame.
        let (mut slow, ..) = encode::decode_rgb(&a.frames[1].jpeg).unwrap();
        let r = a.frames[1].region;
        let mut region = a.frames[1].pixels.to_vec();
        let mut scratch = BlendScratch::default();
        blend::paste(
            &mut region,
            r.w,
            &r.local(&a.boxes[1]),
            &crop,
            a.manifest.crop_size,
            &a.box_masks[1],
            &mut scratch,
        )
        .unwrap();
        for (row, src) in region.chunks_exact(r.w as usize * 3).enumerate() {
            let at = ((r.y as usize + row) * w + r.x as usize) * 3;
            slow[at..at + src.len()].copy_from_slice(src);
        }
        let mut slow_i420 = Vec::new();
        raw_frame::from_rgb(&slow, w, h, &mut slow_i420).unwrap();
        let agree = psnr(&raw.image, &slow_i420);
        assert!(agree > 38.0, "fast vs slow I420: PSNR {agree:.1} dB");
        let idle = idle(&a, 1, Output::I420).unwrap();
        let (bg, ..) = encode::decode_rgb(&a.frames[1].jpeg).unwrap();
        let idle_rgb = raw_frame::to_rgb(&idle.image, w, h).unwrap();
        assert!(psnr(&idle_rgb, &bg) > 30.0);
        // The face region differs between the two; the rest is the same background.
        assert_ne!(raw.image, idle.image);
    }
}

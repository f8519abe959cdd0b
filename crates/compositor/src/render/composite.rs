//! One frame: a generated face crop blended into a copy of its background's face region,
//! and the frame's JPEG made from the prepared background's by encoding only that region and
//! splicing its restart segments in ([`crate::segments`]). The background is read-only:
//! sessions rendering the same frame at once never wait for each other.
//!
//! A 4:2:0 avatar keeps its regions as YCbCr planes ([`crate::prepared::Pixels`]): an I420
//! crop is resized and blended per plane and the region encoded from its planes, so a face
//! goes from the inference service's answer to the JPEG with no colour conversion at all.
//!
//! A request at another quality or subsampling than the avatar's prepared one takes the whole
//! frame path: the prepared JPEG decoded, the region's original pixels put back, the face
//! blended and the frame encoded. Outside the region that frame has been through one more
//! JPEG generation at the prepared quality. Raw I420 frames ([`Output::I420`]) take the same
//! path with a conversion ([`crate::raw_frame`]) instead of the encode.

use crate::avatar::Avatar;
use crate::blend::{self, BlendScratch, BoxMask};
use crate::encode::{self, Subsampling};
use crate::idle_frames::IdleBudget;
use crate::manifest::FaceBox;
use crate::planes::{self, CropPlanes, Planes};
use crate::prepared::Pixels;
use crate::raw_frame::{self, Rect};
use crate::segments;
use bytes::Bytes;
use framecast_proto::i420;
use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Per compositing thread (rayon's, or the blocking pool's for a lone frame): blend buffers,
/// the region being composited, a converted crop and the region's encode, reused frame after
/// frame so the hot path allocates only the output.
#[derive(Default)]
struct Scratch {
    blend: BlendScratch,
    region: Vec<u8>,
    crop: Vec<u8>,
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
    /// Talking frames as only this rectangle of their raw frame ([`raw_frame::crop`]), with
    /// the background's prepared JPEG for the rest; a frame whose face region is not inside
    /// it, and an idle frame, as [`Output::I420`].
    I420Region(Rect),
}

/// A generated face crop, S x S, as the inference service answered it.
#[derive(Debug, Clone, Copy)]
pub enum Crop<'a> {
    /// Planar RGB, `3 x S x S`.
    Rgb(&'a [u8]),
    /// I420 ([`framecast_proto::i420`]): what a 4:2:0 avatar's regions blend without a
    /// conversion.
    I420(&'a [u8]),
}

/// A composed frame and where its time went.
pub struct Composed {
    /// The frame in the request's [`Output`] format.
    pub image: Bytes,
    /// Where `image` holds only this rectangle of the frame ([`Output::I420Region`]); the
    /// rest is the background's prepared JPEG.
    pub region: Option<Rect>,
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

/// Blends `crop` into `scratch.region` (a copy of a face region of `kind`, `w` x `h`, `face`
/// in its coordinates), in the region's own form: planes take the crop as planes (an RGB
/// crop is converted to I420 as the inference service would, or to full-resolution planes
/// when S is odd), RGB takes it as RGB (an I420 crop is converted).
fn paste(
    kind: &Pixels<Bytes>,
    scratch: &mut Scratch,
    (w, h): (u32, u32),
    face: &FaceBox,
    crop: Crop<'_>,
    size: u32,
    mask: &BoxMask,
) -> Result<(), String> {
    let Scratch {
        blend,
        region,
        crop: converted,
        ..
    } = scratch;
    match kind {
        Pixels::Ycc420(_) => {
            let crop = match crop {
                Crop::I420(c) => CropPlanes::i420(c, size)?,
                Crop::Rgb(c) if size.is_multiple_of(2) => {
                    let s = size as usize;
                    *converted = i420::from_planar_rgb(c, 1, s, s);
                    CropPlanes::i420(converted, size)?
                }
                Crop::Rgb(c) => {
                    planes::ycc_from_planar_rgb(c, converted);
                    CropPlanes::ycc444(converted, size)?
                }
            };
            blend::paste_planes(region, &Planes::new(w, h), face, &crop, mask, blend)
        }
        Pixels::Rgb(_) => {
            let crop = match crop {
                Crop::Rgb(c) => c,
                Crop::I420(c) => {
                    let s = size as usize;
                    if c.len() != i420::len(1, s, s) {
                        return Err(format!(
                            "an I420 face crop of {} bytes for S = {s}",
                            c.len()
                        ));
                    }
                    *converted = i420::to_planar_rgb(c, 1, s, s);
                    &converted[..]
                }
            };
            blend::paste(region, w, face, crop, size, mask, blend)
        }
    }
}

/// Blends one frame and makes it into `output` on the calling (compositing) thread.
pub fn compose(
    avatar: &Avatar,
    background: usize,
    crop: Crop<'_>,
    output: Output,
    budget: Option<&Arc<IdleBudget>>,
) -> Result<Composed, String> {
    let frame = &avatar.frames[background];
    let region = &frame.region;
    SCRATCH.with(|cell| {
        let scratch = &mut *cell.borrow_mut();
        let t0 = Instant::now();
        scratch.region.clear();
        scratch.region.extend_from_slice(frame.pixels.bytes());
        paste(
            &frame.pixels,
            scratch,
            (region.w, region.h),
            &region.local(&avatar.boxes[background]),
            crop,
            avatar.manifest.crop_size,
            &avatar.box_masks[background],
        )?;
        let t1 = Instant::now();
        let pasted = frame.pixels.with(scratch.region.as_slice());
        let mut cut = None;
        let image = if splices(avatar, output) {
            pasted.encode_into(region.w, region.h, avatar.params, &mut scratch.part)?;
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
            // Outside what the face changes the frame is its background: a region holding
            // that is all the frame a caller needs.
            let holds_change =
                |rect: &Rect| avatar.changed(background).is_none_or(|c| rect.holds(&c));
            match (output, budget) {
                (Output::I420Region(rect), _) if holds_change(&rect) => {
                    cut = Some(rect);
                    cut_over_idle(avatar, background, pasted, rect, budget)?
                }
                (Output::I420 | Output::I420Region(_), Some(budget)) => {
                    over_idle(avatar, background, pasted, budget)?
                }
                _ => whole(avatar, background, pasted, output)?,
            }
        };
        Ok(Composed {
            image: Bytes::from(image),
            region: cut,
            blend: t1 - t0,
            encode: t1.elapsed(),
        })
    })
}

/// An idle frame (no speech, so no face to paste): the prepared JPEG itself when the settings
/// match, with no encode at all; otherwise the background made whole into `output`, raw
/// frames kept under `budget` for the next time ([`crate::idle_frames`]).
pub fn idle(
    avatar: &Avatar,
    background: usize,
    output: Output,
    budget: Option<&Arc<IdleBudget>>,
) -> Result<Composed, String> {
    let t = Instant::now();
    let frame = &avatar.frames[background];
    let image = if splices(avatar, output) {
        frame.jpeg.clone()
    } else if let (Output::I420 | Output::I420Region(_), Some(budget)) = (output, budget) {
        kept_idle(avatar, background, budget)?
    } else {
        Bytes::from(whole(avatar, background, frame.pixels.view(), output)?)
    };
    Ok(Composed {
        image,
        region: None,
        blend: Duration::ZERO,
        encode: t.elapsed(),
    })
}

/// Background `background` as raw I420, kept under `budget` ([`crate::idle_frames`]).
fn kept_idle(
    avatar: &Avatar,
    background: usize,
    budget: &Arc<IdleBudget>,
) -> Result<Bytes, String> {
    let frame = &avatar.frames[background];
    avatar.idle_raw.get_or_make(background, budget, || {
        whole(avatar, background, frame.pixels.view(), Output::I420)
    })
}

/// A raw talking frame made over its background's kept idle frame: that frame copied and the
/// face region's planes put in (rescaled to limited range), so no JPEG is decoded per talking
/// frame once the background is kept. Byte for byte what [`whole`] makes.
fn over_idle(
    avatar: &Avatar,
    background: usize,
    region: Pixels<&[u8]>,
    budget: &Arc<IdleBudget>,
) -> Result<Vec<u8>, String> {
    let (w, h) = (avatar.grid.width as usize, avatar.grid.height as usize);
    let Pixels::Ycc420(planes) = region else {
        return whole(avatar, background, region, Output::I420);
    };
    if !w.is_multiple_of(2) || !h.is_multiple_of(2) {
        return whole(avatar, background, region, Output::I420);
    }
    let r = &avatar.frames[background].region;
    let mut out = kept_idle(avatar, background, budget)?.to_vec();
    let at = (r.x as usize, r.y as usize);
    raw_frame::put_planes(&mut out, (w, h), at, planes, &Planes::new(r.w, r.h))?;
    raw_frame::full_to_limited_region(&mut out, (w, h), at, (r.w as usize, r.h as usize));
    Ok(out)
}

/// `rect` of a raw talking frame ([`Output::I420Region`]), byte for byte what
/// [`raw_frame::crop`] cuts from [`over_idle`]'s frame when `rect` holds what the face
/// changes ([`Avatar::changed`]): cut from the background's kept idle frame with the part of
/// the face region's planes inside `rect` put in, so no whole frame is copied either.
fn cut_over_idle(
    avatar: &Avatar,
    background: usize,
    region: Pixels<&[u8]>,
    rect: Rect,
    budget: Option<&Arc<IdleBudget>>,
) -> Result<Vec<u8>, String> {
    let size = (avatar.grid.width as usize, avatar.grid.height as usize);
    let even = size.0.is_multiple_of(2) && size.1.is_multiple_of(2);
    let mut out = Vec::new();
    match (region, budget) {
        (Pixels::Ycc420(planes), Some(budget)) if even => {
            let r = &avatar.frames[background].region;
            raw_frame::crop(
                &kept_idle(avatar, background, budget)?,
                size,
                rect,
                &mut out,
            )?;
            if let Some(both) = r.rect().intersect(&rect) {
                let at = ((both.x - rect.x) as usize, (both.y - rect.y) as usize);
                let part = (rect.w as usize, rect.h as usize);
                let in_region = Rect {
                    x: both.x - r.x,
                    y: both.y - r.y,
                    ..both
                };
                raw_frame::put_planes_part(
                    &mut out,
                    part,
                    at,
                    planes,
                    &Planes::new(r.w, r.h),
                    in_region,
                )?;
                raw_frame::full_to_limited_region(
                    &mut out,
                    part,
                    at,
                    (both.w as usize, both.h as usize),
                );
            }
        }
        _ => {
            let raw = match budget {
                Some(budget) => over_idle(avatar, background, region, budget)?,
                None => whole(avatar, background, region, Output::I420)?,
            };
            raw_frame::crop(&raw, size, rect, &mut out)?;
        }
    }
    Ok(out)
}

/// The whole-frame path: the prepared JPEG decoded, `region` (the face region's pixels)
/// written over it, the frame made into `output`.
fn whole(
    avatar: &Avatar,
    background: usize,
    region: Pixels<&[u8]>,
    output: Output,
) -> Result<Vec<u8>, String> {
    let frame = &avatar.frames[background];
    let r = &frame.region;
    let (w, h) = (avatar.grid.width, avatar.grid.height);
    // Odd sizes: libjpeg pads the luma plane of a 4:2:0 decode to even, which I420's
    // layout does not; those take the RGB path.
    let even = w.is_multiple_of(2) && h.is_multiple_of(2);
    if let (Output::I420 | Output::I420Region(_), Pixels::Ycc420(planes), true) =
        (output, region, even)
    {
        // The JPEG's own 4:2:0 planes are I420 already (full range): decoded without colour
        // conversion or upsampling, the region's planes put in, rescaled to limited range.
        // No pixel is converted (docs/performance.md).
        let mut out = vec![0u8; raw_frame::len(w as usize, h as usize)];
        encode::decode_yuv420(&frame.jpeg, w, h, &mut out)?;
        raw_frame::put_planes(
            &mut out,
            (w as usize, h as usize),
            (r.x as usize, r.y as usize),
            planes,
            &Planes::new(r.w, r.h),
        )?;
        raw_frame::full_to_limited(&mut out, w as usize, h as usize);
        return Ok(out);
    }
    let (mut rgb, width, height) = encode::decode_rgb(&frame.jpeg)?;
    if (width, height) != (w, h) {
        return Err(format!(
            "prepared frame {background} is {width}x{height}; the avatar is {w}x{h}"
        ));
    }
    let stride = width as usize * 3;
    let region_rgb = region.rgb(r.w, r.h)?;
    for (row, src) in region_rgb.chunks_exact(r.w as usize * 3).enumerate() {
        let at = (r.y as usize + row) * stride + r.x as usize * 3;
        rgb[at..at + src.len()].copy_from_slice(src);
    }
    match output {
        Output::Jpeg {
            quality,
            subsampling,
        } => encode::encode_rgb(&rgb, width, height, quality, subsampling),
        Output::I420 | Output::I420Region(_) => {
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
    use crate::encode::Rgb;
    use crate::manifest;
    use crate::testing::psnr;
    use rayon::prelude::*;

    fn avatar_at(root: &std::path::Path, subsampling: Subsampling) -> Avatar {
        let opts = DemoOptions {
            id: "a".into(),
            width: 96,
            height: 64,
            frames: 3,
            crop_size: 32,
            ..Default::default()
        };
        let dir = demo::write_demo(root, &opts).unwrap();
        Avatar::load_with(&dir, subsampling).unwrap()
    }

    fn avatar(root: &std::path::Path) -> Avatar {
        avatar_at(root, Subsampling::S420)
    }

    fn jpeg(quality: u8, subsampling: Subsampling) -> Output {
        Output::Jpeg {
            quality,
            subsampling,
        }
    }

    /// A crop with colour and detail in every plane, planar RGB.
    fn gradient_crop() -> Vec<u8> {
        (0..3)
            .flat_map(|c| (0..32 * 32).map(move |i| ((i % 32) * 6 + (i / 32) * 2 + c * 50) as u8))
            .collect()
    }

    /// Frame `bg`'s region planes with `crop` pasted in.
    fn pasted(a: &Avatar, bg: usize, crop: &CropPlanes<'_>) -> Vec<u8> {
        let frame = &a.frames[bg];
        let r = frame.region;
        let mut region = frame.pixels.bytes().to_vec();
        blend::paste_planes(
            &mut region,
            &Planes::new(r.w, r.h),
            &r.local(&a.boxes[bg]),
            crop,
            &a.box_masks[bg],
            &mut BlendScratch::default(),
        )
        .unwrap();
        region
    }

    /// The bundle's own frame `bg`, decoded from its source file.
    fn source(root: &std::path::Path, a: &Avatar, bg: usize) -> Vec<u8> {
        let files = manifest::frame_files(&root.join("a")).unwrap();
        crate::avatar::decode_frame(&files[bg], a.manifest.width, a.manifest.height).unwrap()
    }

    /// What `compose` must produce for a 4:2:0 avatar: the source frame's planes (as libjpeg
    /// converts it), the crop (as I420) pasted into them, the frame encoded whole from its
    /// planes.
    fn expected(root: &std::path::Path, a: &Avatar, bg: usize, crop: &[u8]) -> Vec<u8> {
        let m = &a.manifest;
        let frame = source(root, a, bg);
        let mut planes =
            encode::to_planes(Rgb::packed(&frame, m.width, m.height), Subsampling::S420).unwrap();
        let before = planes.clone();
        let s = m.crop_size as usize;
        let yuv = i420::from_planar_rgb(crop, 1, s, s);
        blend::paste_planes(
            &mut planes,
            &Planes::new(m.width, m.height),
            &a.boxes[bg],
            &CropPlanes::i420(&yuv, m.crop_size).unwrap(),
            &a.box_masks[bg],
            &mut BlendScratch::default(),
        )
        .unwrap();
        assert_ne!(planes, before, "the paste changed nothing");
        let mut out = Vec::new();
        encode::encode_planes_into(&planes, m.width, m.height, a.params, &mut out).unwrap();
        out
    }

    #[test]
    fn compose_equals_a_whole_frame_encode_of_the_composite() {
        let tmp = tempfile::tempdir().unwrap();
        let a = avatar(tmp.path());
        assert!(matches!(a.frames[1].pixels, Pixels::Ycc420(_)));
        let crop = gradient_crop();
        let out = jpeg(a.params.quality, Subsampling::S420);
        let c = compose(&a, 1, Crop::Rgb(&crop), out, None).unwrap();
        assert!(c.image == expected(tmp.path(), &a, 1, &crop));
        // The idle frame is the prepared background itself, and that is an encode of the
        // source: from RGB or from libjpeg's planes of it, the same bytes.
        let idle = idle(&a, 1, out, None).unwrap();
        assert!(idle.image == a.frames[1].jpeg);
        let src = source(tmp.path(), &a, 1);
        let (w, h) = (a.manifest.width, a.manifest.height);
        let mut plain = Vec::new();
        encode::encode_into(Rgb::packed(&src, w, h), a.params, &mut plain).unwrap();
        assert!(
            idle.image == plain,
            "the prepared frame is not an encode of the source"
        );
        let planes = encode::to_planes(Rgb::packed(&src, w, h), Subsampling::S420).unwrap();
        let mut from_planes = Vec::new();
        encode::encode_planes_into(&planes, w, h, a.params, &mut from_planes).unwrap();
        assert!(from_planes == plain, "an encode from planes differs");
    }

    /// An RGB crop (from a replica without I420 outputs) is converted to I420 as the
    /// inference service converts it: the same face makes the same frame either way. A crop
    /// of an odd size, which I420 cannot hold, is blended from full-resolution planes.
    #[test]
    fn an_i420_crop_makes_the_frame_an_rgb_crop_makes() {
        let tmp = tempfile::tempdir().unwrap();
        let a = avatar(tmp.path());
        let crop = gradient_crop();
        let yuv = i420::from_planar_rgb(&crop, 1, 32, 32);
        let out = jpeg(a.params.quality, Subsampling::S420);
        let from_rgb = compose(&a, 2, Crop::Rgb(&crop), out, None).unwrap();
        let from_i420 = compose(&a, 2, Crop::I420(&yuv), out, None).unwrap();
        assert!(from_rgb.image == from_i420.image);
        assert!(compose(&a, 2, Crop::I420(&yuv[1..]), out, None).is_err());
        // The odd-size path against the even one, on the same face box: a 31 x 31 crop is
        // the 32 x 32 one less its last row and column, nearly the same face.
        let mut odd = Vec::new();
        for plane in crop.chunks_exact(32 * 32) {
            for row in plane.chunks_exact(32).take(31) {
                odd.extend_from_slice(&row[..31]);
            }
        }
        let mut ycc = Vec::new();
        planes::ycc_from_planar_rgb(&odd, &mut ycc);
        let region = pasted(&a, 2, &CropPlanes::ycc444(&ycc, 31).unwrap());
        let even = pasted(&a, 2, &CropPlanes::i420(&yuv, 32).unwrap());
        assert!(
            psnr(&region, &even) > 30.0,
            "PSNR {:.1} dB",
            psnr(&region, &even)
        );
    }

    /// An avatar encoded at 4:4:4 keeps RGB regions; both crop forms land in them.
    #[test]
    fn rgb_regions_take_either_crop() {
        let tmp = tempfile::tempdir().unwrap();
        let a = avatar_at(tmp.path(), Subsampling::S444);
        assert!(matches!(a.frames[0].pixels, Pixels::Rgb(_)));
        let crop = gradient_crop();
        let yuv = i420::from_planar_rgb(&crop, 1, 32, 32);
        let out = jpeg(a.params.quality, Subsampling::S444);
        let from_rgb = compose(&a, 0, Crop::Rgb(&crop), out, None).unwrap();
        let from_i420 = compose(&a, 0, Crop::I420(&yuv), out, None).unwrap();
        let (x, ..) = encode::decode_rgb(&from_rgb.image).unwrap();
        let (y, ..) = encode::decode_rgb(&from_i420.image).unwrap();
        let (bg, ..) = encode::decode_rgb(&a.frames[0].jpeg).unwrap();
        assert!(psnr(&x, &y) > 38.0, "PSNR {:.1} dB", psnr(&x, &y));
        assert!(x != bg, "the face is not in the frame");
    }

    /// Another quality takes the whole-frame path: a valid frame of the right size whose face
    /// region holds the face.
    #[test]
    fn another_quality_encodes_the_whole_frame() {
        let tmp = tempfile::tempdir().unwrap();
        let a = avatar(tmp.path());
        let crop = gradient_crop();
        let c = compose(&a, 0, Crop::Rgb(&crop), jpeg(97, Subsampling::S444), None).unwrap();
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
        let crops = [gradient_crop(), vec![5u8; 3 * 32 * 32]];
        let want = [
            expected(tmp.path(), &a, 2, &crops[0]),
            expected(tmp.path(), &a, 2, &crops[1]),
        ];
        let out = jpeg(a.params.quality, Subsampling::S420);
        (0..64usize).into_par_iter().for_each(|i| {
            let c = compose(&a, 2, Crop::Rgb(&crops[i % 2]), out, None).unwrap();
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
        let crop = gradient_crop();
        let raw = compose(&a, 1, Crop::Rgb(&crop), Output::I420, None).unwrap();
        assert_eq!(raw.image.len(), raw_frame::len(w, h));
        let rgb = raw_frame::to_rgb(&raw.image, w, h).unwrap();
        let (want, ..) = encode::decode_rgb(&expected(tmp.path(), &a, 1, &crop)).unwrap();
        assert!(psnr(&rgb, &want) > 30.0, "PSNR {:.1} dB", psnr(&rgb, &want));
        // The 4:2:0 fast path (the JPEG's own planes, the region's planes put in) against
        // decoding to RGB, putting the composite region in and converting the whole frame.
        let (mut slow, ..) = encode::decode_rgb(&a.frames[1].jpeg).unwrap();
        let r = a.frames[1].region;
        let yuv = i420::from_planar_rgb(&crop, 1, 32, 32);
        let region = pasted(&a, 1, &CropPlanes::i420(&yuv, 32).unwrap());
        let region = encode::planes_to_rgb(&region, r.w, r.h, Subsampling::S420).unwrap();
        for (row, src) in region.chunks_exact(r.w as usize * 3).enumerate() {
            let at = ((r.y as usize + row) * w + r.x as usize) * 3;
            slow[at..at + src.len()].copy_from_slice(src);
        }
        let mut slow_i420 = Vec::new();
        raw_frame::from_rgb(&slow, w, h, &mut slow_i420).unwrap();
        let agree = psnr(&raw.image, &slow_i420);
        assert!(agree > 38.0, "fast vs slow I420: PSNR {agree:.1} dB");
        let idle = idle(&a, 1, Output::I420, None).unwrap();
        // Kept under a budget: the same frame, made once (the second is the first's bytes).
        let budget = IdleBudget::new(1 << 30, None);
        let kept = super::idle(&a, 1, Output::I420, Some(&budget)).unwrap();
        let again = super::idle(&a, 1, Output::I420, Some(&budget)).unwrap();
        assert_eq!(kept.image, idle.image);
        assert_eq!(again.image.as_ptr(), kept.image.as_ptr());
        assert_eq!(budget.used(), idle.image.len() as u64);
        let (bg, ..) = encode::decode_rgb(&a.frames[1].jpeg).unwrap();
        let idle_rgb = raw_frame::to_rgb(&idle.image, w, h).unwrap();
        assert!(psnr(&idle_rgb, &bg) > 30.0);
        // The face region differs between the two; the rest is the same background.
        assert_ne!(raw.image, idle.image);
    }

    /// Zeroes `rect` (even corner and size) of a `size` I420 frame.
    fn blank(i420: &mut [u8], size: (usize, usize), rect: Rect) {
        let zeros = vec![0u8; raw_frame::len(rect.w as usize, rect.h as usize)];
        let planes = Planes::new(rect.w, rect.h);
        let at = (rect.x as usize, rect.y as usize);
        raw_frame::put_planes(i420, size, at, &zeros, &planes).unwrap();
    }

    /// A raw talking frame made over the kept idle frame is byte for byte the one made from
    /// the JPEG, for every background and whether the background was kept before or is
    /// kept by it; a budget too small to keep anything still makes the same frame.
    #[test]
    fn talking_frames_over_the_kept_idle_frame_are_the_decoded_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let a = avatar(tmp.path());
        let crop = gradient_crop();
        let budget = IdleBudget::new(1 << 30, None);
        let none = IdleBudget::new(0, None);
        idle(&a, 0, Output::I420, Some(&budget)).unwrap();
        for bg in 0..a.frames.len() {
            let decoded = compose(&a, bg, Crop::Rgb(&crop), Output::I420, None).unwrap();
            for b in [&budget, &none] {
                let over = compose(&a, bg, Crop::Rgb(&crop), Output::I420, Some(b)).unwrap();
                assert!(over.image == decoded.image, "background {bg}");
            }
        }
        let (w, h) = (a.manifest.width as usize, a.manifest.height as usize);
        assert_eq!(
            budget.used(),
            (a.frames.len() * raw_frame::len(w, h)) as u64
        );
        assert_eq!(none.used(), 0);
    }

    /// A talking frame asked for as a rectangle holding the face region (what the mask lets
    /// the face change, smaller than the region kept decoded) is byte for byte that
    /// rectangle of the whole raw frame, with the background's prepared JPEG, for a 4:2:0
    /// avatar and an RGB one, kept backgrounds or not; outside it the whole frame is its
    /// idle frame; a rectangle that does not hold what the face changes, and an idle frame,
    /// come whole.
    #[test]
    fn a_talking_frame_cut_to_a_rectangle_is_that_part_of_the_whole_frame() {
        let tmp = tempfile::tempdir().unwrap();
        for subsampling in [Subsampling::S420, Subsampling::S444] {
            let a = avatar_at(&tmp.path().join(format!("{subsampling:?}")), subsampling);
            let size = (a.manifest.width as usize, a.manifest.height as usize);
            let face = a.face_region().unwrap();
            let rect = Rect {
                x: face.x & !1,
                y: face.y & !1,
                w: (face.x + face.w).next_multiple_of(2) - (face.x & !1),
                h: (face.y + face.h).next_multiple_of(2) - (face.y & !1),
            };
            let regions = a.kept_region().unwrap();
            assert!(regions.holds(&face) && face.w * face.h < regions.w * regions.h);
            let crop = gradient_crop();
            let budget = IdleBudget::new(1 << 30, None);
            for bg in 0..a.frames.len() {
                let whole = compose(&a, bg, Crop::Rgb(&crop), Output::I420, None).unwrap();
                let background = super::idle(&a, bg, Output::I420, None).unwrap();
                let (mut talking, mut idle) = (whole.image.to_vec(), background.image.to_vec());
                for frame in [&mut talking, &mut idle] {
                    blank(frame, size, rect);
                }
                assert!(talking == idle, "background {bg} changed outside {rect:?}");
                let mut want = Vec::new();
                raw_frame::crop(&whole.image, size, rect, &mut want).unwrap();
                for b in [None, Some(&budget)] {
                    let cut =
                        compose(&a, bg, Crop::Rgb(&crop), Output::I420Region(rect), b).unwrap();
                    assert_eq!(cut.region, Some(rect));
                    assert!(cut.image == want, "{subsampling:?}, background {bg}");
                }
            }
            let small = Rect { w: 2, h: 2, ..rect };
            let whole = compose(&a, 0, Crop::Rgb(&crop), Output::I420Region(small), None).unwrap();
            assert!(whole.region.is_none());
            assert_eq!(whole.image.len(), raw_frame::len(size.0, size.1));
            let idle = idle(&a, 0, Output::I420Region(rect), None).unwrap();
            assert!(idle.region.is_none());
            assert_eq!(idle.image.len(), raw_frame::len(size.0, size.1));
        }
    }
}

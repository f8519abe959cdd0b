//! Pastes a generated face crop back into a background frame.
//!
//! The blend mask depends only on the avatar, so it is resized to each face box once, at load
//! ([`BoxMask`]), along with the rectangle where it is non-zero. Per frame, only that
//! rectangle is touched: the matching part of the crop is interleaved, resized with a SIMD
//! resizer, and alpha-blended over the background; everything else is the copied background.

use crate::manifest::FaceBox;
use crate::planes::{CropPlanes, Planes};
use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

fn resize_options() -> ResizeOptions {
    ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
}

/// The blend mask at one face-box size, and the rectangle `[x0, x1) x [y0, y1)` (box
/// coordinates) where it is non-zero. Empty when the mask is zero everywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoxMask {
    pub w: u32,
    pub h: u32,
    /// One alpha per pixel.
    pub alpha: Vec<u8>,
    /// The same alpha repeated for R, G and B, so blending runs over flat byte slices and
    /// vectorizes.
    alpha3: Vec<u8>,
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
    /// The alpha of the chroma samples the rectangle touches, for a box at each parity of
    /// its position (`x % 2 + 2 * (y % 2)`): made on first use ([`BoxMask::chroma_alpha`]).
    chroma: [std::sync::OnceLock<Vec<u8>>; 4],
}

impl BoxMask {
    /// Resizes the `size` x `size` crop-resolution `mask` to `w` x `h`.
    pub fn new(mask: &[u8], size: u32, w: u32, h: u32) -> Result<BoxMask, String> {
        let src = ImageRef::new(size, size, mask, PixelType::U8).map_err(|e| e.to_string())?;
        let mut dst = Image::new(w, h, PixelType::U8);
        Resizer::new()
            .resize(&src, &mut dst, &resize_options())
            .map_err(|e| e.to_string())?;
        let alpha = dst.into_vec();
        let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
        for (y, row) in alpha.chunks_exact(w as usize).enumerate() {
            if let (Some(first), Some(last)) = (
                row.iter().position(|&a| a > 0),
                row.iter().rposition(|&a| a > 0),
            ) {
                x0 = x0.min(first as u32);
                x1 = x1.max(last as u32 + 1);
                y0 = y0.min(y as u32);
                y1 = y as u32 + 1;
            }
        }
        if x1 == 0 {
            (x0, y0) = (0, 0);
        }
        let alpha3 = alpha.iter().flat_map(|&a| [a, a, a]).collect();
        Ok(BoxMask {
            w,
            h,
            alpha,
            alpha3,
            x0,
            y0,
            x1,
            y1,
            chroma: Default::default(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.x1 <= self.x0 || self.y1 <= self.y0
    }

    /// The chroma samples (2 x 2 pixels each) a box at parity (`px`, `py`) touches with its
    /// rectangle: their first, in samples from the box's even-aligned corner, their count
    /// across and down, and each one's alpha, the mean of its four pixels' (0 outside the
    /// rectangle).
    fn chroma_alpha(&self, px: u32, py: u32) -> ((u32, u32), (u32, u32), &[u8]) {
        let (cx0, cy0) = ((px + self.x0) / 2, (py + self.y0) / 2);
        let (cx1, cy1) = ((px + self.x1).div_ceil(2), (py + self.y1).div_ceil(2));
        let alpha = self.chroma[(px + 2 * py) as usize].get_or_init(|| {
            let mut out = Vec::with_capacity(((cx1 - cx0) * (cy1 - cy0)) as usize);
            for cy in cy0..cy1 {
                for cx in cx0..cx1 {
                    let mut sum = 0u32;
                    for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        // The pixel in box coordinates (the sample may start before the box).
                        let (bx, by) =
                            ((2 * cx + dx).checked_sub(px), (2 * cy + dy).checked_sub(py));
                        if let (Some(bx), Some(by)) = (bx, by) {
                            if (self.x0..self.x1).contains(&bx) && (self.y0..self.y1).contains(&by)
                            {
                                sum += self.alpha[(by * self.w + bx) as usize] as u32;
                            }
                        }
                    }
                    out.push(((sum + 2) / 4) as u8);
                }
            }
            out
        });
        ((cx0, cy0), (cx1 - cx0, cy1 - cy0), alpha)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.alpha.len() + self.alpha3.len()
    }

    #[cfg(test)]
    fn from_alpha(w: u32, h: u32, alpha: Vec<u8>) -> BoxMask {
        let alpha3 = alpha.iter().flat_map(|&a| [a, a, a]).collect();
        BoxMask {
            w,
            h,
            alpha,
            alpha3,
            x0: 0,
            y0: 0,
            x1: w,
            y1: h,
            chroma: Default::default(),
        }
    }
}

/// Interleaves rows `rows` of a planar 3 x S x S crop into packed RGB (other rows are left
/// as they were: the resizer reads only the rows it needs).
pub fn interleave_rows(crop_chw: &[u8], size: u32, rows: std::ops::Range<u32>, out: &mut Vec<u8>) {
    let (s, n) = (size as usize, (size * size) as usize);
    out.resize(n * 3, 0);
    let (r, rest) = crop_chw.split_at(n);
    let (g, b) = rest.split_at(n);
    for y in rows.start as usize..rows.end as usize {
        let span = y * s..(y + 1) * s;
        let dst = &mut out[y * s * 3..(y + 1) * s * 3];
        for (((d, &r), &g), &b) in dst
            .chunks_exact_mut(3)
            .zip(&r[span.clone()])
            .zip(&g[span.clone()])
            .zip(&b[span])
        {
            d[0] = r;
            d[1] = g;
            d[2] = b;
        }
    }
}

/// Blends `rgb` (a `(x1-x0)` x `(y1-y0)` patch) into the RGB `frame` at box offset
/// `(face.x + x0, face.y + y0)` with the mask's alpha: `(src * a + bg * (255 - a)) / 255`,
/// rounded.
pub fn alpha_blend(frame: &mut [u8], width: u32, face: &FaceBox, mask: &BoxMask, rgb: &[u8]) {
    let pw = (mask.x1 - mask.x0) as usize;
    let rows = (mask.y0..mask.y1).zip(pasted_rows(width, face, mask));
    for (row, (y, bytes)) in rows.enumerate() {
        let src = &rgb[row * pw * 3..(row + 1) * pw * 3];
        let alpha = &mask.alpha3[(y * mask.w + mask.x0) as usize * 3..][..pw * 3];
        blend_span(&mut frame[bytes], src, alpha);
    }
}

/// `dst = (src * a + dst * (255 - a)) / 255`, rounded, byte by byte.
fn blend_span(dst: &mut [u8], src: &[u8], alpha: &[u8]) {
    for ((d, &s), &a) in dst.iter_mut().zip(src).zip(alpha) {
        // x / 255 rounded without a division; every term fits u16, so this vectorizes.
        let (a, ia) = (a as u16, 255 - a as u16);
        let x = s as u16 * a + *d as u16 * ia + 128;
        *d = ((x + (x >> 8)) >> 8) as u8;
    }
}

/// The byte ranges of an RGB frame `width` pixels wide, one per row, that [`paste`] writes
/// for this box and mask: what must be saved to undo a paste.
pub fn pasted_rows(
    width: u32,
    face: &FaceBox,
    mask: &BoxMask,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let (row_bytes, stride) = ((mask.x1 - mask.x0) as usize * 3, width as usize * 3);
    let (x, top) = ((face.x + mask.x0) as usize * 3, face.y);
    (mask.y0..mask.y1).map(move |y| {
        let start = (top + y) as usize * stride + x;
        start..start + row_bytes
    })
}

/// Whether there is anything to paste (the mask is not empty); an error if the mask is not
/// the box's size.
fn fits(face: &FaceBox, mask: &BoxMask) -> Result<bool, String> {
    if (mask.w, mask.h) != (face.w, face.h) {
        return Err(format!(
            "mask is {}x{}, face box {}x{}",
            mask.w, mask.h, face.w, face.h
        ));
    }
    Ok(!mask.is_empty())
}

/// Reusable per-thread buffers for [`paste`]: after the first frame, pasting allocates
/// nothing.
#[derive(Default)]
pub struct BlendScratch {
    rgb: Vec<u8>,
    patch: Vec<u8>,
    resizer: Resizer,
}

impl BlendScratch {
    /// Resizes the window `(left, top, width, height)` of `src` (`sw` x `sh` pixels of
    /// `pixel`) to `dw` x `dh` into [`BlendScratch::patch`].
    #[allow(clippy::too_many_arguments)]
    fn resize(
        &mut self,
        src: &[u8],
        (sw, sh): (u32, u32),
        pixel: PixelType,
        window: (f64, f64, f64, f64),
        (dw, dh): (u32, u32),
    ) -> Result<(), String> {
        let src = ImageRef::new(sw, sh, src, pixel).map_err(|e| e.to_string())?;
        self.patch.resize((dw * dh) as usize * pixel.size(), 0);
        let mut dst =
            Image::from_slice_u8(dw, dh, &mut self.patch, pixel).map_err(|e| e.to_string())?;
        let (left, top, width, height) = window;
        self.resizer
            .resize(
                &src,
                &mut dst,
                &resize_options().crop(left, top, width, height),
            )
            .map_err(|e| e.to_string())
    }
}

/// Resize + blend of one generated `size` x `size` crop into `frame`, touching only the
/// rectangle where `mask` is non-zero ([`pasted_rows`]).
pub fn paste(
    frame: &mut [u8],
    width: u32,
    face: &FaceBox,
    crop_chw: &[u8],
    size: u32,
    mask: &BoxMask,
    scratch: &mut BlendScratch,
) -> Result<(), String> {
    if !fits(face, mask)? {
        return Ok(());
    }
    // The patch's source window in crop coordinates, on the same linear map as a full resize.
    let (sx, sy) = (size as f64 / face.w as f64, size as f64 / face.h as f64);
    let (left, top) = (mask.x0 as f64 * sx, mask.y0 as f64 * sy);
    let (cw, ch) = (
        (mask.x1 - mask.x0) as f64 * sx,
        (mask.y1 - mask.y0) as f64 * sy,
    );
    // Bilinear support reaches one source pixel beyond the window on each side.
    let rows = (top.floor() as u32).saturating_sub(2)..((top + ch).ceil() as u32 + 2).min(size);
    let mut rgb = std::mem::take(&mut scratch.rgb);
    interleave_rows(crop_chw, size, rows, &mut rgb);
    let (pw, ph) = (mask.x1 - mask.x0, mask.y1 - mask.y0);
    let resized = scratch.resize(
        &rgb,
        (size, size),
        PixelType::U8x3,
        (left, top, cw, ch),
        (pw, ph),
    );
    scratch.rgb = rgb;
    resized?;
    alpha_blend(frame, width, face, mask, &scratch.patch);
    Ok(())
}

/// [`paste`] into the YCbCr planes of a region laid out as `planes`: the crop's luma resized
/// to the mask's rectangle and blended with its alpha; its chroma resized to the chroma
/// samples that rectangle touches and blended with the mean alpha of each sample's 2 x 2
/// pixels (0 outside the box). Blending is linear, so this is the RGB blend up to rounding,
/// without converting a pixel.
pub fn paste_planes(
    region: &mut [u8],
    planes: &Planes,
    face: &FaceBox,
    crop: &CropPlanes<'_>,
    mask: &BoxMask,
    scratch: &mut BlendScratch,
) -> Result<(), String> {
    if !fits(face, mask)? {
        return Ok(());
    }
    if region.len() != planes.bytes() || face.x + face.w > planes.w || face.y + face.h > planes.h {
        return Err(format!(
            "a {}x{} face box at ({}, {}) in a {}x{} region of {} bytes",
            face.w,
            face.h,
            face.x,
            face.y,
            planes.w,
            planes.h,
            region.len()
        ));
    }
    let (luma, cb, cr) = planes.split_mut(region);
    let s = crop.size;
    let (sx, sy) = (s as f64 / face.w as f64, s as f64 / face.h as f64);
    let (pw, ph) = (mask.x1 - mask.x0, mask.y1 - mask.y0);
    let window = (
        mask.x0 as f64 * sx,
        mask.y0 as f64 * sy,
        pw as f64 * sx,
        ph as f64 * sy,
    );
    scratch.resize(crop.y, (s, s), PixelType::U8, window, (pw, ph))?;
    let (x0, y0) = ((face.x + mask.x0) as usize, (face.y + mask.y0) as usize);
    for row in 0..ph as usize {
        let at = (y0 + row) * planes.yw + x0;
        let alpha = &mask.alpha[(mask.y0 as usize + row) * mask.w as usize + mask.x0 as usize..];
        blend_span(
            &mut luma[at..at + pw as usize],
            &scratch.patch[row * pw as usize..],
            &alpha[..pw as usize],
        );
    }
    // The chroma samples the rectangle touches, in region chroma coordinates.
    let ((cx0, cy0), (cpw, cph), alpha) = mask.chroma_alpha(face.x % 2, face.y % 2);
    let (cx0, cy0) = (face.x / 2 + cx0, face.y / 2 + cy0);
    // The same linear map as the luma's: a chroma sample spans two pixels of the frame, and
    // a crop chroma sample `size / chroma` pixels of the crop.
    let k = crop.chroma as f64 / s as f64;
    let c = crop.chroma as f64;
    let left = ((2 * cx0) as f64 - face.x as f64) * sx * k;
    let top = ((2 * cy0) as f64 - face.y as f64) * sy * k;
    // A box at an odd position starts half a chroma sample into its first one: the window
    // is kept inside the crop (that sample is mostly background anyway).
    let (left, top) = (left.max(0.0), top.max(0.0));
    let window = (
        left,
        top,
        ((2 * cpw) as f64 * sx * k).min(c - left),
        ((2 * cph) as f64 * sy * k).min(c - top),
    );
    let chroma = (crop.chroma, crop.chroma);
    for (src, dst) in [(crop.u, &mut *cb), (crop.v, &mut *cr)] {
        scratch.resize(src, chroma, PixelType::U8, window, (cpw, cph))?;
        for row in 0..cph as usize {
            let at = (cy0 as usize + row) * planes.cw + cx0 as usize;
            blend_span(
                &mut dst[at..at + cpw as usize],
                &scratch.patch[row * cpw as usize..],
                &alpha[row * cpw as usize..(row + 1) * cpw as usize],
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blend_matches_the_formula_within_one() {
        let (width, height) = (7u32, 5u32);
        let bg: Vec<u8> = (0..width * height * 3)
            .map(|i| (i * 37 % 256) as u8)
            .collect();
        let face = FaceBox {
            x: 2,
            y: 1,
            w: 4,
            h: 3,
        };
        let mask = BoxMask::from_alpha(4, 3, (0..12).map(|i| (i * 23 % 256) as u8).collect());
        let rgb: Vec<u8> = (0..face.w * face.h * 3)
            .map(|i| (i * 91 % 256) as u8)
            .collect();
        let mut out = bg.clone();
        alpha_blend(&mut out, width, &face, &mask, &rgb);
        for y in 0..height {
            for x in 0..width {
                for c in 0..3 {
                    let i = ((y * width + x) * 3 + c) as usize;
                    let inside =
                        x >= face.x && x < face.x + face.w && y >= face.y && y < face.y + face.h;
                    let want = if inside {
                        let j = ((y - face.y) * face.w + (x - face.x)) as usize;
                        let a = mask.alpha[j] as f64 / 255.0;
                        (rgb[j * 3 + c as usize] as f64 * a + bg[i] as f64 * (1.0 - a)).round()
                    } else {
                        bg[i] as f64
                    };
                    assert!(
                        (out[i] as f64 - want).abs() <= 1.0,
                        "({x},{y},{c}): {} vs {want}",
                        out[i]
                    );
                }
            }
        }
    }

    #[test]
    fn division_by_255_is_exact_for_every_blend() {
        for a in 0..=255u16 {
            for s in [0u16, 1, 77, 128, 254, 255] {
                for d in [0u16, 3, 128, 200, 255] {
                    let x = s * a + d * (255 - a) + 128;
                    let fast = (x + (x >> 8)) >> 8;
                    let exact = ((s * a + d * (255 - a)) as f64 / 255.0).round() as u16;
                    assert_eq!(fast, exact, "s={s} d={d} a={a}");
                }
            }
        }
    }

    #[test]
    fn mask_rectangle_bounds_the_non_zero_alpha() {
        let size = 16;
        let mut mask = vec![0u8; 256];
        for y in 8..12 {
            for x in 4..10 {
                mask[y * 16 + x] = 255;
            }
        }
        let m = BoxMask::new(&mask, size, 32, 32).unwrap();
        assert!(m.x0 >= 6 && m.x0 <= 8 && m.x1 >= 20 && m.x1 <= 22, "{m:?}");
        assert!(
            m.y0 >= 14 && m.y0 <= 16 && m.y1 >= 24 && m.y1 <= 26,
            "{m:?}"
        );
        for y in 0..32 {
            for x in 0..32 {
                let inside = x >= m.x0 && x < m.x1 && y >= m.y0 && y < m.y1;
                assert!(inside || m.alpha[(y * 32 + x) as usize] == 0);
            }
        }
        assert!(BoxMask::new(&[0u8; 256], 16, 8, 8).unwrap().is_empty());
    }

    #[test]
    fn opaque_uniform_crop_lands_exactly() {
        let size = 8;
        let crop: Vec<u8> = [10u8, 20, 30].iter().flat_map(|&v| vec![v; 64]).collect();
        let mut frame = vec![0u8; 16 * 16 * 3];
        let face = FaceBox {
            x: 3,
            y: 5,
            w: 11,
            h: 6,
        };
        let mask = BoxMask::new(&[255u8; 64], size, 11, 6).unwrap();
        paste(
            &mut frame,
            16,
            &face,
            &crop,
            size,
            &mask,
            &mut BlendScratch::default(),
        )
        .unwrap();
        let px = |x: u32, y: u32| &frame[((y * 16 + x) * 3) as usize..][..3];
        assert_eq!(px(3, 5), &[10, 20, 30]);
        assert_eq!(px(13, 10), &[10, 20, 30]);
        assert_eq!(px(2, 5), &[0, 0, 0]);
        assert_eq!(px(14, 10), &[0, 0, 0]);
    }

    /// Blending per plane is blending in RGB, up to rounding and the chroma's 2 x 2: the two
    /// agree once both are seen through the same 4:2:0 encode, for boxes at odd and even
    /// positions and crops given as RGB or I420.
    #[test]
    fn planar_paste_matches_the_rgb_paste() {
        use crate::encode::{self, Rgb, Subsampling};
        let (w, h, s) = (64u32, 48u32, 32u32);
        let bg: Vec<u8> = (0..w * h)
            .flat_map(|i| {
                let (x, y) = (i % w, i / w);
                [(x * 3 + y) as u8, (y * 4) as u8, (120 + x) as u8]
            })
            .collect();
        let crop: Vec<u8> = (0..3)
            .flat_map(|c| (0..s * s).map(move |i| ((i % s) * 7 + (i / s) * 3 + c * 60) as u8))
            .collect();
        let mask = crate::mask::lower_face(s, 0.3);
        let through_420 = |rgb: &[u8]| {
            let planes = encode::to_planes(Rgb::packed(rgb, w, h), Subsampling::S420).unwrap();
            encode::planes_to_rgb(&planes, w, h, Subsampling::S420).unwrap()
        };
        use crate::testing::psnr;
        let planes = Planes::new(w, h);
        let mut ycc = Vec::new();
        crate::planes::ycc_from_planar_rgb(&crop, &mut ycc);
        let i420 = framecast_proto::i420::from_planar_rgb(&crop, 1, s as usize, s as usize);
        for face in [
            FaceBox {
                x: 10,
                y: 6,
                w: 40,
                h: 36,
            },
            FaceBox {
                x: 13,
                y: 7,
                w: 37,
                h: 35,
            },
        ] {
            let m = BoxMask::new(&mask, s, face.w, face.h).unwrap();
            let mut scratch = BlendScratch::default();
            let before = encode::to_planes(Rgb::packed(&bg, w, h), Subsampling::S420).unwrap();
            // Each crop form against the RGB paste of the same face (the I420 one as RGB).
            let i420_rgb = framecast_proto::i420::to_planar_rgb(&i420, 1, s as usize, s as usize);
            for (what, c, as_rgb) in [
                ("rgb", CropPlanes::ycc444(&ycc, s).unwrap(), &crop),
                ("i420", CropPlanes::i420(&i420, s).unwrap(), &i420_rgb),
            ] {
                let mut rgb = bg.clone();
                paste(&mut rgb, w, &face, as_rgb, s, &m, &mut scratch).unwrap();
                let want = through_420(&rgb);
                let mut p = before.clone();
                paste_planes(&mut p, &planes, &face, &c, &m, &mut scratch).unwrap();
                let got = encode::planes_to_rgb(&p, w, h, Subsampling::S420).unwrap();
                let agree = psnr(&got, &want);
                assert!(agree > 40.0, "{what} crop at {face:?}: PSNR {agree:.1} dB");
                // Outside the box's rows nothing moved.
                assert_eq!(
                    p[..face.y as usize * w as usize],
                    before[..face.y as usize * w as usize]
                );
            }
        }
        // A box that does not fit the region, or a region of the wrong size.
        let face = FaceBox {
            x: 40,
            y: 20,
            w: 40,
            h: 36,
        };
        let m = BoxMask::new(&mask, s, face.w, face.h).unwrap();
        let c = CropPlanes::i420(&i420, s).unwrap();
        let mut p = vec![0u8; planes.bytes()];
        assert!(
            paste_planes(&mut p, &planes, &face, &c, &m, &mut BlendScratch::default()).is_err()
        );
        let face = FaceBox {
            x: 0,
            y: 0,
            w: 40,
            h: 36,
        };
        assert!(paste_planes(
            &mut p[1..],
            &planes,
            &face,
            &c,
            &m,
            &mut BlendScratch::default()
        )
        .is_err());
    }
}

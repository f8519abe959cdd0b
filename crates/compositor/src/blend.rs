//! Pastes a generated face crop back into a background frame.
//!
//! The blend mask depends only on the avatar, so it is resized to each face box once, at load
//! ([`BoxMask`]), along with the rectangle where it is non-zero. Per frame, only that
//! rectangle is touched: the matching part of the crop is interleaved, resized with a SIMD
//! resizer, and alpha-blended over the background; everything else is the copied background.

use crate::manifest::FaceBox;
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
        })
    }

    pub fn is_empty(&self) -> bool {
        self.x1 <= self.x0 || self.y1 <= self.y0
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
        let dst = &mut frame[bytes];
        let src = &rgb[row * pw * 3..(row + 1) * pw * 3];
        let alpha = &mask.alpha3[(y * mask.w + mask.x0) as usize * 3..][..pw * 3];
        for ((d, &s), &a) in dst.iter_mut().zip(src).zip(alpha) {
            // x / 255 rounded without a division; every term fits u16, so this vectorizes.
            let (a, ia) = (a as u16, 255 - a as u16);
            let x = s as u16 * a + *d as u16 * ia + 128;
            *d = ((x + (x >> 8)) >> 8) as u8;
        }
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

/// Reusable per-thread buffers for [`paste`]: after the first frame, pasting allocates
/// nothing.
#[derive(Default)]
pub struct BlendScratch {
    rgb: Vec<u8>,
    patch: Vec<u8>,
    resizer: Resizer,
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
    if mask.is_empty() {
        return Ok(());
    }
    if (mask.w, mask.h) != (face.w, face.h) {
        return Err(format!(
            "mask is {}x{}, face box {}x{}",
            mask.w, mask.h, face.w, face.h
        ));
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
    interleave_rows(crop_chw, size, rows, &mut scratch.rgb);
    let src =
        ImageRef::new(size, size, &scratch.rgb, PixelType::U8x3).map_err(|e| e.to_string())?;
    let (pw, ph) = (mask.x1 - mask.x0, mask.y1 - mask.y0);
    scratch.patch.resize((pw * ph * 3) as usize, 0);
    let mut dst = Image::from_slice_u8(pw, ph, &mut scratch.patch, PixelType::U8x3)
        .map_err(|e| e.to_string())?;
    scratch
        .resizer
        .resize(&src, &mut dst, &resize_options().crop(left, top, cw, ch))
        .map_err(|e| e.to_string())?;
    alpha_blend(frame, width, face, mask, &scratch.patch);
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
}

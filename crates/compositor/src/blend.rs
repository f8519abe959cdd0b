//! Pastes a generated face crop back into a background frame: the crop (with the mask as its
//! alpha) is resized to the face box with a SIMD resizer, then alpha-blended over the box only.

use crate::manifest::FaceBox;
use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

/// Interleaves a planar 3 x S x S crop with an S x S mask into RGBA.
pub fn crop_with_alpha(crop_chw: &[u8], mask: &[u8], size: u32, out: &mut Vec<u8>) {
    let n = (size * size) as usize;
    let (r, rest) = crop_chw.split_at(n);
    let (g, b) = rest.split_at(n);
    out.clear();
    out.reserve(n * 4);
    for i in 0..n {
        out.extend_from_slice(&[r[i], g[i], b[i], mask[i]]);
    }
}

/// Resizes an RGBA `size` x `size` image to `w` x `h` into `out`, treating alpha as a plain
/// channel (no premultiplication: it is a blend weight, not transparency of the colour).
pub fn resize_rgba(
    rgba: &[u8],
    size: u32,
    w: u32,
    h: u32,
    resizer: &mut Resizer,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let src = ImageRef::new(size, size, rgba, PixelType::U8x4).map_err(|e| e.to_string())?;
    out.resize(w as usize * h as usize * 4, 0);
    let mut dst = Image::from_slice_u8(w, h, out, PixelType::U8x4).map_err(|e| e.to_string())?;
    let opts = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
        .use_alpha(false);
    resizer
        .resize(&src, &mut dst, &opts)
        .map_err(|e| e.to_string())
}

/// Blends `rgba` (already `face.w` x `face.h`) into the RGB `frame` of `width` pixels per row:
/// `out = (src * a + bg * (255 - a)) / 255`, rounded. Pixels outside the box are untouched.
pub fn alpha_blend(frame: &mut [u8], width: u32, face: &FaceBox, rgba: &[u8]) {
    let (w, stride) = (face.w as usize, width as usize * 3);
    for row in 0..face.h as usize {
        let start = (face.y as usize + row) * stride + face.x as usize * 3;
        let dst = &mut frame[start..start + w * 3];
        let src = &rgba[row * w * 4..(row + 1) * w * 4];
        for (d, s) in dst.chunks_exact_mut(3).zip(src.chunks_exact(4)) {
            let a = s[3] as u32;
            if a == 0 {
                continue;
            }
            let ia = 255 - a;
            for c in 0..3 {
                d[c] = ((s[c] as u32 * a + d[c] as u32 * ia + 127) / 255) as u8;
            }
        }
    }
}

/// Reusable per-thread buffers for [`paste`]: after the first frame of a given box size,
/// pasting allocates nothing.
#[derive(Default)]
pub struct BlendScratch {
    rgba: Vec<u8>,
    resized: Vec<u8>,
    resizer: Resizer,
}

/// Resize + blend of one generated crop into `frame` (a copy of the background).
pub fn paste(
    frame: &mut [u8],
    width: u32,
    face: &FaceBox,
    crop_chw: &[u8],
    mask: &[u8],
    size: u32,
    scratch: &mut BlendScratch,
) -> Result<(), String> {
    crop_with_alpha(crop_chw, mask, size, &mut scratch.rgba);
    resize_rgba(
        &scratch.rgba,
        size,
        face.w,
        face.h,
        &mut scratch.resizer,
        &mut scratch.resized,
    )?;
    alpha_blend(frame, width, face, &scratch.resized);
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
        let rgba: Vec<u8> = (0..face.w * face.h * 4)
            .map(|i| (i * 91 % 256) as u8)
            .collect();
        let mut out = bg.clone();
        alpha_blend(&mut out, width, &face, &rgba);
        for y in 0..height {
            for x in 0..width {
                for c in 0..3 {
                    let i = ((y * width + x) * 3 + c) as usize;
                    let inside =
                        x >= face.x && x < face.x + face.w && y >= face.y && y < face.y + face.h;
                    let want = if inside {
                        let j = (((y - face.y) * face.w + (x - face.x)) * 4) as usize;
                        let a = rgba[j + 3] as f64 / 255.0;
                        (rgba[j + c as usize] as f64 * a + bg[i] as f64 * (1.0 - a)).round()
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
    fn opaque_uniform_crop_lands_exactly() {
        let size = 8;
        let crop: Vec<u8> = [10u8, 20, 30].iter().flat_map(|&v| vec![v; 64]).collect();
        let mask = vec![255u8; 64];
        let mut frame = vec![0u8; 16 * 16 * 3];
        let face = FaceBox {
            x: 3,
            y: 5,
            w: 11,
            h: 6,
        };
        paste(
            &mut frame,
            16,
            &face,
            &crop,
            &mask,
            size,
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

//! Compact image outputs: an output the model writes as planar RGB (`[n, 3, H, W]` UINT8)
//! may be asked for as I420 (YUV 4:2:0, BT.601 full range: the colour space JPEG uses), half
//! the bytes. A requested output carries the parameter [`PARAM_FORMAT`] = [`FORMAT_I420`];
//! the answer's tensor is `[n, H * 3 / 2, W]`: per image the Y plane (H x W), then U and V
//! (H/2 x W/2 each). H and W must be even. An output placed in shared memory is written there
//! as I420 the same way (the window must hold its bytes). Servers offering it list
//! [`EXTENSION`].

/// Output parameter asking for a format.
pub const PARAM_FORMAT: &str = "framecast_format";
/// The one format besides the model's own.
pub const FORMAT_I420: &str = "i420";
/// The extension's name in `ServerMetadata.extensions`.
pub const EXTENSION: &str = "framecast_i420_output";

fn clamp(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

/// BT.601 full range in 16-bit fixed point, as libjpeg computes it (integer arithmetic, which
/// the compiler vectorises; a frame's crop converts in well under a millisecond). Shared with
/// the inference service's conversion on the model's device, which must match bit for bit.
pub mod fixed {
    pub const YR: i32 = 19_595;
    pub const YG: i32 = 38_470;
    pub const YB: i32 = 7_471;
    pub const CBR: i32 = -11_059;
    pub const CBG: i32 = -21_709;
    pub const CRG: i32 = -27_439;
    pub const CRB: i32 = -5_329;
    pub const HALF: i32 = 32_768;
    /// Added to a chroma sum of four pixels before the shift by 18: +128, and rounding.
    pub const CHROMA_BIAS: i32 = (128 << 18) + (1 << 17);
}
use fixed::*;

/// `n` planar RGB images of `h` x `w` to I420.
pub fn from_planar_rgb(rgb: &[u8], n: usize, h: usize, w: usize) -> Vec<u8> {
    let (px, cw, ch) = (h * w, w / 2, h / 2);
    let mut out = vec![0u8; n * (px + 2 * cw * ch)];
    for (img, dst) in rgb
        .chunks_exact(3 * px)
        .zip(out.chunks_exact_mut(px + 2 * cw * ch))
    {
        let (r, rest) = img.split_at(px);
        let (g, b) = rest.split_at(px);
        let (y, uv) = dst.split_at_mut(px);
        let (u, v) = uv.split_at_mut(cw * ch);
        for (((y, &r), &g), &b) in y.iter_mut().zip(r).zip(g).zip(b) {
            *y = ((YR * r as i32 + YG * g as i32 + YB * b as i32 + HALF) >> 16) as u8;
        }
        for cy in 0..ch {
            let (top, bottom) = (2 * cy * w, (2 * cy + 1) * w);
            for cx in 0..cw {
                let sum = |p: &[u8]| {
                    let (a, c) = (top + 2 * cx, bottom + 2 * cx);
                    p[a] as i32 + p[a + 1] as i32 + p[c] as i32 + p[c + 1] as i32
                };
                let (sr, sg, sb) = (sum(r), sum(g), sum(b));
                // Four pixels summed: shift by 18, not 16.
                u[cy * cw + cx] = clamp((CBR * sr + CBG * sg + HALF * sb + CHROMA_BIAS) >> 18);
                v[cy * cw + cx] = clamp((HALF * sr + CRG * sg + CRB * sb + CHROMA_BIAS) >> 18);
            }
        }
    }
    out
}

/// `n` I420 images of `h` x `w` (both even) back to planar RGB, chroma repeated over its
/// 2 x 2 pixels. Each chroma sample's three colour terms are computed once per pair of rows
/// and added to its pixels' luma (a 24-crop batch at 320 x 320 converts several times faster
/// than pixel by pixel).
pub fn to_planar_rgb(i420: &[u8], n: usize, h: usize, w: usize) -> Vec<u8> {
    let (px, cw, ch) = (h * w, w / 2, h / 2);
    let mut out = vec![0u8; n * 3 * px];
    let mut terms = vec![[0i32; 3]; cw];
    for (src, img) in i420
        .chunks_exact(px + 2 * cw * ch)
        .zip(out.chunks_exact_mut(3 * px))
    {
        let (y, uv) = src.split_at(px);
        let (u, v) = uv.split_at(cw * ch);
        let (r, rest) = img.split_at_mut(px);
        let (g, b) = rest.split_at_mut(px);
        for cy in 0..ch {
            for ((t, &cb), &cr) in terms
                .iter_mut()
                .zip(&u[cy * cw..(cy + 1) * cw])
                .zip(&v[cy * cw..(cy + 1) * cw])
            {
                let (cb, cr) = (cb as i32 - 128, cr as i32 - 128);
                *t = [
                    (91_881 * cr + HALF) >> 16,
                    -((22_554 * cb + 46_802 * cr + HALF) >> 16),
                    (116_130 * cb + HALF) >> 16,
                ];
            }
            for row in [2 * cy, 2 * cy + 1] {
                let at = row * w..(row + 1) * w;
                let (yr, rr, gr, br) = (
                    &y[at.clone()],
                    &mut r[at.clone()],
                    &mut g[at.clone()],
                    &mut b[at],
                );
                for (x, t) in terms.iter().enumerate() {
                    for i in [2 * x, 2 * x + 1] {
                        let yy = yr[i] as i32;
                        rr[i] = clamp(yy + t[0]);
                        gr[i] = clamp(yy + t[1]);
                        br[i] = clamp(yy + t[2]);
                    }
                }
            }
        }
    }
    out
}

/// Bytes of `n` I420 images of `h` x `w`.
pub fn len(n: usize, h: usize, w: usize) -> usize {
    n * (h * w + 2 * (h / 2) * (w / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_the_bytes_and_a_faithful_round_trip() {
        let (n, h, w) = (2, 16, 24);
        // Smooth colour gradients, as faces are at this scale.
        let rgb: Vec<u8> = (0..n)
            .flat_map(|k| {
                (0..3).flat_map(move |c| {
                    (0..h * w).map(move |i| ((i % w) * 4 + (i / w) * 2 + c * 40 + k * 5) as u8)
                })
            })
            .collect();
        let yuv = from_planar_rgb(&rgb, n, h, w);
        assert_eq!(yuv.len(), len(n, h, w));
        assert_eq!(yuv.len() * 2, rgb.len());
        let back = to_planar_rgb(&yuv, n, h, w);
        let err: f64 = rgb
            .iter()
            .zip(&back)
            .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
            .sum::<f64>()
            / rgb.len() as f64;
        let psnr = 10.0 * (255.0f64 * 255.0 / err.max(1e-9)).log10();
        assert!(psnr > 30.0, "round trip PSNR {psnr:.1} dB");
        // Grey stays grey, exactly.
        let grey = vec![77u8; 3 * 4];
        assert_eq!(
            to_planar_rgb(&from_planar_rgb(&grey, 1, 2, 2), 1, 2, 2),
            grey
        );
    }

    /// The row-pair conversion gives what the per-pixel formula gives, everywhere.
    #[test]
    fn back_to_rgb_matches_the_per_pixel_formula() {
        let (n, h, w) = (2, 6, 10);
        let mut state = 11u32;
        let yuv: Vec<u8> = (0..len(n, h, w))
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 24) as u8
            })
            .collect();
        let got = to_planar_rgb(&yuv, n, h, w);
        let (px, cw) = (h * w, w / 2);
        for k in 0..n {
            let src = &yuv[k * len(1, h, w)..];
            for row in 0..h {
                for col in 0..w {
                    let c = (row / 2) * cw + col / 2;
                    let yy = src[row * w + col] as i32;
                    let (cb, cr) = (src[px + c] as i32 - 128, src[px + px / 4 + c] as i32 - 128);
                    let want = [
                        clamp(yy + ((91_881 * cr + HALF) >> 16)),
                        clamp(yy - ((22_554 * cb + 46_802 * cr + HALF) >> 16)),
                        clamp(yy + ((116_130 * cb + HALF) >> 16)),
                    ];
                    for (p, want) in want.iter().enumerate() {
                        assert_eq!(got[k * 3 * px + p * px + row * w + col], *want);
                    }
                }
            }
        }
    }
}

//! Compact image outputs: an output the model writes as planar RGB (`[n, 3, H, W]` UINT8)
//! may be asked for as I420 (YUV 4:2:0, BT.601 full range: the colour space JPEG uses), half
//! the bytes. A requested output carries the parameter [`PARAM_FORMAT`] = [`FORMAT_I420`];
//! the answer's tensor is `[n, H * 3 / 2, W]`: per image the Y plane (H x W), then U and V
//! (H/2 x W/2 each). H and W must be even. Servers offering it list [`EXTENSION`].

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

/// `n` I420 images of `h` x `w` back to planar RGB (chroma repeated over its 2 x 2 pixels).
pub fn to_planar_rgb(i420: &[u8], n: usize, h: usize, w: usize) -> Vec<u8> {
    let (px, cw, ch) = (h * w, w / 2, h / 2);
    let mut out = vec![0u8; n * 3 * px];
    for (src, img) in i420
        .chunks_exact(px + 2 * cw * ch)
        .zip(out.chunks_exact_mut(3 * px))
    {
        let (y, uv) = src.split_at(px);
        let (u, v) = uv.split_at(cw * ch);
        let (r, rest) = img.split_at_mut(px);
        let (g, b) = rest.split_at_mut(px);
        for row in 0..h {
            let crow = (row / 2).min(ch.saturating_sub(1)) * cw;
            for col in 0..w {
                let i = row * w + col;
                let c = crow + (col / 2).min(cw.saturating_sub(1));
                let (yy, cb, cr) = (y[i] as i32, u[c] as i32 - 128, v[c] as i32 - 128);
                r[i] = clamp(yy + ((91_881 * cr + HALF) >> 16));
                g[i] = clamp(yy - ((22_554 * cb + 46_802 * cr + HALF) >> 16));
                b[i] = clamp(yy + ((116_130 * cb + HALF) >> 16));
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
}

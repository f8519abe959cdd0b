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

fn clamp(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

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
        for i in 0..px {
            let (r, g, b) = (r[i] as f32, g[i] as f32, b[i] as f32);
            y[i] = clamp(0.299 * r + 0.587 * g + 0.114 * b);
        }
        for cy in 0..ch {
            for cx in 0..cw {
                let (mut cb, mut cr) = (0.0f32, 0.0f32);
                for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    let i = (2 * cy + dy) * w + 2 * cx + dx;
                    let (r, g, b) = (r[i] as f32, g[i] as f32, b[i] as f32);
                    cb += -0.168_736 * r - 0.331_264 * g + 0.5 * b;
                    cr += 0.5 * r - 0.418_688 * g - 0.081_312 * b;
                }
                u[cy * cw + cx] = clamp(cb / 4.0 + 128.0);
                v[cy * cw + cx] = clamp(cr / 4.0 + 128.0);
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
            for col in 0..w {
                let i = row * w + col;
                let c =
                    (row / 2).min(ch.saturating_sub(1)) * cw + (col / 2).min(cw.saturating_sub(1));
                let (yy, cb, cr) = (y[i] as f32, u[c] as f32 - 128.0, v[c] as f32 - 128.0);
                r[i] = clamp(yy + 1.402 * cr);
                g[i] = clamp(yy - 0.344_136 * cb - 0.714_136 * cr);
                b[i] = clamp(yy + 1.772 * cb);
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

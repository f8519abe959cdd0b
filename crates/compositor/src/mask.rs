//! Blend masks at the model's crop resolution: 255 where the generated face replaces the
//! background, 0 where the background stays, feathered in between so no seam shows.

use std::path::Path;

/// Centre and radii of the built-in lower-face ellipse, in crop-relative units.
const CENTRE: (f32, f32) = (0.5, 0.66);
const RADII: (f32, f32) = (0.42, 0.32);

/// The built-in soft lower-face mask, `size` x `size`. `feather` is the width of the soft
/// edge as a fraction of the ellipse radius; alpha falls monotonically from the centre out.
pub fn lower_face(size: u32, feather: f32) -> Vec<u8> {
    let s = size as f32;
    let mut out = Vec::with_capacity((size * size) as usize);
    for y in 0..size {
        for x in 0..size {
            let dx = ((x as f32 + 0.5) / s - CENTRE.0) / RADII.0;
            let dy = ((y as f32 + 0.5) / s - CENTRE.1) / RADII.1;
            let r = (dx * dx + dy * dy).sqrt();
            let t = ((1.0 - r) / feather).clamp(0.0, 1.0);
            let smooth = t * t * (3.0 - 2.0 * t);
            out.push((smooth * 255.0).round() as u8);
        }
    }
    out
}

/// A mask from a grey image in the bundle, resized to `size` x `size`.
pub fn from_image(path: &Path, size: u32) -> Result<Vec<u8>, String> {
    let img = image::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let grey = img
        .resize_exact(size, size, image::imageops::FilterType::Triangle)
        .into_luma8();
    Ok(grey.into_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotone_from_centre_to_edge() {
        let size = 96;
        let m = lower_face(size, 0.3);
        let at = |x: u32, y: u32| m[(y * size + x) as usize];
        let (cx, cy) = (
            (CENTRE.0 * size as f32) as i32,
            (CENTRE.1 * size as f32) as i32,
        );
        assert_eq!(at(cx as u32, cy as u32), 255);
        // Along rays in 16 directions, alpha never rises as we walk outwards.
        for k in 0..16 {
            let a = k as f32 * std::f32::consts::PI / 8.0;
            let mut prev = 255u8;
            for step in 0..size as i32 {
                let x = cx + (a.cos() * step as f32).round() as i32;
                let y = cy + (a.sin() * step as f32).round() as i32;
                if x < 0 || y < 0 || x >= size as i32 || y >= size as i32 {
                    break;
                }
                let v = at(x as u32, y as u32);
                assert!(v <= prev, "ray {k} rises at step {step}: {prev} -> {v}");
                prev = v;
            }
        }
        for (x, y) in [(0, 0), (size - 1, 0), (0, size - 1), (size - 1, size - 1)] {
            assert_eq!(at(x, y), 0, "corner ({x},{y}) must keep the background");
        }
        // Feathered: some pixels are strictly between 0 and 255.
        assert!(m.iter().filter(|&&v| v > 0 && v < 255).count() > size as usize);
    }
}

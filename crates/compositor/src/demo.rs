//! Generates the demo avatar bundle: textured background frames with slow camera motion and
//! sensor noise (so JPEG timings resemble camera footage, not flat colour), a face, and a
//! face box per frame. Nothing is downloaded.

use crate::encode::{self, Subsampling};
use crate::manifest::{FaceBox, BOXES_FILE, FRAMES_DIR, MANIFEST_FILE};
use anyhow::{ensure, Context, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub id: String,
    pub width: u32,
    pub height: u32,
    pub frames: u32,
    pub fps: f64,
    pub crop_size: u32,
    pub model: String,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            id: "demo".to_string(),
            width: 1280,
            height: 720,
            frames: 200,
            fps: 25.0,
            crop_size: 320,
            model: "talking-demo".to_string(),
        }
    }
}

/// Cheap deterministic hash noise in [0, 1).
fn hash(x: u32, y: u32, seed: u32) -> f32 {
    let mut h =
        x.wrapping_mul(0x9E37_79B1) ^ y.wrapping_mul(0x85EB_CA77) ^ seed.wrapping_mul(0xC2B2_AE3D);
    h ^= h >> 15;
    h = h.wrapping_mul(0x2C1B_3C6D);
    h ^= h >> 12;
    (h & 0xFFFF) as f32 / 65536.0
}

/// Smooth value noise at `scale` pixels per cell.
fn value_noise(x: f32, y: f32, scale: f32, seed: u32) -> f32 {
    let (fx, fy) = (x / scale, y / scale);
    let (ix, iy) = (fx.floor(), fy.floor());
    let (tx, ty) = (fx - ix, fy - iy);
    let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
    let (ix, iy) = (ix as i32 as u32, iy as i32 as u32);
    let v = |dx, dy| hash(ix.wrapping_add(dx), iy.wrapping_add(dy), seed);
    let top = v(0, 0) + (v(1, 0) - v(0, 0)) * sx;
    let bottom = v(0, 1) + (v(1, 1) - v(0, 1)) * sx;
    top + (bottom - top) * sy
}

struct World {
    w: u32,
    rgb: Vec<u8>,
    head: (f32, f32, f32, f32),
}

fn ellipse(px: f32, py: f32, cx: f32, cy: f32, rx: f32, ry: f32) -> f32 {
    let (dx, dy) = ((px - cx) / rx, (py - cy) / ry);
    dx * dx + dy * dy
}

/// The scene the camera pans over: a textured room, shelves with hard edges, a person.
fn world(w: u32, h: u32) -> World {
    let (fw, fh) = (w as f32, h as f32);
    let hry = 0.19 * fh;
    let (hx, hy, hrx) = (fw / 2.0, fh * 0.44, hry * 0.78);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    rgb.par_chunks_mut((w * 3) as usize)
        .enumerate()
        .for_each(|(y, row)| {
            let py = y as f32;
            for x in 0..w {
                let px = x as f32;
                let n = 0.55 * value_noise(px, py, 48.0, 1)
                    + 0.3 * value_noise(px, py, 12.0, 2)
                    + 0.15 * value_noise(px, py, 3.0, 3);
                let grad = 0.75 + 0.25 * (py / fh);
                let mut c = [
                    (150.0 + 60.0 * n) * grad,
                    (135.0 + 50.0 * n) * grad,
                    (110.0 + 40.0 * n) * grad,
                ];
                // Shelves: a grid of books with dark outlines on both sides of the room.
                let shelf = px < fw * 0.3 || px > fw * 0.7;
                if shelf && py > fh * 0.1 && py < fh * 0.9 {
                    let (bw, bh) = (fw * 0.018, fh * 0.16);
                    let (cx, cy) = ((px / bw).floor() as u32, (py / bh).floor() as u32);
                    let k = hash(cx, cy, 7);
                    let edge = (px % bw) < 2.0 || (py % bh) < 3.0;
                    let book_top = (py % bh) < bh * (0.15 + 0.3 * hash(cx, cy, 9));
                    if edge {
                        c = [40.0, 30.0, 25.0];
                    } else if !book_top {
                        let palette = [
                            [170.0, 40.0, 40.0],
                            [40.0, 90.0, 150.0],
                            [200.0, 170.0, 60.0],
                            [60.0, 120.0, 70.0],
                            [220.0, 220.0, 210.0],
                        ];
                        let p = palette[(k * 5.0) as usize % 5];
                        c = [
                            p[0] * (0.8 + 0.3 * n),
                            p[1] * (0.8 + 0.3 * n),
                            p[2] * (0.8 + 0.3 * n),
                        ];
                    }
                }
                // The person: shirt, neck, hair, face, eyes, brows, nose, closed mouth.
                if ellipse(px, py, hx, hy + 2.6 * hry, 2.4 * hrx, 1.4 * hry) < 1.0 {
                    c = [50.0 + 20.0 * n, 60.0 + 20.0 * n, 110.0 + 25.0 * n];
                }
                if (px - hx).abs() < hrx * 0.45 && py > hy && py < hy + 1.5 * hry {
                    c = [200.0 - 30.0 * n, 150.0 - 20.0 * n, 120.0 - 20.0 * n];
                }
                if ellipse(px, py, hx, hy - 0.25 * hry, 1.1 * hrx, 0.95 * hry) < 1.0 {
                    c = [45.0 + 25.0 * n, 30.0 + 15.0 * n, 20.0 + 10.0 * n];
                }
                if ellipse(px, py, hx, hy, hrx, hry) < 1.0 {
                    let shade = 1.0 - 0.25 * ((px - hx) / hrx).powi(2);
                    c = [
                        (225.0 - 20.0 * n) * shade,
                        (175.0 - 15.0 * n) * shade,
                        (145.0 - 15.0 * n) * shade,
                    ];
                    for side in [-1.0f32, 1.0] {
                        let ex = hx + side * 0.38 * hrx;
                        if ellipse(px, py, ex, hy - 0.12 * hry, 0.16 * hrx, 0.07 * hry) < 1.0 {
                            c = [250.0, 250.0, 245.0];
                        }
                        if ellipse(px, py, ex, hy - 0.12 * hry, 0.07 * hrx, 0.065 * hry) < 1.0 {
                            c = [50.0, 35.0, 25.0];
                        }
                        if ellipse(px, py, ex, hy - 0.3 * hry, 0.2 * hrx, 0.03 * hry) < 1.0 {
                            c = [60.0, 40.0, 30.0];
                        }
                    }
                    if ellipse(px, py, hx, hy + 0.2 * hry, 0.08 * hrx, 0.12 * hry) < 1.0 {
                        c = [c[0] * 0.85, c[1] * 0.8, c[2] * 0.8];
                    }
                    if ellipse(px, py, hx, hy + 0.55 * hry, 0.32 * hrx, 0.025 * hry) < 1.0 {
                        c = [150.0, 60.0, 60.0];
                    }
                }
                let o = x as usize * 3;
                for k in 0..3 {
                    row[o + k] = c[k].clamp(0.0, 255.0) as u8;
                }
            }
        });
    World {
        w,
        rgb,
        head: (hx, hy, hrx, hry),
    }
}

/// Writes the bundle into `root/<id>/` and returns its directory. Frames are JPEG (q92,
/// 4:4:4) named `000000.jpg`...; an existing bundle is replaced only once the new one is whole.
pub fn write_demo(root: &Path, opts: &DemoOptions) -> Result<PathBuf> {
    ensure!(
        opts.width >= 64 && opts.height >= 64,
        "demo frames must be at least 64x64"
    );
    ensure!(opts.frames >= 1, "demo needs at least one frame");
    let (margin_x, margin_y) = (opts.width / 16, opts.height / 16);
    let w = world(opts.width + 2 * margin_x, opts.height + 2 * margin_y);
    let dir = root.join(&opts.id);
    let tmp = root.join(format!(".{}.partial", opts.id));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(tmp.join(FRAMES_DIR))
        .with_context(|| format!("creating {}", tmp.display()))?;
    let (hx, hy, _, hry) = w.head;
    let side = (2.2 * hry).round() as u32;
    let boxes: Vec<FaceBox> = (0..opts.frames)
        .into_par_iter()
        .map(|i| -> Result<FaceBox> {
            let t = i as f64 / opts.fps;
            let ox = margin_x as f64 * (1.0 + 0.8 * (2.0 * std::f64::consts::PI * t / 7.0).sin());
            let oy =
                margin_y as f64 * (1.0 + 0.6 * (2.0 * std::f64::consts::PI * t / 11.0 + 1.0).sin());
            let (ox, oy) = (ox.round() as u32, oy.round() as u32);
            let mut frame = vec![0u8; (opts.width * opts.height * 3) as usize];
            for y in 0..opts.height {
                let src = (((y + oy) * w.w + ox) * 3) as usize;
                let dst = (y * opts.width * 3) as usize;
                let row = &mut frame[dst..dst + (opts.width * 3) as usize];
                row.copy_from_slice(&w.rgb[src..src + row.len()]);
                for (x, px) in row.iter_mut().enumerate() {
                    let noise = (hash(x as u32, y, i + 100) - 0.5) * 10.0;
                    *px = (*px as f32 + noise).clamp(0.0, 255.0) as u8;
                }
            }
            let jpeg = encode::encode_rgb(&frame, opts.width, opts.height, 92, Subsampling::S444)
                .map_err(anyhow::Error::msg)?;
            std::fs::write(tmp.join(FRAMES_DIR).join(format!("{i:06}.jpg")), jpeg)?;
            let bx = (hx - ox as f32 - side as f32 / 2.0).round().max(0.0) as u32;
            let by = (hy - oy as f32 - 1.078 * hry).round().max(0.0) as u32;
            Ok(FaceBox {
                x: bx.min(opts.width - side.min(opts.width)),
                y: by.min(opts.height - side.min(opts.height)),
                w: side.min(opts.width),
                h: side.min(opts.height),
            })
        })
        .collect::<Result<_>>()?;
    std::fs::write(tmp.join(BOXES_FILE), serde_json::to_string(&boxes)?)?;
    // Built-in face models take `audio` [32, 16, 16]: lipsync-ref hears 16 stacked
    // audio-encoder embeddings; the others (talking-demo opens its mouth with loudness) the
    // window's energy.
    let audio = if opts.model == "lipsync-ref" {
        "[audio]\ninput = \"audio\"\nfeatures = \"encoder\"\nencoder = \"audio-encoder\"\nstack = 16\n"
    } else {
        "[audio]\ninput = \"audio\"\nfeatures = \"energy\"\n"
    };
    let manifest = format!(
        "id = \"{}\"\nfps = {:?}\nwidth = {}\nheight = {}\ncrop_size = {}\nmodel = \"{}\"\nchannel_order = [\"reference\", \"masked\"]\njpeg_quality = 75\n\n[mask]\nfeather = 0.25\n\n{audio}",
        opts.id, opts.fps, opts.width, opts.height, opts.crop_size, opts.model
    );
    std::fs::write(tmp.join(MANIFEST_FILE), manifest)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&tmp, &dir)?;
    Ok(dir)
}

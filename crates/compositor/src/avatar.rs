//! A loaded avatar: decoded background frames, face boxes, blend mask, and the model's face
//! inputs for every frame, computed once at load rather than per rendered frame.

use crate::blend::BoxMask;
use crate::manifest::{self, Channel, FaceBox, Manifest};
use crate::{encode, mask};
use bytes::Bytes;
use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One decoded background frame, packed RGB (`width * height * 3` bytes).
///
/// Compositing pastes the face into these very pixels, encodes them and puts the saved pixels
/// back (`render::compose`), so no frame is ever copied whole: a full-frame copy out of DRAM
/// cost as much as the paste itself. The lock keeps two sessions that render the same frame
/// at once from seeing each other's face.
pub struct Background {
    pixels: Mutex<Vec<u8>>,
    len: usize,
}

impl Background {
    pub fn new(pixels: Vec<u8>) -> Background {
        let len = pixels.len();
        Background {
            pixels: Mutex::new(pixels),
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pixels, for exclusive use. Whoever changes them restores them before unlocking,
    /// even when unwinding, so a poisoned lock still guards intact pixels.
    pub fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.pixels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the pixels.
    pub fn to_vec(&self) -> Vec<u8> {
        self.lock().clone()
    }
}

pub struct Avatar {
    pub manifest: Manifest,
    pub frames: Vec<Background>,
    pub boxes: Vec<FaceBox>,
    /// The model's face input per frame: 6 x S x S u8, groups in `channel_order`.
    pub face_inputs: Vec<Bytes>,
    /// Blend alpha, S x S.
    pub mask: Vec<u8>,
    /// The mask resized to each frame's face box (shared between boxes of one size).
    pub box_masks: Vec<Arc<BoxMask>>,
    pub load_time: Duration,
}

impl Avatar {
    /// Loads and decodes a bundle. On failure every problem found is returned, each naming
    /// the file (and field) at fault.
    pub fn load(dir: &Path) -> Result<Avatar, Vec<String>> {
        let started = Instant::now();
        let manifest = Manifest::load(dir)?;
        let mut problems = Vec::new();
        let files = manifest::frame_files(dir).map_err(|e| vec![e])?;
        let boxes = match manifest::load_boxes(dir) {
            Ok(b) => b,
            Err(e) => return Err(vec![e]),
        };
        if boxes.len() != files.len() {
            problems.push(format!(
                "{}: {} boxes for {} frames",
                dir.join(manifest::BOXES_FILE).display(),
                boxes.len(),
                files.len()
            ));
        }
        for (i, b) in boxes.iter().enumerate() {
            if !b.fits(manifest.width, manifest.height) {
                problems.push(format!(
                    "{}: box {i} [{}, {}, {}, {}] does not lie inside the {}x{} frame",
                    dir.join(manifest::BOXES_FILE).display(),
                    b.x,
                    b.y,
                    b.w,
                    b.h,
                    manifest.width,
                    manifest.height
                ));
            }
        }
        let s = manifest.crop_size;
        let mask = match &manifest.mask.image {
            Some(name) => mask::from_image(&dir.join(name), s).unwrap_or_else(|e| {
                problems.push(e);
                Vec::new()
            }),
            None => mask::lower_face(s, manifest.mask.feather),
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        let done = AtomicUsize::new(0);
        let total = files.len();
        let decoded: Vec<Result<(Vec<u8>, Bytes), String>> = files
            .par_iter()
            .zip(boxes.par_iter())
            .map(|(path, face)| {
                let frame = decode_frame(path, manifest.width, manifest.height)?;
                let input = face_input(&frame, manifest.width, face, s, &manifest.channel_order)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if total >= 100 && n.is_multiple_of(total / 4) {
                    tracing::info!(avatar = %manifest.id, "decoded {n}/{total} frames");
                }
                Ok((frame, input))
            })
            .collect();
        let mut frames = Vec::with_capacity(total);
        let mut face_inputs = Vec::with_capacity(total);
        for r in decoded {
            match r {
                Ok((f, i)) => {
                    frames.push(Background::new(f));
                    face_inputs.push(i);
                }
                Err(e) => problems.push(e),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut by_size: HashMap<(u32, u32), Arc<BoxMask>> = HashMap::new();
        let mut box_masks = Vec::with_capacity(boxes.len());
        for b in &boxes {
            let m = match by_size.get(&(b.w, b.h)) {
                Some(m) => m.clone(),
                None => {
                    let m = Arc::new(BoxMask::new(&mask, s, b.w, b.h).map_err(|e| vec![e])?);
                    by_size.insert((b.w, b.h), m.clone());
                    m
                }
            };
            box_masks.push(m);
        }
        Ok(Avatar {
            manifest,
            frames,
            boxes,
            face_inputs,
            mask,
            box_masks,
            load_time: started.elapsed(),
        })
    }

    /// Background frame used for output frame `index`: frames play forward then backward
    /// (0,1,..,n-1,n-2,..,1,0,1,..) so the loop has no jump.
    pub fn background_index(&self, index: u64) -> usize {
        ping_pong(index, self.frames.len())
    }

    /// Bytes this avatar holds in memory.
    pub fn resident_bytes(&self) -> u64 {
        let frames: usize = self.frames.iter().map(Background::len).sum();
        let inputs: usize = self.face_inputs.iter().map(Bytes::len).sum();
        let mut sizes: Vec<(u32, u32)> = self.boxes.iter().map(|b| (b.w, b.h)).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let box_masks: usize = sizes.iter().map(|&(w, h)| (w * h) as usize * 4).sum();
        (frames
            + inputs
            + self.mask.len()
            + box_masks
            + self.boxes.len() * std::mem::size_of::<FaceBox>()) as u64
    }
}

/// Ping-pong index into `n` frames.
pub fn ping_pong(index: u64, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let period = 2 * (n as u64 - 1);
    let p = index % period;
    (if p < n as u64 { p } else { period - p }) as usize
}

fn decode_frame(path: &Path, width: u32, height: u32) -> Result<Vec<u8>, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let is_jpeg = data.starts_with(&[0xFF, 0xD8]);
    let (pixels, w, h) = if is_jpeg {
        encode::decode_rgb(&data).map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        let img = image::load_from_memory(&data)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .into_rgb8();
        let (w, h) = img.dimensions();
        (img.into_raw(), w, h)
    };
    if (w, h) != (width, height) {
        return Err(format!(
            "{}: frame is {w}x{h}; the manifest says {width}x{height}",
            path.display()
        ));
    }
    Ok(pixels)
}

/// The model's face input for one frame: the box resized to S x S, as planar RGB, once as it
/// is and once with its lower half blacked out, in `order`.
pub fn face_input(
    frame: &[u8],
    width: u32,
    face: &FaceBox,
    s: u32,
    order: &[Channel],
) -> Result<Bytes, String> {
    let height = (frame.len() / (width as usize * 3)) as u32;
    let src = ImageRef::new(width, height, frame, PixelType::U8x3).map_err(|e| e.to_string())?;
    let mut dst = Image::new(s, s, PixelType::U8x3);
    let opts = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
        .crop(face.x as f64, face.y as f64, face.w as f64, face.h as f64);
    Resizer::new()
        .resize(&src, &mut dst, &opts)
        .map_err(|e| e.to_string())?;
    let rgb = dst.buffer();
    let n = (s * s) as usize;
    let mut out = vec![0u8; crate::face_contract::input_bytes(s as usize)];
    for (group, channel) in order.iter().enumerate() {
        let planes = &mut out[group * 3 * n..(group + 1) * 3 * n];
        let rows = match channel {
            Channel::Reference => s as usize,
            Channel::Masked => s as usize / 2,
        };
        for c in 0..3 {
            let plane = &mut planes[c * n..(c + 1) * n];
            for (i, v) in plane[..rows * s as usize].iter_mut().enumerate() {
                *v = rgb[i * 3 + c];
            }
        }
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_pong_has_no_jump() {
        let seq: Vec<usize> = (0..10).map(|i| ping_pong(i, 4)).collect();
        assert_eq!(seq, [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]);
        assert_eq!(ping_pong(u64::MAX, 1), 0);
        assert_eq!(ping_pong(5, 2), 1);
    }

    #[test]
    fn face_input_orders_and_masks() {
        let (w, h, s) = (8u32, 8u32, 4u32);
        let frame: Vec<u8> = (0..w * h).flat_map(|_| [200u8, 100, 50]).collect();
        let face = FaceBox {
            x: 0,
            y: 0,
            w: 8,
            h: 8,
        };
        let input =
            face_input(&frame, w, &face, s, &[Channel::Masked, Channel::Reference]).unwrap();
        let n = (s * s) as usize;
        assert_eq!(input.len(), 6 * n);
        // Group 0 is the masked copy: top half kept, bottom half black.
        assert_eq!(input[0], 200);
        assert_eq!(input[n - 1], 0);
        // Group 1 is the reference: all kept.
        assert_eq!(input[3 * n + n - 1], 200);
        assert_eq!(input[5 * n + n - 1], 50);
    }
}

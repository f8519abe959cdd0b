//! A loaded avatar: its background frames in their prepared form (each encoded once with
//! restart markers, plus the pixels of its face region, see [`crate::prepared`]),
//! face boxes and blend mask. Full raw frames are not kept: a 1280x720 frame costs about a
//! sixth of its 2.7 MiB of RGB. The model's face input is computed from the region when a
//! frame is rendered.

use crate::blend::BoxMask;
use crate::encode::{Params, Subsampling};
use crate::manifest::{self, Channel, FaceBox, Manifest};
use crate::prepared::{self, Expect, Frame};
use crate::raw_frame::Rect;
use crate::segments::Grid;
use crate::{encode, mask};
use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Avatar {
    pub manifest: Manifest,
    pub frames: Vec<Frame>,
    pub boxes: Vec<FaceBox>,
    /// Blend alpha, S x S.
    pub mask: Vec<u8>,
    /// The mask resized to each frame's face box (shared between boxes of one size).
    pub box_masks: Vec<Arc<BoxMask>>,
    /// The frames' MCU and restart-segment grid.
    pub grid: Grid,
    /// How the frames are encoded: a request at this quality and subsampling is spliced
    /// (only the face region encoded); any other is decoded and encoded whole.
    pub params: Params,
    pub load_time: Duration,
    /// Where the frames came from.
    pub source: Source,
    /// A fingerprint of the bundle's sources ([`prepared::fingerprint`]): equal fingerprints,
    /// equal frames and face inputs.
    pub fingerprint: u64,
    /// Idle frames as raw I420, made once for the sessions that take raw frames.
    pub idle_raw: crate::idle_frames::IdleFrames,
}

/// Where an avatar's prepared frames came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Read from the bundle's `prepared.fcp`.
    PreparedFile,
    /// Decoded and encoded at load: there was no usable prepared file (the reason, if one
    /// was there).
    Prepared { unused_file: Option<String> },
}

/// What a bundle's files say, checked, before any frame is decoded.
struct Bundle {
    manifest: Manifest,
    files: Vec<PathBuf>,
    boxes: Vec<FaceBox>,
    mask: Vec<u8>,
    grid: Grid,
    params: Params,
}

impl Bundle {
    fn open(dir: &Path, subsampling: Subsampling) -> Result<Bundle, Vec<String>> {
        let manifest = Manifest::load(dir)?;
        let mut problems = Vec::new();
        let files = manifest::frame_files(dir).map_err(|e| vec![e])?;
        let boxes = manifest::load_boxes(dir).map_err(|e| vec![e])?;
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
        let params = prepared::params(manifest.width, manifest.jpeg_quality, subsampling);
        let grid = Grid::new(
            manifest.width,
            manifest.height,
            subsampling,
            params.restart_mcus,
        )
        .map_err(|e| vec![e])?;
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Bundle {
            manifest,
            files,
            boxes,
            mask,
            grid,
            params,
        })
    }

    fn expect(&self, fingerprint: u64) -> Expect<'_> {
        Expect {
            params: self.params,
            fingerprint,
            grid: &self.grid,
            boxes: &self.boxes,
        }
    }

    /// Decodes every source frame and prepares it, in parallel.
    fn prepare_frames(&self) -> Result<Vec<Frame>, Vec<String>> {
        let m = &self.manifest;
        let done = AtomicUsize::new(0);
        let total = self.files.len();
        let prepared: Vec<Result<Frame, String>> = self
            .files
            .par_iter()
            .zip(self.boxes.par_iter())
            .map(|(path, face)| {
                let rgb = decode_frame(path, m.width, m.height)?;
                let frame = Frame::prepare(&rgb, &self.grid, face, self.params)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if total >= 100 && n.is_multiple_of(total / 4) {
                    tracing::info!(avatar = %m.id, "prepared {n}/{total} frames");
                }
                Ok(frame)
            })
            .collect();
        let (frames, problems): (Vec<_>, Vec<_>) = prepared.into_iter().partition(Result::is_ok);
        if !problems.is_empty() {
            return Err(problems.into_iter().filter_map(Result::err).collect());
        }
        Ok(frames.into_iter().filter_map(Result::ok).collect())
    }

    fn into_avatar(
        self,
        frames: Vec<Frame>,
        fingerprint: u64,
        started: Instant,
        source: Source,
    ) -> Result<Avatar, Vec<String>> {
        let s = self.manifest.crop_size;
        let mut by_size: HashMap<(u32, u32), Arc<BoxMask>> = HashMap::new();
        let mut box_masks = Vec::with_capacity(self.boxes.len());
        for b in &self.boxes {
            let m = match by_size.get(&(b.w, b.h)) {
                Some(m) => m.clone(),
                None => {
                    let m = Arc::new(BoxMask::new(&self.mask, s, b.w, b.h).map_err(|e| vec![e])?);
                    by_size.insert((b.w, b.h), m.clone());
                    m
                }
            };
            box_masks.push(m);
        }
        Ok(Avatar {
            manifest: self.manifest,
            frames,
            boxes: self.boxes,
            mask: self.mask,
            box_masks,
            grid: self.grid,
            params: self.params,
            load_time: started.elapsed(),
            source,
            fingerprint,
            idle_raw: Default::default(),
        })
    }
}

impl Avatar {
    /// Loads a bundle with frames encoded at 4:2:0 (see [`Avatar::load_with`]).
    pub fn load(dir: &Path) -> Result<Avatar, Vec<String>> {
        Self::load_with(dir, Subsampling::S420)
    }

    /// Loads a bundle whose frames are to be encoded with `subsampling`: from its prepared
    /// file when that matches the bundle, else by decoding and preparing every frame. On
    /// failure every problem found is returned, each naming the file (and field) at fault.
    pub fn load_with(dir: &Path, subsampling: Subsampling) -> Result<Avatar, Vec<String>> {
        let started = Instant::now();
        let bundle = Bundle::open(dir, subsampling)?;
        let fingerprint = prepared::fingerprint(dir, &bundle.files).map_err(|e| vec![e])?;
        let unused_file = match prepared::read(dir, &bundle.expect(fingerprint)) {
            Ok(Some(frames)) => {
                return bundle.into_avatar(frames, fingerprint, started, Source::PreparedFile);
            }
            Ok(None) => None,
            Err(why) => {
                tracing::warn!(avatar = %bundle.manifest.id, %why, "prepared file not used");
                Some(why)
            }
        };
        let frames = bundle.prepare_frames()?;
        bundle.into_avatar(
            frames,
            fingerprint,
            started,
            Source::Prepared { unused_file },
        )
    }

    /// Decodes and prepares every frame of a bundle (whatever prepared file it has) and
    /// writes the prepared file; returns the avatar and the file's path.
    pub fn prepare(dir: &Path, subsampling: Subsampling) -> Result<(Avatar, PathBuf), Vec<String>> {
        let started = Instant::now();
        let bundle = Bundle::open(dir, subsampling)?;
        let fingerprint = prepared::fingerprint(dir, &bundle.files).map_err(|e| vec![e])?;
        let frames = bundle.prepare_frames()?;
        let path =
            prepared::write(dir, &bundle.expect(fingerprint), &frames).map_err(|e| vec![e])?;
        let avatar = bundle.into_avatar(
            frames,
            fingerprint,
            started,
            Source::Prepared { unused_file: None },
        )?;
        Ok((avatar, path))
    }

    /// Bytes the avatar will hold once loaded: exact, from its files alone, when it has a
    /// usable prepared file; otherwise an estimate taking each source frame file's size for
    /// its JPEG (the budget makes room for any excess once the avatar is loaded, or refuses
    /// it).
    pub fn footprint(dir: &Path, subsampling: Subsampling) -> Result<u64, Vec<String>> {
        let bundle = Bundle::open(dir, subsampling)?;
        let fingerprint = prepared::fingerprint(dir, &bundle.files).map_err(|e| vec![e])?;
        let grid = &bundle.grid;
        let jpegs: Vec<u64> = match prepared::jpeg_lengths(dir, &bundle.expect(fingerprint)) {
            Ok(Some(lens)) => lens.into_iter().map(u64::from).collect(),
            _ => bundle
                .files
                .iter()
                .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
                .collect(),
        };
        let layout = (grid.segments() * std::mem::size_of::<u32>()) as u64;
        let frames: u64 = jpegs
            .iter()
            .zip(&bundle.boxes)
            .map(|(jpeg, b)| {
                let pixels = prepared::region_bytes(&grid.region(b), bundle.params.subsampling);
                jpeg + layout + pixels as u64
            })
            .sum();
        Ok(frames + fixed_bytes(&bundle.mask, &bundle.boxes) as u64)
    }

    /// Background frame used for output frame `index`: frames play forward then backward
    /// (0,1,..,n-1,n-2,..,1,0,1,..) so the loop has no jump.
    pub fn background_index(&self, index: u64) -> usize {
        ping_pong(index, self.frames.len())
    }

    /// Writes the model's face input for background frame `bg` into `out`
    /// ([`crate::face_contract::input_bytes`] long), from its region's pixels (as RGB: a
    /// region kept as YCbCr planes is converted first, as a JPEG decode would).
    pub fn face_input(&self, bg: usize, out: &mut [u8]) -> Result<(), String> {
        let frame = &self.frames[bg];
        let face = frame.region.local(&self.boxes[bg]);
        face_input(
            &frame.pixels.rgb(frame.region.w, frame.region.h)?,
            frame.region.w,
            &face,
            self.manifest.crop_size,
            &self.manifest.channel_order,
            out,
        )
    }

    /// The pixels of background frame `bg` a talking frame can change: its face box where
    /// the mask lets the face through (alpha above 0), widened to even coordinates (a chroma
    /// sample covers 2x2 pixels) and kept to the frame's region. `None` where the mask lets
    /// nothing through.
    pub fn changed(&self, bg: usize) -> Option<Rect> {
        let (b, m) = (&self.boxes[bg], &self.box_masks[bg]);
        if m.is_empty() {
            return None;
        }
        let (x0, y0) = ((b.x + m.x0) & !1, (b.y + m.y0) & !1);
        let (x1, y1) = (
            (b.x + m.x1).next_multiple_of(2),
            (b.y + m.y1).next_multiple_of(2),
        );
        self.frames[bg].region.rect().intersect(&Rect {
            x: x0,
            y: y0,
            w: x1 - x0,
            h: y1 - y0,
        })
    }

    /// The smallest rectangle holding every pixel a talking frame can change ([`Self::changed`]
    /// of every frame): outside it a talking frame is its background, byte for byte. Where the
    /// mask lets nothing through, [`Self::kept_region`]. `None` for an avatar without frames.
    pub fn face_region(&self) -> Option<Rect> {
        let changed = (0..self.frames.len()).filter_map(|bg| self.changed(bg));
        changed
            .reduce(|a, b| a.union(&b))
            .or_else(|| self.kept_region())
    }

    /// The smallest rectangle holding every frame's region kept decoded (its face box widened
    /// to the JPEG's restart segments). `None` for an avatar without frames.
    pub fn kept_region(&self) -> Option<Rect> {
        let regions = self.frames.iter().map(|f| f.region.rect());
        regions.reduce(|a, b| a.union(&b))
    }

    /// Bytes this avatar holds in memory.
    pub fn resident_bytes(&self) -> u64 {
        let frames: usize = self.frames.iter().map(Frame::resident_bytes).sum();
        (frames + fixed_bytes(&self.mask, &self.boxes)) as u64
    }
}

/// Bytes of an avatar's mask, per-size box masks and boxes.
fn fixed_bytes(mask: &[u8], boxes: &[FaceBox]) -> usize {
    let mut sizes: Vec<(u32, u32)> = boxes.iter().map(|b| (b.w, b.h)).collect();
    sizes.sort_unstable();
    sizes.dedup();
    // Per distinct box size: alpha, and alpha repeated per colour channel.
    let box_masks: usize = sizes.iter().map(|&(w, h)| (w * h) as usize * 4).sum();
    mask.len() + box_masks + std::mem::size_of_val(boxes)
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

/// Decodes a bundle's frame file (JPEG or PNG) to packed RGB, checking its size.
pub fn decode_frame(path: &Path, width: u32, height: u32) -> Result<Vec<u8>, String> {
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

/// Writes the model's face input for one frame into `out`: the box resized to S x S, as
/// planar RGB, once as it is and once with its lower half blacked out, in `order`.
pub fn face_input(
    frame: &[u8],
    width: u32,
    face: &FaceBox,
    s: u32,
    order: &[Channel],
    out: &mut [u8],
) -> Result<(), String> {
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
    if out.len() != crate::face_contract::input_bytes(s as usize) {
        return Err(format!(
            "face input buffer of {} bytes for S = {s}",
            out.len()
        ));
    }
    for (group, channel) in order.iter().enumerate() {
        let planes = &mut out[group * 3 * n..(group + 1) * 3 * n];
        let rows = match channel {
            Channel::Reference => s as usize,
            Channel::Masked => s as usize / 2,
        };
        for c in 0..3 {
            let plane = &mut planes[c * n..(c + 1) * n];
            let (kept, blacked) = plane.split_at_mut(rows * s as usize);
            for (i, v) in kept.iter_mut().enumerate() {
                *v = rgb[i * 3 + c];
            }
            blacked.fill(0);
        }
    }
    Ok(())
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
        let n = (s * s) as usize;
        let mut input = vec![7u8; 6 * n];
        face_input(
            &frame,
            w,
            &face,
            s,
            &[Channel::Masked, Channel::Reference],
            &mut input,
        )
        .unwrap();
        assert_eq!(input.len(), 6 * n);
        // Group 0 is the masked copy: top half kept, bottom half black.
        assert_eq!(input[0], 200);
        assert_eq!(input[n - 1], 0);
        // Group 1 is the reference: all kept.
        assert_eq!(input[3 * n + n - 1], 200);
        assert_eq!(input[5 * n + n - 1], 50);
    }
}

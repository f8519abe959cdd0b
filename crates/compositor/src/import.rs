//! An avatar from a video of a person: `framecast-compositor avatar import VIDEO`.
//!
//! The video is read by Debian's `ffprobe` and decoded by its `ffmpeg` (any container and
//! codec they read: MP4/H.264, WebM/VP8/VP9, ...) to RGB frames, one at a time. The face of
//! every frame is found by [`crate::face_detect`] (the one it is surest of, if there are
//! several; a gap of a few frames without one is filled from its neighbours), the boxes are smoothed over time
//! and padded as Wav2Lip's `inference.py` does (`pads`: top, bottom, left, right, in pixels),
//! and the bundle (frames, `boxes.json`, `avatar.toml`, `prepared.fcp`) is written into a
//! hidden directory beside its final place and renamed there once whole: it appears complete
//! or not at all.

use crate::avatar::Avatar;
use crate::encode::{self, Subsampling};
use crate::face_detect::{Cascade, Face};
use crate::manifest::{Channel, FaceBox, BOXES_FILE, FRAMES_DIR, MANIFEST_FILE};
use rayon::prelude::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Frames without a face that are filled from their neighbours; a longer gap is an error.
pub const MAX_GAP: usize = 5;
/// A padded box may lose this share of its area to the frame's edges before the face counts
/// as leaving the frame.
const MAX_OUTSIDE: f64 = 0.2;
/// Frames detected together (on the rayon pool) while the next ones decode.
const CHUNK: usize = 16;

/// What to import and how.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub video: PathBuf,
    /// The avatar root; the bundle lands in `root/id`.
    pub root: PathBuf,
    pub id: String,
    pub model: String,
    pub crop_size: u32,
    pub channel_order: Vec<Channel>,
    /// The `[audio]` table of the manifest (TOML), if the model takes speech.
    pub audio: Option<String>,
    /// Top, bottom, left, right, in pixels (Wav2Lip's `--pads`).
    pub pads: [i64; 4],
    /// Frames each box is averaged over (1: none).
    pub smooth: usize,
    /// Only frames `start..end` of the video.
    pub trim: Option<(u64, u64)>,
    /// Most frames an avatar may have (its memory once loaded grows with them).
    pub max_frames: u64,
    pub cascade: PathBuf,
    /// Smallest face side searched, pixels; 0: a tenth of the frame's height.
    pub min_face: u32,
    /// Replace an avatar already at `root/id`.
    pub force: bool,
}

/// What an import reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// The video as probed: frame size, rate, and its frame count (estimated for containers
    /// that do not state it).
    Probed {
        width: u32,
        height: u32,
        fps: f64,
        frames: u64,
    },
    /// Frames decoded and searched so far.
    Detected {
        done: u64,
        of: u64,
    },
    /// Something the user should know that does not stop the import.
    Warning(String),
    /// Encoding the prepared file.
    Preparing,
    Done {
        dir: PathBuf,
        frames: u64,
    },
}

/// The video's stream as `ffprobe` reports it.
struct Probe {
    width: u32,
    height: u32,
    fps: f64,
    frames: u64,
}

/// Removes the half-written bundle unless the import finished.
struct Scratch(Option<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Imports `opts.video` as avatar `opts.id`; returns the bundle's directory.
pub fn import(opts: &ImportOptions, mut progress: impl FnMut(Progress)) -> Result<PathBuf, String> {
    crate::check_name(&opts.id).map_err(|_| {
        format!(
            "--id {:?}: only letters, digits, '.', '_' and '-' are allowed",
            opts.id
        )
    })?;
    let video = &opts.video;
    let meta = std::fs::metadata(video).map_err(|e| format!("{}: {e}", video.display()))?;
    if !meta.is_file() {
        return Err(format!("{}: not a file", video.display()));
    }
    if meta.len() == 0 {
        return Err(format!("{}: the file is empty", video.display()));
    }
    let dir = opts.root.join(&opts.id);
    if dir.exists() && !opts.force {
        return Err(format!(
            "{} exists: choose another --id, or --force to replace it",
            dir.display()
        ));
    }
    let cascade = Cascade::load(&opts.cascade)?;
    let probe = probe(video)?;
    let (start, end) = opts.trim.unwrap_or((0, u64::MAX));
    if start >= end {
        return Err(format!("--trim {start}:{end} holds no frame"));
    }
    let wanted = probe.frames.min(end).saturating_sub(start);
    if wanted > opts.max_frames {
        return Err(format!(
            "{}: about {wanted} frames ({:.1} s at {:.2} fps) would be imported; --max-frames is {} (trim the video with --trim START:END, frames, or raise the limit)",
            video.display(),
            wanted as f64 / probe.fps,
            probe.fps,
            opts.max_frames
        ));
    }
    progress(Progress::Probed {
        width: probe.width,
        height: probe.height,
        fps: probe.fps,
        frames: wanted,
    });
    std::fs::create_dir_all(&opts.root).map_err(|e| format!("{}: {e}", opts.root.display()))?;
    let tmp = opts
        .root
        .join(format!(".import-{}-{}", opts.id, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let mut scratch = Scratch(Some(tmp.clone()));
    std::fs::create_dir_all(tmp.join(FRAMES_DIR)).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let min_face = match opts.min_face {
        0 => (probe.height / 10).max(24),
        m => m,
    };
    let (w, h) = (probe.width as usize, probe.height as usize);
    let mut decoder = Decoder::start(video, w, h)?;
    let mut found: Vec<Option<Face>> = Vec::new();
    let mut several = Vec::new();
    let mut index = 0u64;
    let mut written = 0u64;
    loop {
        let mut chunk = Vec::with_capacity(CHUNK);
        while chunk.len() < CHUNK && index < end {
            match decoder.next()? {
                Some(rgb) => {
                    if index >= start {
                        chunk.push(rgb);
                    }
                    index += 1;
                }
                None => break,
            }
        }
        if chunk.is_empty() {
            break;
        }
        if written + chunk.len() as u64 > opts.max_frames {
            return Err(format!(
                "{}: more than {} frames to import (--max-frames); trim it with --trim START:END",
                video.display(),
                opts.max_frames
            ));
        }
        let first = written;
        let results: Vec<Result<Vec<Face>, String>> = chunk
            .par_iter()
            .enumerate()
            .map(|(k, rgb)| {
                let gray: Vec<u8> = rgb
                    .chunks_exact(3)
                    .map(|p| {
                        ((p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114 + 500) / 1000)
                            as u8
                    })
                    .collect();
                let faces = cascade.detect(&gray, w, h, 1.1, 5, min_face as usize);
                let jpeg =
                    encode::encode_rgb(rgb, probe.width, probe.height, 95, Subsampling::S444)?;
                let name = format!("{:06}.jpg", first + k as u64);
                std::fs::write(tmp.join(FRAMES_DIR).join(name), jpeg)
                    .map_err(|e| format!("writing a frame: {e}"))?;
                Ok(faces)
            })
            .collect();
        for (k, r) in results.into_iter().enumerate() {
            let faces = r?;
            // The best-supported face; a second one with half its support is a second face
            // (fewer hits than that are the detector's stray matches).
            let best = faces.iter().copied().max_by_key(|f| f.hits);
            if let Some(b) = best {
                if faces.iter().filter(|f| f.hits * 2 >= b.hits).count() > 1 {
                    several.push(first + k as u64);
                }
            }
            found.push(best);
        }
        written += chunk.len() as u64;
        progress(Progress::Detected {
            done: written,
            of: wanted.max(written),
        });
    }
    decoder.finish()?;
    if found.is_empty() {
        return Err(format!(
            "{}: no frame to import{}",
            video.display(),
            if start > 0 { " in --trim's range" } else { "" }
        ));
    }
    if let (Some(&a), n) = (several.first(), several.len()) {
        progress(Progress::Warning(format!(
            "{n} frame(s) show more than one face (the first: frame {a}); the one the detector is surest of is taken"
        )));
    }
    let boxes = fill_gaps(&found).map_err(|e| format!("{}: {e}", video.display()))?;
    let boxes = smooth(&boxes, opts.smooth.max(1));
    let boxes = pad(&boxes, opts.pads, probe.width, probe.height)
        .map_err(|e| format!("{}: {e}", video.display()))?;
    write_bundle(&tmp, opts, &probe, &boxes)?;
    progress(Progress::Preparing);
    Avatar::prepare(&tmp, Subsampling::S420).map_err(|p| p.join("; "))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("replacing {}: {e}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    scratch.0 = None;
    progress(Progress::Done {
        dir: dir.clone(),
        frames: boxes.len() as u64,
    });
    Ok(dir)
}

/// `ffprobe`'s view of the first video stream.
fn probe(video: &Path) -> Result<Probe, String> {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-show_entries"])
        .arg("stream=width,height,avg_frame_rate,r_frame_rate,nb_frames:format=duration")
        .args(["-of", "json"])
        .arg(video)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!("ffprobe (Debian's ffmpeg package; scripts/setup.sh installs it): {e}")
        })?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "{}: not a video ffmpeg can read: {}",
            video.display(),
            why.lines().last().unwrap_or("ffprobe failed").trim()
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{}: ffprobe's answer: {e}", video.display()))?;
    let stream = &v["streams"][0];
    if stream.is_null() {
        return Err(format!("{}: no video stream", video.display()));
    }
    let dim = |k: &str| stream[k].as_u64().filter(|&d| (16..=8192).contains(&d));
    let (Some(width), Some(height)) = (dim("width"), dim("height")) else {
        return Err(format!(
            "{}: frame size {}x{} is out of range 16..=8192",
            video.display(),
            stream["width"],
            stream["height"]
        ));
    };
    let rate = |k: &str| -> Option<f64> {
        let s = stream[k].as_str()?;
        let (n, d) = s.split_once('/')?;
        let (n, d) = (n.parse::<f64>().ok()?, d.parse::<f64>().ok()?);
        (d > 0.0 && n > 0.0).then(|| n / d)
    };
    let fps = rate("avg_frame_rate")
        .or_else(|| rate("r_frame_rate"))
        .filter(|f| *f > 0.0 && *f <= 240.0)
        .ok_or_else(|| format!("{}: no usable frame rate", video.display()))?;
    let frames = stream["nb_frames"]
        .as_str()
        .and_then(|n| n.parse::<u64>().ok())
        .or_else(|| {
            let d: f64 = v["format"]["duration"].as_str()?.parse().ok()?;
            Some((d * fps).round() as u64)
        })
        .unwrap_or(0);
    Ok(Probe {
        width: width as u32,
        height: height as u32,
        fps,
        frames,
    })
}

/// `ffmpeg` decoding to packed RGB on a pipe, one frame at a time. Its messages are read on a
/// thread of their own (the last few KiB kept): a damaged video can make it write a message
/// per frame, and an unread pipe would stall it, and so the import, for good.
struct Decoder {
    child: std::process::Child,
    frame_bytes: usize,
    /// The end of the video was read.
    ended: bool,
    messages: Option<std::thread::JoinHandle<String>>,
}

/// Bytes of ffmpeg's messages kept (the last ones, which say why it failed).
const MESSAGES_KEPT: usize = 8 << 10;

impl Decoder {
    fn start(video: &Path, w: usize, h: usize) -> Result<Decoder, String> {
        let mut child = Command::new("ffmpeg")
            .args(["-v", "error", "-nostdin", "-i"])
            .arg(video)
            .args([
                "-map",
                "0:v:0",
                "-f",
                "rawvideo",
                "-pix_fmt",
                "rgb24",
                "-vsync",
                "passthrough",
                "-",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!("ffmpeg (Debian's ffmpeg package; scripts/setup.sh installs it): {e}")
            })?;
        let mut stderr = child.stderr.take().ok_or("ffmpeg has no message pipe")?;
        let messages = std::thread::spawn(move || {
            let (mut kept, mut buf) = (Vec::new(), [0u8; 4096]);
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * MESSAGES_KEPT {
                    kept.drain(..kept.len() - MESSAGES_KEPT);
                }
            }
            String::from_utf8_lossy(&kept).into_owned()
        });
        Ok(Decoder {
            child,
            frame_bytes: w * h * 3,
            ended: false,
            messages: Some(messages),
        })
    }

    /// The next frame, or None at the end of the video.
    fn next(&mut self) -> Result<Option<Vec<u8>>, String> {
        let out = self.child.stdout.as_mut().ok_or("ffmpeg has no output")?;
        let mut frame = vec![0u8; self.frame_bytes];
        let mut got = 0;
        while got < frame.len() {
            match out.read(&mut frame[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("reading ffmpeg's frames: {e}")),
            }
        }
        match got {
            0 => {
                self.ended = true;
                Ok(None)
            }
            n if n == frame.len() => Ok(Some(frame)),
            _ => Err("the video's last frame is cut short".into()),
        }
    }

    /// Stops ffmpeg if frames are left (a trimmed import: not a failure) or waits for it; its
    /// last message, if it failed having decoded to the end.
    fn finish(mut self) -> Result<(), String> {
        if !self.ended {
            let _ = self.child.kill();
        }
        drop(self.child.stdout.take());
        let status = self.child.wait().map_err(|e| format!("ffmpeg: {e}"))?;
        let messages = self
            .messages
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        match messages.lines().rev().find(|l| !l.trim().is_empty()) {
            Some(line) if self.ended && !status.success() => {
                Err(format!("ffmpeg: {}", line.trim()))
            }
            _ => Ok(()),
        }
    }
}

impl Drop for Decoder {
    /// An import that failed midway stops its ffmpeg too.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every frame's box: gaps of up to [`MAX_GAP`] frames filled from their neighbours
/// (interpolated between two, or the one there is at either end).
fn fill_gaps(found: &[Option<Face>]) -> Result<Vec<[f64; 4]>, String> {
    let as_box = |f: &Face| [f.x as f64, f.y as f64, f.w as f64, f.h as f64];
    let mut out = Vec::with_capacity(found.len());
    let mut i = 0;
    while i < found.len() {
        if let Some(f) = &found[i] {
            out.push(as_box(f));
            i += 1;
            continue;
        }
        let gap_end = (i..found.len())
            .find(|&j| found[j].is_some())
            .unwrap_or(found.len());
        let (before, after) = (
            out.last().copied(),
            found.get(gap_end).and_then(|f| f.as_ref()).map(as_box),
        );
        if gap_end - i > MAX_GAP || (before.is_none() && after.is_none()) {
            return Err(if gap_end - i == 1 {
                format!("no face in frame {i}")
            } else {
                format!("no face in frames {i}..{}", gap_end - 1)
            });
        }
        for k in i..gap_end {
            let b = match (before, after) {
                (Some(b), Some(a)) => {
                    let t = (k + 1 - i) as f64 / (gap_end + 1 - i) as f64;
                    std::array::from_fn(|c| b[c] + (a[c] - b[c]) * t)
                }
                (Some(b), None) => b,
                (None, Some(a)) => a,
                (None, None) => unreachable!("checked above"),
            };
            out.push(b);
        }
        i = gap_end;
    }
    Ok(out)
}

/// Each box the mean of the `window` boxes centred on it; near the ends the window shrinks
/// to stay centred (a truncated one would lag behind steady motion there).
fn smooth(boxes: &[[f64; 4]], window: usize) -> Vec<[f64; 4]> {
    let n = boxes.len();
    (0..n)
        .map(|i| {
            let half = (window / 2).min(i).min(n - 1 - i);
            let span = &boxes[i - half..=i + half];
            std::array::from_fn(|c| span.iter().map(|b| b[c]).sum::<f64>() / span.len() as f64)
        })
        .collect()
}

/// Boxes padded (top, bottom, left, right) and clamped to the frame, as Wav2Lip does; a box
/// that loses more than [`MAX_OUTSIDE`] of its area to the edges is a face leaving the frame.
fn pad(
    boxes: &[[f64; 4]],
    pads: [i64; 4],
    width: u32,
    height: u32,
) -> Result<Vec<FaceBox>, String> {
    let [top, bottom, left, right] = pads.map(|p| p as f64);
    boxes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let (x0, y0) = (b[0] - left, b[1] - top);
            let (x1, y1) = (b[0] + b[2] + right, b[1] + b[3] + bottom);
            if x1 - x0 < 2.0 || y1 - y0 < 2.0 {
                return Err(format!("frame {i}: the padded face box is empty (--pads)"));
            }
            let (cx0, cy0) = (x0.max(0.0), y0.max(0.0));
            let (cx1, cy1) = (x1.min(width as f64), y1.min(height as f64));
            let area = (x1 - x0) * (y1 - y0);
            let inside = (cx1 - cx0).max(0.0) * (cy1 - cy0).max(0.0);
            if inside < area * (1.0 - MAX_OUTSIDE) {
                return Err(format!(
                    "the face leaves the frame at frame {i}: {:.0}% of its padded box [{x0:.0}, {y0:.0}, {:.0}, {:.0}] is outside the {width}x{height} frame (trim the video with --trim, or lower --pads)",
                    100.0 * (1.0 - inside / area),
                    x1 - x0,
                    y1 - y0
                ));
            }
            let (x, y) = (cx0.round() as u32, cy0.round() as u32);
            Ok(FaceBox {
                x,
                y,
                w: (cx1.round() as u32).saturating_sub(x).max(1),
                h: (cy1.round() as u32).saturating_sub(y).max(1),
            })
        })
        .collect()
}

fn write_bundle(
    dir: &Path,
    opts: &ImportOptions,
    probe: &Probe,
    boxes: &[FaceBox],
) -> Result<(), String> {
    let json = serde_json::to_string(boxes).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(BOXES_FILE), json).map_err(|e| format!("{BOXES_FILE}: {e}"))?;
    let order: Vec<String> = opts
        .channel_order
        .iter()
        .map(|c| match c {
            Channel::Reference => "\"reference\"".to_string(),
            Channel::Masked => "\"masked\"".to_string(),
        })
        .collect();
    let manifest = format!(
        "id = \"{}\"\nfps = {:?}\nwidth = {}\nheight = {}\ncrop_size = {}\nmodel = \"{}\"\nchannel_order = [{}]\njpeg_quality = 75\n\n[mask]\nfeather = 0.25\n\n{}",
        opts.id,
        probe.fps,
        probe.width,
        probe.height,
        opts.crop_size,
        opts.model,
        order.join(", "),
        opts.audio.as_deref().unwrap_or("")
    );
    crate::manifest::Manifest::parse(&manifest)
        .map_err(|p| format!("the manifest made from the options: {}", p.join("; ")))?;
    std::fs::write(dir.join(MANIFEST_FILE), manifest).map_err(|e| format!("{MANIFEST_FILE}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn face(x: u32) -> Option<Face> {
        Some(Face {
            x,
            y: 10,
            w: 20,
            h: 20,
            hits: 5,
        })
    }

    /// Short gaps are filled (interpolated, or from the one neighbour at an end); a long one
    /// names its frames.
    #[test]
    fn gaps_are_filled_or_named() {
        let b = fill_gaps(&[face(0), None, None, face(30)]).unwrap();
        assert_eq!(
            b.iter().map(|b| b[0]).collect::<Vec<_>>(),
            vec![0.0, 10.0, 20.0, 30.0]
        );
        let b = fill_gaps(&[None, face(5), None]).unwrap();
        assert_eq!(
            b.iter().map(|b| b[0]).collect::<Vec<_>>(),
            vec![5.0, 5.0, 5.0]
        );
        let mut long = vec![face(0)];
        long.extend(std::iter::repeat_n(None, MAX_GAP + 1));
        assert_eq!(
            fill_gaps(&long).unwrap_err(),
            format!("no face in frames 1..{}", MAX_GAP + 1)
        );
        assert_eq!(fill_gaps(&[None]).unwrap_err(), "no face in frame 0");
    }

    /// Smoothing averages a centred window; padding grows the box and clamps it to the
    /// frame, and a box mostly outside is a face leaving the frame.
    #[test]
    fn boxes_are_smoothed_and_padded() {
        let boxes: Vec<[f64; 4]> = [0.0, 10.0, 20.0, 30.0, 40.0]
            .iter()
            .map(|&x| [x, 0.0, 10.0, 10.0])
            .collect();
        let s = smooth(&boxes, 3);
        assert_eq!(
            smooth(&[[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 3.0, 4.0]], 1)[1][0],
            3.0
        );
        assert_eq!(
            s.iter().map(|b| b[0]).collect::<Vec<_>>(),
            vec![0.0, 10.0, 20.0, 30.0, 40.0]
        );
        let p = pad(&[[10.0, 10.0, 20.0, 20.0]], [0, 10, 2, 2], 100, 100).unwrap();
        assert_eq!(
            p[0],
            FaceBox {
                x: 8,
                y: 10,
                w: 24,
                h: 30
            }
        );
        let e = pad(&[[90.0, 10.0, 20.0, 20.0]], [0, 0, 0, 0], 100, 100).unwrap_err();
        assert!(e.contains("leaves the frame at frame 0"), "{e}");
    }
}

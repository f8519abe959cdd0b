//! The avatar bundle on disk.
//!
//! ```text
//! <avatars root>/<id>/
//!   avatar.toml      manifest (below)
//!   frames/          background frames, PNG or JPEG, played in file-name order
//!   boxes.json       face boxes, one [x, y, w, h] per frame, in pixels
//!   mask.png         optional blend mask (grey, any size; resized to the crop)
//! ```
//!
//! ```toml
//! id = "demo"
//! fps = 25.0
//! width = 1280
//! height = 720
//! crop_size = 320
//! model = "talking-demo"
//! channel_order = ["reference", "masked"]   # order of the 3-channel groups in the face input
//! jpeg_quality = 75
//! [mask]
//! feather = 0.25        # soft edge, as a fraction of the mask radius (0..1]
//! image = "mask.png"    # optional; replaces the built-in lower-face ellipse
//! [audio]               # optional: how the model hears speech sent on Render
//! input = "audio"       # the model input speech drives
//! features = "encoder"  # "mel": the 1x80x16 mel window itself (Wav2Lip);
//!                       # "encoder": `stack` embeddings of `encoder`, centred on the frame
//!                       #   (SyncTalk_2D: 16 x 512 viewed as the input's shape);
//!                       # "energy": the window's loudness in [0, 1], every element
//! encoder = "audio-encoder"
//! stack = 16
//! ```

use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "avatar.toml";
pub const BOXES_FILE: &str = "boxes.json";
pub const FRAMES_DIR: &str = "frames";

/// One 3-channel group of the model's face input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// The face crop as it is.
    Reference,
    /// The face crop with its lower half (the mouth) blacked out.
    Masked,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskSettings {
    #[serde(default = "default_feather")]
    pub feather: f32,
    #[serde(default)]
    pub image: Option<String>,
}

impl Default for MaskSettings {
    fn default() -> Self {
        MaskSettings {
            feather: default_feather(),
            image: None,
        }
    }
}

fn default_feather() -> f32 {
    0.25
}

fn default_quality() -> u8 {
    75
}

fn default_order() -> Vec<Channel> {
    vec![Channel::Reference, Channel::Masked]
}

/// What a model's audio input receives per frame, computed from speech sent on `Render`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AudioFeatures {
    /// The frame's mel window, [1, 80, 16].
    Mel,
    /// `stack` embeddings of the frame's neighbourhood by the encoder model.
    Encoder,
    /// The window's loudness in [0, 1] in every element.
    Energy,
}

/// The `[audio]` table: how the avatar's model gets its audio.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudioSettings {
    pub input: String,
    pub features: AudioFeatures,
    #[serde(default)]
    pub encoder: Option<String>,
    #[serde(default = "default_stack")]
    pub stack: usize,
}

fn default_stack() -> usize {
    16
}

/// The parsed `avatar.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub id: String,
    pub fps: f64,
    pub width: u32,
    pub height: u32,
    pub crop_size: u32,
    pub model: String,
    #[serde(default = "default_order")]
    pub channel_order: Vec<Channel>,
    #[serde(default = "default_quality")]
    pub jpeg_quality: u8,
    #[serde(default)]
    pub mask: MaskSettings,
    #[serde(default)]
    pub audio: Option<AudioSettings>,
}

/// A face box in frame pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(from = "[u32; 4]", into = "[u32; 4]")]
pub struct FaceBox {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

impl From<[u32; 4]> for FaceBox {
    fn from([x, y, w, h]: [u32; 4]) -> Self {
        FaceBox { x, y, w, h }
    }
}

impl From<FaceBox> for [u32; 4] {
    fn from(b: FaceBox) -> Self {
        [b.x, b.y, b.w, b.h]
    }
}

impl FaceBox {
    /// True when the box has area and lies inside a `width` x `height` frame.
    pub fn fits(&self, width: u32, height: u32) -> bool {
        self.w >= 2
            && self.h >= 2
            && self.x.checked_add(self.w).is_some_and(|r| r <= width)
            && self.y.checked_add(self.h).is_some_and(|b| b <= height)
    }
}

impl Manifest {
    /// Reads `dir/avatar.toml`; every problem found is returned, each naming its field.
    pub fn load(dir: &Path) -> Result<Self, Vec<String>> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| vec![format!("{}: cannot read: {e}", path.display())])?;
        Self::parse(&text).map_err(|problems| {
            problems
                .into_iter()
                .map(|p| format!("{}: {p}", path.display()))
                .collect()
        })
    }

    /// Parses manifest text; every problem found is returned, each naming its field.
    pub fn parse(text: &str) -> Result<Self, Vec<String>> {
        let m: Manifest = toml::from_str(text).map_err(|e| vec![toml_problem(text, &e)])?;
        let problems = m.problems();
        if problems.is_empty() {
            Ok(m)
        } else {
            Err(problems)
        }
    }

    /// Field-level checks that need no other file.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if crate::check_name(&self.id).is_err() {
            p.push(format!(
                "id {:?} must be letters, digits, '.', '_' or '-'",
                self.id
            ));
        }
        if !(self.fps.is_finite() && self.fps > 0.0 && self.fps <= 240.0) {
            p.push(format!("fps {} is out of range (0, 240]", self.fps));
        }
        if !(16..=8192).contains(&self.width) || !(16..=8192).contains(&self.height) {
            p.push(format!(
                "width x height {}x{} is out of range 16..=8192",
                self.width, self.height
            ));
        }
        if !(16..=1024).contains(&self.crop_size) {
            p.push(format!(
                "crop_size {} is out of range 16..=1024",
                self.crop_size
            ));
        }
        if self.model.is_empty() {
            p.push("model is empty".to_string());
        }
        let mut order = self.channel_order.clone();
        order.sort_by_key(|c| *c as u8);
        if order != [Channel::Reference, Channel::Masked] {
            p.push(format!(
                "channel_order {:?} must name \"reference\" and \"masked\" once each",
                self.channel_order
            ));
        }
        if !(1..=100).contains(&self.jpeg_quality) {
            p.push(format!(
                "jpeg_quality {} is out of range 1..=100",
                self.jpeg_quality
            ));
        }
        if !(self.mask.feather > 0.0 && self.mask.feather <= 1.0) {
            p.push(format!(
                "mask.feather {} is out of range (0, 1]",
                self.mask.feather
            ));
        }
        if let Some(img) = &self.mask.image {
            if crate::check_name(img).is_err() {
                p.push(format!(
                    "mask.image {img:?} must be a file name inside the bundle"
                ));
            }
        }
        if let Some(a) = &self.audio {
            if a.input.is_empty() {
                p.push("audio.input is empty".to_string());
            }
            match (a.features, &a.encoder) {
                (AudioFeatures::Encoder, None) => {
                    p.push("audio.encoder is required with features = \"encoder\"".to_string())
                }
                (AudioFeatures::Encoder, Some(e)) if crate::check_name(e).is_err() => {
                    p.push(format!("audio.encoder {e:?} must be a model name"))
                }
                (AudioFeatures::Mel | AudioFeatures::Energy, Some(_)) => {
                    p.push("audio.encoder is only read with features = \"encoder\"".to_string())
                }
                _ => {}
            }
            if !(1..=64).contains(&a.stack) {
                p.push(format!("audio.stack {} is out of range 1..=64", a.stack));
            }
        }
        p
    }
}

/// One line for a TOML error: where, and what (toml's message can be empty, as for `id =`).
fn toml_problem(text: &str, e: &toml::de::Error) -> String {
    let what = match e.message().trim() {
        "" => "invalid TOML",
        m => m,
    };
    match e.span() {
        Some(span) => {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
            format!("line {line}, column {column}: {what}")
        }
        None => what.to_string(),
    }
}

/// Frame files of a bundle in play order.
pub fn frame_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let frames = dir.join(FRAMES_DIR);
    let entries = std::fs::read_dir(&frames).map_err(|e| format!("{}: {e}", frames.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension()
                    .and_then(|e| e.to_str())
                    .map(str::to_ascii_lowercase)
                    .as_deref(),
                Some("png" | "jpg" | "jpeg")
            )
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("{}: no .png or .jpg frames", frames.display()));
    }
    Ok(files)
}

/// Reads `boxes.json`.
pub fn load_boxes(dir: &Path) -> Result<Vec<FaceBox>, String> {
    let path = dir.join(BOXES_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str =
        "id = \"a\"\nfps = 25.0\nwidth = 64\nheight = 64\ncrop_size = 32\nmodel = \"m\"\n";

    #[test]
    fn the_audio_table_is_optional_and_checked_field_by_field() {
        assert_eq!(Manifest::parse(BASE).unwrap().audio, None);
        let ok = Manifest::parse(&format!(
            "{BASE}[audio]\ninput = \"audio\"\nfeatures = \"encoder\"\nencoder = \"audio-encoder\"\n"
        ))
        .unwrap();
        let a = ok.audio.unwrap();
        assert_eq!((a.features, a.stack), (AudioFeatures::Encoder, 16));
        for (table, problem) in [
            ("input = \"\"\nfeatures = \"mel\"\n", "audio.input is empty"),
            (
                "input = \"a\"\nfeatures = \"encoder\"\n",
                "audio.encoder is required",
            ),
            (
                "input = \"a\"\nfeatures = \"mel\"\nencoder = \"e\"\n",
                "audio.encoder is only read",
            ),
            (
                "input = \"a\"\nfeatures = \"encoder\"\nencoder = \"../x\"\n",
                "must be a model name",
            ),
            (
                "input = \"a\"\nfeatures = \"energy\"\nstack = 0\n",
                "audio.stack 0",
            ),
        ] {
            let e = Manifest::parse(&format!("{BASE}[audio]\n{table}")).unwrap_err();
            assert!(e.iter().any(|p| p.contains(problem)), "{table}: {e:?}");
        }
        let e = Manifest::parse(&format!(
            "{BASE}[audio]\ninput = \"a\"\nfeatures = \"loud\"\n"
        ))
        .unwrap_err();
        assert!(e[0].contains("line"), "{e:?}");
    }
}

//! Talking frames as their avatar's shared stream with the session's face region spliced in.
//!
//! A talking frame differs from its background only inside the avatar's face region, and the
//! background's encode is already made once for every session (the shared stream of
//! [`crate::idle_video`], a mosaic of tiles around the region: [`crate::media::MosaicEncoder`]).
//! So a session encodes only its region, a slice per macroblock row, and puts those slices in
//! place of the region's in the stream's access unit for the background
//! ([`framecast_h264::Splicer`]): the demo avatar's region is 17% of its 720p frame.
//!
//! The browser then holds two encoders' pictures: outside the region the stream's, inside
//! the session's. Each spliced frame must follow one that left the browser so: the region's
//! first frame after anything else (an idle frame from the stream, a frame of the session's
//! own encoder, a key frame asked for) is intra, and so is every region put into a key frame
//! of the stream. Back to idle, the session rejoins the stream at a key frame.

use crate::idle_video::{Base, IdleFollower};
use crate::media::{crop_i420, H264Encoder};
use framecast_h264::{Layout, Splicer};

/// The region's bitrate against its share of the frame's area: at 1 a spliced session sends
/// what a whole-frame one does (measured: crates/h264/tests/splice.rs).
const REGION_BITRATE_WEIGHT: f64 = 1.0;
/// Below this the region's encoder cannot hold a face at all.
const MIN_REGION_BITRATE_BPS: u32 = 64_000;

/// One session's encoder of its face region and its splicer.
pub struct RegionSplice {
    /// The region's pixels in the frame: (x, y, width, height).
    pixels: (usize, usize, usize, usize),
    size: (usize, usize),
    encoder: H264Encoder,
    splicer: Splicer,
    crop: Vec<u8>,
    /// The browser's picture has this encoder's region: its last frame was spliced.
    in_sync: bool,
    /// A splice failed: the session encodes its frames itself from then on.
    failed: bool,
}

impl RegionSplice {
    /// For a session of `width` x `height` frames (I420) at `bitrate_bps` in all.
    pub fn new(
        layout: Layout,
        (width, height): (usize, usize),
        fps: f64,
        bitrate_bps: u32,
    ) -> Result<RegionSplice, String> {
        let coded = (width & !1, height & !1);
        let pixels = layout.region.pixels_within(coded);
        let (_, _, rw, rh) = pixels;
        let share = (rw * rh) as f64 / (width * height) as f64;
        let bitrate = ((f64::from(bitrate_bps) * share * REGION_BITRATE_WEIGHT) as u32)
            .clamp(MIN_REGION_BITRATE_BPS.min(bitrate_bps), bitrate_bps);
        Ok(RegionSplice {
            pixels,
            size: (width, height),
            encoder: H264Encoder::sliced(rw, rh, fps, bitrate, layout.region_slicing())?,
            splicer: Splicer::new(layout),
            crop: Vec::new(),
            in_sync: false,
            failed: false,
        })
    }

    /// The talking frame `i420` at `background` as an access unit: the stream's frame with
    /// this session's region. `None`: not possible (no stream frame, or a splice failed); the
    /// caller encodes the frame itself, a key frame if `follower.leave()` says so.
    pub fn frame(
        &mut self,
        follower: &mut IdleFollower,
        background: u32,
        i420: &[u8],
    ) -> Option<Vec<u8>> {
        let (w, h) = self.size;
        if self.failed || i420.len() != w * h + 2 * w.div_ceil(2) * h.div_ceil(2) {
            // A frame of another size is the session's own encoder's to refuse.
            return None;
        }
        let base = follower.base(background, i420)?;
        match self.splice_onto(&base, i420) {
            Ok(au) => Some(au),
            Err(e) => {
                tracing::warn!(error = %e, "face region splice; the session encodes its frames itself");
                self.failed = true;
                self.in_sync = false;
                None
            }
        }
    }

    /// `base` (the stream's frame for the background of `i420`) with this session's region
    /// of `i420` put in: intra where the browser does not hold this encoder's region.
    pub fn splice_onto(&mut self, base: &Base, i420: &[u8]) -> Result<Vec<u8>, String> {
        if base.key || !self.in_sync {
            self.encoder.force_keyframe();
        }
        crop_i420(i420, self.size, self.pixels, &mut self.crop);
        let region = self.encoder.encode(&self.crop)?;
        if let Some(sets) = &base.parameter_sets {
            self.splicer
                .parameter_sets(sets)
                .map_err(|e| e.to_string())?;
        }
        let au = self
            .splicer
            .splice(&base.au, &region)
            .map_err(|e| e.to_string())?;
        self.in_sync = true;
        Ok(au)
    }

    /// Whether the session's last frame was spliced.
    pub fn in_sync(&self) -> bool {
        self.in_sync
    }

    /// The browser's region no longer holds this encoder's picture: the next region is intra.
    pub fn desync(&mut self) {
        self.in_sync = false;
    }
}

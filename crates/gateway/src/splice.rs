//! Talking frames as their avatar's shared stream with the session's face region spliced in.
//!
//! A talking frame differs from its background only inside the avatar's face region (what the
//! blend mask lets the face change, `AvatarInfo.face_region`), and the
//! background's encode is already made once for every session (the shared stream of
//! [`crate::idle_video`], a mosaic of tiles around the region: [`crate::media::MosaicEncoder`]).
//! So a session encodes only its region, a slice per macroblock row, and puts those slices in
//! place of the region's in the stream's access unit for the background
//! ([`framecast_h264::Splicer`]): the demo avatar's region is 9% of its 720p frame. The
//! compositor sends such a frame as that region only ([`region_rect`],
//! `RenderRequest.frame_region`) with the CRC of its background's prepared JPEG, which names
//! the stream's frame for the background ([`IdleFollower::base`]; the JPEG itself comes once
//! a stream, [`crate::backgrounds`]): no whole raw frame crosses the socket.
//!
//! The browser then holds two encoders' pictures: outside the region the stream's, inside
//! the session's. Each spliced frame must follow one that left the browser so: the region's
//! first frame after anything else (an idle frame from the stream, a frame of the session's
//! own encoder, a key frame asked for) is intra, and so is every region put into a key frame
//! of the stream. Back to idle, the session rejoins the stream at a key frame.

use crate::idle_video::{Base, IdleFollower};
use crate::media::{pixel_rect, H264Encoder};
use framecast_compositor::raw_frame::{self, Rect};
use framecast_h264::{Layout, Splicer};

/// The region's bitrate against its share of the frame's area: at 1 a spliced session sends
/// what a whole-frame one does (measured: crates/h264/tests/splice.rs).
const REGION_BITRATE_WEIGHT: f64 = 1.0;
/// Below this the region's encoder cannot hold a face at all.
const MIN_REGION_BITRATE_BPS: u32 = 64_000;

/// The pixels of `layout`'s face region in a `width` x `height` frame: what a session's
/// region encoder takes, and what it asks the compositor for (`RenderRequest.frame_region`).
/// Its corner is on macroblocks and its size even (H.264 codes the even part of the frame).
pub fn region_rect(layout: &Layout, (width, height): (usize, usize)) -> Rect {
    pixel_rect(&layout.region, (width & !1, height & !1))
}

/// One session's encoder of its face region and its splicer.
pub struct RegionSplice {
    rect: Rect,
    encoder: H264Encoder,
    splicer: Splicer,
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
        let rect = region_rect(&layout, (width, height));
        let (rw, rh) = (rect.w as usize, rect.h as usize);
        let share = (rw * rh) as f64 / (width * height) as f64;
        let bitrate = ((f64::from(bitrate_bps) * share * REGION_BITRATE_WEIGHT) as u32)
            .clamp(MIN_REGION_BITRATE_BPS.min(bitrate_bps), bitrate_bps);
        Ok(RegionSplice {
            rect,
            encoder: H264Encoder::sliced(rw, rh, fps, bitrate, layout.region_slicing())?,
            splicer: Splicer::new(layout),
            in_sync: false,
            failed: false,
        })
    }

    /// Its face region in the frame: what [`Self::frame`] takes.
    pub fn rect(&self) -> Rect {
        self.rect
    }

    /// A talking frame as an access unit: the stream's frame for `background` (whose picture
    /// has CRC-32 `picture`, as [`IdleFollower::base`] takes it; `raw` its I420) with `region` (this
    /// session's face region, I420 of [`Self::rect`]) put in. `None`: not possible (no
    /// stream frame, or a splice failed); the caller encodes the frame itself, a key frame
    /// if `follower.leave()` says so.
    pub fn frame(
        &mut self,
        follower: &mut IdleFollower,
        background: u32,
        picture: u32,
        region: &[u8],
        raw: impl FnOnce() -> Result<Vec<u8>, String>,
    ) -> Option<Vec<u8>> {
        let (w, h) = (self.rect.w as usize, self.rect.h as usize);
        if self.failed || region.len() != raw_frame::len(w, h) {
            // A region of another size is the session's own encoder's to refuse.
            return None;
        }
        let base = follower.base(background, picture, raw)?;
        match self.splice_onto(&base, region) {
            Ok(au) => Some(au),
            Err(e) => {
                tracing::warn!(error = %e, "face region splice; the session encodes its frames itself");
                self.failed = true;
                self.in_sync = false;
                None
            }
        }
    }

    /// `base` (the stream's frame for a talking frame's background) with this session's
    /// `region` (I420 of [`Self::rect`]) put in: intra where the browser does not hold this
    /// encoder's region.
    pub fn splice_onto(&mut self, base: &Base, region: &[u8]) -> Result<Vec<u8>, String> {
        if base.key || !self.in_sync {
            self.encoder.force_keyframe();
        }
        let region = self.encoder.encode(region)?;
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

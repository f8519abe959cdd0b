//! Which encoder makes each video frame a session sends.
//!
//! Three sources, and the browser's decoder must always hold the picture the next frame was
//! predicted from:
//! - **shared**: an idle frame, the avatar's shared stream's access unit as it is
//!   ([`crate::idle_video`]);
//! - **spliced**: a talking frame, the shared stream's access unit for its background with
//!   the session's own face region put in ([`crate::splice`]);
//! - **own**: the session's encoder of the whole frame, where neither can be had (VP8, an
//!   avatar whose region is not known, the stream's budget spent, a failed splice).
//!
//! Moving between them costs an intra picture where the browser holds another encoder's:
//! into *own* a key frame, into *spliced* an intra region, back to *shared* after splicing a
//! key frame of the stream (the region the browser holds is the session's).

use crate::idle_video::IdleFollower;
use crate::media::VideoEncoder;
use crate::splice::RegionSplice;
use std::borrow::Cow;

/// Where a frame's access unit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Made {
    Shared,
    Spliced,
    Own,
}

/// A session's video encoders.
pub struct VideoOut {
    pub encoder: VideoEncoder,
    pub idle: Option<IdleFollower>,
    pub splice: Option<RegionSplice>,
}

/// One frame as the compositor sent it.
pub struct Frame<'a> {
    /// The background as it is (no speech in it).
    pub idle: bool,
    /// Which of the avatar's background frames it shows.
    pub background: u32,
    /// The CRC-32 of the background's picture as it came, which names it in the shared
    /// stream: of an idle frame's image (its prepared JPEG, or I420), of a talking frame's
    /// background JPEG where it came as its face region.
    pub picture: u32,
    /// A talking frame sent as only the session's face region (I420 of
    /// [`RegionSplice::rect`]): the frame is the background with it put in.
    pub region: Option<&'a [u8]>,
}

impl VideoOut {
    /// The frame's access unit, and where it came from. `background` makes the I420 of the
    /// frame's background picture, `whole` the frame's own I420 (the same for an idle frame), each
    /// called only when an encoder needs it.
    pub fn frame<'a>(
        &mut self,
        frame: &Frame<'a>,
        background: impl FnOnce() -> Result<Vec<u8>, String>,
        whole: impl FnOnce() -> Result<Cow<'a, [u8]>, String>,
    ) -> Result<(Vec<u8>, Made), String> {
        if let Some(idle) = &mut self.idle {
            if frame.idle {
                if let Some(splice) = self.splice.as_mut().filter(|s| s.in_sync()) {
                    // The browser's region is the session's, not the stream's: rejoin the
                    // stream at a key frame.
                    splice.desync();
                    idle.restart();
                }
                if let Some(au) = idle.next(frame.background, frame.picture, background) {
                    return Ok((au.to_vec(), Made::Shared));
                }
            } else if let (Some(splice), Some(region)) = (&mut self.splice, frame.region) {
                let au = splice.frame(idle, frame.background, frame.picture, region, background);
                if let Some(au) = au {
                    return Ok((au, Made::Spliced));
                }
            }
        }
        if self.idle.as_mut().is_some_and(IdleFollower::leave) {
            // The browser holds the stream's picture, not this encoder's.
            self.encoder.force_keyframe();
        }
        if let Some(splice) = &mut self.splice {
            splice.desync();
        }
        Ok((self.encoder.encode(&whole()?)?, Made::Own))
    }

    /// The browser asked for a key frame (PLI, FIR): the next frame is intra whichever
    /// encoder makes it.
    pub fn key_frame_asked(&mut self) {
        self.encoder.force_keyframe();
        if let Some(splice) = &mut self.splice {
            splice.desync();
        }
        if let Some(idle) = &mut self.idle {
            idle.restart();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idle_video::{Encoding, IdleVideo};
    use crate::media::VideoCodec;
    use crate::metrics::Metrics;
    use framecast_compositor::raw_frame;
    use framecast_h264::Layout;
    use openh264::formats::YUVSource;
    use std::sync::Arc;

    const W: usize = 640;
    const H: usize = 360;
    const LOOP: u32 = 20;
    /// The face region (pixels), down to the picture's edge: 360 rows end inside a
    /// macroblock row, which the region's encoder takes as the frame's does.
    const REGION: (u32, u32, u32, u32) = (230, 150, 180, 210);

    fn layout() -> Layout {
        Layout::around(W as u32, H as u32, REGION).unwrap()
    }

    /// Background `b`: texture drifting with `b` (camera motion) and a bar whose place
    /// depends on `b`, so a picture decoded against the wrong reference shows it.
    fn background(b: u32) -> Vec<u8> {
        let mut f = vec![128u8; W * H * 3 / 2];
        for y in 0..H {
            for x in 0..W {
                let xs = x as f64 + f64::from(b) * 2.0;
                let bar = (x / 32) as u32 % LOOP == b;
                f[y * W + x] = if bar {
                    235
                } else {
                    (110.0 + 60.0 * (xs / 19.0).sin() * (y as f64 / 27.0).cos()) as u8
                };
            }
        }
        f
    }

    /// Background `b` with a session's mouth (`open` rows) in the face region.
    fn talking(b: u32, open: usize) -> Vec<u8> {
        let mut f = background(b);
        let (x, y, w, h) = REGION;
        let (cx, cy) = ((x + w / 2) as usize, (y + h / 2) as usize);
        for yy in cy - open..cy + open {
            for xx in cx - 30..cx + 30 {
                f[yy * W + xx] = 20;
            }
        }
        f
    }

    fn out(video: &Arc<IdleVideo>) -> VideoOut {
        let layout = layout();
        VideoOut {
            encoder: VideoEncoder::new(VideoCodec::H264, W, H, 25.0, 1_000_000).unwrap(),
            idle: video.follower(Encoding {
                codec: VideoCodec::H264,
                avatar: "a".into(),
                width: W,
                height: H,
                fps_milli: 25_000,
                bitrate_bps: 1_000_000,
                layout: Some(layout),
            }),
            splice: Some(RegionSplice::new(layout, (W, H), 25.0, 1_000_000).unwrap()),
        }
    }

    /// Mean absolute luma error of what a browser decodes from `au` against `want`.
    fn luma_error(d: &mut openh264::decoder::Decoder, au: &[u8], want: &[u8]) -> f64 {
        let yuv = d.decode(au).expect("decodes").expect("a picture");
        let stride = yuv.strides().0;
        let y = yuv.y();
        let mut sum = 0u64;
        for r in 0..H {
            for c in 0..W {
                sum += u64::from(y[r * stride + c].abs_diff(want[r * W + c]));
            }
        }
        sum as f64 / (W * H) as f64
    }

    /// Sessions going idle -> talking -> idle -> talking, one starting later in the loop,
    /// one asking for a key frame and losing frames while talking: every access unit each
    /// browser gets decodes to the picture meant, talking frames are spliced (the session
    /// encodes only its region), idle frames come from the shared stream.
    #[test]
    fn talking_frames_splice_into_the_shared_stream_and_decode_as_meant() {
        let video = IdleVideo::new(64 << 20, Metrics::new());
        for (session, start) in [(0, 0u32), (1, 7)] {
            let mut out = out(&video);
            let rect = out.splice.as_ref().unwrap().rect();
            let mut browser = openh264::decoder::Decoder::new().unwrap();
            let mut made = Vec::new();
            for n in 0..70u32 {
                let talk = (10..30).contains(&n) || (45..60).contains(&n);
                if session == 1 && (n == 20 || n == 50) {
                    // A frame the pacer dropped: the next one skips a background.
                    continue;
                }
                if session == 1 && n == 25 {
                    out.key_frame_asked();
                }
                let b = (start + n) % LOOP;
                let picture = if talk {
                    talking(b, 2 + (n as usize % 6) * 3)
                } else {
                    background(b)
                };
                // The compositor sends a talking frame as its region over the background's
                // picture (here its I420 stands for the JPEG whose CRC names it).
                let idle_picture = background(b);
                let mut region = Vec::new();
                raw_frame::crop(&picture, (W, H), rect, &mut region).unwrap();
                let frame = Frame {
                    idle: !talk,
                    background: b,
                    picture: crc32fast::hash(&idle_picture),
                    region: talk.then_some(&region[..]),
                };
                let (au, from) = out
                    .frame(
                        &frame,
                        || Ok(idle_picture.clone()),
                        || Ok(Cow::Borrowed(&picture[..])),
                    )
                    .unwrap();
                let err = luma_error(&mut browser, &au, &picture);
                assert!(
                    err < 3.0,
                    "session {session}, frame {n} (background {b}, {from:?}): luma off by {err:.2}"
                );
                made.push((talk, from));
            }
            let count = |talk: bool, m: Made| made.iter().filter(|&&x| x == (talk, m)).count();
            assert_eq!(count(true, Made::Own), 0, "session {session}: {made:?}");
            assert!(
                count(true, Made::Spliced) >= 33,
                "session {session}: {made:?}"
            );
            assert!(
                count(false, Made::Shared) >= 30,
                "session {session}: {made:?}"
            );
        }
    }
}

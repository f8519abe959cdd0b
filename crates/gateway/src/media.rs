//! The codecs of a session: the browser's Opus microphone decoded to PCM for the
//! compositor, and the compositor's raw I420 frames encoded for the browser, to H.264 or (a
//! browser whose offer has no H.264) VP8.

use framecast_compositor::raw_frame::{self, Rect};
use framecast_h264::TileSlicing;
pub use openh264::encoder::Complexity;
use openh264::encoder::{
    BitRate, Encoder, EncoderConfig, FrameRate, IntraFramePeriod, RateControlMode, UsageType,
};
use openh264::formats::YUVSlices;
use openh264::OpenH264API;

/// Sample rate of the decoded microphone (Opus's own; the compositor resamples).
pub const VOICE_RATE: u32 = 48_000;

/// Opus packets to mono 16-bit PCM at [`VOICE_RATE`].
pub struct VoiceDecoder {
    decoder: opus::Decoder,
    pcm: Vec<i16>,
}

impl VoiceDecoder {
    pub fn new() -> Result<Self, String> {
        let decoder = opus::Decoder::new(VOICE_RATE, opus::Channels::Mono)
            .map_err(|e| format!("opus decoder: {e}"))?;
        Ok(VoiceDecoder {
            decoder,
            // 120 ms, the longest Opus packet.
            pcm: vec![0; VOICE_RATE as usize * 12 / 100],
        })
    }

    /// One packet's samples, as little-endian bytes (what `AudioChunk.pcm` carries).
    pub fn decode(&mut self, packet: &[u8]) -> Result<Vec<u8>, String> {
        let n = self
            .decoder
            .decode(packet, &mut self.pcm, false)
            .map_err(|e| format!("opus packet of {} bytes: {e}", packet.len()))?;
        Ok(self.pcm[..n].iter().flat_map(|s| s.to_le_bytes()).collect())
    }
}

/// The video codecs a session may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VideoCodec {
    /// Constrained baseline (OpenH264), packetization mode 1 where the browser offers it.
    H264,
    /// libvpx, for browsers without H.264.
    Vp8,
}

impl VideoCodec {
    /// As SDP's rtpmap and `--video-codecs` write it.
    pub fn name(self) -> &'static str {
        match self {
            VideoCodec::H264 => "H264",
            VideoCodec::Vp8 => "VP8",
        }
    }

    /// Whether one encoded frame of this codec is a key frame.
    pub fn is_key_frame(self, frame: &[u8]) -> bool {
        match self {
            VideoCodec::H264 => is_key_frame(frame),
            VideoCodec::Vp8 => framecast_vp8::is_key_frame(frame),
        }
    }
}

impl std::str::FromStr for VideoCodec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "h264" | "h.264" => Ok(VideoCodec::H264),
            "vp8" => Ok(VideoCodec::Vp8),
            other => Err(format!(
                "{:?} is not a video codec the gateway encodes (h264, vp8)",
                framecast_proto::echo(other)
            )),
        }
    }
}

/// I420 frames (the layout of `IMAGE_FORMAT_I420`) to the frames of a session's codec.
pub enum VideoEncoder {
    /// Boxed: OpenH264's state is 7 KB inline.
    H264(Box<H264Encoder>),
    /// H.264 made of tiles around a face region (an avatar's shared stream).
    Mosaic(Box<MosaicEncoder>),
    Vp8(framecast_vp8::Encoder),
}

impl VideoEncoder {
    pub fn new(
        codec: VideoCodec,
        width: usize,
        height: usize,
        fps: f64,
        bitrate_bps: u32,
    ) -> Result<Self, String> {
        Ok(match codec {
            VideoCodec::H264 => {
                VideoEncoder::H264(Box::new(H264Encoder::new(width, height, fps, bitrate_bps)?))
            }
            VideoCodec::Vp8 => VideoEncoder::Vp8(
                framecast_vp8::Encoder::new(framecast_vp8::EncoderConfig::new(
                    width,
                    height,
                    fps,
                    bitrate_bps,
                ))
                .map_err(|e| e.to_string())?,
            ),
        })
    }

    /// The encoder of an avatar's shared stream ([`crate::idle_video`]): an H.264 one with
    /// a `layout` is sliced around its face region for talking frames to be spliced into.
    pub fn for_stream(
        codec: VideoCodec,
        width: usize,
        height: usize,
        fps: f64,
        bitrate_bps: u32,
        layout: Option<&framecast_h264::Layout>,
    ) -> Result<Self, String> {
        match (codec, layout) {
            (VideoCodec::H264, Some(layout)) => Ok(VideoEncoder::Mosaic(Box::new(
                MosaicEncoder::new(*layout, width, height, fps, bitrate_bps)?,
            ))),
            _ => VideoEncoder::new(codec, width, height, fps, bitrate_bps),
        }
    }

    /// The SPS and PPS every frame is decoded with, where frames may come without them (a
    /// mosaic's, whose P frames a session splices into).
    pub fn parameter_sets(&self) -> Option<&[u8]> {
        match self {
            VideoEncoder::Mosaic(e) => Some(e.parameter_sets()),
            _ => None,
        }
    }

    /// The size of the frames the browser receives.
    pub fn coded_size(&self) -> (usize, usize) {
        match self {
            VideoEncoder::H264(e) => e.coded_size(),
            VideoEncoder::Mosaic(e) => e.coded_size(),
            VideoEncoder::Vp8(e) => e.coded_size(),
        }
    }

    /// The next frame a key frame (a browser asked, with PLI or FIR).
    pub fn force_keyframe(&mut self) {
        match self {
            VideoEncoder::H264(e) => e.force_keyframe(),
            VideoEncoder::Mosaic(e) => e.force_keyframe(),
            VideoEncoder::Vp8(e) => e.force_keyframe(),
        }
    }

    /// One I420 frame to one encoded frame (an H.264 access unit, or a VP8 frame).
    pub fn encode(&mut self, i420: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            VideoEncoder::H264(e) => e.encode(i420),
            VideoEncoder::Mosaic(e) => e.encode(i420),
            VideoEncoder::Vp8(e) => e.encode(i420).map_err(|e| e.to_string()),
        }
    }
}

/// OpenH264's complexity for sessions: Low, measured against OpenH264's default Medium on a
/// 720p avatar at 2 Mbit/s (`cargo bench -p framecast-gateway --bench codecs`): 5.42 against
/// 6.25 ms a frame for 42.09 against 42.12 dB.
pub const H264_COMPLEXITY: Complexity = Complexity::Low;

/// I420 frames to H.264 access units (Annex B), constrained baseline as every WebRTC
/// browser decodes it.
pub struct H264Encoder {
    encoder: Encoder,
    width: usize,
    height: usize,
    /// Encoded size: odd dimensions lose their last column or row (H.264 4:2:0 needs even).
    coded: (usize, usize),
}

impl H264Encoder {
    pub fn new(width: usize, height: usize, fps: f64, bitrate_bps: u32) -> Result<Self, String> {
        Self::with_complexity(width, height, fps, bitrate_bps, H264_COMPLEXITY)
    }

    /// With OpenH264's complexity other than the gateway's (the codec bench compares them).
    pub fn with_complexity(
        width: usize,
        height: usize,
        fps: f64,
        bitrate_bps: u32,
        complexity: Complexity,
    ) -> Result<Self, String> {
        let coded = (width & !1, height & !1);
        if coded.0 < 16 || coded.1 < 16 {
            return Err(format!("a {width}x{height} avatar is too small to encode"));
        }
        let config = EncoderConfig::new()
            .usage_type(UsageType::CameraVideoRealTime)
            .bitrate(BitRate::from_bps(bitrate_bps))
            .max_frame_rate(FrameRate::from_hz(fps as f32))
            .rate_control_mode(RateControlMode::Bitrate)
            .skip_frames(false)
            // An avatar's loop has no cuts to detect (a browser's PLI still gets a key frame);
            // the detector cost 3% of a session's encode in a profile.
            .scene_change_detect(false)
            .complexity(complexity)
            // A key frame every two seconds: a browser that lost one recovers without asking.
            .intra_frame_period(IntraFramePeriod::from_num_frames((fps * 2.0).round() as u32));
        let encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
            .map_err(|e| format!("H.264 encoder: {e}"))?;
        Ok(H264Encoder {
            encoder,
            width,
            height,
            coded,
        })
    }

    /// An encoder of one tile of a [`framecast_h264::Layout`]: its pictures cut into slices
    /// as `slicing` says, never deblocked across a slice's edge, one reference picture, key
    /// frames only when forced (the tiles of a frame make theirs together).
    pub fn sliced(
        width: usize,
        height: usize,
        fps: f64,
        bitrate_bps: u32,
        slicing: TileSlicing,
    ) -> Result<Self, String> {
        use openh264_sys2::{SEncParamExt, ENCODER_OPTION_SVC_ENCODE_PARAM_EXT, SM_RASTER_SLICE};
        let mut e = Self::new(width, height, fps, bitrate_bps)?;
        // OpenH264 takes slice settings only once initialised, which the crate does on the
        // first encode: one grey frame, never sent.
        let (w, h) = (width, height);
        e.encode(&vec![128u8; w * h + 2 * w.div_ceil(2) * h.div_ceil(2)])?;
        let counts = slicing.slice_counts((w.div_ceil(16) * h.div_ceil(16)) as u32);
        let mut p = SEncParamExt::default();
        // SAFETY: the encoder is initialised (it encoded a frame), `p` is an SEncParamExt
        // that OpenH264 fills and then reads, and the slice counts fit uiSliceMbNum.
        let set = unsafe {
            let raw = e.encoder.raw_api();
            if raw.get_option(ENCODER_OPTION_SVC_ENCODE_PARAM_EXT, (&raw mut p).cast()) != 0 {
                return Err("H.264 encoder: its parameters cannot be read".into());
            }
            // Deblocking stops at slice edges: a spliced slice's pixels are its encoder's.
            p.iLoopFilterDisableIdc = 2;
            // One reference picture: the one before, in either stream.
            p.iNumRefFrame = 1;
            p.uiIntraPeriod = 0;
            // Intra only when asked, never on a scene change: every tile and region makes its
            // key frames together. (Background detection off was measured too: +0.3 dB for
            // 15% more encode time; left on.)
            p.bEnableSceneChangeDetect = false;
            let arg = &mut p.sSpatialLayers[0].sSliceArgument;
            if counts.len() > arg.uiSliceMbNum.len() {
                return Err(format!(
                    "{} slices; OpenH264 makes at most {}",
                    counts.len(),
                    arg.uiSliceMbNum.len()
                ));
            }
            arg.uiSliceMode = SM_RASTER_SLICE;
            arg.uiSliceNum = counts.len() as u32;
            arg.uiSliceMbNum = [0; 35];
            arg.uiSliceMbNum[..counts.len()].copy_from_slice(&counts);
            raw.set_option(ENCODER_OPTION_SVC_ENCODE_PARAM_EXT, (&raw mut p).cast())
        };
        if set != 0 {
            return Err(format!(
                "H.264 encoder: OpenH264 refused the slices (error {set})"
            ));
        }
        e.force_keyframe();
        Ok(e)
    }

    /// The size of the frames the browser receives.
    pub fn coded_size(&self) -> (usize, usize) {
        self.coded
    }

    /// The next frame a key frame (a browser asked, with PLI or FIR).
    pub fn force_keyframe(&mut self) {
        self.encoder.force_intra_frame();
    }

    /// One I420 frame to one H.264 access unit.
    pub fn encode(&mut self, i420: &[u8]) -> Result<Vec<u8>, String> {
        let (w, h) = (self.width, self.height);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        if i420.len() != w * h + 2 * cw * ch {
            return Err(format!(
                "frame of {} bytes; a {w}x{h} I420 frame has {}",
                i420.len(),
                w * h + 2 * cw * ch
            ));
        }
        let (y, chroma) = i420.split_at(w * h);
        let (u, v) = chroma.split_at(cw * ch);
        let (ew, eh) = self.coded;
        // The planes cut to the even size, rows kept at their stride.
        let yuv = YUVSlices::new(
            (&y[..eh * w], &u[..eh / 2 * cw], &v[..eh / 2 * cw]),
            (ew, eh),
            (w, cw, cw),
        );
        let bitstream = self
            .encoder
            .encode(&yuv)
            .map_err(|e| format!("H.264 encode: {e}"))?;
        Ok(bitstream.to_vec())
    }
}

/// An avatar's shared stream where its face region is known: each tile of the layout (the
/// bands above and below the region, the strips beside it, the region) encoded by an
/// OpenH264 of its own and the tiles' slices assembled into one frame
/// ([`framecast_h264::Mosaic`]), so that a session can put its own region in
/// ([`crate::splice`]). One encoder of the whole frame could not: OpenH264 cuts a picture
/// into at most 35 slices, and the region's rows need two each.
pub struct MosaicEncoder {
    tiles: Vec<(framecast_h264::MbRect, H264Encoder)>,
    mosaic: framecast_h264::Mosaic,
    width: usize,
    height: usize,
    coded: (usize, usize),
    crop: Vec<u8>,
    /// Frames between key frames (two seconds, as a session's encoder), and since the last.
    key_every: u32,
    since_key: u32,
}

impl MosaicEncoder {
    pub fn new(
        layout: framecast_h264::Layout,
        width: usize,
        height: usize,
        fps: f64,
        bitrate_bps: u32,
    ) -> Result<Self, String> {
        let coded = (width & !1, height & !1);
        // The frame's parameter sets: an encoder of the whole frame sliced as a tile is.
        let mut whole =
            H264Encoder::sliced(coded.0, coded.1, fps, bitrate_bps, TileSlicing::Whole)?;
        let sets = whole.encode(&vec![128u8; coded.0 * coded.1 * 3 / 2])?;
        let mosaic = framecast_h264::Mosaic::new(layout, &sets).map_err(|e| e.to_string())?;
        let area = (coded.0 * coded.1) as f64;
        let tiles = layout
            .tiles()
            .into_iter()
            .map(|(tile, slicing)| {
                let (_, _, w, h) = tile.pixels_within(coded);
                let share = (w * h) as f64 / area;
                let bitrate = (f64::from(bitrate_bps) * share).max(16_000.0) as u32;
                Ok((tile, H264Encoder::sliced(w, h, fps, bitrate, slicing)?))
            })
            .collect::<Result<_, String>>()?;
        Ok(MosaicEncoder {
            tiles,
            mosaic,
            width,
            height,
            coded,
            crop: Vec::new(),
            key_every: (fps * 2.0).round().max(1.0) as u32,
            since_key: 0,
        })
    }

    pub fn coded_size(&self) -> (usize, usize) {
        self.coded
    }

    /// The frame's SPS and PPS (Annex B), as every key frame carries them.
    pub fn parameter_sets(&self) -> &[u8] {
        self.mosaic.parameter_sets()
    }

    pub fn force_keyframe(&mut self) {
        self.since_key = 0;
    }

    /// One I420 frame (of the size given) to one access unit.
    pub fn encode(&mut self, i420: &[u8]) -> Result<Vec<u8>, String> {
        let (w, h) = (self.width, self.height);
        let expected = w * h + 2 * w.div_ceil(2) * h.div_ceil(2);
        if i420.len() != expected {
            return Err(format!(
                "frame of {} bytes; a {w}x{h} I420 frame has {expected}",
                i420.len()
            ));
        }
        let key = self.since_key == 0;
        self.since_key = (self.since_key + 1) % self.key_every;
        let mut aus = Vec::with_capacity(self.tiles.len());
        for (tile, encoder) in &mut self.tiles {
            if key {
                encoder.force_keyframe();
            }
            raw_frame::crop(i420, (w, h), pixel_rect(tile, self.coded), &mut self.crop)?;
            aus.push(encoder.encode(&self.crop)?);
        }
        let refs: Vec<&[u8]> = aus.iter().map(Vec::as_slice).collect();
        self.mosaic
            .assemble(&refs)
            .map_err(|e| format!("H.264 mosaic: {e}"))
    }
}

/// The pixels of `mb`'s macroblocks inside the `coded` part of a frame (even sizes), as the
/// rectangle an encoder of that part takes.
pub fn pixel_rect(mb: &framecast_h264::MbRect, coded: (usize, usize)) -> Rect {
    let (x, y, w, h) = mb.pixels_within(coded);
    Rect {
        x: x as u32,
        y: y as u32,
        w: w as u32,
        h: h as u32,
    }
}

/// Whether an access unit (Annex B) holds a key frame: an IDR slice (NAL type 5), which a
/// decoder can start from whatever it held before.
pub fn is_key_frame(au: &[u8]) -> bool {
    au.windows(4)
        .any(|n| n[..3] == [0, 0, 1] && n[3] & 0x1f == 5)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame encodes to an access unit starting with an Annex B start code and holding a
    /// key frame (IDR NAL, type 5) first; odd sizes encode at the even size below.
    #[test]
    fn frames_encode_to_h264_access_units() {
        for (w, h) in [(64usize, 48usize), (65, 49)] {
            let mut enc = VideoEncoder::new(VideoCodec::H264, w, h, 25.0, 500_000).unwrap();
            assert_eq!(enc.coded_size(), (w & !1, h & !1));
            let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
            let frame: Vec<u8> = (0..w * h + 2 * cw * ch).map(|i| (i % 200) as u8).collect();
            let au = enc.encode(&frame).unwrap();
            assert!(au.starts_with(&[0, 0, 0, 1]) || au.starts_with(&[0, 0, 1]));
            assert!(is_key_frame(&au), "the first frame must be a key frame");
            assert!(enc.encode(&frame[1..]).is_err());
        }
    }

    /// A VP8 session encodes at the avatar's own size (odd too), a key frame first and when
    /// asked; codec names parse as `--video-codecs` takes them.
    #[test]
    fn frames_encode_to_vp8() {
        let (w, h) = (65usize, 49usize);
        let mut enc = VideoEncoder::new(VideoCodec::Vp8, w, h, 25.0, 500_000).unwrap();
        assert_eq!(enc.coded_size(), (w, h));
        let frame = vec![90u8; framecast_vp8::i420_len(w, h)];
        assert!(VideoCodec::Vp8.is_key_frame(&enc.encode(&frame).unwrap()));
        assert!(!VideoCodec::Vp8.is_key_frame(&enc.encode(&frame).unwrap()));
        enc.force_keyframe();
        assert!(VideoCodec::Vp8.is_key_frame(&enc.encode(&frame).unwrap()));
        assert!(enc.encode(&frame[1..]).is_err());
        assert_eq!("VP8".parse::<VideoCodec>(), Ok(VideoCodec::Vp8));
        assert_eq!("h264".parse::<VideoCodec>(), Ok(VideoCodec::H264));
        assert!("vp9"
            .parse::<VideoCodec>()
            .unwrap_err()
            .contains("h264, vp8"));
    }

    /// Opus from libopus decodes to the samples' count at 48 kHz (20 ms: 960).
    #[test]
    fn opus_packets_decode_to_pcm() {
        let mut encoder =
            opus::Encoder::new(VOICE_RATE, opus::Channels::Mono, opus::Application::Voip).unwrap();
        let tone: Vec<i16> = (0..960)
            .map(|i| ((i as f32 * 0.05).sin() * 8000.0) as i16)
            .collect();
        let packet = encoder.encode_vec(&tone, 4000).unwrap();
        let mut d = VoiceDecoder::new().unwrap();
        assert_eq!(d.decode(&packet).unwrap().len(), 960 * 2);
    }
}

//! The real-time VP8 encoder, set up the way WebRTC's own is (one pass, constant bitrate, no
//! look-ahead, one thread per session, its speed for few cores) except that it never drops a
//! frame: the gateway's pacer has already chosen which frames go, and an empty frame would
//! leave a hole in the browser's video.

use crate::{i420_len, is_key_frame, Error};
use std::os::raw::{c_int, c_uint};
use vpx_sys::*;

/// What an encoder makes.
#[derive(Clone, Copy, Debug)]
pub struct EncoderConfig {
    pub width: usize,
    pub height: usize,
    pub fps: f64,
    pub bitrate_bps: u32,
    /// libvpx's real-time speed (`VP8E_SET_CPUUSED`, -16..=16, higher magnitude faster and
    /// coarser). Default [`EncoderConfig::DEFAULT_SPEED`].
    pub speed: i32,
}

impl EncoderConfig {
    /// -12 (WebRTC's setting for machines of few cores), measured against WebRTC's desktop
    /// -6 on a 720p avatar at 2 Mbit/s (`cargo bench -p framecast-gateway --bench codecs`):
    /// 5.8 against 8.4 ms a frame at the same PSNR (41.8 and 41.6 dB).
    pub const DEFAULT_SPEED: i32 = -12;

    pub fn new(width: usize, height: usize, fps: f64, bitrate_bps: u32) -> EncoderConfig {
        EncoderConfig {
            width,
            height,
            fps,
            bitrate_bps,
            speed: Self::DEFAULT_SPEED,
        }
    }
}

/// I420 frames to VP8 frames, one for one.
pub struct Encoder {
    /// Boxed: libvpx keeps pointers into the context it initialised.
    ctx: Box<vpx_codec_ctx_t>,
    width: usize,
    height: usize,
    pts: i64,
    key_next: bool,
}

// SAFETY: the context is only used through `&mut self`; libvpx's encoder has no affinity to
// the thread that made it.
unsafe impl Send for Encoder {}

impl Encoder {
    pub fn new(config: EncoderConfig) -> Result<Encoder, Error> {
        let EncoderConfig {
            width,
            height,
            fps,
            bitrate_bps,
            speed,
        } = config;
        if !(2..=16_383).contains(&width) || !(2..=16_383).contains(&height) {
            return Err(Error::new(
                "config",
                format!("a {width}x{height} frame: VP8 codes 2 to 16383 pixels a side"),
            ));
        }
        if !(fps.is_finite() && (1.0..=240.0).contains(&fps)) {
            return Err(Error::new(
                "config",
                format!("{fps} frames a second: 1 to 240"),
            ));
        }
        if !(-16..=16).contains(&speed) {
            return Err(Error::new("config", format!("speed {speed}: -16 to 16")));
        }
        // SAFETY: libvpx fills the whole config (its enums have no zero value, so it is not
        // zeroed first); it is read only after success.
        let iface = unsafe { vpx_codec_vp8_cx() };
        let mut cfg = std::mem::MaybeUninit::<vpx_codec_enc_cfg_t>::uninit();
        let err = unsafe { vpx_codec_enc_config_default(iface, cfg.as_mut_ptr(), 0) };
        if err != VPX_CODEC_OK {
            return Err(Error::from_call("config_default", err, None));
        }
        let mut cfg = unsafe { cfg.assume_init() };
        cfg.g_w = width as c_uint;
        cfg.g_h = height as c_uint;
        // One tick a frame: rate control reads the frame rate from the timebase.
        cfg.g_timebase = vpx_rational {
            num: 1000,
            den: (fps * 1000.0).round() as c_int,
        };
        cfg.g_threads = 1;
        cfg.g_lag_in_frames = 0;
        cfg.g_pass = vpx_enc_pass::VPX_RC_ONE_PASS;
        cfg.g_error_resilient = 0;
        cfg.rc_end_usage = vpx_rc_mode::VPX_CBR;
        cfg.rc_target_bitrate = (bitrate_bps / 1000).max(1);
        cfg.rc_dropframe_thresh = 0;
        cfg.rc_resize_allowed = 0;
        cfg.rc_min_quantizer = 2;
        cfg.rc_max_quantizer = 56;
        cfg.rc_undershoot_pct = 100;
        cfg.rc_overshoot_pct = 15;
        cfg.rc_buf_initial_sz = 500;
        cfg.rc_buf_optimal_sz = 600;
        cfg.rc_buf_sz = 1000;
        // A key frame every two seconds, as the H.264 encoder: a browser that lost one
        // recovers without asking.
        cfg.kf_mode = vpx_kf_mode::VPX_KF_AUTO;
        cfg.kf_max_dist = (fps * 2.0).round() as c_uint;
        let mut ctx: Box<vpx_codec_ctx_t> = Box::new(unsafe { std::mem::zeroed() });
        let err = unsafe {
            vpx_codec_enc_init_ver(&mut *ctx, iface, &cfg, 0, VPX_ENCODER_ABI_VERSION as c_int)
        };
        if err != VPX_CODEC_OK {
            return Err(Error::from_call("encoder init", err, Some(&mut ctx)));
        }
        let mut encoder = Encoder {
            ctx,
            width,
            height,
            pts: 0,
            key_next: false,
        };
        encoder.control(vp8e_enc_control_id::VP8E_SET_CPUUSED, speed)?;
        // WebRTC's: skip blocks that barely changed (an avatar's background mostly), no
        // temporal denoising (the frames are rendered, not filmed), and an intra frame at most
        // three times an average one (a key frame would otherwise burst the pacing).
        encoder.control(vp8e_enc_control_id::VP8E_SET_STATIC_THRESHOLD, 1)?;
        encoder.control(vp8e_enc_control_id::VP8E_SET_NOISE_SENSITIVITY, 0)?;
        encoder.control(vp8e_enc_control_id::VP8E_SET_MAX_INTRA_BITRATE_PCT, 300)?;
        Ok(encoder)
    }

    fn control(&mut self, id: vp8e_enc_control_id, value: i32) -> Result<(), Error> {
        // SAFETY: these controls take one int.
        let err = unsafe { vpx_codec_control_(&mut *self.ctx, id as c_int, value as c_int) };
        if err != VPX_CODEC_OK {
            return Err(Error::from_call("control", err, Some(&mut self.ctx)));
        }
        Ok(())
    }

    /// The size of the frames the browser receives (VP8 codes odd sizes as they are).
    pub fn coded_size(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    /// The next frame a key frame (a browser asked, with PLI or FIR).
    pub fn force_keyframe(&mut self) {
        self.key_next = true;
    }

    /// One I420 frame to one VP8 frame.
    pub fn encode(&mut self, i420: &[u8]) -> Result<Vec<u8>, Error> {
        let (w, h) = (self.width, self.height);
        if i420.len() != i420_len(w, h) {
            return Err(Error::new(
                "encode",
                format!(
                    "frame of {} bytes; a {w}x{h} I420 frame has {}",
                    i420.len(),
                    i420_len(w, h)
                ),
            ));
        }
        let cw = w.div_ceil(2);
        let ch = h.div_ceil(2);
        // SAFETY: the image only points into `i420`, which outlives the encode call; libvpx
        // reads the planes through the strides set here and copies what it keeps.
        // vpx_img_wrap clears and fills the whole image.
        let mut img = std::mem::MaybeUninit::<vpx_image_t>::uninit();
        let base = i420.as_ptr() as *mut u8;
        let wrapped = unsafe {
            vpx_img_wrap(
                img.as_mut_ptr(),
                vpx_img_fmt::VPX_IMG_FMT_I420,
                w as c_uint,
                h as c_uint,
                1,
                base,
            )
        };
        if wrapped.is_null() {
            return Err(Error::new("encode", "the frame could not be wrapped"));
        }
        let mut img = unsafe { img.assume_init() };
        unsafe {
            img.planes[0] = base;
            img.planes[1] = base.add(w * h);
            img.planes[2] = base.add(w * h + cw * ch);
        }
        img.stride[0] = w as c_int;
        img.stride[1] = cw as c_int;
        img.stride[2] = cw as c_int;
        let flags = if std::mem::take(&mut self.key_next) {
            VPX_EFLAG_FORCE_KF as vpx_enc_frame_flags_t
        } else {
            0
        };
        let err = unsafe {
            vpx_codec_encode(
                &mut *self.ctx,
                &img,
                self.pts,
                1,
                flags,
                VPX_DL_REALTIME as std::os::raw::c_ulong,
            )
        };
        self.pts += 1;
        if err != VPX_CODEC_OK {
            return Err(Error::from_call("encode", err, Some(&mut self.ctx)));
        }
        let mut out = Vec::new();
        let mut iter: vpx_codec_iter_t = std::ptr::null();
        loop {
            // SAFETY: a packet is valid until the next call on the context; its frame bytes
            // are copied out at once.
            let pkt = unsafe { vpx_codec_get_cx_data(&mut *self.ctx, &mut iter) };
            if pkt.is_null() {
                break;
            }
            let pkt = unsafe { &*pkt };
            if pkt.kind == vpx_codec_cx_pkt_kind::VPX_CODEC_CX_FRAME_PKT {
                let frame = unsafe { pkt.data.frame };
                let bytes = unsafe {
                    std::slice::from_raw_parts(frame.buf as *const u8, frame.sz as usize)
                };
                out.extend_from_slice(bytes);
            }
        }
        if out.is_empty() {
            // Frame dropping is off: no frame out means the encoder failed.
            return Err(Error::new("encode", "libvpx returned no frame"));
        }
        if flags != 0 && !is_key_frame(&out) {
            return Err(Error::new(
                "encode",
                "a key frame was asked for and not made",
            ));
        }
        Ok(out)
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        // SAFETY: initialised in `new` (a failed init never builds an Encoder).
        unsafe {
            vpx_codec_destroy(&mut *self.ctx);
        }
    }
}

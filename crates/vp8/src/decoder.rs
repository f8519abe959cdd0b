//! VP8 frames back to I420: how the load client and the tests see what a browser would.

use crate::{i420_len, Error};
use std::os::raw::{c_int, c_uint};
use vpx_sys::*;

/// A decoded frame, I420 in framecast's layout (planes unpadded).
#[derive(Clone, Debug, PartialEq)]
pub struct Picture {
    pub width: usize,
    pub height: usize,
    pub i420: Vec<u8>,
}

pub struct Decoder {
    ctx: Box<vpx_codec_ctx_t>,
}

// SAFETY: as the encoder: used only through `&mut self`.
unsafe impl Send for Decoder {}

impl Decoder {
    pub fn new() -> Result<Decoder, Error> {
        let mut ctx: Box<vpx_codec_ctx_t> = Box::new(unsafe { std::mem::zeroed() });
        let cfg = vpx_codec_dec_cfg_t {
            threads: 1,
            w: 0,
            h: 0,
        };
        // SAFETY: the context is zeroed and boxed; the config is read during the call.
        let err = unsafe {
            vpx_codec_dec_init_ver(
                &mut *ctx,
                vpx_codec_vp8_dx(),
                &cfg,
                0,
                VPX_DECODER_ABI_VERSION as c_int,
            )
        };
        if err != VPX_CODEC_OK {
            return Err(Error::from_call("decoder init", err, Some(&mut ctx)));
        }
        Ok(Decoder { ctx })
    }

    /// One VP8 frame; `None` when it shows nothing (libvpx made no picture of it).
    pub fn decode(&mut self, frame: &[u8]) -> Result<Option<Picture>, Error> {
        let len = c_uint::try_from(frame.len())
            .map_err(|_| Error::new("decode", format!("a frame of {} bytes", frame.len())))?;
        // SAFETY: libvpx reads `len` bytes of `frame` during the call.
        let err = unsafe {
            vpx_codec_decode(&mut *self.ctx, frame.as_ptr(), len, std::ptr::null_mut(), 0)
        };
        if err != VPX_CODEC_OK {
            return Err(Error::from_call("decode", err, Some(&mut self.ctx)));
        }
        let mut iter: vpx_codec_iter_t = std::ptr::null();
        let mut last = None;
        loop {
            // SAFETY: the image is valid until the next decode; copied out at once.
            let img = unsafe { vpx_codec_get_frame(&mut *self.ctx, &mut iter) };
            if img.is_null() {
                return Ok(last);
            }
            last = Some(unsafe { copy_i420(&*img) }?);
        }
    }
}

/// The planes of an 8-bit I420 image, rows packed.
unsafe fn copy_i420(img: &vpx_image_t) -> Result<Picture, Error> {
    if img.fmt != vpx_img_fmt::VPX_IMG_FMT_I420 {
        return Err(Error::new(
            "decode",
            format!("an image of format {:?}", img.fmt),
        ));
    }
    let (w, h) = (img.d_w as usize, img.d_h as usize);
    let mut i420 = Vec::with_capacity(i420_len(w, h));
    for (plane, pw, ph) in [
        (0, w, h),
        (1, w.div_ceil(2), h.div_ceil(2)),
        (2, w.div_ceil(2), h.div_ceil(2)),
    ] {
        let stride = img.stride[plane] as isize;
        for row in 0..ph {
            let start = img.planes[plane].offset(stride * row as isize);
            i420.extend_from_slice(std::slice::from_raw_parts(start, pw));
        }
    }
    Ok(Picture {
        width: w,
        height: h,
        i420,
    })
}

impl Drop for Decoder {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`.
        unsafe {
            vpx_codec_destroy(&mut *self.ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{i420_len, is_key_frame, Decoder, Encoder, EncoderConfig};

    /// A moving pattern: a bright square crossing a gradient, so frames differ.
    fn frame(w: usize, h: usize, t: usize) -> Vec<u8> {
        let mut f = vec![128u8; i420_len(w, h)];
        for y in 0..h {
            for x in 0..w {
                let inside = (x + w - (t * 3) % w) % w < w / 4 && y > h / 4 && y < h / 2;
                f[y * w + x] = if inside {
                    235
                } else {
                    (16 + (x + y) % 160) as u8
                };
            }
        }
        // Chroma planes of their own gradients: a swapped or mis-strided plane shows.
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        for (p, c) in f[w * h..].chunks_mut(cw * ch).enumerate() {
            for (i, v) in c.iter_mut().enumerate() {
                let (x, y) = (i % cw, i / cw);
                *v = (64 + if p == 0 { x * 2 } else { y * 2 } % 128) as u8;
            }
        }
        f
    }

    fn psnr(a: &[u8], b: &[u8]) -> f64 {
        let mse = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum::<f64>()
            / a.len() as f64;
        10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10()
    }

    /// Frames encode, the first as a key frame and a forced one as a key frame, and decode
    /// back to the picture (PSNR well above what a broken plane layout gives), odd sizes
    /// included.
    #[test]
    fn frames_round_trip_through_libvpx() {
        for (w, h) in [(160usize, 96usize), (161, 97)] {
            let mut enc = Encoder::new(EncoderConfig::new(w, h, 25.0, 1_000_000)).unwrap();
            assert_eq!(enc.coded_size(), (w, h));
            let mut dec = Decoder::new().unwrap();
            let mut keys = Vec::new();
            let mut quality = Vec::new();
            for t in 0..20 {
                if t == 12 {
                    enc.force_keyframe();
                }
                let f = frame(w, h, t);
                let vp8 = enc.encode(&f).unwrap();
                keys.push(is_key_frame(&vp8));
                let pic = dec.decode(&vp8).unwrap().expect("a picture per frame");
                assert_eq!((pic.width, pic.height), (w, h));
                quality.push(psnr(&f, &pic.i420));
            }
            assert!(keys[0] && keys[12], "key frames at 0 and 12: {keys:?}");
            assert!(keys[1..12].iter().all(|k| !k), "{keys:?}");
            let worst = quality.iter().copied().fold(f64::MAX, f64::min);
            assert!(worst > 30.0, "PSNR {worst:.1} dB at {w}x{h}");
            assert!(enc.encode(&frame(w, h, 0)[1..]).is_err());
        }
    }

    /// A P frame decoded without its key frame is refused or shows a wrong picture, never a
    /// panic; garbage is an error with libvpx's words.
    #[test]
    fn hostile_input_is_an_error() {
        let mut dec = Decoder::new().unwrap();
        let e = dec.decode(&[0xff; 64]).unwrap_err().to_string();
        assert!(e.starts_with("VP8 decode"), "{e}");
        assert!(Encoder::new(EncoderConfig::new(1, 64, 25.0, 1_000)).is_err());
        let mut cfg = EncoderConfig::new(64, 64, 25.0, 1_000);
        cfg.speed = 99;
        let e = Encoder::new(cfg)
            .err()
            .expect("speed 99 refused")
            .to_string();
        assert!(e.contains("speed 99"), "{e}");
    }
}

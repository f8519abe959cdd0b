//! VP8 through libvpx: the encoder a gateway session uses for a browser whose offer has no
//! H.264, and the decoder the load client and the tests read its frames back with.
//!
//! Frames are I420 as framecast lays them out (`IMAGE_FORMAT_I420`): a `w`×`h` luma plane,
//! then two `⌈w/2⌉`×`⌈h/2⌉` chroma planes, rows unpadded. VP8 codes any size, odd ones too,
//! so a frame is encoded at its own size.
//!
//! libvpx comes from the system (Debian's `libvpx-dev`, found with pkg-config); the bindings
//! are `env-libvpx-sys`'s, generated for that version.

mod decoder;
mod encoder;

pub use decoder::{Decoder, Picture};
pub use encoder::{Encoder, EncoderConfig};

use std::ffi::CStr;
use vpx_sys::{vpx_codec_ctx_t, vpx_codec_err_t};

/// A libvpx call that failed: which, and libvpx's words for why.
#[derive(Debug, thiserror::Error)]
#[error("VP8 {call}: {detail}")]
pub struct Error {
    call: &'static str,
    detail: String,
}

impl Error {
    fn new(call: &'static str, detail: impl Into<String>) -> Error {
        Error {
            call,
            detail: detail.into(),
        }
    }

    /// `call` returned `err`: its message, and the context's detail when it has one.
    fn from_call(
        call: &'static str,
        err: vpx_codec_err_t,
        ctx: Option<&mut vpx_codec_ctx_t>,
    ) -> Error {
        // SAFETY: libvpx returns static NUL-terminated strings for both, or null for the
        // detail when there is none.
        let mut detail = unsafe { text(vpx_sys::vpx_codec_err_to_string(err)) };
        if let Some(ctx) = ctx {
            let more = unsafe { text(vpx_sys::vpx_codec_error_detail(ctx)) };
            if !more.is_empty() {
                detail = format!("{detail} ({more})");
            }
        }
        Error::new(call, detail)
    }
}

/// A C string libvpx returned, or "" for null.
unsafe fn text(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// Bytes of a `width`×`height` I420 frame.
pub fn i420_len(width: usize, height: usize) -> usize {
    width * height + 2 * width.div_ceil(2) * height.div_ceil(2)
}

/// Whether a VP8 frame is a key frame, which a decoder can start from whatever it held
/// (RFC 6386, 9.1: bit 0 of the frame tag is 0 for a key frame).
pub fn is_key_frame(frame: &[u8]) -> bool {
    frame.first().is_some_and(|b| b & 1 == 0)
}

//! JPEG encoding with libjpeg-turbo, one compressor per thread (a compressor holds its
//! Huffman and scratch state, so threads never share one), with or without restart markers
//! (see [`crate::segments`] for why they matter).

use std::cell::RefCell;
use std::ffi::{c_int, CStr};
use turbojpeg::{raw, Image, PixelFormat};

/// Chroma subsampling choices, named as video people say them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subsampling {
    S444,
    S422,
    S420,
    Gray,
}

impl std::str::FromStr for Subsampling {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "4:4:4" | "444" => Ok(Subsampling::S444),
            "4:2:2" | "422" => Ok(Subsampling::S422),
            "4:2:0" | "420" => Ok(Subsampling::S420),
            "gray" => Ok(Subsampling::Gray),
            _ => Err(format!(
                "subsampling {s:?} is not one of 4:4:4, 4:2:2, 4:2:0, gray"
            )),
        }
    }
}

impl std::fmt::Display for Subsampling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Subsampling::S444 => "4:4:4",
            Subsampling::S422 => "4:2:2",
            Subsampling::S420 => "4:2:0",
            Subsampling::Gray => "gray",
        })
    }
}

impl Subsampling {
    fn turbo(self) -> raw::TJSAMP {
        match self {
            Subsampling::S444 => raw::TJSAMP_TJSAMP_444,
            Subsampling::S422 => raw::TJSAMP_TJSAMP_422,
            Subsampling::S420 => raw::TJSAMP_TJSAMP_420,
            Subsampling::Gray => raw::TJSAMP_TJSAMP_GRAY,
        }
    }

    /// Width and height in pixels of one MCU, the unit a restart interval counts.
    pub fn mcu(self) -> (u32, u32) {
        match self {
            Subsampling::S444 | Subsampling::Gray => (8, 8),
            Subsampling::S422 => (16, 8),
            Subsampling::S420 => (16, 16),
        }
    }
}

/// How a frame is encoded. Baseline, standard Huffman tables (never optimised: every restart
/// segment of every encode must share the same tables for segments to be spliced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub quality: u8,
    pub subsampling: Subsampling,
    /// MCUs per restart interval; 0 for none.
    pub restart_mcus: u16,
}

/// Packed RGB pixels to encode: `height` rows of `width` pixels, `pitch` bytes apart.
#[derive(Clone, Copy)]
pub struct Rgb<'a> {
    pub pixels: &'a [u8],
    pub width: u32,
    pub height: u32,
    pub pitch: usize,
}

impl<'a> Rgb<'a> {
    /// Tightly packed pixels.
    pub fn packed(pixels: &'a [u8], width: u32, height: u32) -> Rgb<'a> {
        Rgb {
            pixels,
            width,
            height,
            pitch: width as usize * 3,
        }
    }
}

/// A TurboJPEG compressor owned by one thread. Used through the raw API because the
/// `turbojpeg` crate's `Compressor` cannot set a restart interval.
struct Handle(raw::tjhandle);

impl Handle {
    fn new() -> Result<Handle, String> {
        // SAFETY: tj3Init has no preconditions; a null result is checked.
        let h = unsafe { raw::tj3Init(raw::TJINIT_TJINIT_COMPRESS as c_int) };
        if h.is_null() {
            return Err("turbojpeg: cannot create a compressor".into());
        }
        Ok(Handle(h))
    }

    fn error(&self) -> String {
        // SAFETY: the handle is live; TurboJPEG returns a NUL-terminated static or per-handle
        // string.
        let msg = unsafe { CStr::from_ptr(raw::tj3GetErrorStr(self.0)) };
        format!("turbojpeg: {}", msg.to_string_lossy())
    }

    fn set(&self, param: raw::TJPARAM, value: c_int) -> Result<(), String> {
        // SAFETY: the handle is live; unknown parameters are reported as errors.
        match unsafe { raw::tj3Set(self.0, param as c_int, value) } {
            0 => Ok(()),
            _ => Err(self.error()),
        }
    }

    /// Encodes `image` into `out` (cleared first).
    fn compress(&self, image: Rgb<'_>, params: Params, out: &mut Vec<u8>) -> Result<(), String> {
        let rows = image.height as usize;
        let needed = match rows {
            0 => 0,
            _ => (rows - 1) * image.pitch + image.width as usize * 3,
        };
        if image.width == 0 || rows == 0 || image.pitch < image.width as usize * 3 {
            return Err(format!(
                "cannot encode a {}x{} image with pitch {}",
                image.width, image.height, image.pitch
            ));
        }
        if image.pixels.len() < needed {
            return Err(format!(
                "{} bytes of pixels for a {}x{} image with pitch {}",
                image.pixels.len(),
                image.width,
                image.height,
                image.pitch
            ));
        }
        self.set(raw::TJPARAM_TJPARAM_QUALITY, params.quality as c_int)?;
        self.set(raw::TJPARAM_TJPARAM_SUBSAMP, params.subsampling.turbo())?;
        self.set(
            raw::TJPARAM_TJPARAM_RESTARTBLOCKS,
            params.restart_mcus as c_int,
        )?;
        // Write into `out` itself: no realloc, a buffer of the worst-case size.
        self.set(raw::TJPARAM_TJPARAM_NOREALLOC, 1)?;
        let bound = worst_case_bytes(image.width, image.height, params.subsampling) as raw::size_t;
        if bound == 0 {
            return Err(self.error());
        }
        out.clear();
        out.resize(bound as usize, 0);
        let mut buf = out.as_mut_ptr();
        let mut size = bound;
        // SAFETY: `pixels` holds `height` rows of `pitch` bytes (checked above); `out` holds
        // `bound` bytes, the most TurboJPEG writes for these dimensions, and NOREALLOC keeps
        // it from replacing the buffer.
        let rc = unsafe {
            raw::tj3Compress8(
                self.0,
                image.pixels.as_ptr(),
                image.width as c_int,
                image.pitch as c_int,
                image.height as c_int,
                raw::TJPF_TJPF_RGB,
                &mut buf,
                &mut size,
            )
        };
        if rc != 0 {
            out.clear();
            return Err(self.error());
        }
        out.truncate(size as usize);
        Ok(())
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle is live and dropped once.
        unsafe { raw::tj3Destroy(self.0) }
    }
}

/// The most bytes TurboJPEG writes for a `width` x `height` frame.
fn worst_case_bytes(width: u32, height: u32, subsampling: Subsampling) -> usize {
    // SAFETY: pure arithmetic; 0 (an error) for impossible sizes.
    unsafe { raw::tj3JPEGBufSize(width as c_int, height as c_int, subsampling.turbo()) as usize }
}

thread_local! {
    static COMPRESSOR: RefCell<Option<Handle>> = const { RefCell::new(None) };
}

/// Encodes `image` on this thread's compressor into `out` (cleared first).
pub fn encode_into(image: Rgb<'_>, params: Params, out: &mut Vec<u8>) -> Result<(), String> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Handle::new()?);
        }
        let handle = slot.as_ref().ok_or("turbojpeg compressor missing")?;
        handle.compress(image, params, out)
    })
}

/// Encodes packed RGB pixels as JPEG (no restart markers) on this thread's compressor.
pub fn encode_rgb(
    pixels: &[u8],
    width: u32,
    height: u32,
    quality: u8,
    subsampling: Subsampling,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let params = Params {
        quality,
        subsampling,
        restart_mcus: 0,
    };
    encode_into(Rgb::packed(pixels, width, height), params, &mut out)?;
    Ok(out)
}

/// Decodes a JPEG to packed RGB.
/// A 4:2:0 JPEG of `width` x `height` decoded into `out` as its own YCbCr planes (full
/// range, as JFIF stores them), packed end to end: no colour conversion, no chroma
/// upsampling. The layout is that of [`crate::raw_frame`].
pub fn decode_yuv420(jpeg: &[u8], width: u32, height: u32, out: &mut [u8]) -> Result<(), String> {
    let mut d = turbojpeg::Decompressor::new().map_err(|e| format!("turbojpeg: {e}"))?;
    let header = d.read_header(jpeg).map_err(|e| format!("turbojpeg: {e}"))?;
    if (header.width, header.height) != (width as usize, height as usize)
        || header.subsamp != turbojpeg::Subsamp::Sub2x2
        || !width.is_multiple_of(2)
        || !height.is_multiple_of(2)
        || turbojpeg::yuv_pixels_len(
            width as usize,
            1,
            height as usize,
            turbojpeg::Subsamp::Sub2x2,
        )
        .ok()
            != Some(out.len())
    {
        return Err(format!(
            "the JPEG is {}x{} {:?}; wanted {width}x{height} (even) 4:2:0 into {} bytes",
            header.width,
            header.height,
            header.subsamp,
            out.len()
        ));
    }
    let image = turbojpeg::YuvImage {
        pixels: out,
        width: width as usize,
        align: 1,
        height: height as usize,
        subsamp: turbojpeg::Subsamp::Sub2x2,
    };
    d.decompress_to_yuv(jpeg, image)
        .map_err(|e| format!("turbojpeg: {e}"))
}

pub fn decode_rgb(jpeg: &[u8]) -> Result<(Vec<u8>, u32, u32), String> {
    let img: Image<Vec<u8>> =
        turbojpeg::decompress(jpeg, PixelFormat::RGB).map_err(|e| format!("turbojpeg: {e}"))?;
    Ok((img.pixels, img.width as u32, img.height as u32))
}

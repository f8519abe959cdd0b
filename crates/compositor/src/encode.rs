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
    /// Whether `pixels` holds the `height` rows of `width` pixels `pitch` bytes apart.
    fn check(&self) -> Result<(), String> {
        let rows = self.height as usize;
        let needed = match rows {
            0 => 0,
            _ => (rows - 1) * self.pitch + self.width as usize * 3,
        };
        if self.width == 0 || rows == 0 || self.pitch < self.width as usize * 3 {
            return Err(format!(
                "cannot encode a {}x{} image with pitch {}",
                self.width, self.height, self.pitch
            ));
        }
        if self.pixels.len() < needed {
            return Err(format!(
                "{} bytes of pixels for a {}x{} image with pitch {}",
                self.pixels.len(),
                self.width,
                self.height,
                self.pitch
            ));
        }
        Ok(())
    }

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
    fn new(init: raw::TJINIT) -> Result<Handle, String> {
        // SAFETY: tj3Init has no preconditions; a null result is checked.
        let h = unsafe { raw::tj3Init(init as c_int) };
        if h.is_null() {
            return Err("turbojpeg: cannot create a handle".into());
        }
        Ok(Handle(h))
    }

    /// Calls `f` with this thread's handle of kind `init` (`slot`), made on first use.
    fn with<T>(
        slot: &'static std::thread::LocalKey<RefCell<Option<Handle>>>,
        init: raw::TJINIT,
        f: impl FnOnce(&Handle) -> Result<T, String>,
    ) -> Result<T, String> {
        slot.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(Handle::new(init)?);
            }
            f(slot.as_ref().ok_or("turbojpeg handle missing")?)
        })
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
        image.check()?;
        // SAFETY (of the call): `pixels` holds `height` rows of `pitch` bytes (checked
        // above); `compress_with` hands a buffer of the worst-case size.
        self.compress_with(image.width, image.height, params, out, |buf, size| unsafe {
            raw::tj3Compress8(
                self.0,
                image.pixels.as_ptr(),
                image.width as c_int,
                image.pitch as c_int,
                image.height as c_int,
                raw::TJPF_TJPF_RGB,
                buf,
                size,
            )
        })
    }

    /// Encodes [`crate::planes`] of a `width` x `height` image, in `params.subsampling`,
    /// into `out` (cleared first): no colour conversion, no downsampling.
    fn compress_planes(
        &self,
        planes: &[u8],
        width: u32,
        height: u32,
        params: Params,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        check_planes(planes, width, height, params.subsampling)?;
        // SAFETY (of the call): `planes` holds exactly the planes of this size, unpadded
        // rows (align 1), checked above.
        self.compress_with(width, height, params, out, |buf, size| unsafe {
            raw::tj3CompressFromYUV8(
                self.0,
                planes.as_ptr(),
                width as c_int,
                1,
                height as c_int,
                buf,
                size,
            )
        })
    }

    /// Sets `params` and runs `call` (one of TurboJPEG's compress functions) with a buffer of
    /// the worst-case size for the image: `out`'s own, which NOREALLOC keeps TurboJPEG from
    /// replacing; `out` is cut to the JPEG's length.
    fn compress_with(
        &self,
        width: u32,
        height: u32,
        params: Params,
        out: &mut Vec<u8>,
        call: impl FnOnce(*mut *mut u8, *mut raw::size_t) -> c_int,
    ) -> Result<(), String> {
        self.set(raw::TJPARAM_TJPARAM_QUALITY, params.quality as c_int)?;
        self.set(raw::TJPARAM_TJPARAM_SUBSAMP, params.subsampling.turbo())?;
        self.set(
            raw::TJPARAM_TJPARAM_RESTARTBLOCKS,
            params.restart_mcus as c_int,
        )?;
        self.set(raw::TJPARAM_TJPARAM_NOREALLOC, 1)?;
        let bound = worst_case_bytes(width, height, params.subsampling) as raw::size_t;
        if bound == 0 {
            return Err(self.error());
        }
        out.clear();
        out.resize(bound as usize, 0);
        let mut buf = out.as_mut_ptr();
        let mut size = bound;
        if call(&mut buf, &mut size) != 0 {
            out.clear();
            return Err(self.error());
        }
        out.truncate(size as usize);
        Ok(())
    }

    /// Packed RGB to [`crate::planes`] in `subsampling`, converted and downsampled exactly
    /// as this library's own encode does (a compress handle).
    fn rgb_to_planes(&self, image: Rgb<'_>, subsampling: Subsampling) -> Result<Vec<u8>, String> {
        image.check()?;
        self.set(raw::TJPARAM_TJPARAM_SUBSAMP, subsampling.turbo())?;
        let mut out = vec![0u8; planes_len(image.width, image.height, subsampling)];
        // SAFETY: `pixels` holds `height` rows of `pitch` bytes (checked above); `out` holds
        // the planes of this size with unpadded rows (align 1).
        let rc = unsafe {
            raw::tj3EncodeYUV8(
                self.0,
                image.pixels.as_ptr(),
                image.width as c_int,
                image.pitch as c_int,
                image.height as c_int,
                raw::TJPF_TJPF_RGB,
                out.as_mut_ptr(),
                1,
            )
        };
        if rc != 0 {
            return Err(self.error());
        }
        Ok(out)
    }

    /// [`crate::planes`] in `subsampling` back to packed RGB, upsampled as a JPEG decode
    /// does (a decompress handle).
    fn planes_to_rgb(
        &self,
        planes: &[u8],
        width: u32,
        height: u32,
        subsampling: Subsampling,
    ) -> Result<Vec<u8>, String> {
        check_planes(planes, width, height, subsampling)?;
        self.set(raw::TJPARAM_TJPARAM_SUBSAMP, subsampling.turbo())?;
        let mut out = vec![0u8; width as usize * height as usize * 3];
        // SAFETY: `planes` holds the planes of this size (checked above); `out` holds
        // `height` rows of `width * 3` bytes.
        let rc = unsafe {
            raw::tj3DecodeYUV8(
                self.0,
                planes.as_ptr(),
                1,
                out.as_mut_ptr(),
                width as c_int,
                width as c_int * 3,
                height as c_int,
                raw::TJPF_TJPF_RGB,
            )
        };
        if rc != 0 {
            return Err(self.error());
        }
        Ok(out)
    }
}

/// Whether `planes` holds exactly a `width` x `height` image's planes in `subsampling`.
fn check_planes(
    planes: &[u8],
    width: u32,
    height: u32,
    subsampling: Subsampling,
) -> Result<(), String> {
    let want = planes_len(width, height, subsampling);
    if width == 0 || height == 0 || planes.len() != want {
        return Err(format!(
            "{} bytes of planes for a {width}x{height} image (want {want})",
            planes.len()
        ));
    }
    Ok(())
}

/// Bytes of a `width` x `height` image's planes in `subsampling` (rows unpadded, as
/// [`crate::planes`] lays them out for 4:2:0).
pub fn planes_len(width: u32, height: u32, subsampling: Subsampling) -> usize {
    // SAFETY: pure arithmetic; 0 (an error) for impossible sizes.
    unsafe { raw::tj3YUVBufSize(width as c_int, 1, height as c_int, subsampling.turbo()) as usize }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle is live and dropped once.
        unsafe { raw::tj3Destroy(self.0) }
    }
}

/// The most bytes TurboJPEG writes for a `width` x `height` frame.
pub fn worst_case_bytes(width: u32, height: u32, subsampling: Subsampling) -> usize {
    // SAFETY: pure arithmetic; 0 (an error) for impossible sizes.
    unsafe { raw::tj3JPEGBufSize(width as c_int, height as c_int, subsampling.turbo()) as usize }
}

thread_local! {
    static COMPRESSOR: RefCell<Option<Handle>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<Handle>> = const { RefCell::new(None) };
}

fn compressor<T>(f: impl FnOnce(&Handle) -> Result<T, String>) -> Result<T, String> {
    Handle::with(&COMPRESSOR, raw::TJINIT_TJINIT_COMPRESS, f)
}

/// Encodes `image` on this thread's compressor into `out` (cleared first).
pub fn encode_into(image: Rgb<'_>, params: Params, out: &mut Vec<u8>) -> Result<(), String> {
    compressor(|h| h.compress(image, params, out))
}

/// Encodes the [`crate::planes`] of a `width` x `height` image (in `params.subsampling`) on
/// this thread's compressor into `out` (cleared first). Planes made by [`to_planes`] encode
/// to the same bytes as the RGB they came from.
pub fn encode_planes_into(
    planes: &[u8],
    width: u32,
    height: u32,
    params: Params,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    compressor(|h| h.compress_planes(planes, width, height, params, out))
}

/// Packed RGB to YCbCr planes in `subsampling`, as libjpeg-turbo's encode computes them.
pub fn to_planes(image: Rgb<'_>, subsampling: Subsampling) -> Result<Vec<u8>, String> {
    compressor(|h| h.rgb_to_planes(image, subsampling))
}

/// YCbCr planes in `subsampling` back to packed RGB, as a JPEG decode computes it.
pub fn planes_to_rgb(
    planes: &[u8],
    width: u32,
    height: u32,
    subsampling: Subsampling,
) -> Result<Vec<u8>, String> {
    Handle::with(&DECOMPRESSOR, raw::TJINIT_TJINIT_DECOMPRESS, |h| {
        h.planes_to_rgb(planes, width, height, subsampling)
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

//! JPEG encoding with libjpeg-turbo, one compressor per thread (a compressor holds its
//! Huffman and scratch state, so threads never share one).

use std::cell::RefCell;
use turbojpeg::{Compressor, Image, PixelFormat, Subsamp};

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
    fn turbo(self) -> Subsamp {
        match self {
            Subsampling::S444 => Subsamp::None,
            Subsampling::S422 => Subsamp::Sub2x1,
            Subsampling::S420 => Subsamp::Sub2x2,
            Subsampling::Gray => Subsamp::Gray,
        }
    }
}

thread_local! {
    static COMPRESSOR: RefCell<Option<Compressor>> = const { RefCell::new(None) };
}

/// Encodes packed RGB pixels as JPEG on this thread's compressor.
pub fn encode_rgb(
    pixels: &[u8],
    width: u32,
    height: u32,
    quality: u8,
    subsampling: Subsampling,
) -> Result<Vec<u8>, String> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Compressor::new().map_err(|e| format!("turbojpeg: {e}"))?);
        }
        let c = slot.as_mut().ok_or("turbojpeg compressor missing")?;
        // The crate defaults to quality 95 and 4:4:4; set both every call (cheap field writes).
        c.set_quality(quality as i32)
            .map_err(|e| format!("turbojpeg: {e}"))?;
        c.set_subsamp(subsampling.turbo())
            .map_err(|e| format!("turbojpeg: {e}"))?;
        let image = Image {
            pixels,
            width: width as usize,
            pitch: width as usize * 3,
            height: height as usize,
            format: PixelFormat::RGB,
        };
        c.compress_to_vec(image)
            .map_err(|e| format!("turbojpeg: {e}"))
    })
}

/// Decodes a JPEG to packed RGB.
pub fn decode_rgb(jpeg: &[u8]) -> Result<(Vec<u8>, u32, u32), String> {
    let img: Image<Vec<u8>> =
        turbojpeg::decompress(jpeg, PixelFormat::RGB).map_err(|e| format!("turbojpeg: {e}"))?;
    Ok((img.pixels, img.width as u32, img.height as u32))
}

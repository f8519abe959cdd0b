//! YCbCr 4:2:0 planes as libjpeg-turbo lays them out (one buffer, rows unpadded, planes end
//! to end: Y, then Cb, then Cr), the form in which a 4:2:0 avatar keeps its face regions.
//!
//! A JPEG encoder works in this space: keeping the region here means a face is blended and
//! encoded with no colour conversion, and a face crop that arrives as I420 is used as it is.
//! libjpeg pads an odd width or height to even in every plane, so the luma plane of a
//! 5-pixel-wide region is 6 samples wide; [`Planes`] follows it.

/// The layout of a `w` x `h` image's planes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planes {
    pub w: u32,
    pub h: u32,
    /// Luma plane width and height (`w` and `h` rounded up to even).
    pub yw: usize,
    pub yh: usize,
    /// Chroma plane width and height (half the luma plane's).
    pub cw: usize,
    pub ch: usize,
}

impl Planes {
    pub fn new(w: u32, h: u32) -> Planes {
        let (yw, yh) = (
            w.next_multiple_of(2) as usize,
            h.next_multiple_of(2) as usize,
        );
        Planes {
            w,
            h,
            yw,
            yh,
            cw: yw / 2,
            ch: yh / 2,
        }
    }

    /// Bytes of all three planes.
    pub fn bytes(&self) -> usize {
        self.yw * self.yh + 2 * self.cw * self.ch
    }

    /// The three planes of `buf` ([`Planes::bytes`] bytes).
    pub fn split<'a>(&self, buf: &'a [u8]) -> (&'a [u8], &'a [u8], &'a [u8]) {
        let (y, c) = buf.split_at(self.yw * self.yh);
        let (u, v) = c.split_at(self.cw * self.ch);
        (y, u, v)
    }

    pub fn split_mut<'a>(&self, buf: &'a mut [u8]) -> (&'a mut [u8], &'a mut [u8], &'a mut [u8]) {
        let (y, c) = buf.split_at_mut(self.yw * self.yh);
        let (u, v) = c.split_at_mut(self.cw * self.ch);
        (y, u, v)
    }
}

/// A face crop as planes: luma `size` x `size`, chroma `chroma` x `chroma` (`size / 2` for an
/// I420 crop, `size` for one converted from RGB).
pub struct CropPlanes<'a> {
    pub y: &'a [u8],
    pub u: &'a [u8],
    pub v: &'a [u8],
    pub size: u32,
    pub chroma: u32,
}

impl<'a> CropPlanes<'a> {
    /// An I420 crop ([`framecast_proto::i420`]): `size` even, `buf` exactly its bytes.
    pub fn i420(buf: &'a [u8], size: u32) -> Result<CropPlanes<'a>, String> {
        let s = size as usize;
        if !s.is_multiple_of(2) || buf.len() != framecast_proto::i420::len(1, s, s) {
            return Err(format!(
                "an I420 face crop of {} bytes for S = {size}",
                buf.len()
            ));
        }
        let (y, c) = buf.split_at(s * s);
        let (u, v) = c.split_at(s * s / 4);
        Ok(CropPlanes {
            y,
            u,
            v,
            size,
            chroma: size / 2,
        })
    }

    /// A full-resolution YCbCr crop made by [`ycc_from_planar_rgb`].
    pub fn ycc444(buf: &'a [u8], size: u32) -> Result<CropPlanes<'a>, String> {
        let n = (size * size) as usize;
        if buf.len() != 3 * n {
            return Err(format!(
                "a YCbCr face crop of {} bytes for S = {size}",
                buf.len()
            ));
        }
        Ok(CropPlanes {
            y: &buf[..n],
            u: &buf[n..2 * n],
            v: &buf[2 * n..],
            size,
            chroma: size,
        })
    }
}

/// A planar RGB crop (`3 x n` bytes) as full-resolution Y, Cb and Cr planes, each pixel
/// converted as libjpeg converts it (BT.601 full range, 16-bit fixed point), into `out`.
pub fn ycc_from_planar_rgb(rgb: &[u8], out: &mut Vec<u8>) {
    use framecast_proto::i420::fixed::*;
    let n = rgb.len() / 3;
    out.resize(3 * n, 0);
    let (r, rest) = rgb.split_at(n);
    let (g, b) = rest.split_at(n);
    let (y, c) = out.split_at_mut(n);
    let (u, v) = c.split_at_mut(n);
    // libjpeg's chroma offset: 128, with rounding that never reaches 256.
    const OFFSET: i32 = (128 << 16) + HALF - 1;
    // Three passes over zipped slices: no bounds checks, so each one vectorises.
    for ((y, &r), (&g, &b)) in y.iter_mut().zip(r).zip(g.iter().zip(b)) {
        *y = ((YR * r as i32 + YG * g as i32 + YB * b as i32 + HALF) >> 16) as u8;
    }
    for ((u, &r), (&g, &b)) in u.iter_mut().zip(r).zip(g.iter().zip(b)) {
        *u = ((CBR * r as i32 + CBG * g as i32 + HALF * b as i32 + OFFSET) >> 16) as u8;
    }
    for ((v, &r), (&g, &b)) in v.iter_mut().zip(r).zip(g.iter().zip(b)) {
        *v = ((HALF * r as i32 + CRG * g as i32 + CRB * b as i32 + OFFSET) >> 16) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_sizes_pad_to_even_as_libjpeg_does() {
        let p = Planes::new(5, 3);
        assert_eq!((p.yw, p.yh, p.cw, p.ch), (6, 4, 3, 2));
        assert_eq!(p.bytes(), 24 + 12);
        // The layout libjpeg-turbo computes for the same image.
        let tj = turbojpeg::yuv_pixels_len(5, 1, 3, turbojpeg::Subsamp::Sub2x2).unwrap();
        assert_eq!(p.bytes(), tj);
        let p = Planes::new(32, 16);
        assert_eq!(p.bytes(), 32 * 16 * 3 / 2);
    }

    /// The per-pixel conversion is libjpeg's: a crop converted here and one converted by
    /// libjpeg-turbo (4:4:4 planes) agree exactly.
    #[test]
    fn rgb_to_ycc_matches_libjpeg() {
        let s = 16usize;
        let mut state = 7u32;
        let rgb: Vec<u8> = (0..3 * s * s)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 24) as u8
            })
            .collect();
        let mut ours = Vec::new();
        ycc_from_planar_rgb(&rgb, &mut ours);
        let packed: Vec<u8> = (0..s * s)
            .flat_map(|i| [rgb[i], rgb[s * s + i], rgb[2 * s * s + i]])
            .collect();
        let image = crate::encode::Rgb::packed(&packed, s as u32, s as u32);
        let theirs = crate::encode::to_planes(image, crate::encode::Subsampling::S444).unwrap();
        assert_eq!(ours, theirs);
    }
}

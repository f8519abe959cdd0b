//! Frames as raw I420, for video encoders (a WebRTC gateway encodes VP8 or H.264 from these):
//! no JPEG encode here and no decode there.
//!
//! The layout is the one `RenderedFrame.image` documents for `IMAGE_FORMAT_I420`: BT.601
//! limited range (Y 16..=235, Cb and Cr 16..=240: what VP8 and H.264 encoders and browsers'
//! decoders assume), three planes end to end with no padding: Y (width x height), then Cb and
//! Cr ((width + 1) / 2 x (height + 1) / 2 each). A chroma sample is the average of the pixels
//! of its 2 x 2 block (of the one or two there are on an odd edge).

use framecast_proto::compositor::v1::FaceRegion;

/// Bytes of a `width` x `height` frame.
pub fn len(width: usize, height: usize) -> usize {
    let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
    width * height + 2 * cw * ch
}

// BT.601 limited range in 8-bit fixed point (the common integer form, as in libyuv).
fn luma(r: i32, g: i32, b: i32) -> u8 {
    (((66 * r + 129 * g + 25 * b + 128) >> 8) + 16) as u8
}

fn cb(r: i32, g: i32, b: i32) -> u8 {
    (((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128) as u8
}

fn cr(r: i32, g: i32, b: i32) -> u8 {
    (((112 * r - 94 * g - 18 * b + 128) >> 8) + 128) as u8
}

/// Packed RGB (`width` x `height`, rows end to end) into `out` as I420 (replacing what it
/// held).
pub fn from_rgb(rgb: &[u8], width: usize, height: usize, out: &mut Vec<u8>) -> Result<(), String> {
    if rgb.len() != width * height * 3 {
        return Err(format!(
            "{} bytes of RGB for a {width}x{height} frame",
            rgb.len()
        ));
    }
    let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
    out.clear();
    out.resize(len(width, height), 0);
    let (y, chroma) = out.split_at_mut(width * height);
    let (u, v) = chroma.split_at_mut(cw * ch);
    for (src, dst) in rgb.chunks_exact(3).zip(y.iter_mut()) {
        *dst = luma(src[0] as i32, src[1] as i32, src[2] as i32);
    }
    for cy in 0..ch {
        let rows = 2 * cy..(2 * cy + 2).min(height);
        for cx in 0..cw {
            let cols = 2 * cx..(2 * cx + 2).min(width);
            let (mut s, mut n) = ([0i32; 3], 0i32);
            for row in rows.clone() {
                for col in cols.clone() {
                    let p = &rgb[(row * width + col) * 3..][..3];
                    for (s, &p) in s.iter_mut().zip(p) {
                        *s += p as i32;
                    }
                    n += 1;
                }
            }
            let [r, g, b] = s.map(|s| (s + n / 2) / n);
            u[cy * cw + cx] = cb(r, g, b);
            v[cy * cw + cx] = cr(r, g, b);
        }
    }
    Ok(())
}

/// A JPEG (an avatar's prepared frame: an idle frame asked for as JPEG,
/// `RenderRequest.idle_frame_format`) as the I420 frame the compositor would have sent for
/// it: the JPEG's own 4:2:0 planes where it has them (no colour conversion, rescaled to
/// limited range), else converted from RGB. The JPEG must be `width` x `height`.
pub fn from_jpeg(jpeg: &[u8], width: u32, height: u32) -> Result<Vec<u8>, String> {
    let (w, h) = (width as usize, height as usize);
    let mut out = vec![0u8; len(w, h)];
    if crate::encode::decode_yuv420(jpeg, width, height, &mut out).is_ok() {
        full_to_limited(&mut out, w, h);
        return Ok(out);
    }
    let (rgb, jw, jh) = crate::encode::decode_rgb(jpeg)?;
    if (jw, jh) != (width, height) {
        return Err(format!(
            "the JPEG is {jw}x{jh}; the frames are {width}x{height}"
        ));
    }
    from_rgb(&rgb, w, h, &mut out)?;
    Ok(out)
}

/// Full-range YCbCr planes (JFIF, as a JPEG decodes) to limited range, in place.
pub fn full_to_limited(i420: &mut [u8], width: usize, height: usize) {
    let (y, chroma) = i420.split_at_mut(width * height);
    y.iter_mut().for_each(|v| *v = luma_to_limited(*v));
    chroma.iter_mut().for_each(|v| *v = chroma_to_limited(*v));
}

/// [`full_to_limited`] for the `rw` x `rh` region at (`x`, `y`) of a `width` x `height`
/// frame only (the region as [`put_planes`] takes it: even coordinates, inside the frame).
pub fn full_to_limited_region(
    i420: &mut [u8],
    (width, height): (usize, usize),
    (x, y): (usize, usize),
    (rw, rh): (usize, usize),
) {
    let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
    let (frame_y, frame_c) = i420.split_at_mut(width * height);
    for row in y..(y + rh).min(height) {
        let line = &mut frame_y[row * width..][x.min(width)..(x + rw).min(width)];
        line.iter_mut().for_each(|v| *v = luma_to_limited(*v));
    }
    let (cx, cy) = (x / 2, y / 2);
    let (rcw, rch) = (rw.div_ceil(2), rh.div_ceil(2));
    for plane in frame_c.chunks_exact_mut(cw * ch) {
        for row in cy..(cy + rch).min(ch) {
            let line = &mut plane[row * cw..][cx.min(cw)..(cx + rcw).min(cw)];
            line.iter_mut().for_each(|v| *v = chroma_to_limited(*v));
        }
    }
}

// Full to limited range in 16-bit integers, which the compiler vectorizes (a table lookup per
// byte it does not: that was 9% of a compositor's CPU with talking frames cut to their
// region). Both round exactly: 2 x 255 is even and the numerators' doubles are odd, so no
// value lies on a half; and x / 255 == (x + 1 + (x >> 8)) >> 8 for every x below 65535.

/// round(16 + v x 219 / 255).
#[inline]
fn luma_to_limited(v: u8) -> u8 {
    let x = u16::from(v) * 219 + 127 + 16 * 255;
    ((x + 1 + (x >> 8)) >> 8) as u8
}

/// round(128 + (v - 128) x 224 / 255) = round((224 v + 3968) / 255).
#[inline]
fn chroma_to_limited(v: u8) -> u8 {
    let x = u16::from(v) * 224 + 3968 + 127;
    ((x + 1 + (x >> 8)) >> 8) as u8
}

/// Writes a region's YCbCr planes (`planes`, laid out as [`crate::planes::Planes`]) at
/// (`x`, `y`) into a `width` x `height` I420 frame of the same range. `x` and `y` must be
/// even (chroma samples are not split) and the region inside the frame.
pub fn put_planes(
    i420: &mut [u8],
    size: (usize, usize),
    at: (usize, usize),
    region: &[u8],
    planes: &crate::planes::Planes,
) -> Result<(), String> {
    let whole = Rect::at_origin(planes.w, planes.h);
    put_planes_part(i420, size, at, region, planes, whole)
}

/// [`put_planes`] for the part `part` of the region (in the region's own coordinates, its
/// corner even), written with its corner at (`x`, `y`).
pub fn put_planes_part(
    i420: &mut [u8],
    (width, height): (usize, usize),
    (x, y): (usize, usize),
    region: &[u8],
    planes: &crate::planes::Planes,
    part: Rect,
) -> Result<(), String> {
    let (px, py, pw, ph) = (
        part.x as usize,
        part.y as usize,
        part.w as usize,
        part.h as usize,
    );
    if x % 2 != 0
        || y % 2 != 0
        || px % 2 != 0
        || py % 2 != 0
        || !Rect::at_origin(planes.w, planes.h).holds(&part)
        || x + pw > width
        || y + ph > height
        || region.len() != planes.bytes()
        || i420.len() != len(width, height)
    {
        return Err(format!(
            "a {pw}x{ph} part at ({px}, {py}) of a {}x{} region, put at ({x}, {y}), does not fit the {width}x{height} frame on even coordinates",
            planes.w, planes.h
        ));
    }
    let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
    let (pcw, pch) = (pw.div_ceil(2), ph.div_ceil(2));
    let (frame_y, frame_c) = i420.split_at_mut(width * height);
    let (frame_u, frame_v) = frame_c.split_at_mut(cw * ch);
    let (part_y, part_u, part_v) = planes.split(region);
    for row in 0..ph {
        let at = (y + row) * width + x;
        frame_y[at..at + pw].copy_from_slice(&part_y[(py + row) * planes.yw + px..][..pw]);
    }
    for (dst, src) in [(frame_u, part_u), (frame_v, part_v)] {
        for row in 0..pch {
            let at = (y / 2 + row) * cw + x / 2;
            let from = (py / 2 + row) * planes.cw + px / 2;
            dst[at..at + pcw].copy_from_slice(&src[from..][..pcw]);
        }
    }
    Ok(())
}

/// A rectangle of a frame, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

impl Rect {
    /// `w` x `h` at (0, 0).
    pub fn at_origin(w: u32, h: u32) -> Rect {
        Rect { x: 0, y: 0, w, h }
    }

    /// The smallest rectangle holding both.
    pub fn union(&self, other: &Rect) -> Rect {
        let (x, y) = (self.x.min(other.x), self.y.min(other.y));
        Rect {
            x,
            y,
            w: (self.x + self.w).max(other.x + other.w) - x,
            h: (self.y + self.h).max(other.y + other.h) - y,
        }
    }

    /// Where both are, if anywhere.
    pub fn intersect(&self, other: &Rect) -> Option<Rect> {
        let (x, y) = (self.x.max(other.x), self.y.max(other.y));
        let right = (self.x + self.w).min(other.x + other.w);
        let bottom = (self.y + self.h).min(other.y + other.h);
        (right > x && bottom > y).then(|| Rect {
            x,
            y,
            w: right - x,
            h: bottom - y,
        })
    }

    /// Whether `other` lies inside this rectangle.
    pub fn holds(&self, other: &Rect) -> bool {
        other.x >= self.x
            && other.y >= self.y
            && other.x + other.w <= self.x + self.w
            && other.y + other.h <= self.y + self.h
    }

    /// Checks that the rectangle can be cut from a `width` x `height` I420 frame as an I420
    /// image of its own: non-empty, inside the frame, on even coordinates and sizes (chroma
    /// samples are not split). The error says which.
    pub fn check_within(&self, width: u32, height: u32) -> Result<(), String> {
        let Rect { x, y, w, h } = *self;
        if w == 0 || h == 0 {
            return Err(format!("{w}x{h} is empty"));
        }
        if [x, y, w, h].iter().any(|v| v % 2 != 0) {
            return Err(format!(
                "({x}, {y}) {w}x{h}: x, y, width and height must be even"
            ));
        }
        let inside = x.checked_add(w).is_some_and(|r| r <= width)
            && y.checked_add(h).is_some_and(|b| b <= height);
        if !inside {
            return Err(format!(
                "({x}, {y}) {w}x{h} is not inside the {width}x{height} frame"
            ));
        }
        Ok(())
    }
}

/// The wire's form of a rectangle (`RenderRequest.frame_region`, `RenderedFrame.region`).
impl From<FaceRegion> for Rect {
    fn from(r: FaceRegion) -> Rect {
        Rect {
            x: r.x,
            y: r.y,
            w: r.width,
            h: r.height,
        }
    }
}

impl From<Rect> for FaceRegion {
    fn from(r: Rect) -> FaceRegion {
        FaceRegion {
            x: r.x,
            y: r.y,
            width: r.w,
            height: r.h,
        }
    }
}

/// `rect` ([`Rect::check_within`]) of a `width` x `height` I420 frame, into `out` as an I420
/// image of the rectangle's own size (replacing what it held).
pub fn crop(
    i420: &[u8],
    (width, height): (usize, usize),
    rect: Rect,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    rect.check_within(width as u32, height as u32)?;
    if i420.len() != len(width, height) {
        return Err(format!(
            "{} bytes of I420 for a {width}x{height} frame",
            i420.len()
        ));
    }
    let (x, y, w, h) = (
        rect.x as usize,
        rect.y as usize,
        rect.w as usize,
        rect.h as usize,
    );
    out.clear();
    out.reserve(len(w, h));
    for row in y..y + h {
        out.extend_from_slice(&i420[row * width + x..][..w]);
    }
    let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
    for plane in 0..2 {
        let base = width * height + plane * cw * ch;
        for row in y / 2..(y + h) / 2 {
            out.extend_from_slice(&i420[base + row * cw + x / 2..][..w / 2]);
        }
    }
    Ok(())
}

/// Puts `part`, the I420 image of `rect` ([`Rect::check_within`]), into a `width` x
/// `height` I420 frame: the inverse of [`crop`].
pub fn put(
    i420: &mut [u8],
    (width, height): (usize, usize),
    rect: Rect,
    part: &[u8],
) -> Result<(), String> {
    rect.check_within(width as u32, height as u32)?;
    put_planes(
        i420,
        (width, height),
        (rect.x as usize, rect.y as usize),
        part,
        &crate::planes::Planes::new(rect.w, rect.h),
    )
}

/// I420 back to packed RGB (chroma repeated over its block): for tests and tools.
pub fn to_rgb(i420: &[u8], width: usize, height: usize) -> Result<Vec<u8>, String> {
    if i420.len() != len(width, height) {
        return Err(format!(
            "{} bytes of I420 for a {width}x{height} frame (want {})",
            i420.len(),
            len(width, height)
        ));
    }
    let cw = width.div_ceil(2);
    let (y, chroma) = i420.split_at(width * height);
    let (u, v) = chroma.split_at(chroma.len() / 2);
    let mut out = Vec::with_capacity(width * height * 3);
    for row in 0..height {
        for col in 0..width {
            let c = (row / 2) * cw + col / 2;
            let yy = 298 * (y[row * width + col] as i32 - 16);
            let (d, e) = (u[c] as i32 - 128, v[c] as i32 - 128);
            let px = [
                (yy + 409 * e + 128) >> 8,
                (yy - 100 * d - 208 * e + 128) >> 8,
                (yy + 516 * d + 128) >> 8,
            ];
            out.extend(px.map(|p| p.clamp(0, 255) as u8));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_maps_to_the_rounded_limited_range() {
        for v in 0..=255u8 {
            let f = f64::from(v);
            let y = (16.0 + f * 219.0 / 255.0).round() as u8;
            let c = (128.0 + (f - 128.0) * 224.0 / 255.0).round() as u8;
            assert_eq!((luma_to_limited(v), chroma_to_limited(v)), (y, c), "{v}");
        }
    }

    #[test]
    fn a_cropped_rectangle_put_back_restores_the_frame_and_bad_rectangles_are_named() {
        let (w, h) = (10usize, 7usize);
        let frame: Vec<u8> = (0..len(w, h)).map(|i| (i * 7 % 251) as u8).collect();
        let rect = Rect {
            x: 2,
            y: 2,
            w: 6,
            h: 4,
        };
        let mut part = Vec::new();
        crop(&frame, (w, h), rect, &mut part).unwrap();
        assert_eq!(part.len(), len(6, 4));
        // Row 1 of the crop's luma is frame row 3 from column 2; its Cr plane's first sample
        // is the frame's Cr at (1, 1).
        assert_eq!(part[6..12], frame[3 * w + 2..3 * w + 8]);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        assert_eq!(part[24 + 6], frame[w * h + cw * ch + cw + 1]);
        let mut blank = vec![0u8; len(w, h)];
        put(&mut blank, (w, h), rect, &part).unwrap();
        let mut again = Vec::new();
        crop(&blank, (w, h), rect, &mut again).unwrap();
        assert_eq!(again, part);
        assert!(blank[..w].iter().all(|&v| v == 0), "outside the rectangle");
        for (bad, says) in [
            (Rect { x: 1, ..rect }, "even"),
            (Rect { w: 0, ..rect }, "empty"),
            (Rect { x: 6, ..rect }, "not inside"),
            (
                Rect {
                    y: u32::MAX - 1,
                    ..rect
                },
                "not inside",
            ),
        ] {
            let e = crop(&frame, (w, h), bad, &mut part).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        assert!(crop(&frame[1..], (w, h), rect, &mut part).is_err());
        assert!(put(&mut blank, (w, h), rect, &part[1..]).is_err());
    }

    #[test]
    fn black_white_and_grey_land_on_the_limited_range() {
        let mut out = Vec::new();
        for (value, want_y) in [(0u8, 16u8), (255, 235), (128, 126)] {
            from_rgb(&[value; 2 * 2 * 3], 2, 2, &mut out).unwrap();
            assert_eq!(
                out,
                [want_y, want_y, want_y, want_y, 128, 128],
                "rgb {value}"
            );
        }
        // Pure red: Cr at its top.
        from_rgb(&[255, 0, 0], 1, 1, &mut out).unwrap();
        assert_eq!(out, [82, 90, 240]);
    }

    #[test]
    fn odd_sizes_have_rounded_up_chroma_and_round_trip() {
        let (w, h) = (7, 5);
        // Smooth gradients, as video is at this scale (chroma is shared by 2 x 2 pixels).
        let rgb: Vec<u8> = (0..w * h)
            .flat_map(|i| [(i % w * 12) as u8, (40 + i / w * 15) as u8, 128])
            .collect();
        let mut i420 = Vec::new();
        from_rgb(&rgb, w, h, &mut i420).unwrap();
        assert_eq!(i420.len(), 7 * 5 + 2 * 4 * 3);
        let back = to_rgb(&i420, w, h).unwrap();
        let psnr = crate::testing::psnr(&rgb, &back);
        assert!(psnr > 32.0, "round trip PSNR {psnr:.1} dB");
        assert!(from_rgb(&rgb[1..], w, h, &mut i420).is_err());
        assert!(to_rgb(&i420[1..], w, h).is_err());
    }

    #[test]
    fn full_range_planes_rescale_and_regions_land_on_their_samples() {
        let (w, h) = (6usize, 4usize);
        let mut frame = vec![0u8; len(w, h)];
        frame[..w * h].fill(255);
        frame[w * h..].fill(128);
        full_to_limited(&mut frame, w, h);
        assert!(frame[..w * h].iter().all(|&v| v == 235));
        assert!(frame[w * h..].iter().all(|&v| v == 128));
        // A 3x2 region at (2, 2) (its planes padded to 4x2, as libjpeg lays them out): its
        // six luma samples and its two chroma samples of each plane.
        let planes = crate::planes::Planes::new(3, 2);
        let region = [[9u8, 9, 9, 0, 9, 9, 9, 0].as_slice(), &[7, 7], &[5, 5]].concat();
        put_planes(&mut frame, (w, h), (2, 2), &region, &planes).unwrap();
        let y: Vec<usize> = (0..w * h).filter(|&i| frame[i] == 9).collect();
        assert_eq!(y, [14, 15, 16, 20, 21, 22]);
        let (cb, cr) = (&frame[w * h..w * h + 6], &frame[w * h + 6..]);
        assert_eq!((&cb[4..6], &cr[4..6]), (&[7, 7][..], &[5, 5][..]));
        assert_eq!((cb[0], cr[0]), (128, 128), "elsewhere untouched");
        assert!(put_planes(&mut frame, (w, h), (1, 2), &region, &planes).is_err());
        assert!(put_planes(&mut frame, (w, h), (4, 2), &region, &planes).is_err());
        assert!(put_planes(&mut frame, (w, h), (2, 2), &region[1..], &planes).is_err());
    }
}

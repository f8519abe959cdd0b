//! Restart segments of a baseline JPEG, and splicing: a frame whose only change is its face is
//! its background's JPEG with the segments covering the face replaced by those of the face
//! region encoded on its own.
//!
//! A restart interval of R MCUs cuts the entropy-coded data into segments that each start with
//! fresh DC predictors and end byte-aligned, followed by an RSTn marker (n = index mod 8). With
//! the same quantisation, the standard Huffman tables and the same colour conversion and
//! downsampling (all local to an MCU), a segment's bytes depend only on its own MCUs' pixels.
//! So when a region is a rectangle of whole segments and is encoded as its own image with the
//! same parameters, its segments are byte for byte those a full encode of the frame would
//! write for that area, and the spliced file equals the full encode. Edges hold too: a region
//! touching the right or bottom edge has the frame's partial last MCU, padded the same way.
//!
//! When R divides the frame's width in MCUs, segments never straddle MCU rows and a region is
//! the face box widened to segment columns and MCU rows. Otherwise segments run across rows
//! and a region is a band of whole rows that starts and ends on a segment boundary: exact
//! still, and slower (the compositor picks an R that divides the width, [`restart_for`]).

use crate::encode::Subsampling;
use crate::manifest::FaceBox;
use std::ops::Range;

/// The MCU and segment grid of a frame encoded with a restart interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub width: u32,
    pub height: u32,
    mcu_w: u32,
    mcu_h: u32,
    /// MCUs per row and MCU rows.
    cols: u32,
    rows: u32,
    /// MCUs per restart interval.
    restart: u32,
}

/// A rectangle of whole segments: its pixels, and the frame segments it covers in the order
/// the region's own encode writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
    /// First frame segment, segments per region row, region rows of segments, and frame
    /// segments from one region row to the next.
    first: usize,
    per_row: usize,
    seg_rows: usize,
    stride: usize,
}

impl Region {
    /// Segments the region's own encode holds.
    pub fn segments(&self) -> usize {
        self.per_row * self.seg_rows
    }

    /// The frame segment of each of the region's segments, in order.
    pub fn frame_segments(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.seg_rows)
            .flat_map(move |r| (0..self.per_row).map(move |c| self.first + r * self.stride + c))
    }

    /// Whether `face` lies inside the region.
    pub fn holds(&self, face: &FaceBox) -> bool {
        face.x >= self.x
            && face.y >= self.y
            && face.x + face.w <= self.x + self.w
            && face.y + face.h <= self.y + self.h
    }

    /// Where the region lies in the frame.
    pub fn rect(&self) -> crate::raw_frame::Rect {
        crate::raw_frame::Rect {
            x: self.x,
            y: self.y,
            w: self.w,
            h: self.h,
        }
    }

    /// `face` in the region's own coordinates.
    pub fn local(&self, face: &FaceBox) -> FaceBox {
        FaceBox {
            x: face.x - self.x,
            y: face.y - self.y,
            w: face.w,
            h: face.h,
        }
    }
}

impl Grid {
    pub fn new(
        width: u32,
        height: u32,
        subsampling: Subsampling,
        restart: u16,
    ) -> Result<Grid, String> {
        if width == 0 || height == 0 || restart == 0 {
            return Err(format!(
                "no segment grid for a {width}x{height} frame with a restart interval of {restart}"
            ));
        }
        let (mcu_w, mcu_h) = subsampling.mcu();
        Ok(Grid {
            width,
            height,
            mcu_w,
            mcu_h,
            cols: width.div_ceil(mcu_w),
            rows: height.div_ceil(mcu_h),
            restart: restart as u32,
        })
    }

    /// Segments in the frame's encode.
    pub fn segments(&self) -> usize {
        (self.cols as usize * self.rows as usize).div_ceil(self.restart as usize)
    }

    /// The smallest region of whole segments that holds `face` (which must lie in the frame).
    pub fn region(&self, face: &FaceBox) -> Region {
        let (r, cols) = (self.restart, self.cols);
        let r0 = face.y / self.mcu_h;
        let r1 = (face.y + face.h)
            .div_ceil(self.mcu_h)
            .clamp(r0 + 1, self.rows);
        let pixel_rows = |a: u32, b: u32| (a * self.mcu_h, (b * self.mcu_h).min(self.height));
        if cols.is_multiple_of(r) {
            let c0 = face.x / self.mcu_w / r * r;
            let c1 = (face.x + face.w)
                .div_ceil(self.mcu_w)
                .div_ceil(r)
                .saturating_mul(r)
                .clamp(c0 + r, cols);
            let (y, y1) = pixel_rows(r0, r1);
            let x = c0 * self.mcu_w;
            let stride = (cols / r) as usize;
            return Region {
                x,
                y,
                w: (c1 * self.mcu_w).min(self.width) - x,
                h: y1 - y,
                first: r0 as usize * stride + (c0 / r) as usize,
                per_row: ((c1 - c0) / r) as usize,
                seg_rows: (r1 - r0) as usize,
                stride,
            };
        }
        // Segments straddle rows: whole rows, from a row that starts a segment to one that
        // ends one (or the frame's end).
        let starts_segment = |row: u32| (row as u64 * cols as u64).is_multiple_of(r as u64);
        let mut a = r0;
        while !starts_segment(a) {
            a -= 1;
        }
        let mut b = r1;
        while b < self.rows && !starts_segment(b) {
            b += 1;
        }
        let (y, y1) = pixel_rows(a, b);
        let first = (a as usize * cols as usize) / r as usize;
        let last = (b as usize * cols as usize).div_ceil(r as usize);
        Region {
            x: 0,
            y,
            w: self.width,
            h: y1 - y,
            first,
            per_row: last - first,
            seg_rows: 1,
            stride: 0,
        }
    }
}

/// The MCUs per restart interval framecast uses for a frame `width` pixels wide: the divisor of
/// its width in MCUs nearest 64 pixels of segment (4 MCUs at 4:2:0), so segments never
/// straddle rows; ties go to the longer segment (fewer markers).
pub fn restart_for(width: u32, subsampling: Subsampling) -> u16 {
    let mcu = subsampling.mcu().0;
    let cols = width.div_ceil(mcu).max(1);
    let target = (64 / mcu).max(1);
    let best = (1..=cols.min(u16::MAX as u32))
        .filter(|d| cols.is_multiple_of(*d))
        .min_by_key(|&d| (d.abs_diff(target), std::cmp::Reverse(d)))
        .unwrap_or(1);
    best as u16
}

/// Where the segments of one JPEG lie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// First byte of each segment's entropy-coded data; segment k ends two bytes before
    /// segment k+1 starts (its RST marker), the last at `end`.
    pub starts: Vec<u32>,
    /// Offset of the EOI marker.
    pub end: u32,
    /// Width and height from the frame header.
    pub size: (u32, u32),
}

impl Layout {
    /// Segment `k`'s entropy-coded bytes, without its marker.
    pub fn segment(&self, k: usize) -> Range<usize> {
        let end = match self.starts.get(k + 1) {
            Some(&next) => next as usize - 2,
            None => self.end as usize,
        };
        self.starts[k] as usize..end
    }

    /// Bytes this layout holds in memory.
    pub fn heap_bytes(&self) -> usize {
        self.starts.capacity() * std::mem::size_of::<u32>()
    }
}

/// Finds the segments of a baseline, single-scan JPEG with restart markers. Errors name what
/// is wrong: framecast writes these files itself, so an error means a corrupt or foreign one.
pub fn parse(jpeg: &[u8]) -> Result<Layout, String> {
    if jpeg.len() > u32::MAX as usize {
        return Err("JPEG larger than 4 GiB".into());
    }
    if !jpeg.starts_with(&[0xFF, 0xD8]) {
        return Err("not a JPEG (no SOI marker)".into());
    }
    let mut i = 2;
    let mut size = None;
    let data = loop {
        let (Some(&0xFF), Some(&marker)) = (jpeg.get(i), jpeg.get(i + 1)) else {
            return Err(format!("expected a marker at byte {i}"));
        };
        let len = match (jpeg.get(i + 2), jpeg.get(i + 3)) {
            (Some(&hi), Some(&lo)) => u16::from_be_bytes([hi, lo]) as usize,
            _ => return Err(format!("marker 0x{marker:02X} at byte {i} is cut short")),
        };
        match marker {
            0xC0 => {
                let field = |at: usize| jpeg.get(i + at).copied().unwrap_or(0) as u32;
                size = Some((field(7) << 8 | field(8), field(5) << 8 | field(6)));
                i += 2 + len;
            }
            0xC4 | 0xDB | 0xDD | 0xE0..=0xEF | 0xFE => i += 2 + len,
            0xDA => break i + 2 + len,
            0xC1..=0xCF => {
                return Err(format!(
                    "frame type 0x{marker:02X}: only baseline JPEG can be spliced"
                ))
            }
            _ => return Err(format!("unexpected marker 0x{marker:02X} at byte {i}")),
        }
    };
    let size = size.ok_or("no baseline frame header (SOF0) before the scan")?;
    if data > jpeg.len() {
        return Err("the scan header runs past the end".into());
    }
    let mut starts = vec![data as u32];
    let mut i = data;
    loop {
        let Some(at) = jpeg[i..].iter().position(|&b| b == 0xFF) else {
            return Err("no EOI marker".into());
        };
        i += at;
        match jpeg.get(i + 1) {
            Some(0x00) => i += 2,
            Some(0xFF) => i += 1,
            Some(&m @ 0xD0..=0xD7) => {
                let want = 0xD0 + ((starts.len() - 1) % 8) as u8;
                if m != want {
                    return Err(format!(
                        "restart marker RST{} at byte {i}; RST{} expected",
                        m - 0xD0,
                        want - 0xD0
                    ));
                }
                i += 2;
                starts.push(i as u32);
            }
            Some(0xD9) => {
                // Held for the life of an avatar: no spare capacity.
                starts.shrink_to_fit();
                return Ok(Layout {
                    starts,
                    end: i as u32,
                    size,
                });
            }
            Some(m) => {
                return Err(format!(
                    "unexpected marker 0x{m:02X} in the scan at byte {i}"
                ))
            }
            None => return Err("no EOI marker".into()),
        }
    }
}

/// Writes into `out` the background `bg` (laid out as `bg_layout`) with the segments of
/// `region` taken from `part`, the region's own encode (laid out as `part_layout`). Runs of
/// background segments are copied with their markers in one piece: the markers' numbers
/// depend only on position.
pub fn splice(
    bg: &[u8],
    bg_layout: &Layout,
    region: &Region,
    part: &[u8],
    part_layout: &Layout,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    if part_layout.starts.len() != region.segments() {
        return Err(format!(
            "the region's encode has {} segments; the region covers {}",
            part_layout.starts.len(),
            region.segments()
        ));
    }
    if region.first + region.segments() > bg_layout.starts.len() && region.segments() > 0 {
        return Err(format!(
            "the region's segments end past the background's {}",
            bg_layout.starts.len()
        ));
    }
    out.clear();
    out.reserve(bg.len() + part.len());
    let mut copied = 0;
    for (j, k) in region.frame_segments().enumerate() {
        let replaced = bg_layout.segment(k);
        out.extend_from_slice(&bg[copied..replaced.start]);
        out.extend_from_slice(&part[part_layout.segment(j)]);
        copied = replaced.end;
    }
    out.extend_from_slice(&bg[copied..]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::{encode_into, Params, Rgb};

    /// The next of a seeded xorshift sequence: the tests' random cases reproduce.
    fn next(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    fn noise(width: u32, height: u32, seed: u64) -> Vec<u8> {
        // Smooth gradients with noise: cheap, and exercises every coefficient.
        let mut x = seed | 1;
        (0..width * height)
            .flat_map(|i| {
                next(&mut x);
                let (px, py) = (i % width, i / width);
                let n = (x & 31) as u32;
                [
                    ((px * 255 / width.max(1)) + n) as u8,
                    ((py * 255 / height.max(1)) + n) as u8,
                    (x >> 8) as u8,
                ]
            })
            .collect()
    }

    fn encode(image: Rgb<'_>, params: Params) -> Vec<u8> {
        let mut out = Vec::new();
        encode_into(image, params, &mut out).unwrap();
        out
    }

    /// A small noisy frame at quality 80, 4:2:0, restart every `restart` MCUs.
    fn small(width: u32, height: u32, restart: u16) -> Vec<u8> {
        let frame = noise(width, height, 3);
        let params = Params {
            quality: 80,
            subsampling: Subsampling::S420,
            restart_mcus: restart,
        };
        encode(Rgb::packed(&frame, width, height), params)
    }

    /// One case: the spliced frame equals, byte for byte, the full encode of the composite,
    /// and decodes with a second decoder.
    fn check(width: u32, height: u32, params: Params, face: FaceBox, seed: u64) {
        let mut frame = noise(width, height, seed);
        let bg = encode(Rgb::packed(&frame, width, height), params);
        let bg_layout = parse(&bg).unwrap();
        let grid = Grid::new(width, height, params.subsampling, params.restart_mcus).unwrap();
        assert_eq!(bg_layout.starts.len(), grid.segments(), "{grid:?}");
        // The composite: the face box painted over.
        let patch = noise(face.w, face.h, seed.wrapping_mul(31));
        for y in 0..face.h {
            let row = ((face.y + y) * width + face.x) as usize * 3;
            let src = (y * face.w) as usize * 3;
            frame[row..row + face.w as usize * 3]
                .copy_from_slice(&patch[src..src + face.w as usize * 3]);
        }
        let full = encode(Rgb::packed(&frame, width, height), params);
        let region = grid.region(&face);
        assert!(region.holds(&face), "{region:?} does not hold {face:?}");
        let offset = (region.y * width + region.x) as usize * 3;
        let part = encode(
            Rgb {
                pixels: &frame[offset..],
                width: region.w,
                height: region.h,
                pitch: width as usize * 3,
            },
            params,
        );
        let mut out = Vec::new();
        splice(
            &bg,
            &bg_layout,
            &region,
            &part,
            &parse(&part).unwrap(),
            &mut out,
        )
        .unwrap();
        assert!(
            out == full,
            "spliced != full encode: {width}x{height} {params:?} {face:?} {region:?}"
        );
        let decoded = image::load_from_memory(&out).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (width, height));
    }

    /// 1,500 random cases (at least 1,000 of them keeping some background segments), seeded
    /// so a failure reproduces: frame sizes (most not multiples of
    /// 16), boxes anywhere (touching the edges too), restart intervals (many not dividing the
    /// width in MCUs), qualities, every subsampling.
    #[test]
    fn splicing_equals_a_full_encode() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = |n: u32| (next(&mut x) % n as u64) as u32;
        let all = [
            Subsampling::S420,
            Subsampling::S422,
            Subsampling::S444,
            Subsampling::Gray,
        ];
        let mut partial = 0;
        for _ in 0..1500 {
            let (width, height) = (1 + next(400), 1 + next(240));
            // Mostly small boxes, so that most cases replace only some segments.
            let (wmax, hmax) = (1 + next(width), 1 + next(height));
            let (w, h) = (1 + next(wmax), 1 + next(hmax));
            let face = FaceBox {
                x: next(width - w + 1),
                y: next(height - h + 1),
                w,
                h,
            };
            let params = Params {
                quality: 30 + next(71) as u8,
                subsampling: all[next(4) as usize],
                restart_mcus: 1 + next(8) as u16,
            };
            check(width, height, params, face, next(u32::MAX) as u64);
            let grid = Grid::new(width, height, params.subsampling, params.restart_mcus).unwrap();
            partial += usize::from(grid.region(&face).segments() < grid.segments());
        }
        assert!(
            partial >= 1000,
            "only {partial} cases kept some background segments"
        );
    }

    /// The production case: 720p and 1080p at 4:2:0 with framecast's restart interval, a
    /// 320-px face anywhere, at the corners included.
    #[test]
    fn framecast_sizes_splice_exactly() {
        for (width, height) in [(1280, 720), (1920, 1080), (1000, 562)] {
            let restart = restart_for(width, Subsampling::S420);
            let params = Params {
                quality: 85,
                subsampling: Subsampling::S420,
                restart_mcus: restart,
            };
            for (x, y) in [(0, 0), (width - 320, height - 320), (477, 131)] {
                let face = FaceBox {
                    x,
                    y,
                    w: 320,
                    h: 320,
                };
                check(width, height, params, face, (x * 7 + y) as u64);
            }
        }
    }

    #[test]
    fn restart_interval_divides_the_width_near_64_pixels() {
        assert_eq!(restart_for(1280, Subsampling::S420), 4); // 80 MCUs: 4 and 5 tie; 4 is nearer
        assert_eq!(restart_for(1920, Subsampling::S420), 4);
        assert_eq!(restart_for(1000, Subsampling::S420), 3); // 63 MCUs
        assert_eq!(restart_for(976, Subsampling::S420), 1); // 61 MCUs, a prime
        assert_eq!(restart_for(1280, Subsampling::S444), 8);
        for w in 1..2000 {
            let r = restart_for(w, Subsampling::S420) as u32;
            assert!(w.div_ceil(16).is_multiple_of(r));
        }
    }

    /// A damaged file (prepared files are read from disk) gets an error or a layout whose
    /// every segment lies inside the file, never a panic.
    #[test]
    fn parse_survives_damage() {
        let jpeg = small(64, 48, 1);
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..3000 {
            let mut bad = jpeg.clone();
            for _ in 0..1 + (x % 4) {
                next(&mut x);
                let at = (x % bad.len() as u64) as usize;
                bad[at] = (x >> 32) as u8;
            }
            let cut = (x >> 40) as usize % (bad.len() + 1);
            let bad = if x & 1 == 0 { &bad[..] } else { &bad[..cut] };
            if let Ok(layout) = parse(bad) {
                for k in 0..layout.starts.len() {
                    let r = layout.segment(k);
                    assert!(r.start <= r.end && r.end <= bad.len());
                }
            }
        }
    }

    #[test]
    fn parse_refuses_what_it_cannot_splice() {
        assert!(parse(b"GIF89a").unwrap_err().contains("no SOI"));
        let jpeg = small(64, 32, 2);
        let layout = parse(&jpeg).unwrap();
        assert_eq!(layout.starts.len(), 4);
        let cut = &jpeg[..jpeg.len() - 2];
        assert!(parse(cut).unwrap_err().contains("EOI"));
        // A restart marker out of order.
        let mut bad = jpeg.clone();
        let at = layout.starts[1] as usize - 1;
        bad[at] = 0xD3;
        assert!(
            parse(&bad).unwrap_err().contains("RST3"),
            "{:?}",
            parse(&bad)
        );
    }
}

//! H.264 bitstream surgery for sessions that share most of a frame.
//!
//! A talking avatar's frame is its background loop's frame with a face region put in. The
//! background is the same picture for every session of the avatar, so its encode can be
//! done once (the gateway's shared stream) and only the face region encoded per session.
//! H.264 lets one picture be made of slices from several encoders when each slice is
//! self-contained: intra prediction, motion vector prediction and CAVLC's coefficient
//! contexts never look across a slice boundary, and with `disable_deblocking_filter_idc` 2
//! neither does the loop filter.
//!
//! So a [`Layout`] cuts the frame into tiles around the face region (the bands above and
//! below it, the strips left and right of it, the region), each tile is encoded by an
//! encoder of its own, a slice per macroblock row where the tile is narrower than the frame,
//! and [`Mosaic`] assembles the tiles' slices into the frame's pictures: their slice data
//! copied bit for bit, their headers rewritten for the frame's parameter sets and picture.
//! [`Splicer`] then swaps a mosaic picture's region rows for a session's own.
//!
//! What slices do not isolate is motion compensation: a motion vector may point across a
//! tile's edge, where its encoder held a padded copy of its tile, not the neighbour's pixels.
//! The error stays near the edge, lasts until the next key frame, and is measured in this
//! crate's tests (luma PSNR of the decoded pictures against a whole-frame encode).

mod bits;
mod syntax;

pub use bits::{nal_units, push_unit};
pub use syntax::{Marking, Pps, SliceHeader, SliceType, Sps};

use bits::{escape_into, stop_bit, unescape};

/// Why a splice could not be made. Nothing is written on error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("H.264 stream ends inside a syntax element")]
    Truncated,
    #[error("malformed H.264: {0}")]
    Malformed(&'static str),
    #[error("H.264 field out of its range: {0}")]
    OutOfRange(&'static str),
    #[error("H.264 feature out of reach: {0}")]
    Unsupported(&'static str),
    #[error("{0}")]
    Mismatch(String),
}

/// OpenH264 encodes at most this many slices a picture (`MAX_SLICES_NUM_TMP`, the length of
/// `uiSliceMbNum`): a tile narrower than the frame has at most this many rows.
pub const MAX_SLICES: u32 = 35;
/// Macroblocks across or down, at most (an SPS's bound here: 65,536 pixels).
const MAX_FRAME_MBS: u32 = 1 << 12;
/// OpenH264 encodes a picture of this many macroblocks or fewer as one slice.
const MIN_SLICED_MBS: u32 = 48;

/// A rectangle of macroblocks: columns `x0..x1`, rows `y0..y1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MbRect {
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
}

impl MbRect {
    pub fn width(&self) -> u32 {
        self.x1 - self.x0
    }

    pub fn height(&self) -> u32 {
        self.y1 - self.y0
    }

    fn area(&self) -> u32 {
        self.width() * self.height()
    }

    /// Its pixels in a picture of `size` (width, height): the last macroblock row and column
    /// of a picture whose size is not a multiple of 16 end where the picture does.
    pub fn pixels_within(&self, size: (usize, usize)) -> (usize, usize, usize, usize) {
        let (x, y, w, h) = self.pixels();
        (
            x,
            y,
            w.min(size.0.saturating_sub(x)),
            h.min(size.1.saturating_sub(y)),
        )
    }

    /// Its pixels: (x, y, width, height).
    pub fn pixels(&self) -> (usize, usize, usize, usize) {
        (
            self.x0 as usize * 16,
            self.y0 as usize * 16,
            self.width() as usize * 16,
            self.height() as usize * 16,
        )
    }
}

/// A frame of `width_mbs` x `height_mbs` macroblocks with a face region that is encoded
/// apart from the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    pub width_mbs: u32,
    pub height_mbs: u32,
    pub region: MbRect,
}

/// How a tile's encoder cuts its pictures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileSlicing {
    /// A slice per macroblock row: the tile is narrower than the frame, so each of its rows
    /// is a run of the frame's raster order of its own.
    Rows,
    /// Any: the tile spans the frame's width. OpenH264 is asked for two slices, all but the
    /// last macroblock and that one ([`TileSlicing::slice_counts`]): a picture of one slice
    /// it deblocks across the picture's edges as it would across any slice's.
    Whole,
}

impl TileSlicing {
    /// OpenH264's `uiSliceMbNum` for a tile of `area` macroblocks (`SM_RASTER_SLICE`; a
    /// leading 0 asks for a slice per row).
    pub fn slice_counts(self, area: u32) -> Vec<u32> {
        match self {
            TileSlicing::Rows => vec![0],
            TileSlicing::Whole => vec![area - 1, 1],
        }
    }
}

impl Layout {
    /// The layout of a `width` x `height` frame whose pictures differ only inside the pixel
    /// rectangle `(x, y, w, h)`: the rectangle widened to whole macroblocks (they must lie
    /// inside the picture: the region's encoder sees whole macroblocks of pixels), and
    /// further where a strip beside it or the region itself would be too small for OpenH264
    /// to slice.
    pub fn around(
        width: u32,
        height: u32,
        (x, y, w, h): (u32, u32, u32, u32),
    ) -> Result<Layout, Error> {
        let (width_mbs, height_mbs) = (width.div_ceil(16), height.div_ceil(16));
        if width_mbs > MAX_FRAME_MBS || height_mbs > MAX_FRAME_MBS {
            return Err(Error::OutOfRange("frame size"));
        }
        if w == 0 || h == 0 {
            return Err(Error::Mismatch(format!("face region {w}x{h} is empty")));
        }
        let mut region = MbRect {
            x0: x / 16,
            y0: y / 16,
            x1: x.saturating_add(w).div_ceil(16),
            y1: y.saturating_add(h).div_ceil(16),
        };
        if region.x0 >= region.x1
            || region.y0 >= region.y1
            || u64::from(x) + u64::from(w) > u64::from(width)
            || u64::from(y) + u64::from(h) > u64::from(height)
        {
            return Err(Error::Mismatch(format!(
                "face region ({x}, {y}, {w}x{h}) is empty or leaves the {width}x{height} picture"
            )));
        }
        // A band or strip beside the region that OpenH264 would not slice, or not encode at
        // all (under 16 pixels: the last macroblock row or column of a frame whose size is
        // not a multiple of 16), joins the region.
        if region.y1 < height_mbs && height - region.y1 * 16 < 16 {
            region.y1 = height_mbs;
        }
        if region.x1 < width_mbs && width - region.x1 * 16 < 16 {
            region.x1 = width_mbs;
        }
        if region.y0 * width_mbs <= MIN_SLICED_MBS {
            region.y0 = 0;
        }
        if (height_mbs - region.y1) * width_mbs <= MIN_SLICED_MBS {
            region.y1 = height_mbs;
        }
        if region.x0 * region.height() <= MIN_SLICED_MBS {
            region.x0 = 0;
        }
        if (width_mbs - region.x1) * region.height() <= MIN_SLICED_MBS {
            region.x1 = width_mbs;
        }
        while region.area() <= MIN_SLICED_MBS && region.width() < width_mbs {
            if region.x1 < width_mbs {
                region.x1 += 1;
            } else {
                region.x0 -= 1;
            }
        }
        let layout = Layout::new(width_mbs, height_mbs, region)?;
        let size = (width as usize, height as usize);
        if let Some((t, _)) = layout.tiles().into_iter().find(|(t, _)| {
            let (_, _, w, h) = t.pixels_within(size);
            w < 16 || h < 16
        }) {
            return Err(Error::Mismatch(format!(
                "a tile {:?} under 16 pixels of the {width}x{height} picture",
                t.pixels_within(size)
            )));
        }
        Ok(layout)
    }

    /// A layout whose tiles OpenH264 can encode as [`Layout::tiles`] says.
    pub fn new(width_mbs: u32, height_mbs: u32, region: MbRect) -> Result<Layout, Error> {
        if width_mbs > MAX_FRAME_MBS || height_mbs > MAX_FRAME_MBS {
            return Err(Error::OutOfRange("frame size"));
        }
        if region.x0 >= region.x1
            || region.y0 >= region.y1
            || region.x1 > width_mbs
            || region.y1 > height_mbs
        {
            return Err(Error::Mismatch(format!(
                "region {region:?} is not inside a {width_mbs}x{height_mbs}-macroblock frame"
            )));
        }
        let layout = Layout {
            width_mbs,
            height_mbs,
            region,
        };
        for (tile, slicing) in layout.tiles() {
            if tile.area() <= MIN_SLICED_MBS
                || (slicing == TileSlicing::Rows && tile.height() > MAX_SLICES)
            {
                return Err(Error::Mismatch(format!(
                    "a tile of {}x{} macroblocks: OpenH264 slices only pictures above {MIN_SLICED_MBS} macroblocks, by rows up to {MAX_SLICES}",
                    tile.width(),
                    tile.height()
                )));
            }
        }
        Ok(layout)
    }

    /// How the region's own encoder slices it (as [`Layout::tiles`] says of the region).
    pub fn region_slicing(&self) -> TileSlicing {
        if self.region.width() == self.width_mbs {
            TileSlicing::Whole
        } else {
            TileSlicing::Rows
        }
    }

    /// The region in pixels: (x, y, width, height).
    pub fn region_pixels(&self) -> (usize, usize, usize, usize) {
        self.region.pixels()
    }

    /// The tiles, in raster order of their first macroblock, the region's first of its rows'
    /// (band above, strip left, region, strip right, band below; the empty ones left out),
    /// and how each is sliced.
    pub fn tiles(&self) -> Vec<(MbRect, TileSlicing)> {
        let (w, h, r) = (self.width_mbs, self.height_mbs, self.region);
        let rect = |x0, y0, x1, y1| MbRect { x0, y0, x1, y1 };
        let slicing = |t: MbRect| {
            if t.width() == w {
                TileSlicing::Whole
            } else {
                TileSlicing::Rows
            }
        };
        [
            rect(0, 0, w, r.y0),
            rect(0, r.y0, r.x0, r.y1),
            r,
            rect(r.x1, r.y0, w, r.y1),
            rect(0, r.y1, w, h),
        ]
        .into_iter()
        .filter(|t| t.x0 < t.x1 && t.y0 < t.y1)
        .map(|t| (t, slicing(t)))
        .collect()
    }

    /// Whether macroblock `mb` of the frame is in the region.
    fn in_region(&self, mb: u32) -> bool {
        let (x, y) = (mb % self.width_mbs, mb / self.width_mbs);
        (self.region.x0..self.region.x1).contains(&x)
            && (self.region.y0..self.region.y1).contains(&y)
    }
}

/// One parsed NAL unit.
struct Unit<'a> {
    raw: &'a [u8],
    rbsp: Vec<u8>,
}

/// RBSP bytes a slice header takes at most in practice (a few dozen with every option): where
/// only the header is read, only these are unescaped, not the slice's data.
const HEAD_BYTES: usize = 96;

impl<'a> Unit<'a> {
    fn new(raw: &'a [u8]) -> Unit<'a> {
        Unit {
            raw,
            rbsp: unescape(&raw[1..]),
        }
    }

    /// The unit with only the start of its RBSP, enough for a slice header (see
    /// [`TileSets::parse`] for the rare header that is longer).
    fn head(raw: &'a [u8]) -> Unit<'a> {
        Unit {
            raw,
            rbsp: unescape(&raw[1..raw.len().min(1 + HEAD_BYTES)]),
        }
    }

    fn kind(&self) -> u8 {
        self.raw[0] & 0x1f
    }
}

/// A tile's stream: the parameter sets it sent last.
#[derive(Default, Clone)]
struct TileSets {
    sps: Option<Sps>,
    pps: Option<Pps>,
}

/// A tile's slices of one picture: their headers, units and first macroblocks in the frame.
struct TileSlices<'a> {
    slices: Vec<(SliceHeader, Unit<'a>, u32)>,
    pps: Pps,
}

impl TileSets {
    /// Parses `au`, a picture of `rect`'s size: parameter sets kept, slices parsed against
    /// them, other units (SEI) returned as they are. With `headers_only` a slice's units
    /// hold the RBSP of its header, not of its data (a slice copied as it is needs no more).
    fn parse<'a>(
        &mut self,
        au: &'a [u8],
        rect: MbRect,
        what: &str,
        headers_only: bool,
    ) -> Result<FramePicture<'a>, Error> {
        let mut slices = Vec::new();
        let mut others = Vec::new();
        for raw in nal_units(au) {
            let slice = matches!(raw[0] & 0x1f, 1 | 5);
            let unit = if headers_only && slice {
                Unit::head(raw)
            } else {
                Unit::new(raw)
            };
            match unit.kind() {
                7 => self.sps = Some(Sps::parse(&unit.rbsp)?),
                8 => self.pps = Some(Pps::parse(&unit.rbsp)?),
                _ => {}
            }
            if !matches!(unit.kind(), 1 | 5) {
                push_unit(&mut others, unit.raw);
                continue;
            }
            let (Some(sps), Some(pps)) = (&self.sps, &self.pps) else {
                return Err(Error::Mismatch(format!(
                    "{what} slice before its parameter sets"
                )));
            };
            if (sps.width_mbs, sps.height_mbs) != (rect.width(), rect.height()) {
                return Err(Error::Mismatch(format!(
                    "{what} stream of {}x{} macroblocks; its picture is {}x{}",
                    sps.width_mbs,
                    sps.height_mbs,
                    rect.width(),
                    rect.height()
                )));
            }
            let (header, unit) = match SliceHeader::parse(unit.raw[0], &unit.rbsp, sps, pps) {
                // A header longer than HEAD_BYTES: read again from the whole unit.
                Err(Error::Truncated) if unit.raw.len() > 1 + HEAD_BYTES && headers_only => {
                    let unit = Unit::new(unit.raw);
                    (SliceHeader::parse(unit.raw[0], &unit.rbsp, sps, pps)?, unit)
                }
                parsed => (parsed?, unit),
            };
            slices.push((header, unit));
        }
        if slices.is_empty() {
            return Err(Error::Mismatch(format!("{what} picture without slices")));
        }
        Ok(FramePicture { slices, others })
    }

    /// Parses `au`, a picture of the tile `rect` of a `frame_width`-macroblock-wide frame,
    /// its slices placed in the frame.
    fn picture<'a>(
        &mut self,
        au: &'a [u8],
        rect: MbRect,
        frame_width: u32,
        what: &str,
    ) -> Result<TileSlices<'a>, Error> {
        let parsed = self.parse(au, rect, what, false)?;
        let mut slices = Vec::with_capacity(parsed.slices.len());
        for (header, unit) in parsed.slices {
            if !matches!(header.deblocking, Some((1 | 2, _, _))) {
                return Err(Error::Unsupported(
                    "slices deblocked across their edges (disable_deblocking_filter_idc 0)",
                ));
            }
            if header.first_mb >= rect.area() {
                return Err(Error::Malformed("first_mb_in_slice outside the picture"));
            }
            let (x, y) = (
                header.first_mb % rect.width(),
                header.first_mb / rect.width(),
            );
            let at = (rect.y0 + y) * frame_width + rect.x0 + x;
            slices.push((header, unit, at));
        }
        let pps = self
            .pps
            .clone()
            .ok_or_else(|| Error::Mismatch(format!("{what} picture without parameter sets")))?;
        // Narrower than the frame, a slice must stay in its row: the frame's raster order
        // runs on outside the tile.
        if rect.width() != frame_width {
            let mut firsts: Vec<u32> = slices.iter().map(|s| s.0.first_mb).collect();
            firsts.sort_unstable();
            let rows: Vec<u32> = (0..rect.height()).map(|r| r * rect.width()).collect();
            if firsts != rows {
                return Err(Error::Mismatch(format!(
                    "{what} picture's slices start at {firsts:?}; a slice a row expected"
                )));
            }
        }
        Ok(TileSlices { slices, pps })
    }
}

/// What every slice of a picture says alike.
#[derive(Clone, Copy)]
struct PictureId {
    nal_ref_idc: u8,
    idr: bool,
    frame_num: u32,
    idr_pic_id: u32,
    poc_lsb: u32,
}

/// A tile's slice in the frame's picture: its header rewritten, its slice data copied.
fn rewrite(
    out: &mut Vec<u8>,
    picture: &PictureId,
    marking: &Marking,
    (tile, unit, first_mb): (&SliceHeader, &Unit, u32),
    tile_pps: &Pps,
    (sps, pps): (&Sps, &Pps),
) -> Result<(), Error> {
    if tile.nal_ref_idc == 0 {
        // Its encoder's next picture predicts from the one before this; the frame's would
        // predict from this one.
        return Err(Error::Unsupported("a tile's non-reference picture"));
    }
    if picture.idr && tile.slice_type != SliceType::I {
        return Err(Error::Mismatch(
            "a key frame's tile must be intra (force its encoder to a key frame)".into(),
        ));
    }
    if tile_pps.chroma_qp_index_offset != pps.chroma_qp_index_offset
        || tile_pps.constrained_intra_pred != pps.constrained_intra_pred
        || !pps.deblocking_filter_control_present
    {
        return Err(Error::Unsupported(
            "tile and frame PPS differ in chroma_qp_index_offset, constrained_intra_pred or deblocking control",
        ));
    }
    let num_ref_idx_override = if tile.slice_type == SliceType::P {
        let refs = tile
            .num_ref_idx_override
            .unwrap_or(tile_pps.num_ref_idx_l0_default);
        // With one reference the default list is the picture before, in either stream; a
        // modification may only name that one (abs_diff_pic_num_minus1 0).
        if refs != 1 || tile.list_modification.iter().any(|&m| m != (0, 0)) {
            return Err(Error::Unsupported(
                "slices predicting from more than one picture",
            ));
        }
        (pps.num_ref_idx_l0_default != 1).then_some(1)
    } else {
        None
    };
    let header = SliceHeader {
        nal_ref_idc: picture.nal_ref_idc,
        idr: picture.idr,
        first_mb,
        slice_type: tile.slice_type,
        pps_id: pps.id,
        frame_num: picture.frame_num,
        idr_pic_id: picture.idr_pic_id,
        poc_lsb: picture.poc_lsb,
        num_ref_idx_override,
        list_modification: Vec::new(),
        marking: marking.clone(),
        qp_delta: tile_pps.pic_init_qp + tile.qp_delta - pps.pic_init_qp,
        deblocking: tile.deblocking,
        data_offset: 0,
    };
    let (nal, mut w) = header.write(sps, pps);
    let end = stop_bit(&unit.rbsp)?;
    if end < tile.data_offset {
        return Err(Error::Malformed(
            "a slice whose header runs past its stop bit",
        ));
    }
    w.copy(&unit.rbsp, tile.data_offset, end);
    out.extend_from_slice(&[0, 0, 0, 1, nal]);
    escape_into(&w.finish(), out);
    Ok(())
}

/// Assembles the tiles' pictures into the frame's, numbered as one stream of its own.
pub struct Mosaic {
    layout: Layout,
    /// The frame's SPS and PPS NAL units (Annex B), sent before each key frame.
    sets_nal: Vec<u8>,
    sps: Sps,
    pps: Pps,
    tiles: Vec<(MbRect, TileSets)>,
    /// Pictures since the last key frame.
    since_key: u32,
    idr_pic_id: u32,
}

impl Mosaic {
    /// For `layout`'s tiles, in [`Layout::tiles`] order; `parameter_sets` the frame's SPS and
    /// PPS (Annex B, as an encoder of the whole frame writes them, with deblocking control).
    pub fn new(layout: Layout, parameter_sets: &[u8]) -> Result<Mosaic, Error> {
        let (mut sps, mut pps, mut sets_nal) = (None, None, Vec::new());
        for unit in nal_units(parameter_sets).into_iter().map(Unit::new) {
            match unit.kind() {
                7 => sps = Some(Sps::parse(&unit.rbsp)?),
                8 => pps = Some(Pps::parse(&unit.rbsp)?),
                _ => continue,
            }
            push_unit(&mut sets_nal, unit.raw);
        }
        let (Some(sps), Some(pps)) = (sps, pps) else {
            return Err(Error::Mismatch("no SPS and PPS for the frame".into()));
        };
        if (sps.width_mbs, sps.height_mbs) != (layout.width_mbs, layout.height_mbs) {
            return Err(Error::Mismatch(format!(
                "frame SPS of {}x{} macroblocks; the layout's frame is {}x{}",
                sps.width_mbs, sps.height_mbs, layout.width_mbs, layout.height_mbs
            )));
        }
        Ok(Mosaic {
            tiles: layout
                .tiles()
                .into_iter()
                .map(|(t, _)| (t, TileSets::default()))
                .collect(),
            layout,
            sets_nal,
            sps,
            pps,
            since_key: 0,
            idr_pic_id: 0,
        })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The frame's SPS and PPS (Annex B), as every key frame carries them.
    pub fn parameter_sets(&self) -> &[u8] {
        &self.sets_nal
    }

    /// One frame from one picture of each tile (`aus` in [`Layout::tiles`] order): a key
    /// frame where every tile's picture is, else a P frame (a tile may still be intra).
    pub fn assemble(&mut self, aus: &[&[u8]]) -> Result<Vec<u8>, Error> {
        if aus.len() != self.tiles.len() {
            return Err(Error::Mismatch(format!(
                "{} tile pictures for {} tiles",
                aus.len(),
                self.tiles.len()
            )));
        }
        let width = self.layout.width_mbs;
        let mut pictures = Vec::with_capacity(aus.len());
        for (n, ((rect, sets), au)) in self.tiles.iter_mut().zip(aus).enumerate() {
            pictures.push(sets.picture(au, *rect, width, &format!("tile {n}"))?);
        }
        let idr = pictures.iter().all(|p| p.slices.iter().all(|s| s.0.idr));
        // Numbered here, kept only once the picture is made.
        let (since_key, idr_pic_id) = if idr {
            (0, (self.idr_pic_id + 1) & 0xffff)
        } else {
            (self.since_key.wrapping_add(1), self.idr_pic_id)
        };
        let picture = PictureId {
            nal_ref_idc: 3,
            idr,
            frame_num: since_key & ((1 << self.sps.log2_max_frame_num) - 1),
            idr_pic_id,
            poc_lsb: since_key.wrapping_mul(2) & ((1u32 << self.sps.log2_max_poc_lsb.max(1)) - 1),
        };
        let marking = if idr {
            Marking::Idr {
                no_output_of_prior_pics: false,
                long_term_reference: false,
            }
        } else {
            Marking::Adaptive(None)
        };
        let mut slices: Vec<_> = pictures
            .iter()
            .flat_map(|p| p.slices.iter().map(move |s| (s, &p.pps)))
            .collect();
        slices.sort_by_key(|((_, _, at), _)| *at);
        let mut out = Vec::with_capacity(
            aus.iter().map(|a| a.len() + 8).sum::<usize>() + self.sets_nal.len(),
        );
        if idr {
            out.extend_from_slice(&self.sets_nal);
        }
        for ((header, unit, at), tile_pps) in slices {
            rewrite(
                &mut out,
                &picture,
                &marking,
                (header, unit, *at),
                tile_pps,
                (&self.sps, &self.pps),
            )?;
        }
        self.since_key = since_key;
        self.idr_pic_id = idr_pic_id;
        Ok(out)
    }
}

/// Puts a session's own region into a [`Mosaic`]'s frames, one picture at a time.
pub struct Splicer {
    layout: Layout,
    frame: TileSets,
    region: TileSets,
}

impl Splicer {
    pub fn new(layout: Layout) -> Splicer {
        Splicer {
            layout,
            frame: TileSets::default(),
            region: TileSets::default(),
        }
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The frame stream's parameter sets (Annex B SPS and PPS), for frames that come without
    /// them (a session that joined the stream before it spliced).
    pub fn parameter_sets(&mut self, sets: &[u8]) -> Result<(), Error> {
        for unit in nal_units(sets).into_iter().map(Unit::new) {
            match unit.kind() {
                7 => self.frame.sps = Some(Sps::parse(&unit.rbsp)?),
                8 => self.frame.pps = Some(Pps::parse(&unit.rbsp)?),
                _ => {}
            }
        }
        Ok(())
    }

    /// `frame_au` (a picture of the mosaic of this layout) with its region's slices taken
    /// from `region_au` (a picture of the region's own encoder). Where `frame_au` is a key
    /// frame the region's picture must be intra. Nothing is kept of a failed splice.
    pub fn splice(&mut self, frame_au: &[u8], region_au: &[u8]) -> Result<Vec<u8>, Error> {
        let layout = self.layout;
        let whole = MbRect {
            x0: 0,
            y0: 0,
            x1: layout.width_mbs,
            y1: layout.height_mbs,
        };
        let mut frame_sets = self.frame.clone();
        let mut region_sets = self.region.clone();
        let frame = frame_sets.parse(frame_au, whole, "frame", true)?;
        let region = region_sets.picture(region_au, layout.region, layout.width_mbs, "region")?;
        let (Some(sps), Some(pps)) = (&frame_sets.sps, &frame_sets.pps) else {
            return Err(Error::Mismatch(
                "frame slice before its parameter sets".into(),
            ));
        };
        let Some(first) = frame.slices.first() else {
            return Err(Error::Mismatch("frame picture without slices".into()));
        };
        let picture = PictureId {
            nal_ref_idc: first.0.nal_ref_idc,
            idr: first.0.idr,
            frame_num: first.0.frame_num,
            idr_pic_id: first.0.idr_pic_id,
            poc_lsb: first.0.poc_lsb,
        };
        let marking = first.0.marking.clone();
        // The frame's region slices give way; each must start in the region and be a row of
        // it, as a mosaic of this layout makes them.
        let kept: Vec<_> = frame
            .slices
            .iter()
            .filter(|s| !layout.in_region(s.0.first_mb))
            .collect();
        if frame.slices.len() - kept.len() != region.slices.len() {
            return Err(Error::Mismatch(format!(
                "frame picture has {} slices in the region; the region's picture {}",
                frame.slices.len() - kept.len(),
                region.slices.len()
            )));
        }
        // In raster order of their first macroblocks, written straight into the picture.
        let mut placed: Vec<(u32, Option<&[u8]>, usize)> = kept
            .iter()
            .map(|s| (s.0.first_mb, Some(s.1.raw), 0))
            .chain((0..region.slices.len()).map(|i| (region.slices[i].2, None, i)))
            .collect();
        placed.sort_by_key(|p| p.0);
        let mut out = Vec::with_capacity(frame_au.len() + region_au.len());
        out.extend_from_slice(&frame.others);
        for (_, kept, i) in placed {
            match kept {
                Some(raw) => push_unit(&mut out, raw),
                None => {
                    let (header, unit, at) = &region.slices[i];
                    rewrite(
                        &mut out,
                        &picture,
                        &marking,
                        (header, unit, *at),
                        &region.pps,
                        (sps, pps),
                    )?;
                }
            }
        }
        self.frame = frame_sets;
        self.region = region_sets;
        Ok(out)
    }
}

/// A whole frame's picture: its slices (any) and its other NAL units (parameter sets, SEI),
/// kept as they are.
struct FramePicture<'a> {
    slices: Vec<(SliceHeader, Unit<'a>)>,
    others: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_widens_the_region_to_macroblocks_and_cuts_five_tiles() {
        let l = Layout::around(1280, 720, (384, 112, 448, 352)).unwrap();
        assert_eq!(
            l.region,
            MbRect {
                x0: 24,
                y0: 7,
                x1: 52,
                y1: 29
            }
        );
        let tiles: Vec<MbRect> = l.tiles().into_iter().map(|t| t.0).collect();
        assert_eq!(tiles.len(), 5);
        assert_eq!(tiles.iter().map(|t| t.area()).sum::<u32>(), 80 * 45);
        // An off-grid rectangle is widened outwards.
        let l = Layout::around(1280, 720, (390, 115, 100, 100)).unwrap();
        assert_eq!(
            (l.region.x0, l.region.y0, l.region.x1, l.region.y1),
            (24, 7, 31, 14)
        );
    }

    #[test]
    fn strips_too_small_to_slice_join_the_region() {
        // 2 macroblocks left of the region over 10 rows: 20, one slice for OpenH264.
        let l = Layout::around(640, 368, (32, 160, 200, 160)).unwrap();
        assert_eq!(l.region.x0, 0);
        assert!(l.tiles().iter().all(|(t, _)| t.area() > 48));
        // A band of one row above a narrow frame joins it too.
        let l = Layout::around(320, 192, (64, 16, 160, 96)).unwrap();
        assert_eq!(l.region.y0, 0);
    }

    #[test]
    fn layouts_out_of_reach_are_refused_in_words() {
        for (w, h, r) in [
            (1280, 720, (1200, 100, 200, 200)), // leaves the picture
            (1280, 720, (100, 100, 0, 50)),     // empty
            (1280, 1080, (400, 0, 400, 1000)),  // 63 rows: more slices than OpenH264 makes
            (64, 48, (0, 0, 64, 48)),           // 12 macroblocks: never sliced
            (u32::MAX, 720, (0, 0, 64, 64)),    // no H.264 frame that wide
        ] {
            let e = Layout::around(w, h, r).unwrap_err();
            assert!(!e.to_string().is_empty(), "{w}x{h} {r:?}");
        }
    }

    #[test]
    fn tiles_never_reach_past_a_picture_whose_size_is_not_a_multiple_of_16() {
        // 360 rows: the last macroblock row is 8 pixels; a region down to the picture's
        // edge takes it, ending where the picture does.
        let l = Layout::around(640, 360, (200, 100, 200, 260)).unwrap();
        assert_eq!(l.region.y1, 23);
        for (t, _) in l.tiles() {
            let (x, y, w, h) = t.pixels_within((640, 360));
            assert!(x + w <= 640 && y + h <= 360 && w >= 16 && h >= 16, "{t:?}");
        }
        // 1080 rows: a band of 8 pixels below the region joins it.
        let l = Layout::around(1920, 1080, (800, 600, 300, 470)).unwrap();
        assert_eq!(l.region.y1, 68);
    }

    /// A frame slice's header is read from its first HEAD_BYTES only; one that runs longer
    /// (64 memory management operations with large arguments) is read again whole, to the
    /// same header and data offset.
    #[test]
    fn a_slice_header_longer_than_the_head_is_read_from_the_whole_unit() {
        use openh264::encoder::Encoder;
        use openh264::formats::YUVSlices;
        let (w, h) = (64usize, 64usize);
        let grey = vec![128u8; w * h * 3 / 2];
        let mut enc = Encoder::new().unwrap();
        let first = enc
            .encode(&YUVSlices::new(
                (
                    &grey[..w * h],
                    &grey[w * h..w * h * 5 / 4],
                    &grey[w * h * 5 / 4..],
                ),
                (w, h),
                (w, w / 2, w / 2),
            ))
            .unwrap()
            .to_vec();
        let whole = MbRect {
            x0: 0,
            y0: 0,
            x1: 4,
            y1: 4,
        };
        let mut sets = TileSets::default();
        sets.parse(&first, whole, "test", false).unwrap();
        let (sps, pps) = (sets.sps.clone().unwrap(), sets.pps.clone().unwrap());
        let header = SliceHeader {
            nal_ref_idc: 3,
            idr: false,
            first_mb: 0,
            slice_type: SliceType::P,
            pps_id: pps.id,
            frame_num: 1,
            idr_pic_id: 0,
            poc_lsb: 2,
            num_ref_idx_override: None,
            list_modification: Vec::new(),
            marking: Marking::Adaptive(Some((0..64).map(|i| (1, vec![1_000_000 + i])).collect())),
            qp_delta: 0,
            deblocking: pps.deblocking_filter_control_present.then_some((2, 0, 0)),
            data_offset: 0,
        };
        let (nal, mut bits) = header.write(&sps, &pps);
        bits.bits(0xabcd, 16);
        let mut au = vec![0, 0, 0, 1, nal];
        escape_into(&bits.finish(), &mut au);
        assert!(
            au.len() > HEAD_BYTES + 5,
            "the header must outrun HEAD_BYTES"
        );
        let mut head_sets = sets.clone();
        let heads = head_sets.parse(&au, whole, "test", true).unwrap();
        let full = sets.parse(&au, whole, "test", false).unwrap();
        let (a, b) = (&heads.slices[0].0, &full.slices[0].0);
        assert_eq!(a, b);
        assert_eq!(a.marking, header.marking);
        assert_eq!(heads.slices[0].1.rbsp, full.slices[0].1.rbsp);
    }

    /// Where the header fits, a frame slice's unit holds only the head of its RBSP.
    #[test]
    fn a_short_header_is_read_from_the_head_alone() {
        let raw: Vec<u8> = std::iter::once(0x41)
            .chain((0..400).map(|i| (i % 200 + 1) as u8))
            .collect();
        assert_eq!(Unit::head(&raw).rbsp.len(), HEAD_BYTES);
        assert_eq!(Unit::new(&raw).rbsp.len(), 400);
    }

    #[test]
    fn a_whole_width_tile_asks_for_two_slices() {
        assert_eq!(TileSlicing::Whole.slice_counts(560), vec![559, 1]);
        assert_eq!(TileSlicing::Rows.slice_counts(560), vec![0]);
    }
}

//! The parameter sets and slice headers of the streams OpenH264 writes for WebRTC: constrained
//! baseline, frames only, one slice group, CAVLC. Anything else is refused with the field
//! that is out of reach, never guessed at.

use crate::bits::{BitReader, BitWriter};
use crate::Error;

/// `v` where the standard bounds it by `max`.
fn bounded(v: u32, max: u32, field: &'static str) -> Result<u32, Error> {
    if v > max {
        return Err(Error::OutOfRange(field));
    }
    Ok(v)
}

/// What a slice header's syntax depends on in a sequence parameter set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sps {
    pub id: u32,
    pub log2_max_frame_num: u32,
    pub poc_type: u32,
    pub log2_max_poc_lsb: u32,
    pub width_mbs: u32,
    pub height_mbs: u32,
}

impl Sps {
    /// From an SPS NAL unit's RBSP (the NAL header byte taken off).
    pub fn parse(rbsp: &[u8]) -> Result<Sps, Error> {
        let mut r = BitReader::new(rbsp);
        let profile = r.bits(8)?;
        r.bits(16)?; // constraint flags, level
        let id = r.ue()?;
        if [100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135].contains(&profile) {
            return Err(Error::Unsupported("a High-family profile"));
        }
        let log2_max_frame_num = bounded(r.ue()?, 12, "log2_max_frame_num_minus4")? + 4;
        let poc_type = r.ue()?;
        let mut log2_max_poc_lsb = 0;
        match poc_type {
            0 => log2_max_poc_lsb = bounded(r.ue()?, 12, "log2_max_pic_order_cnt_lsb_minus4")? + 4,
            2 => {}
            _ => return Err(Error::Unsupported("pic_order_cnt_type 1")),
        }
        r.ue()?; // max_num_ref_frames
        r.bit()?; // gaps_in_frame_num_value_allowed_flag
                  // Level 6.2's largest frame is 139,264 macroblocks.
        let width_mbs = bounded(r.ue()?, 1 << 12, "pic_width_in_mbs_minus1")? + 1;
        let height_mbs = bounded(r.ue()?, 1 << 12, "pic_height_in_map_units_minus1")? + 1;
        if !r.flag()? {
            return Err(Error::Unsupported("field coding (frame_mbs_only_flag 0)"));
        }
        Ok(Sps {
            id,
            log2_max_frame_num,
            poc_type,
            log2_max_poc_lsb,
            width_mbs,
            height_mbs,
        })
    }
}

/// What a slice's header and data depend on in a picture parameter set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pps {
    pub id: u32,
    pub sps_id: u32,
    pub num_ref_idx_l0_default: u32,
    pub pic_init_qp: i32,
    pub chroma_qp_index_offset: i32,
    pub deblocking_filter_control_present: bool,
    pub constrained_intra_pred: bool,
}

impl Pps {
    pub fn parse(rbsp: &[u8]) -> Result<Pps, Error> {
        let mut r = BitReader::new(rbsp);
        let id = r.ue()?;
        let sps_id = r.ue()?;
        if r.flag()? {
            return Err(Error::Unsupported("CABAC (entropy_coding_mode_flag 1)"));
        }
        if r.flag()? {
            return Err(Error::Unsupported(
                "bottom_field_pic_order_in_frame_present_flag",
            ));
        }
        if r.ue()? != 0 {
            return Err(Error::Unsupported("slice groups (FMO)"));
        }
        let num_ref_idx_l0_default =
            bounded(r.ue()?, 31, "num_ref_idx_l0_default_active_minus1")? + 1;
        r.ue()?; // l1
        if r.flag()? || r.bits(2)? != 0 {
            return Err(Error::Unsupported("weighted prediction"));
        }
        let pic_init_qp = 26 + r.se()?.clamp(-64, 64);
        r.se()?; // pic_init_qs
        let chroma_qp_index_offset = r.se()?.clamp(-64, 64);
        let deblocking_filter_control_present = r.flag()?;
        let constrained_intra_pred = r.flag()?;
        if r.flag()? {
            return Err(Error::Unsupported("redundant pictures"));
        }
        Ok(Pps {
            id,
            sps_id,
            num_ref_idx_l0_default,
            pic_init_qp,
            chroma_qp_index_offset,
            deblocking_filter_control_present,
            constrained_intra_pred,
        })
    }
}

/// Slice types, folded to 0..=4 (5..=9 say every slice of the picture has the type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceType {
    P,
    I,
}

/// dec_ref_pic_marking(): what a reference picture does to the decoder's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marking {
    /// A non-reference picture (nal_ref_idc 0) has none.
    None,
    Idr {
        no_output_of_prior_pics: bool,
        long_term_reference: bool,
    },
    /// Sliding window (no operations) or memory management operations, as (op, args).
    Adaptive(Option<Vec<(u32, Vec<u32>)>>),
}

/// A slice header, and where in its RBSP the slice data starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceHeader {
    pub nal_ref_idc: u8,
    pub idr: bool,
    pub first_mb: u32,
    pub slice_type: SliceType,
    pub pps_id: u32,
    pub frame_num: u32,
    pub idr_pic_id: u32,
    pub poc_lsb: u32,
    /// num_ref_idx_l0_active, where the header overrides the PPS's default.
    pub num_ref_idx_override: Option<u32>,
    /// ref_pic_list_modification() of list 0, as (modification_of_pic_nums_idc, value).
    pub list_modification: Vec<(u32, u32)>,
    pub marking: Marking,
    pub qp_delta: i32,
    /// (disable_deblocking_filter_idc, alpha offset / 2, beta offset / 2), where the PPS
    /// lets the header say.
    pub deblocking: Option<(u32, i32, i32)>,
    /// The bit of the RBSP at which slice_data() starts.
    pub data_offset: usize,
}

impl SliceHeader {
    /// From a coded slice NAL unit's first byte and RBSP, with the parameter sets it names.
    pub fn parse(nal_header: u8, rbsp: &[u8], sps: &Sps, pps: &Pps) -> Result<Self, Error> {
        let idr = nal_header & 0x1f == 5;
        let nal_ref_idc = (nal_header >> 5) & 3;
        let mut r = BitReader::new(rbsp);
        let first_mb = r.ue()?;
        let slice_type = match r.ue()? % 5 {
            0 => SliceType::P,
            2 => SliceType::I,
            _ => return Err(Error::Unsupported("B, SP or SI slices")),
        };
        let pps_id = r.ue()?;
        if pps_id != pps.id {
            return Err(Error::Malformed(
                "a slice naming another PPS than the one given",
            ));
        }
        let frame_num = r.bits(sps.log2_max_frame_num)?;
        let idr_pic_id = if idr { r.ue()? } else { 0 };
        let poc_lsb = if sps.poc_type == 0 {
            r.bits(sps.log2_max_poc_lsb)?
        } else {
            0
        };
        let mut num_ref_idx_override = None;
        let mut list_modification = Vec::new();
        if slice_type == SliceType::P {
            if r.flag()? {
                num_ref_idx_override =
                    Some(bounded(r.ue()?, 31, "num_ref_idx_l0_active_minus1")? + 1);
            }
            if r.flag()? {
                loop {
                    let idc = r.ue()?;
                    match idc {
                        3 => break,
                        0..=2 => list_modification.push((idc, r.ue()?)),
                        _ => return Err(Error::Malformed("modification_of_pic_nums_idc")),
                    }
                    if list_modification.len() > 32 {
                        return Err(Error::Malformed("more than 32 list modifications"));
                    }
                }
            }
        }
        let marking = if nal_ref_idc == 0 {
            Marking::None
        } else if idr {
            Marking::Idr {
                no_output_of_prior_pics: r.flag()?,
                long_term_reference: r.flag()?,
            }
        } else if r.flag()? {
            let mut ops = Vec::new();
            loop {
                let op = r.ue()?;
                let args = match op {
                    0 => break,
                    1 | 2 | 6 | 4 => vec![r.ue()?],
                    3 => vec![r.ue()?, r.ue()?],
                    5 => Vec::new(),
                    _ => return Err(Error::Malformed("memory_management_control_operation")),
                };
                ops.push((op, args));
                if ops.len() > 64 {
                    return Err(Error::Malformed(
                        "more than 64 memory management operations",
                    ));
                }
            }
            Marking::Adaptive(Some(ops))
        } else {
            Marking::Adaptive(None)
        };
        let qp_delta = r.se()?.clamp(-128, 128);
        let deblocking = if pps.deblocking_filter_control_present {
            let idc = r.ue()?;
            if idc > 2 {
                return Err(Error::Malformed("disable_deblocking_filter_idc above 2"));
            }
            let (alpha, beta) = if idc != 1 { (r.se()?, r.se()?) } else { (0, 0) };
            Some((idc, alpha, beta))
        } else {
            None
        };
        Ok(SliceHeader {
            nal_ref_idc,
            idr,
            first_mb,
            slice_type,
            pps_id,
            frame_num,
            idr_pic_id,
            poc_lsb,
            num_ref_idx_override,
            list_modification,
            marking,
            qp_delta,
            deblocking,
            data_offset: r.position(),
        })
    }

    /// The NAL header byte and the header's bits, as the given parameter sets read them.
    pub fn write(&self, sps: &Sps, pps: &Pps) -> (u8, BitWriter) {
        let mut w = BitWriter::default();
        w.ue(self.first_mb);
        w.ue(match self.slice_type {
            SliceType::P => 0,
            SliceType::I => 2,
        });
        w.ue(pps.id);
        w.bits(self.frame_num, sps.log2_max_frame_num);
        if self.idr {
            w.ue(self.idr_pic_id);
        }
        if sps.poc_type == 0 {
            w.bits(self.poc_lsb, sps.log2_max_poc_lsb);
        }
        if self.slice_type == SliceType::P {
            match self.num_ref_idx_override {
                Some(n) => {
                    w.flag(true);
                    w.ue(n - 1);
                }
                None => w.flag(false),
            }
            w.flag(!self.list_modification.is_empty());
            if !self.list_modification.is_empty() {
                for &(idc, value) in &self.list_modification {
                    w.ue(idc);
                    w.ue(value);
                }
                w.ue(3);
            }
        }
        match &self.marking {
            Marking::None => {}
            Marking::Idr {
                no_output_of_prior_pics,
                long_term_reference,
            } => {
                w.flag(*no_output_of_prior_pics);
                w.flag(*long_term_reference);
            }
            Marking::Adaptive(None) => w.flag(false),
            Marking::Adaptive(Some(ops)) => {
                w.flag(true);
                for (op, args) in ops {
                    w.ue(*op);
                    for &a in args {
                        w.ue(a);
                    }
                }
                w.ue(0);
            }
        }
        w.se(self.qp_delta);
        if let Some((idc, alpha, beta)) = self.deblocking {
            w.ue(idc);
            if idc != 1 {
                w.se(alpha);
                w.se(beta);
            }
        }
        let nal = (self.nal_ref_idc << 5) | if self.idr { 5 } else { 1 };
        (nal, w)
    }
}

//! Small NAL units of an access unit packed into STAP-A aggregation packets (RFC 6184 §5.7.1).
//!
//! A spliced frame is made of many slices: for the demo avatar 79 (a slice for each of the
//! face region's 25 macroblock rows and for each row of the strips left and right of it, two
//! for each band above and below), most of them a few dozen bytes. The RTP packetizer
//! (str0m's) sends each NAL unit in a packet of its own, so a frame of a few KB went out as
//! 79 packets, each one sealed (SRTP), sent (a system call) and received by the browser on
//! its own: the kernel was a quarter of the gateway's CPU. Packed into STAP-A units of at
//! most [`MAX_STAP_A_BYTES`], the same frame goes in a handful.
//!
//! The packetizer sends a NAL unit that fits its MTU as it is, so a STAP-A unit written into
//! the access unit's byte stream travels as one packet. It is safe to write there: its
//! length fields never form a start code (a length is never 0, and no NAL unit ends in a zero
//! byte), and everything else in it is NAL units already escaped. STAP-A is part of
//! packetization mode 1, which every browser's H.264 receiver implements; the caller packs
//! only for a payload type that negotiated mode 1.

use framecast_h264::{nal_units, push_unit};

/// The largest STAP-A unit made: under str0m's RTP payload budget (its default MTU of 1150
/// bytes less SRTP's tag), so the packetizer never has to fragment one (FU-A cannot carry a
/// STAP-A).
pub const MAX_STAP_A_BYTES: usize = 1000;

/// NAL unit type of a STAP-A.
const STAP_A: u8 = 24;

/// `au` (Annex B) with runs of its small slices packed into STAP-A units of at most `max`
/// bytes; every other NAL unit (parameter sets, which the packetizer keeps for itself, and
/// slices too large to share a packet) as it was, in the same order.
pub fn pack(au: &[u8], max: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(au.len() + 64);
    let mut run: Vec<&[u8]> = Vec::new();
    let mut run_bytes = 1;
    for unit in nal_units(au) {
        let kind = unit[0] & 0x1f;
        // Coded slices (1: non-IDR, 5: IDR) only.
        let packable = matches!(kind, 1 | 5) && 1 + 2 + unit.len() <= max;
        if packable && run_bytes + 2 + unit.len() <= max {
            run_bytes += 2 + unit.len();
            run.push(unit);
            continue;
        }
        flush(&mut out, &mut run);
        run_bytes = 1;
        if packable {
            run_bytes += 2 + unit.len();
            run.push(unit);
        } else {
            push_unit(&mut out, unit);
        }
    }
    flush(&mut out, &mut run);
    out
}

/// Writes `run` as one STAP-A unit (a single unit as itself) and empties it.
fn flush(out: &mut Vec<u8>, run: &mut Vec<&[u8]>) {
    match run.as_slice() {
        [] => {}
        [one] => push_unit(out, one),
        units => {
            out.extend_from_slice(&[0, 0, 0, 1]);
            // F is 0 (no unit is known broken), NRI the largest of the units' (RFC 6184).
            let nri = units.iter().map(|u| u[0] & 0x60).max().unwrap_or(0);
            out.push(nri | STAP_A);
            for u in units {
                out.extend_from_slice(&(u.len() as u16).to_be_bytes());
                out.extend_from_slice(u);
            }
        }
    }
    run.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annex_b(units: &[Vec<u8>]) -> Vec<u8> {
        units
            .iter()
            .flat_map(|u| [&[0u8, 0, 0, 1][..], u].concat())
            .collect()
    }

    /// The NAL units a receiver gets back: STAP-A units opened, the rest as they are.
    fn unpack(au: &[u8]) -> Vec<Vec<u8>> {
        let mut units = Vec::new();
        for u in nal_units(au) {
            if u[0] & 0x1f != STAP_A {
                units.push(u.to_vec());
                continue;
            }
            let mut at = 1;
            while at < u.len() {
                let n = u16::from_be_bytes([u[at], u[at + 1]]) as usize;
                units.push(u[at + 2..at + 2 + n].to_vec());
                at += 2 + n;
            }
            assert_eq!(at, u.len(), "a STAP-A unit ends at its last unit");
        }
        units
    }

    /// Parameter sets stay apart, small slices share units of at most `max` bytes, a large
    /// slice stays alone, and unpacking gives back every unit in order, byte for byte; no
    /// length field reads as a start code, even for lengths like 0x0100 or 0x0001.
    #[test]
    fn small_slices_share_units_and_come_back_whole() {
        let slice = |kind: u8, n: usize, fill: u8| {
            let mut u = vec![0x60 | kind];
            u.extend(std::iter::repeat_n(fill, n - 1));
            u
        };
        let units = vec![
            vec![0x67, 0x42, 0xc0, 0x1f], // SPS
            vec![0x68, 0xce, 0x3c, 0x80], // PPS
            slice(5, 1, 0),
            slice(5, 256, 0x80),
            slice(5, 40, 0x11),
            slice(1, 900, 0x22),
            slice(1, 3000, 0x33),
            vec![0x01, 0x9a, 0x01], // NRI 0
            slice(1, 30, 0x44),
            slice(1, 30, 0x55),
        ];
        let au = annex_b(&units);
        let packed = pack(&au, 1000);
        assert_eq!(unpack(&packed), units);
        let sizes: Vec<(u8, usize)> = nal_units(&packed)
            .iter()
            .map(|u| (u[0] & 0x1f, u.len()))
            .collect();
        assert_eq!(
            sizes,
            [
                (7, 4),
                (8, 4),
                (STAP_A, 1 + 3 + 258 + 42),
                (1, 900),
                (1, 3000),
                (STAP_A, 1 + 5 + 32 + 32),
            ]
        );
        assert!(sizes.iter().all(|&(k, n)| k != STAP_A || n <= 1000));
        // The largest NRI of the units packed.
        let last = nal_units(&packed)[5][0];
        assert_eq!(last & 0x60, 0x60);
    }

    /// An access unit of one large slice (a whole-frame encode) is left as it was.
    #[test]
    fn a_large_slice_alone_is_untouched() {
        let au = annex_b(&[vec![0x65; 5000]]);
        assert_eq!(pack(&au, 1000), au);
    }
}

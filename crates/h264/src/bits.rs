//! Bits of an H.264 RBSP: Annex B framing, emulation prevention, Exp-Golomb codes.

use crate::Error;

/// The NAL units of an Annex B byte stream (start codes of three or four bytes), without
/// their start codes.
pub fn nal_units(stream: &[u8]) -> Vec<&[u8]> {
    // Found with memchr's vector search: every access unit the gateway sends is scanned
    // two or three times (splice, STAP-A packing), and a byte-at-a-time scan was 2% of its CPU.
    let starts: Vec<usize> = memchr::memmem::find_iter(stream, &[0u8, 0, 1]).collect();
    let mut units = Vec::with_capacity(starts.len());
    for (n, &code) in starts.iter().enumerate() {
        let begin = code + 3;
        let mut end = starts.get(n + 1).copied().unwrap_or(stream.len());
        // A four-byte start code's leading zero (and trailing_zero_8bits) belong to no unit.
        while end > begin && stream[end - 1] == 0 {
            end -= 1;
        }
        if end > begin {
            units.push(&stream[begin..end]);
        }
    }
    units
}

/// Appends `unit` (a NAL unit, escaped) to `out` as Annex B: a four-byte start code, then
/// the unit; what [`nal_units`] reads back.
pub fn push_unit(out: &mut Vec<u8>, unit: &[u8]) {
    out.extend_from_slice(&[0, 0, 0, 1]);
    out.extend_from_slice(unit);
}

/// A NAL unit's payload with emulation prevention bytes (the 3 of 00 00 03) taken out.
pub fn unescape(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len());
    let mut zeros = 0;
    for &b in payload {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        out.push(b);
    }
    out
}

/// An RBSP with emulation prevention bytes put in, appended to `out`.
pub fn escape_into(rbsp: &[u8], out: &mut Vec<u8>) {
    let mut zeros = 0;
    for &b in rbsp {
        if zeros >= 2 && b <= 3 {
            out.push(3);
            zeros = 0;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        out.push(b);
    }
}

/// Reads bits most significant first.
pub struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> BitReader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        BitReader { data, pos: 0 }
    }

    /// Bits read so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn bit(&mut self) -> Result<u32, Error> {
        let byte = self.data.get(self.pos / 8).ok_or(Error::Truncated)?;
        let bit = (byte >> (7 - self.pos % 8)) & 1;
        self.pos += 1;
        Ok(u32::from(bit))
    }

    pub fn flag(&mut self) -> Result<bool, Error> {
        Ok(self.bit()? == 1)
    }

    pub fn bits(&mut self, n: u32) -> Result<u32, Error> {
        let mut v = 0;
        for _ in 0..n {
            v = (v << 1) | self.bit()?;
        }
        Ok(v)
    }

    /// ue(v).
    pub fn ue(&mut self) -> Result<u32, Error> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return Err(Error::Malformed("an Exp-Golomb code longer than 32 bits"));
            }
        }
        let rest = self.bits(zeros)?;
        Ok(((1u64 << zeros) - 1 + u64::from(rest)) as u32)
    }

    /// se(v).
    pub fn se(&mut self) -> Result<i32, Error> {
        let k = i64::from(self.ue()?);
        Ok(if k % 2 == 1 { (k + 1) / 2 } else { -(k / 2) } as i32)
    }
}

/// Writes bits most significant first.
#[derive(Default)]
pub struct BitWriter {
    out: Vec<u8>,
    cur: u8,
    used: u8,
}

impl BitWriter {
    pub fn bit(&mut self, b: u32) {
        self.cur = (self.cur << 1) | (b & 1) as u8;
        self.used += 1;
        if self.used == 8 {
            self.out.push(self.cur);
            self.cur = 0;
            self.used = 0;
        }
    }

    pub fn flag(&mut self, f: bool) {
        self.bit(u32::from(f));
    }

    pub fn bits(&mut self, v: u32, n: u32) {
        for i in (0..n).rev() {
            self.bit(v >> i);
        }
    }

    pub fn ue(&mut self, v: u32) {
        let x = u64::from(v) + 1;
        let len = 64 - x.leading_zeros();
        for _ in 0..len - 1 {
            self.bit(0);
        }
        for i in (0..len).rev() {
            self.bit((x >> i) as u32);
        }
    }

    pub fn se(&mut self, v: i32) {
        let k = if v > 0 {
            2 * i64::from(v) - 1
        } else {
            -2 * i64::from(v)
        };
        self.ue(k as u32);
    }

    /// Bits `from..to` of `data`, whole bytes at a time where this writer is aligned.
    pub fn copy(&mut self, data: &[u8], from: usize, to: usize) {
        let mut p = from;
        while p < to && !p.is_multiple_of(8) {
            self.bit(u32::from(data[p / 8] >> (7 - p % 8)));
            p += 1;
        }
        if self.used == 0 {
            let whole = (to - p) / 8;
            self.out.extend_from_slice(&data[p / 8..p / 8 + whole]);
            p += whole * 8;
        } else {
            let shift = self.used;
            while to - p >= 8 {
                let b = data[p / 8];
                self.out.push((self.cur << (8 - shift)) | (b >> shift));
                self.cur = b & ((1u8 << shift) - 1);
                p += 8;
            }
        }
        while p < to {
            self.bit(u32::from(data[p / 8] >> (7 - p % 8)));
            p += 1;
        }
    }

    /// rbsp_trailing_bits, and the RBSP.
    pub fn finish(mut self) -> Vec<u8> {
        self.bit(1);
        while self.used != 0 {
            self.bit(0);
        }
        self.out
    }
}

/// The position of an RBSP's stop bit (its last set bit): slice data ends there.
pub fn stop_bit(rbsp: &[u8]) -> Result<usize, Error> {
    let last = rbsp
        .iter()
        .rposition(|&b| b != 0)
        .ok_or(Error::Malformed("an RBSP with no stop bit"))?;
    Ok(last * 8 + 7 - rbsp[last].trailing_zeros() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_golomb_codes_round_trip() {
        let mut w = BitWriter::default();
        let values = [0u32, 1, 2, 3, 7, 8, 255, 65_535, u32::MAX - 1];
        for &v in &values {
            w.ue(v);
        }
        for v in [-5i32, 0, 5, -1, 1, 1 << 20, -(1 << 20)] {
            w.se(v);
        }
        w.bits(0b101, 3);
        let rbsp = w.finish();
        let mut r = BitReader::new(&rbsp);
        for &v in &values {
            assert_eq!(r.ue().unwrap(), v);
        }
        for v in [-5i32, 0, 5, -1, 1, 1 << 20, -(1 << 20)] {
            assert_eq!(r.se().unwrap(), v);
        }
        assert_eq!(r.bits(3).unwrap(), 0b101);
        assert_eq!(stop_bit(&rbsp).unwrap(), r.position());
    }

    #[test]
    fn copies_bits_at_any_offset() {
        let data: Vec<u8> = (0..40u32).map(|i| (i * 37 + 11) as u8).collect();
        for lead in 0..8 {
            for from in [0usize, 3, 8, 13] {
                let to = data.len() * 8 - 5;
                let mut w = BitWriter::default();
                w.bits(0x55, lead);
                w.copy(&data, from, to);
                let out = w.finish();
                let mut r = BitReader::new(&out);
                r.bits(lead).unwrap();
                let mut src = BitReader::new(&data);
                src.bits(from as u32).unwrap();
                for _ in from..to {
                    assert_eq!(r.bit().unwrap(), src.bit().unwrap());
                }
                assert_eq!(stop_bit(&out).unwrap(), r.position());
            }
        }
    }

    #[test]
    fn emulation_prevention_round_trips() {
        let rbsp = [0u8, 0, 0, 0, 0, 1, 0, 0, 2, 0, 0, 3, 0, 0, 4, 9, 0, 0];
        let mut escaped = Vec::new();
        escape_into(&rbsp, &mut escaped);
        assert!(!escaped
            .windows(3)
            .any(|w| w[0] == 0 && w[1] == 0 && w[2] <= 2));
        assert_eq!(unescape(&escaped), rbsp);
    }

    #[test]
    fn finds_units_between_start_codes() {
        let stream = [
            0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 4, 5,
        ];
        let units = nal_units(&stream);
        assert_eq!(units, vec![&[0x67, 1, 2][..], &[0x68, 3], &[0x65, 4, 5]]);
    }
}

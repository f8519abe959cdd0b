//! Raw PCM packets to samples: mono, little-endian, 16-bit integers or 32-bit floats.

/// How the samples of a packet are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleFormat {
    /// Signed 16-bit little-endian; full scale is ±32768.
    S16le,
    /// 32-bit IEEE float little-endian; full scale is ±1.0.
    F32le,
}

impl SampleFormat {
    pub fn bytes_per_sample(self) -> usize {
        match self {
            SampleFormat::S16le => 2,
            SampleFormat::F32le => 4,
        }
    }
}

/// Lowest and highest input rates accepted (telephony to studio).
pub const MIN_RATE: u32 = 8_000;
pub const MAX_RATE: u32 = 48_000;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PcmError {
    #[error("sample_rate {0} is out of range {MIN_RATE}..={MAX_RATE} Hz")]
    Rate(u32),
    #[error("{len} bytes is not a whole number of {format:?} samples ({} bytes each)", format.bytes_per_sample())]
    Partial { len: usize, format: SampleFormat },
    #[error("sample {index} is {value}: samples must be finite")]
    NotFinite { index: usize, value: f32 },
    #[error("sample {index} is {value}: float samples must lie within -1.0..=1.0 (full scale), allowing 2x headroom")]
    OutOfScale { index: usize, value: f32 },
}

/// Checks a rate against [`MIN_RATE`]..=[`MAX_RATE`].
pub fn check_rate(rate: u32) -> Result<(), PcmError> {
    if (MIN_RATE..=MAX_RATE).contains(&rate) {
        Ok(())
    } else {
        Err(PcmError::Rate(rate))
    }
}

/// Appends the samples of `bytes` to `out`, scaled to ±1.0. Nothing is appended when the
/// packet is refused, so a bad packet never leaves half its samples behind.
pub fn decode(format: SampleFormat, bytes: &[u8], out: &mut Vec<f32>) -> Result<(), PcmError> {
    let size = format.bytes_per_sample();
    if bytes.len() % size != 0 {
        return Err(PcmError::Partial {
            len: bytes.len(),
            format,
        });
    }
    let start = out.len();
    match format {
        SampleFormat::S16le => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0),
        ),
        SampleFormat::F32le => {
            for (index, b) in bytes.chunks_exact(4).enumerate() {
                let value = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                let problem = if !value.is_finite() {
                    Some(PcmError::NotFinite { index, value })
                } else if value.abs() > 2.0 {
                    Some(PcmError::OutOfScale { index, value })
                } else {
                    None
                };
                if let Some(e) = problem {
                    out.truncate(start);
                    return Err(e);
                }
                out.push(value);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s16_scales_to_full_scale_and_refuses_half_samples() {
        let mut out = Vec::new();
        let bytes: Vec<u8> = [i16::MIN, 0, 16384, i16::MAX]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        decode(SampleFormat::S16le, &bytes, &mut out).unwrap();
        assert_eq!(out, [-1.0, 0.0, 0.5, 32767.0 / 32768.0]);
        let e = decode(SampleFormat::S16le, &bytes[..3], &mut out).unwrap_err();
        assert!(matches!(e, PcmError::Partial { len: 3, .. }), "{e}");
        assert_eq!(out.len(), 4, "a refused packet left samples behind");
    }

    #[test]
    fn f32_refuses_nan_inf_and_absurd_values_without_a_partial_append() {
        let mut out = vec![0.25];
        for bad in [f32::NAN, f32::INFINITY, 1e9] {
            let bytes: Vec<u8> = [0.5f32, bad].iter().flat_map(|s| s.to_le_bytes()).collect();
            let e = decode(SampleFormat::F32le, &bytes, &mut out).unwrap_err();
            assert!(e.to_string().starts_with("sample 1 is"), "{e}");
            assert_eq!(out, [0.25]);
        }
        assert!(check_rate(7_999).is_err() && check_rate(48_001).is_err());
        assert!(check_rate(22_050).is_ok());
    }
}

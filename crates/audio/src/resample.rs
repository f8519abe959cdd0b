//! Any accepted input rate to 16 kHz, streaming: samples go in as packets of any size and come
//! out as soon as the resampler has a whole chunk.
//!
//! rubato's synchronous FFT resampler (a fixed-ratio band-limited resampler: the spectrum is
//! cut above the lower Nyquist frequency, so nothing aliases) works on chunks of 20-40 ms of
//! input; its delay is compensated, so output sample `k` is the input at time `k / 16000`.

use crate::SAMPLE_RATE;
use rubato::{FftFixedInOut, Resampler as _};

/// Input samples per resampler chunk: at least 20 ms, a whole number of the ratio's periods
/// (`rate / gcd(rate, 16000)` samples), and even. An odd FFT length puts the filter's centre
/// between two samples, and the output then lags by a fraction of a sample (measured: 12 %
/// error on a 440 Hz tone at 11025 Hz).
fn chunk_in(rate: u32) -> usize {
    let gcd = {
        let (mut a, mut b) = (rate as usize, SAMPLE_RATE as usize);
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let period = rate as usize / gcd;
    let mut chunks = (rate as usize / 50).div_ceil(period);
    if (chunks * period) % 2 == 1 {
        chunks += 1;
    }
    chunks * period
}

/// A stream of samples at `rate` resampled to 16 kHz.
pub struct Resampler {
    inner: Option<FftFixedInOut<f64>>,
    /// Input not yet resampled (less than one chunk).
    pending: Vec<f64>,
    /// Output samples still to drop: the resampler's delay.
    skip: usize,
    rate: u32,
    /// Input samples pushed so far.
    pushed: u64,
    /// Output samples produced so far.
    produced: u64,
    out_chunk: Vec<Vec<f64>>,
}

impl Resampler {
    /// A resampler from `rate` (checked by [`crate::pcm::check_rate`]) to 16 kHz.
    pub fn new(rate: u32) -> Result<Self, crate::PcmError> {
        crate::pcm::check_rate(rate)?;
        let inner = if rate == SAMPLE_RATE {
            None
        } else {
            Some(
                FftFixedInOut::new(rate as usize, SAMPLE_RATE as usize, chunk_in(rate), 1)
                    .map_err(|_| crate::PcmError::Rate(rate))?,
            )
        };
        let skip = inner.as_ref().map_or(0, |r| r.output_delay());
        let out_chunk = vec![vec![
            0.0;
            inner.as_ref().map_or(0, |r| r.output_frames_max())
        ]];
        Ok(Resampler {
            inner,
            pending: Vec::new(),
            skip,
            rate,
            pushed: 0,
            produced: 0,
            out_chunk,
        })
    }

    /// Resamples `input`, appending every output sample now complete to `out`.
    pub fn push(&mut self, input: &[f32], out: &mut Vec<f32>) {
        self.pushed += input.len() as u64;
        let Some(inner) = &mut self.inner else {
            out.extend_from_slice(input);
            self.produced += input.len() as u64;
            return;
        };
        self.pending.extend(input.iter().map(|&s| s as f64));
        let chunk = inner.input_frames_next();
        let mut used = 0;
        while self.pending.len() - used >= chunk {
            let (_, n) = inner
                .process_into_buffer(
                    &[&self.pending[used..used + chunk]],
                    &mut self.out_chunk,
                    None,
                )
                .expect("buffers sized by the resampler");
            used += chunk;
            Self::emit(
                &self.out_chunk[0][..n],
                &mut self.skip,
                &mut self.produced,
                out,
            );
        }
        self.pending.drain(..used);
    }

    /// Ends the stream: the rest of the input is resampled (its tail padded with silence) and
    /// the output cut to the input's duration, `round(n * 16000 / rate)` samples in all.
    pub fn finish(&mut self, out: &mut Vec<f32>) {
        let want = (self.pushed * SAMPLE_RATE as u64 + self.rate as u64 / 2) / self.rate as u64;
        if let Some(inner) = &mut self.inner {
            let chunk = inner.input_frames_next();
            // Silence enough to push the last real sample through the delay.
            while self.produced < want {
                self.pending.resize(chunk, 0.0);
                let (_, n) = inner
                    .process_into_buffer(&[&self.pending[..]], &mut self.out_chunk, None)
                    .expect("buffers sized by the resampler");
                self.pending.clear();
                let room = (want - self.produced) as usize;
                let n = n.min(room + self.skip);
                Self::emit(
                    &self.out_chunk[0][..n],
                    &mut self.skip,
                    &mut self.produced,
                    out,
                );
            }
        }
    }

    fn emit(chunk: &[f64], skip: &mut usize, produced: &mut u64, out: &mut Vec<f32>) {
        let drop = (*skip).min(chunk.len());
        *skip -= drop;
        out.extend(chunk[drop..].iter().map(|&s| s as f32));
        *produced += (chunk.len() - drop) as u64;
    }

    /// Output samples produced so far.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    /// Drops the input held and not yet resampled (an interrupt) and starts afresh; returns
    /// how many output samples that input stood for, for the caller to put silence in their
    /// place (so the stream's clock is unchanged: what follows is aligned as before).
    pub fn drop_pending(&mut self) -> usize {
        let owed = (self.pushed * SAMPLE_RATE as u64 / self.rate as u64)
            .saturating_sub(self.produced) as usize;
        if let Ok(fresh) = Resampler::new(self.rate) {
            *self = fresh;
        }
        owed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(rate: u32, hz: f64, seconds: f64) -> Vec<f32> {
        let n = (rate as f64 * seconds) as usize;
        (0..n)
            .map(|i| {
                (0.5 * (2.0 * std::f64::consts::PI * hz * i as f64 / rate as f64).sin()) as f32
            })
            .collect()
    }

    /// A 440 Hz tone at every common rate comes out at 16 kHz as the same tone, in time,
    /// whatever the packet sizes.
    #[test]
    fn a_tone_survives_resampling_in_time_and_in_any_packet_sizes() {
        for rate in [
            8_000, 11_025, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000,
        ] {
            let input = sine(rate, 440.0, 1.0);
            let mut r = Resampler::new(rate).unwrap();
            let mut out = Vec::new();
            let mut sizes = [1usize, 7, 160, 3000, 33].iter().cycle();
            let mut at = 0;
            while at < input.len() {
                let n = (*sizes.next().unwrap()).min(input.len() - at);
                r.push(&input[at..at + n], &mut out);
                at += n;
            }
            r.finish(&mut out);
            assert_eq!(out.len(), 16_000, "rate {rate}");
            let want = sine(16_000, 440.0, 1.0);
            // Away from the edges (where the filter sees the stream start and end).
            let err = out[800..15_200]
                .iter()
                .zip(&want[800..15_200])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            // Off by one sample would be 0.086 here.
            assert!(err < 1e-3, "rate {rate}: max error {err}");
        }
    }

    /// Content above 8 kHz is removed, not folded back into the band.
    #[test]
    fn tones_above_the_new_nyquist_do_not_alias() {
        let input = sine(48_000, 12_000.0, 1.0);
        let mut r = Resampler::new(48_000).unwrap();
        let mut out = Vec::new();
        r.push(&input, &mut out);
        r.finish(&mut out);
        let rms = (out[800..15_200].iter().map(|s| s * s).sum::<f32>() / 14_400.0).sqrt();
        assert!(rms < 0.01, "aliased energy {rms}");
    }
}

//! The log-mel spectrogram of the Wav2Lip recipe (also SyncTalk_2D's), computed as audio
//! arrives.
//!
//! On 16 kHz samples: pre-emphasis `y[n] = x[n] - 0.97 x[n-1]`; a centred STFT (n_fft 800,
//! hop 200, periodic Hann window of 800, the signal reflect-padded by 400 at both ends as
//! librosa's `center=True, pad_mode="reflect"`); magnitudes; 80 Slaney mel bands over
//! 55-7600 Hz with Slaney normalisation (librosa's default filters); `20 log10(max(1e-5, m))
//! - 20` dB; scaled to [-4, 4] with a -100 dB floor. 80 frames a second; frame `t` is centred
//! on sample `200 t`. Everything is computed in f64 and rounded to f32 at the end.

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};
use std::sync::{Arc, OnceLock};

pub const N_FFT: usize = 800;
pub const HOP: usize = 200;
pub const N_MELS: usize = 80;
pub const FMIN: f64 = 55.0;
pub const FMAX: f64 = 7600.0;
pub const PREEMPHASIS: f64 = 0.97;
/// Mel frames per second of audio.
pub const MEL_FPS: u32 = crate::SAMPLE_RATE / HOP as u32;
/// Value of a mel band with no energy (the -100 dB floor).
pub const FLOOR: f32 = -4.0;

const HALF: usize = N_FFT / 2;
const BINS: usize = N_FFT / 2 + 1;

/// One mel frame: 80 bands, each in [-4, 4].
pub type MelFrame = [f32; N_MELS];

/// The mel filter bank: per band, its first non-zero FFT bin and its weights from there.
struct Filters {
    bands: Vec<(usize, Vec<f64>)>,
    window: Vec<f64>,
}

/// librosa's Slaney mel scale: linear below 1 kHz, logarithmic above.
fn hz_to_mel(hz: f64) -> f64 {
    let (f_sp, min_log_hz, min_log_mel, logstep) = slaney();
    if hz >= min_log_hz {
        min_log_mel + (hz / min_log_hz).ln() / logstep
    } else {
        hz / f_sp
    }
}

fn mel_to_hz(mel: f64) -> f64 {
    let (f_sp, min_log_hz, min_log_mel, logstep) = slaney();
    if mel >= min_log_mel {
        min_log_hz * (logstep * (mel - min_log_mel)).exp()
    } else {
        mel * f_sp
    }
}

fn slaney() -> (f64, f64, f64, f64) {
    let f_sp = 200.0 / 3.0;
    let min_log_hz = 1000.0;
    (f_sp, min_log_hz, min_log_hz / f_sp, 6.4f64.ln() / 27.0)
}

fn filters() -> &'static Filters {
    static FILTERS: OnceLock<Filters> = OnceLock::new();
    FILTERS.get_or_init(|| {
        let sr = crate::SAMPLE_RATE as f64;
        let fft_freqs: Vec<f64> = (0..BINS).map(|k| k as f64 * sr / N_FFT as f64).collect();
        let (lo, hi) = (hz_to_mel(FMIN), hz_to_mel(FMAX));
        let mel_f: Vec<f64> = (0..N_MELS + 2)
            .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (N_MELS + 1) as f64))
            .collect();
        let bands = (0..N_MELS)
            .map(|m| {
                let (left, center, right) = (mel_f[m], mel_f[m + 1], mel_f[m + 2]);
                // Slaney normalisation: each triangle has unit area.
                let norm = 2.0 / (right - left);
                let weights: Vec<(usize, f64)> = fft_freqs
                    .iter()
                    .enumerate()
                    .map(|(k, &f)| {
                        let lower = (f - left) / (center - left);
                        let upper = (right - f) / (right - center);
                        (k, lower.min(upper).max(0.0) * norm)
                    })
                    .filter(|&(_, w)| w > 0.0)
                    .collect();
                let first = weights.first().map_or(0, |&(k, _)| k);
                (first, weights.into_iter().map(|(_, w)| w).collect())
            })
            .collect();
        let window = (0..N_FFT)
            .map(|n| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / N_FFT as f64).cos())
            .collect();
        Filters { bands, window }
    })
}

/// Mel frames of a stream of 16 kHz samples, each emitted as soon as the samples it covers
/// have arrived (frame `t` needs samples up to `200 t + 399`); [`MelStream::finish`] emits
/// the tail, reflect-padded at the end as librosa pads it. Memory stays bounded however long
/// the stream runs: samples no future frame needs are dropped.
pub struct MelStream {
    /// Pre-emphasised samples; `samples[i]` is sample `base + i` of the stream.
    samples: Vec<f64>,
    base: usize,
    total: usize,
    /// The last raw sample, for the pre-emphasis of the next packet.
    prev: f64,
    next: usize,
    finished: bool,
    fft: Arc<dyn RealToComplex<f64>>,
    frame: Vec<f64>,
    spectrum: Vec<Complex<f64>>,
    scratch: Vec<Complex<f64>>,
    magnitude: Vec<f64>,
}

impl Default for MelStream {
    fn default() -> Self {
        MelStream::new()
    }
}

impl MelStream {
    pub fn new() -> Self {
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(N_FFT);
        MelStream {
            samples: Vec::new(),
            base: 0,
            total: 0,
            prev: 0.0,
            next: 0,
            finished: false,
            frame: fft.make_input_vec(),
            spectrum: fft.make_output_vec(),
            scratch: fft.make_scratch_vec(),
            magnitude: vec![0.0; BINS],
            fft,
        }
    }

    /// Mel frames emitted so far.
    pub fn frames(&self) -> usize {
        self.next
    }

    /// Samples pushed so far.
    pub fn samples(&self) -> usize {
        self.total
    }

    /// Silences the samples pushed and not yet in a mel frame (an interrupt): the frames
    /// they would have made come as silence; the stream's counts are unchanged.
    pub fn silence_pending(&mut self) {
        self.samples.iter_mut().for_each(|s| *s = 0.0);
        self.prev = 0.0;
    }

    /// Adds 16 kHz samples and appends every mel frame they complete to `out`.
    pub fn push(&mut self, input: &[f32], out: &mut Vec<MelFrame>) {
        debug_assert!(!self.finished, "push after finish");
        self.samples.reserve(input.len());
        for &x in input {
            let x = x as f64;
            self.samples.push(x - PREEMPHASIS * self.prev);
            self.prev = x;
        }
        self.total += input.len();
        // Frame t reads samples up to 200 t + 399, and the first two frames read sample 400
        // (reflected to the left of sample 0).
        while self.total >= (self.next * HOP + HALF).max(HALF + 1) {
            self.emit(self.total, false, out);
        }
        // Keep only what frame `next` onwards can read.
        let keep_from = (self.next * HOP).saturating_sub(HALF);
        if keep_from > self.base + 4 * N_FFT {
            self.samples.drain(..keep_from - self.base);
            self.base = keep_from;
        }
    }

    /// Ends the stream: appends the remaining frames, `1 + n / 200` in all for `n` samples
    /// (none for an empty stream), the last ones reading the signal reflected at its end.
    pub fn finish(&mut self, out: &mut Vec<MelFrame>) {
        if self.finished {
            return;
        }
        self.finished = true;
        if self.total == 0 {
            return;
        }
        let count = 1 + self.total / HOP;
        while self.next < count {
            self.emit(self.total, true, out);
        }
    }

    /// Computes frame `next` of a stream of `n` samples.
    fn emit(&mut self, n: usize, at_end: bool, out: &mut Vec<MelFrame>) {
        let f = filters();
        let start = (self.next * HOP) as i64 - HALF as i64;
        for (j, slot) in self.frame.iter_mut().enumerate() {
            let idx = reflect(start + j as i64, n, at_end);
            *slot = self.samples[idx - self.base] * f.window[j];
        }
        self.fft
            .process_with_scratch(&mut self.frame, &mut self.spectrum, &mut self.scratch)
            .expect("buffers made by the plan");
        for (m, c) in self.magnitude.iter_mut().zip(&self.spectrum) {
            // Not `norm()`: that is libm's hypot, overflow-safe and several times slower
            // (4% of a compositor's CPU); a spectrum's squares cannot overflow.
            *m = c.norm_sqr().sqrt();
        }
        let mut frame = [0f32; N_MELS];
        for (v, (first, weights)) in frame.iter_mut().zip(&f.bands) {
            let mel: f64 = weights
                .iter()
                .zip(&self.magnitude[*first..])
                .map(|(w, m)| w * m)
                .sum();
            let db = 20.0 * mel.max(1e-5).log10() - 20.0;
            *v = (8.0 * ((db + 100.0) / 100.0) - 4.0).clamp(-4.0, 4.0) as f32;
        }
        out.push(frame);
        self.next += 1;
    }
}

/// numpy's "reflect" padding of a signal of `n` samples: index -k reads sample k, index
/// n - 1 + k reads n - 1 - k (at the end only once the stream has ended).
fn reflect(i: i64, n: usize, at_end: bool) -> usize {
    if n == 1 {
        return 0;
    }
    let last = n as i64 - 1;
    let mut i = i;
    loop {
        if i < 0 {
            i = -i;
        } else if i > last && at_end {
            i = 2 * last - i;
        } else {
            return i as usize;
        }
    }
}

/// The whole spectrogram of `samples` (16 kHz), as librosa computes it.
pub fn spectrogram(samples: &[f32]) -> Vec<MelFrame> {
    let mut stream = MelStream::new();
    let mut out = Vec::with_capacity(1 + samples.len() / HOP);
    stream.push(samples, &mut out);
    stream.finish(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let env = (i as f32 / 1600.0).sin().abs();
                env * ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5)
            })
            .collect()
    }

    #[test]
    fn streaming_in_any_packet_sizes_equals_the_whole_spectrogram() {
        let input = noise(16_000 * 3 + 123, 7);
        let whole = spectrogram(&input);
        assert_eq!(whole.len(), 1 + input.len() / HOP);
        for sizes in [&[1usize, 13, 200][..], &[4000], &[321, 7, 999]] {
            let mut s = MelStream::new();
            let mut out = Vec::new();
            let mut at = 0;
            for &n in sizes.iter().cycle() {
                if at >= input.len() {
                    break;
                }
                let n = n.min(input.len() - at);
                s.push(&input[at..at + n], &mut out);
                // Never ahead of the audio: frame t needs samples up to 200 t + 399.
                assert!(out.len() * HOP <= (at + n).saturating_sub(HALF) + HOP);
                at += n;
            }
            s.finish(&mut out);
            assert!(out == whole, "packets {sizes:?} changed the spectrogram");
        }
    }

    #[test]
    fn silence_sits_at_the_floor_and_a_tone_lights_its_band() {
        let silence = spectrogram(&vec![0.0; 16_000]);
        assert!(silence.iter().flatten().all(|&v| v == FLOOR));
        let tone: Vec<f32> = (0..16_000)
            .map(|i| {
                (0.5 * (2.0 * std::f64::consts::PI * 1000.0 * i as f64 / 16_000.0).sin()) as f32
            })
            .collect();
        let mel = spectrogram(&tone);
        let mid = &mel[40];
        let loudest = (0..N_MELS)
            .max_by(|&a, &b| mid[a].total_cmp(&mid[b]))
            .unwrap();
        let band_hz = |m: usize| {
            let (lo, hi) = (hz_to_mel(FMIN), hz_to_mel(FMAX));
            mel_to_hz(lo + (hi - lo) * (m + 1) as f64 / (N_MELS + 1) as f64)
        };
        assert!(
            (band_hz(loudest) - 1000.0).abs() < 60.0,
            "band {loudest} at {} Hz",
            band_hz(loudest)
        );
        assert!(mid[loudest] > 0.0 && mid[0] < mid[loudest] - 2.0);
    }

    #[test]
    fn the_mel_scale_matches_librosa_at_known_points() {
        // librosa.hz_to_mel(htk=False): 1000 Hz is 15 mel, 55 Hz 0.825, 7600 Hz 44.4996.
        assert!((hz_to_mel(1000.0) - 15.0).abs() < 1e-12);
        assert!((hz_to_mel(55.0) - 0.825).abs() < 1e-12);
        assert!((hz_to_mel(7600.0) - 44.499_575_478_237_67).abs() < 1e-9);
        assert!((mel_to_hz(hz_to_mel(4321.0)) - 4321.0).abs() < 1e-9);
    }

    #[test]
    fn a_long_stream_keeps_bounded_memory() {
        let mut s = MelStream::new();
        let mut out = Vec::new();
        let packet = noise(320, 3);
        for _ in 0..5_000 {
            s.push(&packet, &mut out);
            out.clear();
        }
        assert!(
            s.samples.len() < 6 * N_FFT,
            "{} samples held",
            s.samples.len()
        );
    }
}

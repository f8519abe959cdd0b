//! The mel front end against librosa 0.11 (scripts/mel_reference.py, float64) on real speech
//! from espeak-ng, at two input rates: 22050 Hz (espeak-ng's own) and 44100 Hz (another
//! utterance, resampled by librosa). Both tools are installed by scripts/setup.sh.
//!
//! Two comparisons per utterance, printed with `--nocapture`:
//! - the mel front end alone: librosa and framecast on the same 16 kHz samples (those
//!   framecast's resampler produced). Target: max |difference| <= 1e-3.
//! - the resamplers: framecast's mel of its own 16 kHz samples against framecast's mel of
//!   librosa's (soxr_hq). Two good resamplers differ in their filters' transition bands
//!   and in ripple: measured max 2.3e-2, mean 8.8e-5 (22050 Hz); bounded at 0.1 and 1e-3.

use framecast_audio::{mel, Resampler};
use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> String {
    std::env::var("FRAMECAST_REFERENCE_PYTHON").expect(
        "FRAMECAST_REFERENCE_PYTHON is not set: run through `make test`, or eval \"$(scripts/setup.sh)\" first (it installs librosa and espeak-ng)",
    )
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/mel_reference.py")
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn reference(args: &[&Path], cmd: &str) {
    run(Command::new(python()).arg(script()).arg(cmd).args(args));
}

fn read_wav(path: &Path) -> (u32, Vec<f32>) {
    let mut r = hound::WavReader::open(path).unwrap();
    let spec = r.spec();
    assert_eq!((spec.channels, spec.bits_per_sample), (1, 16), "{spec:?}");
    let samples = r
        .samples::<i16>()
        .map(|s| s.unwrap() as f32 / 32768.0)
        .collect();
    (spec.sample_rate, samples)
}

fn write_f32(path: &Path, v: &[f32]) {
    let bytes: Vec<u8> = v.iter().flat_map(|s| s.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// (max, mean) absolute difference over every mel value.
fn diff(a: &[mel::MelFrame], b: &[f32]) -> (f32, f64) {
    let a: Vec<f32> = a.iter().flatten().copied().collect();
    assert_eq!(a.len(), b.len(), "frame counts differ");
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    let mean = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .sum::<f64>()
        / a.len() as f64;
    (max, mean)
}

#[test]
fn the_mel_front_end_matches_librosa_on_speech_at_two_rates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let a = dir.join("a.wav");
    run(Command::new("espeak-ng")
        .args(["-w"])
        .arg(&a)
        .arg("The quick brown fox jumps over the lazy dog, and talks about it."));
    let b_src = dir.join("b-22050.wav");
    run(Command::new("espeak-ng")
        .args(["-v", "en-us", "-s", "150", "-w"])
        .arg(&b_src)
        .arg("She sells sea shells by the sea shore, twelve times a day."));
    let b = dir.join("b.wav");
    reference(&[&b_src, Path::new("44100"), &b], "resample");

    for (wav, want_rate) in [(&a, 22_050), (&b, 44_100)] {
        let (rate, samples) = read_wav(wav);
        assert_eq!(rate, want_rate);
        let mut r = Resampler::new(rate).unwrap();
        let mut ours16 = Vec::new();
        r.push(&samples, &mut ours16);
        r.finish(&mut ours16);
        let s16 = dir.join("ours16.f32");
        write_f32(&s16, &ours16);
        let reference_mel = dir.join("ref.f32");
        reference(&[&s16, &reference_mel], "mel");
        let ours = mel::spectrogram(&ours16);
        // Speech, not silence: a comparison of two floors would prove nothing.
        let lit = ours.iter().flatten().filter(|&&v| v > -3.0).count();
        assert!(
            lit * 3 > ours.len() * mel::N_MELS,
            "only {lit} mel values above -3"
        );
        let (max, mean) = diff(&ours, &read_f32(&reference_mel));
        eprintln!(
            "{rate} Hz, {:.2} s, {} mel frames: mel vs librosa: max {max:.2e}, mean {mean:.2e}",
            samples.len() as f64 / rate as f64,
            ours.len()
        );
        assert!(max <= 1e-3, "{rate} Hz: max difference {max} > 1e-3");

        let l16 = dir.join("librosa16.f32");
        reference(&[wav, &l16], "load16");
        let theirs16 = read_f32(&l16);
        assert_eq!(theirs16.len(), ours16.len(), "16 kHz lengths differ");
        let theirs: Vec<f32> = mel::spectrogram(&theirs16).into_iter().flatten().collect();
        let (max, mean) = diff(&ours, &theirs);
        eprintln!("{rate} Hz: resampler (rubato) vs librosa's (soxr_hq), in mel: max {max:.2e}, mean {mean:.2e}");
        assert!(
            mean <= 1e-3 && max <= 0.1,
            "{rate} Hz: resamplers differ by {mean} on average, {max} at most"
        );
    }
}

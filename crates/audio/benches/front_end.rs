//! Cost of the speech front end per second of audio, on one core (the calling thread):
//! the mel spectrogram of 16 kHz samples, and 22050 Hz resampled to 16 kHz.
//!
//! `cargo bench -p framecast-audio --bench front_end`
//!
//! Target (issue 15): the mel front end at >= 200x real time, one second of audio in
//! <= 5 ms. The side-by-side pass at the end prints the medians and the real-time factor.

use criterion::Criterion;
use framecast_audio::{mel, Resampler};
use std::hint::black_box;
use std::time::Instant;

/// One second of speech-like audio: a voiced buzz with a syllable envelope, plus noise.
fn speechlike(rate: u32) -> Vec<f32> {
    let mut seed = 1u64;
    (0..rate)
        .map(|i| {
            let t = i as f64 / rate as f64;
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let noise = (seed >> 40) as f64 / (1u64 << 24) as f64 - 0.5;
            let env = (std::f64::consts::PI * 4.0 * t).sin().abs();
            let voiced: f64 = (1..12)
                .map(|h| (2.0 * std::f64::consts::PI * 120.0 * h as f64 * t).sin() / h as f64)
                .sum();
            (env * (0.3 * voiced + 0.05 * noise)) as f32
        })
        .collect()
}

fn resample(input: &[f32], rate: u32) -> Vec<f32> {
    let mut r = Resampler::new(rate).unwrap();
    let mut out = Vec::with_capacity(16_000);
    r.push(input, &mut out);
    r.finish(&mut out);
    out
}

fn main() {
    let s16 = speechlike(16_000);
    let s22 = speechlike(22_050);
    let mut c = Criterion::default().configure_from_args();
    c.bench_function("mel/1s", |b| b.iter(|| mel::spectrogram(black_box(&s16))));
    c.bench_function("resample_22050/1s", |b| {
        b.iter(|| resample(black_box(&s22), 22_050))
    });
    c.final_summary();

    // Side by side, interleaved, medians: one second of audio each.
    let mut mel_ms = Vec::new();
    let mut res_ms = Vec::new();
    for _ in 0..101 {
        let t = Instant::now();
        black_box(mel::spectrogram(&s16));
        mel_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        black_box(resample(&s22, 22_050));
        res_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (m, r) = (median(&mut mel_ms), median(&mut res_ms));
    println!(
        "median per second of audio: mel {m:.3} ms ({:.0}x real time), resample 22050->16000 {r:.3} ms ({:.0}x)",
        1e3 / m,
        1e3 / r
    );
}

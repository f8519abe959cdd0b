//! Helpers of the tests and benchmarks that judge pictures (this crate's, the end-to-end
//! tests', the gateway's codec bench).

/// Peak signal-to-noise ratio of `b` against `a`, in dB (8-bit samples).
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (255.0f64.powi(2) / mse.max(1e-9)).log10()
}

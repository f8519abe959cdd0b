//! The face model's tensor contract, in one place. Per frame the compositor sends a UINT8
//! `[6, S, S]` face input (the reference crop, then a copy with its lower half masked, each
//! planar RGB) and gets back a UINT8 `[3, S, S]` face (planar RGB); the batch dimension comes
//! first. Models state S and their tensor names in `ModelMetadata`.

/// Channels of the face input: reference RGB, then masked RGB.
pub const INPUT_CHANNELS: usize = 6;
/// Channels of the generated face: RGB.
pub const OUTPUT_CHANNELS: usize = 3;

/// Bytes of one frame's face input at crop size `s`.
pub fn input_bytes(s: usize) -> usize {
    INPUT_CHANNELS * s * s
}

/// Bytes of one generated face at crop size `s`.
pub fn output_bytes(s: usize) -> usize {
    OUTPUT_CHANNELS * s * s
}

/// The face input's shape for `n` frames at crop size `s`.
pub fn input_shape(n: usize, s: usize) -> Vec<i64> {
    vec![n as i64, INPUT_CHANNELS as i64, s as i64, s as i64]
}

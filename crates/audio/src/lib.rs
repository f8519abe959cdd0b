//! framecast-audio: speech in. PCM packets are decoded ([`pcm`]), resampled to 16 kHz
//! ([`resample`]) and turned into the 80-band log-mel spectrogram of the Wav2Lip recipe
//! ([`mel`]), incrementally, so a frame's features exist as soon as the audio they cover has
//! arrived. [`window`] maps video frames to mel windows.
//!
//! No libtorch and no async here: the compositor runs it on its stream tasks, the bench and
//! the tests call it directly.

#[doc(hidden)]
pub mod fuzzing;
pub mod mel;
pub mod pcm;
pub mod resample;
pub mod window;

pub use mel::{MelFrame, MelStream, N_MELS};
pub use pcm::{PcmError, SampleFormat};
pub use resample::Resampler;

/// The rate the mel front end works at.
pub const SAMPLE_RATE: u32 = 16_000;

//! Video frames to mel windows: video frame `f` at `fps` is driven by the 16 mel frames
//! starting at `floor(80 f / fps)` (200 ms of audio from the frame's own time on).

use crate::mel::{MelFrame, MEL_FPS};

/// Mel frames in one frame's window.
pub const WINDOW: usize = 16;

/// The first mel frame of video frame `frame`'s window.
pub fn start(frame: u64, fps: f64) -> usize {
    // The epsilon keeps exact products (80 * 5 / 25 = 16) from flooring to 15.999...
    (MEL_FPS as f64 * frame as f64 / fps + 1e-9).floor() as usize
}

/// Video frames covering `samples` of 16 kHz audio: `ceil(seconds * fps)`.
pub fn frames_for(samples: usize, fps: f64) -> u64 {
    (samples as f64 / crate::SAMPLE_RATE as f64 * fps - 1e-9)
        .ceil()
        .max(0.0) as u64
}

/// The window of video frame `frame` within `mel`, whose first entry is mel frame `base` of
/// the stream (a caller may have dropped the ones before), if `mel` already holds it. With
/// `ended` (no more audio will come), a window running past the end is the last 16 frames,
/// as Wav2Lip's inference takes it; frames missing (a spectrogram shorter than a window, or
/// dropped) read as silence.
pub fn window(
    mel: &[MelFrame],
    base: usize,
    frame: u64,
    fps: f64,
    ended: bool,
) -> Option<Vec<MelFrame>> {
    let count = base + mel.len();
    let s = start(frame, fps);
    let from = if s + WINDOW <= count {
        s
    } else if ended {
        count.saturating_sub(WINDOW)
    } else {
        return None;
    };
    let silence = [crate::mel::FLOOR; crate::N_MELS];
    Some(
        (from..from + WINDOW)
            .map(|t| {
                t.checked_sub(base)
                    .and_then(|i| mel.get(i))
                    .copied()
                    .unwrap_or(silence)
            })
            .collect(),
    )
}

/// Speech energy of a window in [0, 1]: the mean of its bands mapped from [-4, 2] (silence
/// to loud speech). Drives models that only open a mouth with loudness (`talking-demo`).
pub fn energy(window: &[MelFrame]) -> f32 {
    loudness(window.as_flattened())
}

/// [`energy`] of a window's values in any layout.
pub fn loudness(values: &[f32]) -> f32 {
    let mean = values.iter().sum::<f32>() / values.len().max(1) as f32;
    ((mean + 4.0) / 6.0).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_map_to_windows_as_the_recipe_says() {
        assert_eq!(start(0, 25.0), 0);
        assert_eq!(start(1, 25.0), 3); // 3.2
        assert_eq!(start(5, 25.0), 16);
        assert_eq!(start(1, 29.97), 2); // 2.669
        assert_eq!(frames_for(16_000, 25.0), 25);
        assert_eq!(frames_for(16_001, 25.0), 26);
        assert_eq!(frames_for(0, 25.0), 0);
        let mel = vec![[0.0; crate::N_MELS]; 20];
        assert!(window(&mel, 0, 1, 25.0, false).is_some()); // 3..19
        assert!(window(&mel, 0, 2, 25.0, false).is_none()); // 6..22: not yet
        assert_eq!(window(&mel, 0, 2, 25.0, true).unwrap().len(), WINDOW);
        // With the first 3 frames dropped, frame 1 (3..19) still reads them all.
        assert_eq!(
            window(&mel[3..], 3, 1, 25.0, false).unwrap(),
            mel[3..19].to_vec()
        );
        assert_eq!(energy(&[[crate::mel::FLOOR; crate::N_MELS]]), 0.0);
    }
}

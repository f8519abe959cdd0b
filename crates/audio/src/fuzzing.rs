//! Entry point for the `audio_chunks` fuzz target in `fuzz/` and for the regression test that
//! replays what it found: arbitrary packets of arbitrary PCM, in any format and at any rate,
//! are refused or turned into mel frames, never a panic, never a value outside [-4, 4].

use crate::mel::{MelStream, HOP};
use crate::{pcm, Resampler, SampleFormat};

/// `data`: a format byte, a rate (u16 x 8 Hz), then packets, each a length byte and its bytes.
pub fn audio_chunks(data: &[u8]) {
    let [f, r0, r1, rest @ ..] = data else {
        return;
    };
    let format = if f % 2 == 0 {
        SampleFormat::S16le
    } else {
        SampleFormat::F32le
    };
    let rate = u16::from_le_bytes([*r0, *r1]) as u32 * 8;
    let Ok(mut resampler) = Resampler::new(rate) else {
        assert!(pcm::check_rate(rate).is_err());
        return;
    };
    let mut mel = MelStream::new();
    let (mut samples, mut resampled, mut frames) = (Vec::new(), Vec::new(), Vec::new());
    let mut rest = rest;
    while let [len, tail @ ..] = rest {
        let n = (*len as usize * 4).min(tail.len());
        let (packet, next) = tail.split_at(n);
        rest = next;
        samples.clear();
        match pcm::decode(format, packet, &mut samples) {
            Ok(()) => assert_eq!(samples.len(), packet.len() / format.bytes_per_sample()),
            Err(_) => {
                assert!(samples.is_empty(), "a refused packet left samples");
                continue;
            }
        }
        resampled.clear();
        resampler.push(&samples, &mut resampled);
        mel.push(&resampled, &mut frames);
    }
    resampled.clear();
    resampler.finish(&mut resampled);
    mel.push(&resampled, &mut frames);
    mel.finish(&mut frames);
    let n = mel.samples();
    assert_eq!(frames.len(), if n == 0 { 0 } else { 1 + n / HOP });
    assert!(frames.iter().flatten().all(|v| (-4.0..=4.0).contains(v)));
}

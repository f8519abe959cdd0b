//! A minimal MJPEG AVI writer: every frame is a JPEG chunk, optionally followed by its share
//! of a PCM sound track, with an index so players can seek. Enough for any player (VLC,
//! ffplay, browsers via a converter) to show the demo with sound.

/// A mono 16-bit PCM track to interleave with the video.
pub struct Audio<'a> {
    pub rate: u32,
    pub samples: &'a [i16],
}

/// Builds an AVI holding `frames` (JPEG files) of `width` x `height` at `fps`, and `audio`
/// interleaved with them (after each frame, the samples of that frame's duration; the last
/// frame takes what remains), so players show it with sound.
pub fn mjpeg_avi(
    frames: &[Vec<u8>],
    width: u32,
    height: u32,
    fps: f64,
    audio: Option<Audio<'_>>,
) -> Vec<u8> {
    let scale = 1000u32;
    let rate = (fps * scale as f64).round() as u32;
    let n = frames.len() as u32;
    let max_frame = frames.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let us_per_frame = (1e6 / fps).round() as u32;
    // Audio samples that go after frame i: [cut(i), cut(i + 1)), the last frame to the end.
    let cut = |i: usize| -> usize {
        audio.as_ref().map_or(0, |a| {
            if i >= frames.len() {
                a.samples.len()
            } else {
                ((i as f64 * a.rate as f64 / fps).round() as usize).min(a.samples.len())
            }
        })
    };
    let max_audio = (0..frames.len())
        .map(|i| 2 * (cut(i + 1) - cut(i)))
        .max()
        .unwrap_or(0) as u32;
    let streams = if audio.is_some() { 2 } else { 1 };
    // AVIF_HASINDEX, and AVIF_ISINTERLEAVED with sound.
    let flags = if audio.is_some() { 0x110 } else { 0x10 };

    let mut avih = Vec::new();
    for v in [
        us_per_frame,
        max_frame.saturating_mul(fps.ceil() as u32),
        0,
        flags,
        n,
        0,
        streams,
        max_frame.max(max_audio),
        width,
        height,
        0,
        0,
        0,
        0,
    ] {
        avih.extend_from_slice(&v.to_le_bytes());
    }
    let mut strh = Vec::new();
    strh.extend_from_slice(b"vidsMJPG");
    for v in [0u32, 0, 0, scale, rate, 0, n, max_frame, u32::MAX, 0] {
        strh.extend_from_slice(&v.to_le_bytes());
    }
    for v in [0u16, 0, width as u16, height as u16] {
        strh.extend_from_slice(&v.to_le_bytes());
    }
    let mut strf = Vec::new();
    strf.extend_from_slice(&40u32.to_le_bytes());
    strf.extend_from_slice(&(width as i32).to_le_bytes());
    strf.extend_from_slice(&(height as i32).to_le_bytes());
    strf.extend_from_slice(&1u16.to_le_bytes());
    strf.extend_from_slice(&24u16.to_le_bytes());
    strf.extend_from_slice(b"MJPG");
    for v in [width * height * 3, 0, 0, 0, 0] {
        strf.extend_from_slice(&v.to_le_bytes());
    }
    let mut streams_list = list(
        b"strl",
        &[chunk(b"strh", &strh), chunk(b"strf", &strf)].concat(),
    );
    if let Some(a) = &audio {
        // One sample per block: scale 1, rate = samples per second, sample size 2 bytes.
        let mut strh = Vec::new();
        strh.extend_from_slice(b"auds");
        strh.extend_from_slice(&[0u8; 4]);
        for v in [
            0u32,
            0,
            0,
            1,
            a.rate,
            0,
            a.samples.len() as u32,
            max_audio,
            u32::MAX,
            2,
        ] {
            strh.extend_from_slice(&v.to_le_bytes());
        }
        strh.extend_from_slice(&[0u8; 8]);
        // WAVEFORMATEX: PCM, mono, 16-bit.
        let mut strf = Vec::new();
        strf.extend_from_slice(&1u16.to_le_bytes());
        strf.extend_from_slice(&1u16.to_le_bytes());
        strf.extend_from_slice(&a.rate.to_le_bytes());
        strf.extend_from_slice(&(a.rate * 2).to_le_bytes());
        strf.extend_from_slice(&2u16.to_le_bytes());
        strf.extend_from_slice(&16u16.to_le_bytes());
        strf.extend_from_slice(&0u16.to_le_bytes());
        streams_list.extend(list(
            b"strl",
            &[chunk(b"strh", &strh), chunk(b"strf", &strf)].concat(),
        ));
    }
    let hdrl = list(b"hdrl", &[chunk(b"avih", &avih), streams_list].concat());

    let mut movi = b"movi".to_vec();
    let mut idx1 = Vec::new();
    let mut put = |movi: &mut Vec<u8>, id: &[u8; 4], data: &[u8]| {
        // Offsets in idx1 count from the 'movi' fourcc.
        let offset = movi.len() as u32;
        movi.extend_from_slice(&chunk(id, data));
        idx1.extend_from_slice(id);
        for v in [0x10u32, offset, data.len() as u32] {
            idx1.extend_from_slice(&v.to_le_bytes());
        }
    };
    for (i, f) in frames.iter().enumerate() {
        put(&mut movi, b"00dc", f);
        if let Some(a) = &audio {
            let pcm: Vec<u8> = a.samples[cut(i)..cut(i + 1)]
                .iter()
                .flat_map(|s| s.to_le_bytes())
                .collect();
            put(&mut movi, b"01wb", &pcm);
        }
    }
    let movi = chunk(b"LIST", &movi);
    let body = [b"AVI ".to_vec(), hdrl, movi, chunk(b"idx1", &idx1)].concat();
    chunk(b"RIFF", &body)
}

fn chunk(id: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 9);
    out.extend_from_slice(id);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    if !data.len().is_multiple_of(2) {
        out.push(0);
    }
    out
}

fn list(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    chunk(b"LIST", &[kind.as_slice(), data].concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structure_is_consistent() {
        let frames = vec![
            vec![0xFF, 0xD8, 1, 0xFF, 0xD9],
            vec![0xFF, 0xD8, 0xFF, 0xD9],
        ];
        let avi = mjpeg_avi(&frames, 16, 8, 25.0, None);
        assert_eq!(&avi[0..4], b"RIFF");
        assert_eq!(
            u32::from_le_bytes(avi[4..8].try_into().unwrap()) as usize,
            avi.len() - 8
        );
        assert_eq!(&avi[8..12], b"AVI ");
        let movi = avi.windows(4).position(|w| w == b"movi").unwrap();
        let idx = avi.windows(4).position(|w| w == b"idx1").unwrap();
        // Each index entry points at a '00dc' chunk of the recorded size.
        for (k, f) in frames.iter().enumerate() {
            let e = idx + 8 + k * 16;
            let off = u32::from_le_bytes(avi[e + 8..e + 12].try_into().unwrap()) as usize;
            let len = u32::from_le_bytes(avi[e + 12..e + 16].try_into().unwrap()) as usize;
            assert_eq!(&avi[movi + off..movi + off + 4], b"00dc");
            assert_eq!(len, f.len());
            assert_eq!(&avi[movi + off + 8..movi + off + 8 + len], f.as_slice());
        }
    }

    /// With sound: two streams, each frame followed by its share of the samples, all of them
    /// indexed, none lost.
    #[test]
    fn audio_is_interleaved_frame_by_frame_and_indexed() {
        let frames = vec![vec![0xFF, 0xD8, 0xFF, 0xD9]; 3];
        let samples: Vec<i16> = (0..2000).map(|i| i as i16).collect();
        let audio = Audio {
            rate: 16_000,
            samples: &samples,
        };
        let avi = mjpeg_avi(&frames, 16, 8, 25.0, Some(audio));
        let u32_at = |at: usize| u32::from_le_bytes(avi[at..at + 4].try_into().unwrap());
        let avih = avi.windows(4).position(|w| w == b"avih").unwrap() + 8;
        assert_eq!(u32_at(avih + 24), 2, "streams");
        assert!(avi.windows(4).any(|w| w == b"auds"));
        let movi = avi.windows(4).position(|w| w == b"movi").unwrap();
        let idx = avi.windows(4).position(|w| w == b"idx1").unwrap();
        let entries = u32_at(idx + 4) as usize / 16;
        assert_eq!(entries, 6);
        let mut pcm = Vec::new();
        for k in 0..entries {
            let e = idx + 8 + k * 16;
            let id = &avi[e..e + 4];
            assert_eq!(id, if k % 2 == 0 { b"00dc" } else { b"01wb" });
            let (off, len) = (u32_at(e + 8) as usize, u32_at(e + 12) as usize);
            assert_eq!(&avi[movi + off..movi + off + 4], id);
            if k % 2 == 1 {
                // 640 samples a frame at 16 kHz and 25 fps; the last frame takes the rest.
                assert_eq!(len, if k == 5 { 2 * 720 } else { 2 * 640 });
                pcm.extend_from_slice(&avi[movi + off + 8..movi + off + 8 + len]);
            }
        }
        let back: Vec<i16> = pcm
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(back, samples);
    }
}

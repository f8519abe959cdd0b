//! A minimal MJPEG AVI writer: every frame is a JPEG chunk, with an index so players can seek.
//! Enough for any player (VLC, ffplay, browsers via a converter) to show the demo.

/// Builds an AVI holding `frames` (JPEG files) of `width` x `height` at `fps`.
pub fn mjpeg_avi(frames: &[Vec<u8>], width: u32, height: u32, fps: f64) -> Vec<u8> {
    let scale = 1000u32;
    let rate = (fps * scale as f64).round() as u32;
    let n = frames.len() as u32;
    let max_frame = frames.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let us_per_frame = (1e6 / fps).round() as u32;

    let mut avih = Vec::new();
    for v in [
        us_per_frame,
        max_frame.saturating_mul(fps.ceil() as u32),
        0,
        0x10,
        n,
        0,
        1,
        max_frame,
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
    let strl = list(
        b"strl",
        &[chunk(b"strh", &strh), chunk(b"strf", &strf)].concat(),
    );
    let hdrl = list(b"hdrl", &[chunk(b"avih", &avih), strl].concat());

    let mut movi = b"movi".to_vec();
    let mut idx1 = Vec::new();
    for f in frames {
        // Offsets in idx1 count from the 'movi' fourcc.
        let offset = movi.len() as u32;
        movi.extend_from_slice(&chunk(b"00dc", f));
        idx1.extend_from_slice(b"00dc");
        for v in [0x10u32, offset, f.len() as u32] {
            idx1.extend_from_slice(&v.to_le_bytes());
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
        let avi = mjpeg_avi(&frames, 16, 8, 25.0);
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
}

//! Audio an application hands a session to speak, read as it streams: a WAV file (PCM, 16
//! bits, mono), raw 16-bit PCM with its rate (`audio/L16; rate=N`, big-endian as RFC 2586
//! has it, or `audio/pcm; rate=N`, little-endian), each resampled to the session's voice
//! rate, 16 kHz (what the compositor hears and the Opus encoder is given).
//!
//! Bad audio is refused naming the field, before any of it is spoken where the header
//! says it (a WAV's format, channels, bits, rate), and at the end where only the end can
//! tell (a body that stops before its header is whole).

use framecast_audio::{pcm, Resampler};

/// The session's voice rate: every utterance is resampled to it.
pub const RATE: u32 = framecast_audio::SAMPLE_RATE;

/// How a body's audio is encoded, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Wav,
    /// 16-bit samples, big-endian (`audio/L16`) or little-endian (`audio/pcm`).
    Raw {
        rate: u32,
        big_endian: bool,
    },
}

/// Why audio was refused: a status's reason, naming the field.
pub type Refusal = String;

impl Encoding {
    /// The encoding `content_type` names; `Ok(None)` when it is not audio at all.
    pub fn of(content_type: &str) -> Result<Option<Encoding>, Refusal> {
        let mut parts = content_type.split(';').map(str::trim);
        let mime = parts.next().unwrap_or("").to_ascii_lowercase();
        let params: Vec<(String, String)> = parts
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| {
                (
                    k.trim().to_ascii_lowercase(),
                    v.trim().trim_matches('"').to_string(),
                )
            })
            .collect();
        let param = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let raw = |big_endian: bool| -> Result<Option<Encoding>, Refusal> {
            let rate = param("rate").ok_or_else(|| {
                format!("Content-Type: {mime} needs its rate (e.g. {mime}; rate=16000)")
            })?;
            let rate: u32 = rate
                .parse()
                .map_err(|_| format!("Content-Type rate: {:?} is not a number", short(rate)))?;
            pcm::check_rate(rate).map_err(|e| format!("Content-Type rate: {e}"))?;
            if let Some(ch) = param("channels").filter(|c| *c != "1") {
                return Err(format!(
                    "Content-Type channels: {} (mono audio only: channels=1)",
                    short(ch)
                ));
            }
            Ok(Some(Encoding::Raw { rate, big_endian }))
        };
        match mime.as_str() {
            "audio/wav" | "audio/wave" | "audio/x-wav" | "audio/vnd.wave" => {
                Ok(Some(Encoding::Wav))
            }
            "audio/l16" => raw(true),
            "audio/pcm" => raw(false),
            _ => Ok(None),
        }
    }
}

fn short(s: &str) -> String {
    let end = s.char_indices().nth(32).map_or(s.len(), |(i, _)| i);
    framecast_proto::echo(&s[..end]).into_owned()
}

/// What a WAV header says, once it has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    pub rate: u32,
    pub big_endian: bool,
}

/// Reads one body's audio as it arrives and yields it at [`RATE`].
pub struct AudioIn {
    format: Option<Format>,
    resampler: Option<Resampler>,
    /// Bytes not used yet: a header still coming, or half a sample.
    pending: Vec<u8>,
    /// WAV: bytes of chunks to skip before `data`.
    skip: usize,
    decoded: Vec<f32>,
    resampled: Vec<f32>,
}

/// A WAV header longer than this (chunks before `data`) is refused.
const MAX_HEADER: usize = 64 << 10;

impl AudioIn {
    pub fn new(encoding: Encoding) -> AudioIn {
        let mut a = AudioIn {
            format: None,
            resampler: None,
            pending: Vec::new(),
            skip: 0,
            decoded: Vec::new(),
            resampled: Vec::new(),
        };
        if let Encoding::Raw { rate, big_endian } = encoding {
            a.set_format(Format { rate, big_endian });
        }
        a
    }

    /// The audio's format, once known (at once for raw PCM, after the header for WAV).
    pub fn format(&self) -> Option<Format> {
        self.format
    }

    fn set_format(&mut self, f: Format) {
        self.format = Some(f);
        self.resampler = Resampler::new(f.rate).ok();
    }

    /// Takes the next bytes of the body; appends the samples they complete, at [`RATE`],
    /// to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<i16>) -> Result<(), Refusal> {
        self.pending.extend_from_slice(bytes);
        if self.format.is_none() && !self.header()? {
            return Ok(());
        }
        if self.skip > 0 {
            let n = self.skip.min(self.pending.len());
            self.pending.drain(..n);
            self.skip -= n;
        }
        let Some(f) = self.format else {
            return Ok(());
        };
        let whole = self.pending.len() / 2 * 2;
        self.decoded.clear();
        self.decoded
            .extend(self.pending[..whole].chunks_exact(2).map(|b| {
                let s = if f.big_endian {
                    i16::from_be_bytes([b[0], b[1]])
                } else {
                    i16::from_le_bytes([b[0], b[1]])
                };
                s as f32 / 32768.0
            }));
        self.pending.drain(..whole);
        self.resampled.clear();
        if let Some(r) = self.resampler.as_mut() {
            r.push(&self.decoded, &mut self.resampled);
        }
        out.extend(self.resampled.iter().map(|&s| to_i16(s)));
        Ok(())
    }

    /// The body has ended: the resampler's tail, or why the audio was not whole.
    pub fn finish(&mut self, out: &mut Vec<i16>) -> Result<(), Refusal> {
        if self.format.is_none() {
            return Err(if self.pending.is_empty() {
                "body: no audio (an empty body)".to_string()
            } else {
                format!(
                    "body: the WAV header is cut short ({} bytes)",
                    self.pending.len()
                )
            });
        }
        self.resampled.clear();
        if let Some(r) = self.resampler.as_mut() {
            r.finish(&mut self.resampled);
        }
        out.extend(self.resampled.iter().map(|&s| to_i16(s)));
        Ok(())
    }

    /// Parses the WAV header from `pending` if it is all there: true once the format is
    /// known (and `pending` starts at the first sample, or `skip` before it).
    fn header(&mut self) -> Result<bool, Refusal> {
        let b = &self.pending;
        if b.len() < 12 {
            return Ok(false);
        }
        if &b[..4] != b"RIFF" || &b[8..12] != b"WAVE" {
            return Err("body: not a WAV file (no RIFF/WAVE header)".into());
        }
        let mut at = 12;
        let mut format = None;
        loop {
            if at > MAX_HEADER {
                return Err(format!(
                    "body: no data chunk in the first {MAX_HEADER} bytes of the WAV file"
                ));
            }
            if b.len() < at + 8 {
                return Ok(false);
            }
            let id = &b[at..at + 4];
            let size = u32::from_le_bytes([b[at + 4], b[at + 5], b[at + 6], b[at + 7]]) as usize;
            let body = at + 8;
            if id == b"data" {
                let Some(f) = format else {
                    return Err("body: the WAV data chunk comes before its fmt chunk".into());
                };
                self.pending.drain(..body);
                self.set_format(f);
                return Ok(true);
            }
            if id == b"fmt " {
                if b.len() < body + 16 {
                    return Ok(false);
                }
                let u16_at = |i: usize| u16::from_le_bytes([b[body + i], b[body + i + 1]]);
                let (tag, channels, bits) = (u16_at(0), u16_at(2), u16_at(14));
                let rate = u32::from_le_bytes([b[body + 4], b[body + 5], b[body + 6], b[body + 7]]);
                // 1: PCM; 0xFFFE: extensible, whose sub-format must then be PCM too.
                let pcm_tag =
                    tag == 1 || (tag == 0xFFFE && b.len() >= body + 26 && u16_at(24) == 1);
                if tag == 0xFFFE && b.len() < body + 26 {
                    return Ok(false);
                }
                if !pcm_tag {
                    return Err(format!(
                        "WAV format: tag {tag:#06x} is not PCM (1): send 16-bit PCM"
                    ));
                }
                if channels != 1 {
                    return Err(format!("WAV channels: {channels} (mono audio only)"));
                }
                if bits != 16 {
                    return Err(format!("WAV bits_per_sample: {bits} (16-bit samples only)"));
                }
                pcm::check_rate(rate).map_err(|e| format!("WAV sample_rate: {e}"))?;
                format = Some(Format {
                    rate,
                    big_endian: false,
                });
            }
            // Chunks are padded to an even size.
            at = body.saturating_add(size).saturating_add(size & 1);
        }
    }
}

fn to_i16(s: f32) -> i16 {
    (s * 32768.0).round().clamp(-32768.0, 32767.0) as i16
}

/// A WAV file's 44-byte header for `samples` 16-bit mono samples at `rate`.
pub fn wav_header(rate: u32, samples: usize) -> Vec<u8> {
    let data = (samples * 2) as u32;
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&(36 + data).to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&rate.to_le_bytes());
    h.extend_from_slice(&(rate * 2).to_le_bytes());
    h.extend_from_slice(&2u16.to_le_bytes());
    h.extend_from_slice(&16u16.to_le_bytes());
    h.extend_from_slice(b"data");
    h.extend_from_slice(&data.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(rate: u32, seconds: f32) -> Vec<i16> {
        (0..(rate as f32 * seconds) as usize)
            .map(|i| {
                ((i as f32 * 440.0 * std::f32::consts::TAU / rate as f32).sin() * 8000.0) as i16
            })
            .collect()
    }

    fn wav(rate: u32, samples: &[i16]) -> Vec<u8> {
        let mut w = wav_header(rate, samples.len());
        w.extend(samples.iter().flat_map(|s| s.to_le_bytes()));
        w
    }

    /// A WAV body fed a few bytes at a time gives the same samples as fed whole: its
    /// duration at 16 kHz.
    #[test]
    fn wav_bodies_stream_in_any_pieces_to_16_khz() {
        let body = wav(22_050, &tone(22_050, 0.5));
        let run = |piece: usize| {
            let mut a = AudioIn::new(Encoding::Wav);
            let mut out = Vec::new();
            for c in body.chunks(piece) {
                a.push(c, &mut out).unwrap();
            }
            a.finish(&mut out).unwrap();
            out
        };
        let whole = run(body.len());
        assert_eq!(run(7), whole);
        assert!(
            (whole.len() as i64 - 8000).abs() < 40,
            "{} samples",
            whole.len()
        );
        assert_eq!(Encoding::of("audio/wav").unwrap(), Some(Encoding::Wav));
    }

    /// Raw PCM at 16 kHz passes through unchanged; big-endian L16 is read as such.
    #[test]
    fn raw_pcm_is_read_in_its_byte_order() {
        let t = tone(16_000, 0.1);
        let le: Vec<u8> = t.iter().flat_map(|s| s.to_le_bytes()).collect();
        let be: Vec<u8> = t.iter().flat_map(|s| s.to_be_bytes()).collect();
        for (ct, bytes) in [("audio/pcm; rate=16000", le), ("audio/L16;rate=16000", be)] {
            let e = Encoding::of(ct).unwrap().unwrap();
            let mut a = AudioIn::new(e);
            let mut out = Vec::new();
            a.push(&bytes, &mut out).unwrap();
            a.finish(&mut out).unwrap();
            let diff: i64 = out
                .iter()
                .zip(&t)
                .map(|(a, b)| (*a as i64 - *b as i64).abs())
                .max()
                .unwrap();
            assert!(diff <= 2 && out.len() >= t.len() - 2, "{ct}: {diff}");
        }
    }

    /// Each bad header or type names its field.
    #[test]
    fn bad_audio_names_the_field() {
        let e = |ct: &str| Encoding::of(ct).unwrap_err();
        assert!(e("audio/L16").contains("rate"));
        assert!(e("audio/pcm; rate=999999").contains("rate"));
        assert!(e("audio/pcm; rate=16000; channels=2").contains("channels"));
        assert_eq!(Encoding::of("text/plain").unwrap(), None);
        let header = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut w = wav(16_000, &[0; 10]);
            f(&mut w);
            let mut out = Vec::new();
            AudioIn::new(Encoding::Wav).push(&w, &mut out).unwrap_err()
        };
        assert!(header(&|w| w[20] = 3).contains("not PCM"));
        assert!(header(&|w| w[22] = 2).contains("channels"));
        assert!(header(&|w| w[34] = 24).contains("bits_per_sample"));
        assert!(
            header(&|w| w[24..28].copy_from_slice(&1_000_000u32.to_le_bytes()))
                .contains("sample_rate")
        );
        assert!(header(&|w| w[..4].copy_from_slice(b"OggS")).contains("not a WAV"));
        let mut a = AudioIn::new(Encoding::Wav);
        let mut out = Vec::new();
        a.push(b"RIFF", &mut out).unwrap();
        assert!(a.finish(&mut out).unwrap_err().contains("cut short"));
        assert!(AudioIn::new(Encoding::Wav)
            .finish(&mut out)
            .unwrap_err()
            .contains("empty"));
    }
}

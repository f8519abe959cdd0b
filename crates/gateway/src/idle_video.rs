//! The idle loop encoded once for every session of an avatar.
//!
//! Between utterances a session shows its avatar's background loop as it is, and its own
//! video encode of that loop was most of an idle session's CPU (OpenH264 at 25 frames a
//! second: 60% of the gateway's samples in a profile). The loop is the same picture for every
//! session of the avatar, so an encoder of the loop's own encodes it once and the sessions
//! send its access units.
//!
//! A P frame decodes only against the picture its encoder held before it, so the cache is one
//! stream, kept in the order its encoder made it, and a session follows it: it joins at a key
//! frame (an IDR, or a VP8 key frame) of the stream, then takes frame after frame while the stream goes the way its
//! own frames go. A frame that is not next in the stream is taken from a key frame of the
//! stream with that picture; failing that the stream grows (a P frame where the session stands
//! at its end, a key frame elsewhere) while the budget allows, else the session encodes the
//! frame itself, its first such frame a key frame (its encoder's reference is not what the
//! browser holds). The first session of an avatar thus encodes one pass of the loop, through
//! the stream's encoder, and every pass after, its own and other sessions', is sent from it.
//!
//! A talking frame's picture differs from its background's only in the face region: where
//! the avatar's region is known ([`Encoding::layout`], H.264), the stream is a mosaic of
//! tiles around it ([`crate::media::MosaicEncoder`]) and a talking frame is the stream's
//! access unit for its background with the session's own face region spliced in
//! ([`crate::splice`], [`IdleFollower::base`]). The compositor sends such a frame as its
//! region and the CRC of its background's prepared JPEG (the JPEG itself once a stream:
//! [`crate::backgrounds`]), which names the background's entry exactly as an idle frame's
//! JPEG does.
//!
//! Entries are matched by background index and a CRC of the picture as it came (the
//! prepared JPEG, or I420): an idle frame of a replaced avatar is never shown from an old
//! cache (a picture that differs from the cached one at its index starts the stream over).
//! All streams together stay under a byte budget (`--idle-cache-mib`); once it is spent,
//! streams stop growing.

use crate::media::{VideoCodec, VideoEncoder};
use crate::metrics::Metrics;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// The idle streams of a gateway, one per avatar and encoding (codec included: a VP8 session
/// follows a stream of its own).
pub struct IdleVideo {
    /// The background JPEGs spliced sessions' talking frames are made over.
    pub backgrounds: crate::backgrounds::Backgrounds,
    budget: usize,
    used: AtomicUsize,
    /// CPU time spent encoding frames onto the streams, µs: work done once for every session
    /// of an avatar, which admission does not charge to the session that happened to do it.
    shared_cpu_us: AtomicU64,
    streams: Mutex<HashMap<Encoding, Arc<Mutex<Stream>>>>,
    metrics: Metrics,
}

/// What a stream's access units fit: sessions of one avatar encoded alike.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Encoding {
    pub codec: VideoCodec,
    pub avatar: String,
    pub width: usize,
    pub height: usize,
    /// Frames per second, in thousandths (a float is no key).
    pub fps_milli: u64,
    pub bitrate_bps: u32,
    /// The face region every talking frame's difference lies in: the stream's slices are
    /// cut around it so that talking frames can splice theirs in. H.264 only.
    pub layout: Option<framecast_h264::Layout>,
}

struct Stream {
    encoding: Encoding,
    /// Made on the first frame the stream encodes (and again after it starts over).
    encoder: Option<VideoEncoder>,
    /// Its encoder's parameter sets, where its frames are spliced into.
    parameter_sets: Option<Arc<[u8]>>,
    entries: Vec<Entry>,
    /// Indices of the key-frame entries, by background index.
    keys: HashMap<u32, Vec<usize>>,
    /// The picture's CRC at each background index encoded.
    pictures: HashMap<u32, u32>,
    bytes: usize,
    /// Counts the times the stream started over: a session's place in an older one is void.
    generation: u64,
}

struct Entry {
    background: u32,
    key: bool,
    crc: u32,
    au: Arc<[u8]>,
}

impl IdleVideo {
    /// Streams of at most `budget` bytes together (0: no sharing, every session encodes its
    /// own idle frames).
    pub fn new(budget: usize, metrics: Metrics) -> Arc<IdleVideo> {
        Arc::new(IdleVideo {
            backgrounds: Default::default(),
            budget,
            used: AtomicUsize::new(0),
            shared_cpu_us: AtomicU64::new(0),
            streams: Mutex::default(),
            metrics,
        })
    }

    /// A session's follower of the stream of `encoding`; `None` when nothing may be cached.
    pub fn follower(self: &Arc<Self>, encoding: Encoding) -> Option<IdleFollower> {
        if self.budget == 0 {
            return None;
        }
        let stream = self
            .streams
            .lock()
            .entry(encoding.clone())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Stream {
                    encoding,
                    encoder: None,
                    parameter_sets: None,
                    entries: Vec::new(),
                    keys: HashMap::new(),
                    pictures: HashMap::new(),
                    bytes: 0,
                    generation: 0,
                }))
            })
            .clone();
        Some(IdleFollower {
            video: self.clone(),
            stream,
            generation: 0,
            at: None,
            borrowed: false,
        })
    }

    /// CPU time spent so far encoding frames onto the streams (each background decoded and
    /// encoded once for every session): an avatar's first pass of its loop, then little.
    pub fn shared_work(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.shared_cpu_us.load(Ordering::Relaxed))
    }

    /// Bytes held by all streams.
    pub fn bytes(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn account(&self, added: usize, freed: usize) {
        let now = if added >= freed {
            self.used.fetch_add(added - freed, Ordering::Relaxed) + (added - freed)
        } else {
            self.used.fetch_sub(freed - added, Ordering::Relaxed) - (freed - added)
        };
        self.metrics.idle_cache_bytes.set(now as i64);
    }
}

/// A stream's access unit for a talking frame to be spliced into.
pub struct Base {
    pub au: Arc<[u8]>,
    pub key: bool,
    /// The SPS and PPS the stream's frames are decoded with.
    pub parameter_sets: Option<Arc<[u8]>>,
}

/// One session's place in its avatar's idle stream.
pub struct IdleFollower {
    video: Arc<IdleVideo>,
    stream: Arc<Mutex<Stream>>,
    generation: u64,
    /// The entry the session sent last, while it follows the stream.
    at: Option<usize>,
    /// The browser's last picture came from the stream (not the session's encoder).
    borrowed: bool,
}

impl IdleFollower {
    /// The access unit to send for the idle frame at `background`, from the stream; `None`:
    /// the session encodes the frame itself (after [`Self::leave`]). `crc` is the CRC-32 of
    /// the picture as it came (the prepared JPEG, or I420), which identifies it; `raw` makes
    /// its I420, called only when the stream encodes it.
    pub fn next(
        &mut self,
        background: u32,
        crc: u32,
        raw: impl FnOnce() -> Result<Vec<u8>, String>,
    ) -> Option<Arc<[u8]>> {
        let base = self.base(background, crc, raw)?;
        self.video.metrics.idle_frames_shared.inc();
        Some(base.au)
    }

    /// The stream's frame for the background at `background` whose picture has CRC-32 `crc`
    /// (as [`Self::next`] takes it), for a talking frame to splice its face region into
    /// ([`crate::splice`]): the entry [`Self::next`] would send, and whether it is a key
    /// frame. `None`: the budget is spent.
    pub fn base(
        &mut self,
        background: u32,
        crc: u32,
        raw: impl FnOnce() -> Result<Vec<u8>, String>,
    ) -> Option<Base> {
        let stream = self.stream.clone();
        let mut s = stream.lock();
        if s.pictures.get(&background).is_some_and(|&c| c != crc) {
            // The avatar changed under the same name: what is cached shows the old one.
            let freed = s.start_over();
            self.video.account(0, freed);
        }
        let fits = |e: &Entry| e.background == background && e.crc == crc;
        let i = self.advance(&mut s, background, fits, |s, key| {
            s.append(background, crc, raw, key)
        })?;
        let e = &s.entries[i];
        Some(Base {
            au: e.au.clone(),
            key: e.key,
            parameter_sets: s.parameter_sets.clone(),
        })
    }

    /// Moves the session to the entry it sends next for a picture at `background`: the one
    /// after its own if it `fits`, else the first key frame that does, else one `append`ed
    /// while the budget allows (told whether it must be a key frame: the session does not
    /// stand at the stream's end, where the browser holds what the stream's encoder holds).
    fn advance(
        &mut self,
        s: &mut Stream,
        background: u32,
        fits: impl Fn(&Entry) -> bool,
        append: impl FnOnce(&mut Stream, bool) -> Option<(usize, usize)>,
    ) -> Option<usize> {
        if s.generation != self.generation {
            self.generation = s.generation;
            self.at = None;
        }
        let next = self.at.map(|at| at + 1);
        let found = next
            .filter(|&n| s.entries.get(n).is_some_and(&fits))
            .or_else(|| {
                s.keys
                    .get(&background)?
                    .iter()
                    .copied()
                    .find(|&i| fits(&s.entries[i]))
            });
        let i = match found {
            Some(i) => i,
            None if self.video.bytes() < self.video.budget => {
                let at_end = next.is_some() && next == Some(s.entries.len());
                let started = framecast_telemetry::host_cpu::thread_cpu();
                let appended = append(s, !at_end);
                if let (Some(a), Some(b)) = (started, framecast_telemetry::host_cpu::thread_cpu()) {
                    self.video
                        .shared_cpu_us
                        .fetch_add(b.saturating_sub(a).as_micros() as u64, Ordering::Relaxed);
                }
                let (i, bytes) = appended?;
                self.video.account(bytes, 0);
                let kind = if s.entries[i].key { "key" } else { "delta" };
                self.video
                    .metrics
                    .idle_stream_encoded
                    .with_label_values(&[kind])
                    .inc();
                i
            }
            None => return None,
        };
        self.at = Some(i);
        self.borrowed = true;
        Some(i)
    }

    /// The session encodes a frame itself: whether that frame must be a key frame (the
    /// browser's last picture came from the stream, not from the session's encoder).
    pub fn leave(&mut self) -> bool {
        self.at = None;
        std::mem::take(&mut self.borrowed)
    }

    /// The browser asked for a key frame: the next frame from the stream is one of its key
    /// frames (the session's encoder is told to make one by the caller).
    pub fn restart(&mut self) {
        self.at = None;
    }
}

impl Stream {
    /// Encodes the picture (`raw`, its I420) onto the end of the stream (a key frame if
    /// `key`: the session asking is not where the stream ends); its index and size, or
    /// `None` if it cannot be encoded.
    fn append(
        &mut self,
        background: u32,
        crc: u32,
        raw: impl FnOnce() -> Result<Vec<u8>, String>,
        key: bool,
    ) -> Option<(usize, usize)> {
        let image = match raw() {
            Ok(image) => image,
            Err(e) => {
                tracing::warn!(error = %e, "idle frame");
                return None;
            }
        };
        let encoder = match &mut self.encoder {
            Some(e) => e,
            None => {
                let e = &self.encoding;
                let fps = e.fps_milli as f64 / 1000.0;
                let made = VideoEncoder::for_stream(
                    e.codec,
                    e.width,
                    e.height,
                    fps,
                    e.bitrate_bps,
                    e.layout.as_ref(),
                );
                match made {
                    Ok(made) => {
                        self.parameter_sets = made.parameter_sets().map(Arc::from);
                        self.encoder.insert(made)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "idle stream encoder");
                        return None;
                    }
                }
            }
        };
        if key {
            encoder.force_keyframe();
        }
        let au = match encoder.encode(&image) {
            Ok(au) if !au.is_empty() => au,
            Ok(_) => return None,
            Err(e) => {
                // Its reference is now unknown: the next frame starts a fresh encoder.
                tracing::warn!(error = %e, "idle stream encode");
                self.encoder = None;
                return None;
            }
        };
        let made_key = self.encoding.codec.is_key_frame(&au);
        if key && !made_key {
            // A P frame where the session needs one it can start from: the encoder's state
            // is not what was asked; the next frame starts a fresh encoder.
            tracing::warn!("idle stream: a key frame asked for, a P frame made");
            self.encoder = None;
            return None;
        }
        let key = made_key;
        if !key && self.entries.is_empty() {
            return None;
        }
        let i = self.entries.len();
        if key {
            self.keys.entry(background).or_default().push(i);
        }
        self.pictures.insert(background, crc);
        let bytes = au.len();
        self.bytes += bytes;
        self.entries.push(Entry {
            background,
            key,
            crc,
            au: au.into(),
        });
        Some((i, bytes))
    }

    /// Forgets every entry (the pictures changed); returns the bytes freed.
    fn start_over(&mut self) -> usize {
        self.entries.clear();
        self.keys.clear();
        self.pictures.clear();
        self.encoder = None;
        self.generation += 1;
        std::mem::take(&mut self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openh264::formats::YUVSource;

    const W: usize = 96;
    const H: usize = 64;
    const LOOP: u32 = 12;

    const CODECS: [VideoCodec; 2] = [VideoCodec::H264, VideoCodec::Vp8];

    fn encoding(codec: VideoCodec) -> Encoding {
        Encoding {
            codec,
            avatar: "a".into(),
            width: W,
            height: H,
            fps_milli: 25_000,
            bitrate_bps: 2_000_000,
            layout: None,
        }
    }

    /// Background picture `b` (shifted by `shade` for a "replaced avatar"): a bright bar whose
    /// place moves with `b`, so a P frame decoded against the wrong picture shows it.
    fn picture(b: u32, shade: u8) -> Vec<u8> {
        let mut f = vec![128u8; W * H + 2 * (W / 2) * (H / 2)];
        for y in 0..H {
            for x in 0..W {
                let bar = (x / 8) as u32 % LOOP == b;
                f[y * W + x] = if bar {
                    230
                } else {
                    40 + ((x + y) % 32) as u8 + shade
                };
            }
        }
        f
    }

    /// A browser's decoder of the codec.
    enum Browser {
        H264(openh264::decoder::Decoder),
        Vp8(framecast_vp8::Decoder),
    }

    impl Browser {
        fn new(codec: VideoCodec) -> Browser {
            match codec {
                VideoCodec::H264 => Browser::H264(openh264::decoder::Decoder::new().unwrap()),
                VideoCodec::Vp8 => Browser::Vp8(framecast_vp8::Decoder::new().unwrap()),
            }
        }
    }

    /// Decodes `au` and returns the mean absolute difference of its luma from `want`'s.
    fn luma_error(d: &mut Browser, au: &[u8], want: &[u8]) -> f64 {
        let (stride, y) = match d {
            Browser::H264(d) => {
                let yuv = d.decode(au).expect("decodes").expect("a picture");
                (yuv.strides().0, yuv.y().to_vec())
            }
            Browser::Vp8(d) => {
                let pic = d.decode(au).expect("decodes").expect("a picture");
                (pic.width, pic.i420[..pic.width * pic.height].to_vec())
            }
        };
        let mut sum = 0u64;
        for row in 0..H {
            for x in 0..W {
                sum += (y[row * stride + x] as i64 - want[row * W + x] as i64).unsigned_abs();
            }
        }
        sum as f64 / (W * H) as f64
    }

    /// What a session sends for one frame: from the stream if it is idle and cached,
    /// otherwise its own encode (a key frame when it comes back from the stream).
    fn send(
        f: &mut IdleFollower,
        own: &mut VideoEncoder,
        b: u32,
        idle: bool,
        img: &[u8],
    ) -> (Vec<u8>, bool) {
        if idle {
            if let Some(au) = f.next(b, crc32fast::hash(img), || Ok(img.to_vec())) {
                return (au.to_vec(), true);
            }
        }
        if f.leave() {
            own.force_keyframe();
        }
        (own.encode(img).unwrap(), false)
    }

    /// Sessions mixing their own frames with the shared stream, joining it at different
    /// places of the loop: every access unit each browser gets decodes to the picture meant,
    /// every idle frame comes from the stream, and a session that goes where the stream has
    /// been adds nothing to it (the loop is encoded once, not once per pass or session).
    #[test]
    fn sessions_share_one_encode_of_the_loop_and_their_browsers_see_the_right_pictures() {
        for codec in CODECS {
            share_one_encode(codec);
        }
    }

    fn share_one_encode(codec: VideoCodec) {
        let video = IdleVideo::new(64 << 20, Metrics::new());
        let pictures: Vec<Vec<u8>> = (0..LOOP).map(|b| picture(b, 0)).collect();
        let talking = picture(LOOP + 3, 9);
        let stream = || video.streams.lock().values().next().unwrap().clone();
        let mut sizes = Vec::new();
        for (start, talk_at) in [(0u32, 30u32), (5, 17), (0, 30)] {
            let mut f = video.follower(encoding(codec)).unwrap();
            let mut own = VideoEncoder::new(codec, W, H, 25.0, 2_000_000).unwrap();
            let mut browser = Browser::new(codec);
            let mut shared = 0;
            for n in 0..60u32 {
                let b = (start + n) % LOOP;
                // Two stretches of talking frames (not idle).
                let idle = ![talk_at, talk_at + 20]
                    .iter()
                    .any(|&t| (t..t + 4).contains(&n));
                let img = if idle {
                    &pictures[b as usize]
                } else {
                    &talking
                };
                let (au, from_stream) = send(&mut f, &mut own, b, idle, img);
                shared += from_stream as u32;
                let err = luma_error(&mut browser, &au, img);
                assert!(
                    err < 6.0,
                    "{codec:?} session from {start}, frame {n} (background {b}, shared \
                     {from_stream}): luma off by {err:.1}"
                );
            }
            assert_eq!(
                shared, 52,
                "idle frames of the {codec:?} session from {start} sent from the stream"
            );
            sizes.push(stream().lock().entries.len());
        }
        // Five passes of the loop, 52 idle frames: one pass encoded, and each rejoin after
        // talking adds at most the way to the next key frame.
        assert!(
            sizes[0] < 2 * LOOP as usize,
            "first {codec:?} session: {sizes:?} entries"
        );
        assert_eq!(
            sizes[2], sizes[1],
            "a {codec:?} session repeating the first grew the stream"
        );
        assert_eq!(video.bytes(), stream().lock().bytes);
    }

    /// A picture that differs from the cached one at its index (the avatar was replaced) is
    /// never answered from the old entries: the stream starts over and the browser sees the
    /// new picture.
    #[test]
    fn a_replaced_avatar_is_not_shown_from_the_cache() {
        for codec in CODECS {
            replaced_avatar(codec);
        }
    }

    fn replaced_avatar(codec: VideoCodec) {
        let video = IdleVideo::new(64 << 20, Metrics::new());
        let mut f = video.follower(encoding(codec)).unwrap();
        let mut browser = Browser::new(codec);
        for b in 0..LOOP {
            let au = f
                .next(b, crc32fast::hash(&picture(b, 0)), || Ok(picture(b, 0)))
                .unwrap();
            assert!(luma_error(&mut browser, &au, &picture(b, 0)) < 6.0);
        }
        let before = video.bytes();
        let mut g = video.follower(encoding(codec)).unwrap();
        let mut other = Browser::new(codec);
        let new = picture(0, 60);
        let au = g
            .next(0, crc32fast::hash(&new), || Ok(new.clone()))
            .unwrap();
        assert!(
            luma_error(&mut other, &au, &new) < 6.0,
            "the old picture was sent"
        );
        assert!(video.bytes() < before, "the old entries were not freed");
        // The first follower's place is void: it rejoins at a key frame of the new stream.
        let au = f
            .next(0, crc32fast::hash(&new), || Ok(new.clone()))
            .unwrap();
        assert!(codec.is_key_frame(&au));
        assert!(luma_error(&mut browser, &au, &new) < 6.0);
    }

    /// With the budget spent the stream stops growing and sessions encode for themselves;
    /// a budget of 0 shares nothing.
    #[test]
    fn the_budget_bounds_the_streams() {
        assert!(IdleVideo::new(0, Metrics::new())
            .follower(encoding(VideoCodec::H264))
            .is_none());
        let video = IdleVideo::new(1, Metrics::new());
        let mut f = video.follower(encoding(VideoCodec::H264)).unwrap();
        assert!(
            f.next(0, crc32fast::hash(&picture(0, 0)), || Ok(picture(0, 0)))
                .is_some(),
            "the first entry fits an empty budget"
        );
        assert!(
            f.next(1, crc32fast::hash(&picture(1, 0)), || Ok(picture(1, 0)))
                .is_none(),
            "the budget is spent"
        );
        assert!(
            f.next(0, crc32fast::hash(&picture(0, 0)), || Ok(picture(0, 0)))
                .is_some(),
            "what is cached is still served"
        );
        assert!(
            f.leave(),
            "back on its own encoder after the stream: a key frame"
        );
        assert!(!f.leave());
    }
}

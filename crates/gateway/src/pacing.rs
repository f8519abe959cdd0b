//! One clock for a session's video and voice, so lips and sound stay together.
//!
//! The compositor answers frame `f` of an audio session once the speech its window needs has
//! arrived, in bursts (one batch at a time). The pacer plays frame `f` at
//! `t0 + (f - f0) / fps`, where `f0` is the first frame to arrive and `t0` its arrival plus a
//! jitter margin that absorbs the bursts; the voice the browser sent `tau` seconds into the
//! session is sent back at `t0 + tau - f0 / fps`, the moment of the frame it belongs to. So
//! the voice is delayed by exactly the video's latency. A frame that is due while a later
//! one is also due is dropped (late), and both queues are bounded: nothing waits without
//! bound.
//!
//! The frames follow the browser's audio clock (the compositor makes 25 frames per second
//! *of voice received*), which drifts from this host's clock: a fake or cheap capture device
//! runs a few percent fast or slow. So the clock is re-anchored as frames arrive: a frame that
//! arrives after its moment moves `t0` later by its lateness (it plays now, and the voice
//! waits with it); a frame whose moment is more than [`MAX_AHEAD`] beyond the jitter margin
//! moves `t0` earlier by the excess (the frames it overtakes are dropped as late). Without
//! this a 5% fast microphone filled the queue in 30 s and no frame was ever due again.
//!
//! Following late frames must not become a growing delay when the compositor (not the
//! sender's clock) falls behind: with a latency bound ([`Pacer::with_max_latency`]), a frame
//! that would show later than the bound after its voice reached the gateway is dropped
//! (counted) instead of moving the clock, so the voice keeps its time and the lag never
//! accumulates. A slow sender's voice arrives late too, so its frames stay within the bound
//! and the clock still follows it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most frames held (two seconds at 25 fps): past that the oldest are dropped.
pub const MAX_FRAMES: usize = 50;
/// Most voice held before the first frame arrives (ten seconds of 20 ms packets).
pub const MAX_VOICE: usize = 500;
/// How far past the jitter margin a frame's moment may lie before the clock catches up. An
/// audio session's frames come a few at a time (those whose voice arrived while the last ones
/// rendered), so a frame this far ahead means the sender's clock is fast; the bound is also
/// how far a fast sender's latency can climb before it is cut back.
pub const MAX_AHEAD: Duration = Duration::from_millis(300);

/// A packet of the browser's voice: where it sits in the session, and its Opus payload.
pub struct Voice {
    /// Seconds since the session's first voice packet (from its RTP timestamps).
    pub at: f64,
    pub rtp_time: u64,
    pub payload: std::sync::Arc<[u8]>,
}

pub struct Due<P> {
    /// The frame to encode and send now, if one is due: (index, picture).
    pub frame: Option<(u64, P)>,
    /// Voice to send now, in order.
    pub voice: Vec<Voice>,
    /// Frames dropped because a later frame was due too (or the queue overflowed).
    pub dropped: u64,
}

/// Paces pictures of type `P` (what the session encodes: an I420 image and what it knows of
/// it) and the voice.
pub struct Pacer<P> {
    period: Duration,
    jitter: Duration,
    /// (t0, f0) once the first frame has arrived.
    base: Option<(Instant, u64)>,
    /// (index, picture, idle, when the voice of its moment reached the gateway).
    frames: VecDeque<(u64, P, bool, Option<Instant>)>,
    voice: VecDeque<Voice>,
    /// Talking frames before this one come from speech an interrupt cut: not played.
    cut_at: u64,
    /// The next frame to arrive after an interrupt sets the clock: it plays at once.
    resync: bool,
    /// Longest a frame may show after its voice reached the gateway; later ones are dropped.
    max_latency: Option<Duration>,
}

impl<P> Due<P> {
    fn new() -> Self {
        Due {
            frame: None,
            voice: Vec::new(),
            dropped: 0,
        }
    }
}

impl<P> Pacer<P> {
    pub fn new(fps: f64, jitter: Duration) -> Pacer<P> {
        Pacer {
            period: Duration::from_secs_f64(1.0 / fps.max(1.0)),
            jitter,
            base: None,
            frames: VecDeque::new(),
            voice: VecDeque::new(),
            cut_at: 0,
            resync: false,
            max_latency: None,
        }
    }

    /// Frames later than `bound` after their voice reached the gateway are dropped, not
    /// waited for.
    pub fn with_max_latency(mut self, bound: Duration) -> Pacer<P> {
        self.max_latency = Some(bound);
        self
    }

    /// A frame from the compositor (`idle`: the background, no speech in it; `heard`: when the
    /// voice of its moment reached the gateway, if known); returns how many frames were
    /// dropped (to make room, or this one, past the latency bound).
    pub fn push_frame(
        &mut self,
        now: Instant,
        index: u64,
        image: P,
        idle: bool,
        heard: Option<Instant>,
    ) -> u64 {
        if !idle && index < self.cut_at {
            // Talking, of speech an interrupt cut: still on its way, never shown.
            return 0;
        }
        if std::mem::take(&mut self.resync) {
            // The first frame since the interrupt plays now, and the clock follows it.
            if let Some((_, f0)) = self.base {
                let back = self.period.mul_f64(index.saturating_sub(f0) as f64);
                self.base = Some((now.checked_sub(back).unwrap_or(now), f0));
            }
        }
        if self.base.is_none() {
            if let (Some(heard), Some(bound)) = (heard, self.max_latency) {
                if now.saturating_duration_since(heard) > bound {
                    // Too old to show within the bound (a cold compositor's first frames): it
                    // does not set the clock, or every frame after it would be as late.
                    return 1;
                }
                // The first frame plays after the jitter margin, but a period inside the bound
                // at the latest (the thread wakes a little after a slot).
                let latest = (heard + bound).checked_sub(self.period).unwrap_or(now);
                self.base = Some(((now + self.jitter).min(latest.max(now)), index));
            }
        }
        let (t0, f0) = *self.base.get_or_insert((now + self.jitter, index));
        let slot = self.slot(index).unwrap_or(t0);
        if slot < now {
            if let (Some(heard), Some(bound)) = (heard, self.max_latency) {
                if now.saturating_duration_since(heard) > bound {
                    // The compositor is behind: showing it would delay everything after.
                    return 1;
                }
            }
            // Late: the sender's clock is slower than ours (or the compositor stalled).
            self.base = Some((t0 + (now - slot), f0));
        } else if let Some(excess) = slot.checked_duration_since(now + self.jitter + MAX_AHEAD) {
            // Early: the sender's clock is faster than ours.
            self.base = Some((t0.checked_sub(excess).unwrap_or(t0), f0));
        } else if let (Some(heard), Some(bound)) = (heard, self.max_latency) {
            // A clock within two periods of the bound (set by a slow first frame) while the
            // frames now come with more than the jitter margin to spare: pulled in to the
            // margin, or the compositor's ordinary jitter would push frame after frame past
            // the bound.
            let close = slot.saturating_duration_since(heard) + 2 * self.period > bound;
            if let (true, Some(spare)) = (close, slot.checked_duration_since(now + self.jitter)) {
                self.base = Some((t0.checked_sub(spare).unwrap_or(t0), f0));
            }
        }
        self.frames.push_back((index, image, idle, heard));
        let mut dropped = 0;
        while self.frames.len() > MAX_FRAMES {
            self.frames.pop_front();
            dropped += 1;
        }
        dropped
    }

    /// An interrupt: `frame` is the first the cut speech does not reach. The voice waiting
    /// becomes `silence` (an Opus packet of it: the speech it carried was cut, and the
    /// track goes on without a gap, so the browser's decoder has nothing to conceal), and
    /// the talking frames before `frame` go,
    /// held or still to come; the idle ones stay (the compositor renders what it had not yet
    /// of the cut speech as silence: the mouth closed). The clock then restarts from the
    /// first idle frame, played at once instead of after the frames that went: the closed
    /// mouth and the silence follow within a frame of their arrival, voice and frames still
    /// together (the picture holds its last frame meanwhile). Returns how many frames went.
    pub fn cut(&mut self, frame: u64, now: Instant, silence: &std::sync::Arc<[u8]>) -> u64 {
        for v in &mut self.voice {
            v.payload = silence.clone();
        }
        self.cut_at = self.cut_at.max(frame);
        let before = self.frames.len();
        self.frames.retain(|(i, _, idle, _)| *idle || *i >= frame);
        match (self.frames.front(), self.base) {
            (Some(&(first, ..)), Some((_, f0))) => {
                let back = self.period.mul_f64(first.saturating_sub(f0) as f64);
                self.base = Some((now.checked_sub(back).unwrap_or(now), f0));
            }
            _ => self.resync = true,
        }
        (before - self.frames.len()) as u64
    }

    pub fn push_voice(&mut self, voice: Voice) {
        self.voice.push_back(voice);
        while self.voice.len() > MAX_VOICE {
            self.voice.pop_front();
        }
    }

    /// When frame `index` plays. Sent with this time as its wall clock (not the moment the
    /// thread got to it), the RTCP sender reports of both tracks map their RTP clocks to one
    /// wall clock exactly, and the browser's lip sync lines them up from those.
    pub fn slot(&self, index: u64) -> Option<Instant> {
        let (t0, f0) = self.base?;
        Some(t0 + self.period.mul_f64(index.saturating_sub(f0) as f64))
    }

    /// When the voice `at` seconds into the session plays.
    pub fn voice_slot(&self, at: f64) -> Option<Instant> {
        let (t0, f0) = self.base?;
        let offset = at - f0 as f64 * self.period.as_secs_f64();
        Some(if offset >= 0.0 {
            t0 + Duration::from_secs_f64(offset)
        } else {
            t0
        })
    }

    /// What is due at `now`.
    pub fn due(&mut self, now: Instant) -> Due<P> {
        let mut due = Due::new();
        while let Some(&(index, ..)) = self.frames.front() {
            if self.slot(index).is_some_and(|t| t <= now) {
                let (index, image, _, heard) = self.frames.pop_front().expect("front");
                // Past the bound by now (it waited behind others after arriving in time):
                // dropped here too, so no frame leaves later than the bound.
                let stale = heard
                    .zip(self.max_latency)
                    .is_some_and(|(h, bound)| now.saturating_duration_since(h) > bound);
                // A stale frame, or the frame it replaces (a later one was due too), is dropped.
                if stale || due.frame.replace((index, image)).is_some() {
                    due.dropped += 1;
                }
            } else {
                break;
            }
        }
        while let Some(v) = self.voice.front() {
            if self.voice_slot(v.at).is_some_and(|t| t <= now) {
                due.voice.extend(self.voice.pop_front());
            } else {
                break;
            }
        }
        due
    }

    /// The next instant something falls due, if anything waits.
    pub fn next(&self) -> Option<Instant> {
        let frame = self.frames.front().and_then(|(i, ..)| self.slot(*i));
        let voice = self.voice.front().and_then(|v| self.voice_slot(v.at));
        frame.into_iter().chain(voice).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn silent() -> std::sync::Arc<[u8]> {
        std::sync::Arc::from(&[0u8][..])
    }

    fn voice(at: f64) -> Voice {
        Voice {
            at,
            rtp_time: (at * 48_000.0) as u64,
            payload: std::sync::Arc::from(&[1u8][..]),
        }
    }

    /// The bound holds at sending too: a frame that arrived in time but whose slot comes
    /// later than the bound after its voice (the clock held it behind others) is dropped,
    /// not sent.
    #[test]
    fn no_frame_leaves_later_than_the_bound() {
        let t = Instant::now();
        let ms = |n: u64| Duration::from_millis(n);
        let mut p = Pacer::new(25.0, ms(100)).with_max_latency(ms(500));
        // Frame 0 sets the clock (plays at t + 100 ms); frame 1's voice came 450 ms before t,
        // and it comes at t + 100 ms (no time to spare: the clock stays).
        assert_eq!(p.push_frame(t, 0, Bytes::new(), false, Some(t)), 0);
        assert_eq!(
            p.push_frame(t + ms(100), 1, Bytes::new(), false, t.checked_sub(ms(450))),
            0
        );
        let d = p.due(t + ms(100));
        assert_eq!((d.frame.map(|f| f.0), d.dropped), (Some(0), 0));
        // Frame 1 is due at t + 140 ms: 590 ms after its voice, past the 500 ms bound.
        let d = p.due(t + ms(140));
        assert_eq!((d.frame.map(|f| f.0), d.dropped), (None, 1));
    }

    /// A session whose first frames come late (a cold compositor: the first forward passes,
    /// the face tensor's registration) shows the first frame that comes within the bound and
    /// every one after it: the late ones neither play nor set the clock. Once the clock set
    /// itself on a frame 500 ms after its voice, so every frame after it was as late, past the
    /// 600 ms bound once the jitter margin was added, and the session never showed a frame.
    #[test]
    fn late_first_frames_do_not_set_the_clock() {
        let t = Instant::now();
        let ms = |n: u64| Duration::from_millis(n);
        let mut p = Pacer::new(25.0, ms(150)).with_max_latency(ms(600));
        // Voice of moment i reaches the gateway at t + 40i ms; frames 0-9 come 2 s after it.
        let heard = |i: u64| t + ms(40 * i);
        for i in 0..10 {
            assert_eq!(
                p.push_frame(heard(i) + ms(2000), i, Bytes::new(), false, Some(heard(i))),
                1
            );
        }
        assert_eq!(p.slot(10), None, "a frame past the bound set the clock");
        // Frame 10 comes 500 ms after its voice, the rest too: all shown, each within bound.
        let mut shown = 0;
        for i in 10..60 {
            let now = heard(i) + ms(500);
            assert_eq!(p.push_frame(now, i, Bytes::new(), false, Some(heard(i))), 0);
            let slot = p.slot(i).expect("the clock is set");
            assert!(
                slot <= heard(i) + ms(600) - ms(40),
                "frame {i} plays past the bound"
            );
            let d = p.due(slot + ms(2));
            assert_eq!(d.dropped, 0, "frame {i}");
            shown += d.frame.is_some() as u32;
        }
        assert_eq!(shown, 50);
    }

    /// A clock set close to the bound by a slow first frame comes back to the jitter margin
    /// once frames come faster: the compositor's ordinary jitter then costs no frames.
    #[test]
    fn a_clock_near_the_bound_comes_back_when_frames_come_early() {
        let t = Instant::now();
        let ms = |n: u64| Duration::from_millis(n);
        let mut p = Pacer::new(25.0, ms(150)).with_max_latency(ms(600));
        let heard = |i: u64| t + ms(40 * i);
        // The first frame 550 ms after its voice: the clock is set at 560 ms.
        p.push_frame(heard(0) + ms(550), 0, Bytes::new(), false, Some(heard(0)));
        assert_eq!(p.slot(0), Some(heard(0) + ms(560)));
        // Then frames 250 ms after their voice: the clock comes in to 250 + 150 ms.
        p.push_frame(heard(1) + ms(250), 1, Bytes::new(), false, Some(heard(1)));
        assert_eq!(p.slot(1), Some(heard(1) + ms(400)));
        // Ordinary jitter (a frame 180 ms later than the others) costs nothing now.
        p.push_frame(heard(2) + ms(430), 2, Bytes::new(), false, Some(heard(2)));
        let d = p.due(p.slot(2).unwrap() + ms(2));
        assert_eq!(
            (d.frame.map(|f| f.0), d.dropped),
            (Some(2), 2),
            "0 and 1 replaced"
        );
        // The clock does not move on frames arriving in the margin as usual.
        let slot3 = p.slot(3);
        p.push_frame(heard(3) + ms(300), 3, Bytes::new(), false, Some(heard(3)));
        assert_eq!(p.slot(3), slot3);
    }

    /// With a latency bound, a compositor that falls behind costs frames, never delay: frames
    /// later than the bound after their voice are dropped and the clock stays; the voice
    /// keeps its time. Without one, the clock would follow them (the old behaviour, kept for
    /// a slow sender whose voice is late too).
    #[test]
    fn a_compositor_behind_costs_frames_not_delay() {
        let t = Instant::now();
        let ms = |n: u64| Duration::from_millis(n);
        let mut p = Pacer::new(25.0, ms(100)).with_max_latency(ms(500));
        assert_eq!(p.push_frame(t, 0, Bytes::new(), false, Some(t)), 0);
        // Frame 50 (moment 2 s) arrives 1 s late: its voice came at 2 s, it at 3.1 s.
        let (heard, now) = (t + ms(2000), t + ms(3100));
        assert_eq!(p.push_frame(now, 50, Bytes::new(), false, Some(heard)), 1);
        assert_eq!(
            p.slot(51),
            Some(t + ms(100) + ms(51 * 40)),
            "the clock stayed"
        );
        // One within the bound is waited for, as before.
        let (heard, now) = (t + ms(2040), t + ms(2400));
        assert_eq!(p.push_frame(now, 51, Bytes::new(), false, Some(heard)), 0);
        assert_eq!(p.slot(51), Some(now));
        // Without the bound the clock follows the late frame (a slow sender).
        let mut q = Pacer::new(25.0, ms(100));
        q.push_frame(t, 0, Bytes::new(), false, Some(t));
        assert_eq!(
            q.push_frame(t + ms(3100), 50, Bytes::new(), false, Some(t + ms(2000))),
            0
        );
        assert_eq!(q.slot(50), Some(t + ms(3100)));
    }

    /// Frames play one period apart from the first one's arrival plus the jitter margin;
    /// the voice of frame f's moment plays with frame f; a late frame gives way to the next.
    #[test]
    fn frames_and_voice_play_on_one_clock() {
        let t = Instant::now();
        let mut p = Pacer::new(25.0, Duration::from_millis(100));
        p.push_voice(voice(0.0));
        p.push_voice(voice(0.08));
        assert!(
            p.due(t + Duration::from_secs(5)).voice.is_empty(),
            "no frame yet"
        );
        for f in 0..4 {
            assert_eq!(
                p.push_frame(t, f, Bytes::from(vec![f as u8]), false, None),
                0
            );
        }
        let at = |ms: u64| t + Duration::from_millis(ms);
        assert_eq!(p.next(), Some(at(100)));
        let d = p.due(at(99));
        assert!(d.frame.is_none() && d.voice.is_empty());
        let d = p.due(at(100));
        assert_eq!(d.frame.as_ref().map(|f| f.0), Some(0));
        assert_eq!(d.voice.len(), 1, "the voice at 0 s plays with frame 0");
        // At 190 ms frames 1 (140) and 2 (180) are due: 1 is dropped as late.
        let d = p.due(at(190));
        assert_eq!((d.frame.as_ref().map(|f| f.0), d.dropped), (Some(2), 1));
        assert_eq!(
            d.voice.len(),
            1,
            "the voice at 80 ms plays by frame 2's moment"
        );
        assert_eq!(p.next(), Some(at(220)));
    }

    /// A microphone 5% fast or slow: frames keep playing at about their arrival rate, the
    /// queue stays short, nothing stalls, and a slow sender loses no frame.
    #[test]
    fn the_clock_follows_a_sender_that_drifts() {
        for (rate, max_dropped) in [(26.25f64, 0.06f64), (23.75, 0.0)] {
            let t = Instant::now();
            let mut p = Pacer::new(25.0, Duration::from_millis(150));
            let (mut sent, mut dropped, mut longest_wait) = (0u64, 0u64, 0f64);
            let mut last_sent = t;
            // 60 s, frames arriving in batches of 8 at `rate` per second, polled every 5 ms.
            let mut next_batch = 0u64;
            for step in 0..12_000u64 {
                let now = t + Duration::from_millis(step * 5);
                while (next_batch as f64 + 8.0) / rate <= step as f64 * 0.005 {
                    for f in next_batch..next_batch + 8 {
                        dropped += p.push_frame(now, f, Bytes::new(), false, None);
                    }
                    next_batch += 8;
                }
                let d = p.due(now);
                dropped += d.dropped;
                if d.frame.is_some() {
                    sent += 1;
                    longest_wait = longest_wait.max((now - last_sent).as_secs_f64());
                    last_sent = now;
                }
                assert!(
                    p.frames.len() <= 40,
                    "rate {rate}: {} frames queued",
                    p.frames.len()
                );
            }
            let arrived = next_batch as f64;
            assert!(
                sent as f64 >= arrived * (1.0 - max_dropped) - 40.0,
                "rate {rate}: {sent} of {arrived} frames sent ({dropped} dropped)"
            );
            assert!(longest_wait < 0.5, "rate {rate}: a {longest_wait:.2} s gap");
            if max_dropped == 0.0 {
                assert_eq!(dropped, 0, "a slow sender's frames are all played");
            }
        }
    }

    #[test]
    fn queues_are_bounded() {
        let t = Instant::now();
        let mut p = Pacer::new(25.0, Duration::ZERO);
        let dropped: u64 = (0..MAX_FRAMES as u64 + 5)
            .map(|f| p.push_frame(t, f, Bytes::new(), false, None))
            .sum();
        assert_eq!(dropped, 5);
        for i in 0..MAX_VOICE + 3 {
            p.push_voice(voice(i as f64 * 0.02));
        }
        assert_eq!(p.voice.len(), MAX_VOICE);
    }

    /// An interrupt drops the voice waiting and the frames before its frame, held or still
    /// to come, and brings its frame forward to one period from the cut.
    #[test]
    fn a_cut_drops_what_it_stops_and_plays_on_at_once() {
        let t = Instant::now();
        let mut p = Pacer::new(25.0, Duration::from_millis(100));
        for f in 0..6 {
            p.push_frame(t, f, Bytes::new(), f == 3, None);
            p.push_voice(voice(f as f64 * 0.04));
        }
        assert_eq!(
            p.cut(5, t, &silent()),
            4,
            "frames 0, 1, 2 and 4 talk before frame 5"
        );
        assert!(
            p.voice.iter().all(|v| v.payload[..] == [0u8][..]),
            "the voice went silent"
        );
        let left: Vec<u64> = p.frames.iter().map(|(i, ..)| *i).collect();
        assert_eq!(left, [3, 5]);
        // The idle frame 3 (due at 100 + 3 * 40 ms) plays at once, frame 5 two periods on.
        let d = p.due(t);
        assert_eq!(d.frame.map(|f| f.0), Some(3));
        assert!(d.voice.iter().all(|v| v.payload[..] == [0u8][..]));
        let late = p.push_frame(t, 4, Bytes::new(), false, None);
        assert_eq!(
            (late, p.frames.len()),
            (0, 1),
            "talking, from before the cut"
        );
        // With nothing held, the next frame to come sets the clock.
        let mut q = Pacer::new(25.0, Duration::from_millis(100));
        q.push_frame(t, 0, Bytes::new(), false, None);
        let _ = q.due(t + Duration::from_millis(100));
        q.cut(10, t + Duration::from_millis(150), &silent());
        let later = t + Duration::from_millis(230);
        q.push_frame(later, 7, Bytes::new(), true, None);
        assert_eq!(
            q.next(),
            Some(later),
            "the first idle frame plays on arrival"
        );
    }
}

//! The speech queue of an agent session and the voice it makes: utterances play in the order
//! they were queued, one 20 ms packet at a time, in real time. Each packet goes to the
//! compositor (the mouth: a `Render` audio session) and, Opus-encoded, to the session thread
//! (the voice), which sends it on the session's one clock with the frames of its moment, so
//! lips and sound leave together. Between utterances the packets are silence: the compositor
//! renders idle frames (the background, no inference) and the browser hears nothing.
//!
//! An interrupt drops the utterance playing and every one queued: the compositor is told to
//! render what it holds of them as silence (`AudioChunk.cancel`), and the session thread to
//! drop the talking frames and the voice it holds ([`ToThread::Cut`]).
//!
//! What the person sees is the session thread's to say (it sends the frames): the speaker
//! marks where each utterance starts and ends ([`ToThread::Mark`]) and the thread reports the
//! events when those frames leave.

use crate::audio_in::RATE;
use crate::events::{Event, Events};
use bytes::Bytes;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// One packet of the session's voice: 20 ms.
pub const PACKET: Duration = Duration::from_millis(20);
/// Samples per packet at [`RATE`].
const SAMPLES: usize = (RATE / 50) as usize;
/// RTP clock ticks (48 kHz, Opus's) per packet.
pub const RTP_TICKS: u64 = 960;

/// Audio for the compositor's `Render` audio session.
#[derive(Debug, Clone, PartialEq)]
pub enum ToCompositor {
    /// 16-bit little-endian PCM at the session's rate.
    Pcm(Bytes),
    /// Render what is held of the cancelled speech as silence.
    Cancel,
    /// Send the background JPEGs of talking frames again (one was missing).
    ResendBackgrounds,
}

/// What the speaker tells the session thread.
pub enum ToThread {
    /// The voice packet of moment `at` (seconds into the session).
    Voice {
        at: f64,
        rtp_time: u64,
        payload: std::sync::Arc<[u8]>,
    },
    /// Report `event` when frame `frame` leaves (what the person then sees).
    Mark { frame: u64, event: Event },
    /// An interrupt at frame `frame`: drop the talking frames before it not yet sent, and
    /// make the voice held `silence` (an Opus packet of 20 ms of it); report the utterance
    /// that was playing as interrupted.
    Cut {
        frame: u64,
        interrupted: Option<String>,
        silence: std::sync::Arc<[u8]>,
    },
}

/// One utterance: its id and its audio at [`RATE`], as it comes (a stream that ends when
/// the body or the TTS does; an error ends it early).
pub struct Utterance {
    pub id: String,
    pub audio: mpsc::Receiver<Result<Vec<i16>, String>>,
}

/// Why an utterance was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The queue holds its most (`--max-utterances`).
    Full(usize),
    /// The session has ended.
    Gone,
}

enum Command {
    Say {
        utterance: Utterance,
        interrupt: bool,
        reply: oneshot::Sender<Result<usize, Refused>>,
    },
    Interrupt {
        reply: oneshot::Sender<usize>,
    },
}

/// The HTTP side's handle on a session's speaker.
#[derive(Clone)]
pub struct Speaker {
    commands: mpsc::Sender<Command>,
}

impl Speaker {
    /// Queues `utterance` (first dropping what plays and waits, with `interrupt`); its place
    /// in the queue (0: it plays next, or now).
    pub async fn say(&self, utterance: Utterance, interrupt: bool) -> Result<usize, Refused> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Say {
                utterance,
                interrupt,
                reply,
            })
            .await
            .map_err(|_| Refused::Gone)?;
        rx.await.map_err(|_| Refused::Gone)?
    }

    /// Stops the utterance playing and clears the queue; how many were dropped.
    pub async fn interrupt(&self) -> Result<usize, Refused> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Interrupt { reply })
            .await
            .map_err(|_| Refused::Gone)?;
        rx.await.map_err(|_| Refused::Gone)
    }
}

/// The utterance playing: its samples not yet played, and whether its source has ended.
struct Playing {
    id: String,
    audio: mpsc::Receiver<Result<Vec<i16>, String>>,
    buffer: VecDeque<i16>,
    ended: bool,
}

/// Where the speaker's output goes.
pub struct Outputs {
    pub compositor: mpsc::Sender<ToCompositor>,
    pub thread: std::sync::mpsc::SyncSender<ToThread>,
    pub events: Events,
}

/// Starts the speaker of a session at `fps` holding at most `max_queue` utterances
/// waiting; it runs until the thread's or the compositor's end of its channels goes.
pub fn start(fps: f64, max_queue: usize, out: Outputs) -> Result<Speaker, String> {
    let mut encoder = opus::Encoder::new(RATE, opus::Channels::Mono, opus::Application::Voip)
        .map_err(|e| format!("opus encoder: {e}"))?;
    let mut packet = [0u8; 400];
    let n = encoder
        .encode(&[0i16; SAMPLES], &mut packet)
        .map_err(|e| format!("opus encoder: {e}"))?;
    let silence: std::sync::Arc<[u8]> = std::sync::Arc::from(&packet[..n]);
    let (tx, rx) = mpsc::channel(16);
    let state = State {
        fps,
        max_queue,
        out,
        encoder,
        silence,
        queue: VecDeque::new(),
        playing: None,
        packet: 0,
    };
    tokio::spawn(state.run(rx));
    Ok(Speaker { commands: tx })
}

struct State {
    fps: f64,
    max_queue: usize,
    out: Outputs,
    encoder: opus::Encoder,
    /// 20 ms of silence, encoded.
    silence: std::sync::Arc<[u8]>,
    queue: VecDeque<Utterance>,
    playing: Option<Playing>,
    /// Packets sent so far: packet `n` is moment `n * 20 ms`.
    packet: u64,
}

impl State {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut ticks = tokio::time::interval(PACKET);
        // Late ticks catch up at once: the voice's moments are the packets' count, and the
        // frames follow them.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(c) => self.command(c),
                    None => return,
                },
                _ = ticks.tick() => {
                    if !self.packet() {
                        return;
                    }
                }
            }
        }
    }

    /// The frame of the moment the next packet starts.
    fn frame_now(&self) -> u64 {
        (self.packet as f64 * PACKET.as_secs_f64() * self.fps).ceil() as u64
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Say {
                utterance,
                interrupt,
                reply,
            } => {
                if interrupt {
                    self.interrupt();
                }
                if self.queue.len() >= self.max_queue {
                    let _ = reply.send(Err(Refused::Full(self.max_queue)));
                    return;
                }
                let position = self.queue.len() + usize::from(self.playing.is_some());
                self.out.events.send(Event::Queued {
                    id: utterance.id.clone(),
                    position,
                });
                self.queue.push_back(utterance);
                let _ = reply.send(Ok(position));
            }
            Command::Interrupt { reply } => {
                let _ = reply.send(self.interrupt());
            }
        }
    }

    /// Drops what plays and what waits; how many utterances that was.
    fn interrupt(&mut self) -> usize {
        let playing = self.playing.take().map(|p| p.id);
        let dropped = self.queue.len() + usize::from(playing.is_some());
        for u in self.queue.drain(..) {
            self.out.events.send(Event::Ended {
                id: u.id,
                frame: None,
                frames: 0,
                interrupted: true,
            });
        }
        if dropped > 0 {
            // The encoder's look-ahead holds the cut speech's last milliseconds: they must
            // not lead the silence.
            let _ = self.encoder.reset_state();
            let _ = self.out.compositor.try_send(ToCompositor::Cancel);
            let frame = self.frame_now();
            let _ = self.out.thread.try_send(ToThread::Cut {
                frame,
                interrupted: playing,
                silence: self.silence.clone(),
            });
            self.mark(frame, Event::Idle { frame: None });
        }
        dropped
    }

    fn mark(&self, frame: u64, event: Event) {
        let _ = self.out.thread.try_send(ToThread::Mark { frame, event });
    }

    /// Sends the next packet; false once the session is gone.
    fn packet(&mut self) -> bool {
        let frame = self.frame_now();
        if self.playing.is_none() {
            if let Some(u) = self.queue.pop_front() {
                self.mark(
                    frame,
                    Event::Started {
                        id: u.id.clone(),
                        frame: None,
                    },
                );
                self.playing = Some(Playing {
                    id: u.id,
                    audio: u.audio,
                    buffer: VecDeque::new(),
                    ended: false,
                });
            }
        }
        let mut samples = Vec::with_capacity(SAMPLES);
        if let Some(p) = &mut self.playing {
            // What the source has made so far (never waiting for it: a pause while it lags).
            while !p.ended && p.buffer.len() < SAMPLES {
                match p.audio.try_recv() {
                    Ok(Ok(chunk)) => p.buffer.extend(chunk),
                    Ok(Err(why)) => {
                        self.out.events.send(Event::Failed {
                            id: p.id.clone(),
                            reason: why,
                        });
                        p.ended = true;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => p.ended = true,
                }
            }
            let n = SAMPLES.min(p.buffer.len());
            samples.extend(p.buffer.drain(..n));
            if p.ended && p.buffer.is_empty() {
                let id = p.id.clone();
                self.playing = None;
                // Its last frame is the one of this packet's end.
                let end =
                    ((self.packet + 1) as f64 * PACKET.as_secs_f64() * self.fps).ceil() as u64;
                self.mark(
                    end,
                    Event::Ended {
                        id,
                        frame: None,
                        frames: 0,
                        interrupted: false,
                    },
                );
                if self.queue.is_empty() {
                    self.mark(end, Event::Idle { frame: None });
                }
            }
        }
        samples.resize(SAMPLES, 0);
        let pcm: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        match self
            .out
            .compositor
            .try_send(ToCompositor::Pcm(Bytes::from(pcm)))
        {
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            // The compositor's stream is behind: the mouth misses this packet, the voice
            // does not.
            Err(mpsc::error::TrySendError::Full(_)) | Ok(()) => {}
        }
        let mut opus = [0u8; 400];
        if let Ok(n) = self.encoder.encode(&samples, &mut opus) {
            let voice = ToThread::Voice {
                at: self.packet as f64 * PACKET.as_secs_f64(),
                rtp_time: self.packet * RTP_TICKS,
                payload: std::sync::Arc::from(&opus[..n]),
            };
            if let Err(std::sync::mpsc::TrySendError::Disconnected(_)) =
                self.out.thread.try_send(voice)
            {
                return false;
            }
        }
        self.packet += 1;
        true
    }
}

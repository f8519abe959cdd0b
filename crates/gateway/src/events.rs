//! What happens to an agent session, told to the application (server-sent events on
//! `GET /sessions/{id}/events`) and to the page (the session's WebRTC data channel), as one
//! JSON object per event:
//!
//! | `type` | fields | when |
//! | --- | --- | --- |
//! | `utterance_queued` | `id`, `position` (0: next) | the speech call was accepted |
//! | `utterance_started` | `id`, `frame`, `media_time_s`, `unix_ms` | its first frame left for the browser |
//! | `utterance_ended` | `id`, `frame`, `media_time_s`, `unix_ms`, `frames` (shown), `interrupted` | its last frame left, or it was interrupted (queued ones that never started: `frames` 0, no `frame`) |
//! | `utterance_failed` | `id`, `reason` | its audio or TTS failed midway (it ends with what came) |
//! | `idle` | `frame`, `media_time_s`, `unix_ms` | nothing plays or waits any more |
//! | `falling_behind` | `frames_dropped` (in all so far) | frames came too late to show and were dropped (the compositor is behind); at most every 2 s while it lasts |
//! | `session_closed` | `reason` | the session ended |
//!
//! `frame` is the session's frame index (frame `f` shows moment `f / fps` of the session's
//! voice, `media_time_s`), and `unix_ms` the wall-clock time the gateway sent it: together
//! they tell an application what the person has seen, within the browser's own jitter
//! buffer.

use serde_json::json;
use std::sync::Arc;
use tokio::sync::broadcast;

/// One event, before the session thread says when it happened on screen.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Queued {
        id: String,
        position: usize,
    },
    Started {
        id: String,
        frame: Option<u64>,
    },
    Ended {
        id: String,
        frame: Option<u64>,
        frames: u64,
        interrupted: bool,
    },
    Failed {
        id: String,
        reason: String,
    },
    Idle {
        frame: Option<u64>,
    },
    /// Frames were dropped as too late; `dropped` in all so far.
    Behind {
        dropped: u64,
    },
    Closed {
        reason: String,
    },
}

impl Event {
    /// The same event shown at `frame`.
    pub fn at(self, frame: u64) -> Event {
        match self {
            Event::Started { id, .. } => Event::Started {
                id,
                frame: Some(frame),
            },
            Event::Ended {
                id,
                frames,
                interrupted,
                ..
            } => Event::Ended {
                id,
                frame: Some(frame),
                frames,
                interrupted,
            },
            Event::Idle { .. } => Event::Idle { frame: Some(frame) },
            other => other,
        }
    }
}

/// Where a session's events go: every subscriber gets each one (a subscriber too slow to
/// keep up with 256 of them is told how many it missed).
#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<Arc<str>>,
    fps: f64,
}

/// Events held for a slow subscriber.
const BACKLOG: usize = 256;

impl Events {
    pub fn new(fps: f64) -> Events {
        Events {
            tx: broadcast::channel(BACKLOG).0,
            fps,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.tx.subscribe()
    }

    /// Sends `e` to every subscriber, as JSON; returns that JSON.
    pub fn send(&self, e: Event) -> Arc<str> {
        let json: Arc<str> = Arc::from(self.json(&e).to_string());
        let _ = self.tx.send(json.clone());
        json
    }

    fn json(&self, e: &Event) -> serde_json::Value {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let when = |frame: &Option<u64>| match frame {
            Some(f) => json!({
                "frame": f,
                "media_time_s": (*f as f64 / self.fps * 1000.0).round() / 1000.0,
                "unix_ms": unix_ms,
            }),
            None => json!({ "unix_ms": unix_ms }),
        };
        match e {
            Event::Queued { id, position } => {
                json!({"type": "utterance_queued", "id": id, "position": position, "unix_ms": unix_ms})
            }
            Event::Started { id, frame } => {
                let mut v = when(frame);
                v["type"] = "utterance_started".into();
                v["id"] = id.clone().into();
                v
            }
            Event::Ended {
                id,
                frame,
                frames,
                interrupted,
            } => {
                let mut v = when(frame);
                v["type"] = "utterance_ended".into();
                v["id"] = id.clone().into();
                v["frames"] = (*frames).into();
                v["interrupted"] = (*interrupted).into();
                v
            }
            Event::Failed { id, reason } => {
                json!({"type": "utterance_failed", "id": id, "reason": reason, "unix_ms": unix_ms})
            }
            Event::Idle { frame } => {
                let mut v = when(frame);
                v["type"] = "idle".into();
                v
            }
            Event::Behind { dropped } => {
                json!({"type": "falling_behind", "frames_dropped": dropped, "unix_ms": unix_ms})
            }
            Event::Closed { reason } => {
                json!({"type": "session_closed", "reason": reason, "unix_ms": unix_ms})
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_one_json_object_each_with_their_moment() {
        let events = Events::new(25.0);
        let mut rx = events.subscribe();
        events.send(
            Event::Ended {
                id: "u1".into(),
                frame: None,
                frames: 12,
                interrupted: true,
            }
            .at(50),
        );
        let v: serde_json::Value = serde_json::from_str(&rx.try_recv().unwrap()).unwrap();
        assert_eq!(v["type"], "utterance_ended");
        assert_eq!(
            (v["frame"].as_u64(), v["media_time_s"].as_f64()),
            (Some(50), Some(2.0))
        );
        assert_eq!(
            (v["frames"].as_u64(), v["interrupted"].as_bool()),
            (Some(12), Some(true))
        );
        assert!(v["unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
        let behind = events.send(Event::Behind { dropped: 7 });
        let v: serde_json::Value = serde_json::from_str(&behind).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["frames_dropped"].as_u64()),
            (Some("falling_behind"), Some(7))
        );
    }
}

//! The agent endpoints of a session, beside its URL (`/sessions/{id}/...`): what an
//! application uses to speak through the avatar and hear the user. Each requires the
//! gateway's `--api-token` when one is set (401 otherwise): a session's id alone is not
//! enough to make someone's avatar speak or to hear their user.
//!
//! - `POST speech`: say something. Text (`text/plain`, spoken by the TTS; `voice` and `rate`
//!   query parameters) or audio (`audio/wav`, `audio/L16; rate=N`, `audio/pcm; rate=N`;
//!   the body may stream: speech starts before it ends). Answers `202` with
//!   `{"id", "position"}` at once; `?interrupt=true` first drops what plays and waits.
//! - `POST interrupt`: stops the utterance playing and clears the queue.
//! - `GET events`: the session's events as server-sent events ([`crate::events`]).
//! - `GET microphone`: a WebSocket carrying the user's voice, 16 kHz 16-bit mono
//!   little-endian PCM, each binary message a whole number of samples as they come (about
//!   every 20 to 60 ms). One at a time per session.
//!
//! Refusals are a status and a one-line reason: 404 / 410 (unknown / ended session), 409 (a
//! mirror session, or a second microphone), 415 (content type), 400 (the field at fault:
//! empty text, a WAV that is not 16-bit mono PCM, an absurd rate), 413 (a body over
//! `--max-speech-bytes`), 429 (the queue at `--max-utterances`), 502 (the TTS failed or did
//! not start within `--tts-timeout-s`). None of them ends the session.

use crate::audio_in::{AudioIn, Encoding};
use crate::http::{refuse, Gateway};
use crate::session::Mode;
use crate::speech::{Refused, Utterance};
use crate::tts;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;

type Refusal = (StatusCode, String);

fn refused((status, why): Refusal) -> Response {
    refuse(status, why)
}

/// The session `id`, if the caller may act on it (its token) and it is an agent session
/// where `agent_only`.
fn session(
    gw: &Gateway,
    headers: &HeaderMap,
    id: &str,
    agent_only: bool,
) -> Result<crate::http::Handle, Refusal> {
    let auth = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    if gw.api_auth.check(auth).is_err() {
        return Err((
            StatusCode::UNAUTHORIZED,
            "authorization: send 'Authorization: Bearer <token>' with the gateway's --api-token"
                .into(),
        ));
    }
    let s = gw.session(id)?;
    if agent_only && s.mode != Mode::Agent {
        return Err((
            StatusCode::CONFLICT,
            "the session mirrors the browser's voice: open it with mode=agent for the application to speak and hear".into(),
        ));
    }
    Ok(s)
}

/// A random utterance id: 64 bits as hex.
fn utterance_id() -> String {
    use std::io::Read;
    let mut b = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub async fn speech(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match speak(&gw, &id, &query, &headers, body).await {
        Ok((uid, position)) => (
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({"id": uid, "position": position})),
        )
            .into_response(),
        Err(r) => refused(r),
    }
}

async fn speak(
    gw: &Gateway,
    id: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
) -> Result<(String, usize), Refusal> {
    let s = session(gw, headers, id, true)?;
    let speaker = s
        .speaker
        .ok_or((StatusCode::CONFLICT, "no speaker".to_string()))?;
    let bad = |why: String| (StatusCode::BAD_REQUEST, why);
    let interrupt = match query.get("interrupt").map(String::as_str) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(v) => {
            return Err(bad(format!(
                "interrupt: {:?} is not true or false",
                framecast_proto::echo(v.get(..16).unwrap_or(v))
            )))
        }
    };
    let limit = gw.opts.max_speech_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "body: {} bytes; at most {limit} (--max-speech-bytes)",
                declared.unwrap_or(0)
            ),
        ));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut stream = body.into_data_stream();
    let (encoding, rest): (Encoding, BodyBytes) =
        match Encoding::of(content_type).map_err(bad)? {
            Some(encoding) => (encoding, BodyBytes::Http(stream)),
            None if content_type
                .split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/plain")) =>
            {
                let mut text = Vec::new();
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| bad(format!("body: {e}")))?;
                    text.extend_from_slice(&chunk);
                    if text.len() > tts::MAX_TEXT {
                        return Err(bad(format!("text: more than {} bytes", tts::MAX_TEXT)));
                    }
                }
                let text = String::from_utf8(text).map_err(|_| bad("text: not UTF-8".into()))?;
                let req = tts::Request {
                    text,
                    voice: query.get("voice").cloned(),
                    rate: match query.get("rate") {
                        None => None,
                        Some(r) => Some(r.parse().map_err(|_| {
                            bad(format!(
                                "rate: {:?} is not a whole number of words per minute",
                                framecast_proto::echo(r.get(..16).unwrap_or(r))
                            ))
                        })?),
                    },
                };
                let speech = gw
                    .opts
                    .tts
                    .speak(&req, gw.opts.tts_timeout)
                    .await
                    .map_err(|e| match e {
                        tts::TtsError::Bad(why) => bad(why),
                        tts::TtsError::Failed(why) => (StatusCode::BAD_GATEWAY, why),
                    })?;
                (speech.encoding, BodyBytes::Tts(speech.bytes))
            }
            None => {
                return Err((
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!(
                        "Content-Type: {:?}; send text/plain (spoken by the TTS), audio/wav, audio/L16; rate=N or audio/pcm; rate=N",
                        framecast_proto::echo(content_type.get(..64).unwrap_or(content_type))
                    ),
                ))
            }
        };
    let mut rest = rest;
    let mut decoder = AudioIn::new(encoding);
    let mut samples = Vec::new();
    let mut received = 0usize;
    // The header is read here, so that bad audio is refused (400) before it is queued.
    while decoder.format().is_none() {
        match rest.next().await {
            Some(Ok(chunk)) => {
                received += chunk.len();
                decoder
                    .push(&chunk, &mut samples)
                    .map_err(|why| match &rest {
                        BodyBytes::Tts(_) => {
                            (StatusCode::BAD_GATEWAY, format!("the TTS's audio: {why}"))
                        }
                        BodyBytes::Http(_) => bad(why),
                    })?;
            }
            Some(Err(why)) => {
                return Err(match &rest {
                    BodyBytes::Tts(_) => (StatusCode::BAD_GATEWAY, why),
                    BodyBytes::Http(_) => bad(format!("body: {why}")),
                })
            }
            None => {
                let why = decoder.finish(&mut samples).err().unwrap_or_default();
                return Err(match &rest {
                    BodyBytes::Tts(_) => {
                        (StatusCode::BAD_GATEWAY, format!("the TTS's audio: {why}"))
                    }
                    BodyBytes::Http(_) => bad(why),
                });
            }
        }
    }
    let uid = utterance_id();
    let (tx, audio) = mpsc::channel(UTTERANCE_CHUNKS);
    if !samples.is_empty() {
        let _ = tx.try_send(Ok(std::mem::take(&mut samples)));
    }
    let position = speaker
        .say(
            Utterance {
                id: uid.clone(),
                audio,
            },
            interrupt,
        )
        .await
        .map_err(|e| match e {
            Refused::Full(n) => (
                StatusCode::TOO_MANY_REQUESTS,
                format!("the session's queue holds its most, {n} utterances (--max-utterances): wait for one to end, or interrupt"),
            ),
            Refused::Gone => (StatusCode::GONE, "the session has ended".into()),
        })?;
    tokio::spawn(pump(decoder, rest, tx, received, limit));
    Ok((uid, position))
}

/// Samples-chunks an utterance holds ahead of its playing: the body (or the TTS) waits when
/// it is this far ahead, so a fast source is held back by HTTP flow control.
const UTTERANCE_CHUNKS: usize = 32;

/// Where an utterance's bytes come from.
enum BodyBytes {
    Http(axum::body::BodyDataStream),
    Tts(mpsc::Receiver<Result<Bytes, String>>),
}

impl BodyBytes {
    async fn next(&mut self) -> Option<Result<Bytes, String>> {
        match self {
            BodyBytes::Http(s) => s.next().await.map(|r| r.map_err(|e| e.to_string())),
            BodyBytes::Tts(rx) => rx.recv().await,
        }
    }
}

/// Decodes the rest of an utterance's bytes into its samples as they come; a failure or a
/// body past the limit ends the utterance with what came (and says why).
async fn pump(
    mut decoder: AudioIn,
    mut bytes: BodyBytes,
    tx: mpsc::Sender<Result<Vec<i16>, String>>,
    mut received: usize,
    limit: usize,
) {
    let mut samples = Vec::new();
    loop {
        let failure = match bytes.next().await {
            None => decoder.finish(&mut samples).err(),
            Some(Err(why)) => Some(why),
            Some(Ok(chunk)) => {
                received += chunk.len();
                if received > limit {
                    Some(format!(
                        "body: more than {limit} bytes (--max-speech-bytes); the rest is not spoken"
                    ))
                } else {
                    match decoder.push(&chunk, &mut samples) {
                        Ok(()) => {
                            if !samples.is_empty()
                                && tx.send(Ok(std::mem::take(&mut samples))).await.is_err()
                            {
                                return; // interrupted
                            }
                            continue;
                        }
                        Err(why) => Some(why),
                    }
                }
            }
        };
        if !samples.is_empty() {
            let _ = tx.send(Ok(std::mem::take(&mut samples))).await;
        }
        if let Some(why) = failure {
            let _ = tx.send(Err(why)).await;
        }
        return;
    }
}

pub async fn interrupt(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let s = match session(&gw, &headers, &id, true) {
        Ok(s) => s,
        Err(r) => return refused(r),
    };
    match s.speaker.map(|sp| async move { sp.interrupt().await }) {
        Some(f) => match f.await {
            Ok(n) => axum::Json(serde_json::json!({"interrupted": n})).into_response(),
            Err(_) => refuse(StatusCode::GONE, "the session has ended"),
        },
        None => refuse(StatusCode::CONFLICT, "no speaker"),
    }
}

pub async fn events(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let s = match session(&gw, &headers, &id, false) {
        Ok(s) => s,
        Err(r) => return refused(r),
    };
    Sse::new(event_stream(s.events.subscribe()))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The session's events as server-sent events, until the session ends.
fn event_stream(
    rx: tokio::sync::broadcast::Receiver<Arc<str>>,
) -> impl Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>> {
    use tokio::sync::broadcast::error::RecvError;
    futures::stream::unfold((rx, false), |(mut rx, closed)| async move {
        if closed {
            return None;
        }
        let (json, closed) = match rx.recv().await {
            Ok(json) => {
                let closed = json.contains("\"session_closed\"");
                (json.to_string(), closed)
            }
            Err(RecvError::Lagged(n)) => (
                format!("{{\"type\":\"events_missed\",\"count\":{n}}}"),
                false,
            ),
            Err(RecvError::Closed) => return None,
        };
        Some((
            Ok(axum::response::sse::Event::default().data(json)),
            (rx, closed),
        ))
    })
}

pub async fn microphone(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    // Who asks and for what first: a stranger learns nothing from the upgrade's checks.
    let s = match session(&gw, &headers, &id, true) {
        Ok(s) => s,
        Err(r) => return refused(r),
    };
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let Some(slot) = s.microphone else {
        return refuse(StatusCode::CONFLICT, "the session has no microphone");
    };
    let Some(rx) = slot.lock().take() else {
        return refuse(
            StatusCode::CONFLICT,
            "the session's microphone is already open on another WebSocket",
        );
    };
    upgrade.on_upgrade(move |ws| send_microphone(ws, rx, slot))
}

/// Sends the microphone's PCM until either side ends; then the microphone may be opened
/// again.
async fn send_microphone(
    mut ws: WebSocket,
    mut rx: mpsc::Receiver<Bytes>,
    slot: Arc<parking_lot::Mutex<Option<mpsc::Receiver<Bytes>>>>,
) {
    loop {
        tokio::select! {
            pcm = rx.recv() => match pcm {
                Some(pcm) => {
                    if ws.send(Message::Binary(pcm)).await.is_err() {
                        break;
                    }
                }
                None => {
                    let _ = ws.send(Message::Close(None)).await;
                    break;
                }
            },
            msg = ws.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    *slot.lock() = Some(rx);
}

//! Text to speech for agent sessions: espeak-ng, built in (setup installs it), with the voice
//! and rate each call chooses; or an operator's TTS service over HTTP (`--tts-url`): the text
//! is POSTed (`text/plain`, with `voice` and `rate` as query parameters when given) and the
//! answer, WAV or raw 16-bit PCM (`audio/L16; rate=N`, `audio/pcm; rate=N`), is spoken as it
//! streams back, so speech starts before the service has finished.

use crate::audio_in::Encoding;
use bytes::Bytes;
use std::time::Duration;
use tokio::sync::mpsc;

/// Where a session's text is spoken.
#[derive(Clone, Debug)]
pub enum Tts {
    /// `espeak-ng` on the PATH (or this program).
    Espeak { program: String },
    /// An HTTP service: `http://host:port/path`.
    Http { url: String },
}

impl Default for Tts {
    fn default() -> Self {
        Tts::Espeak {
            program: "espeak-ng".into(),
        }
    }
}

/// What one call asks for.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub text: String,
    /// espeak-ng's voice (`en`, `en-us`, `en+f3`, ...) or the service's own name for one.
    pub voice: Option<String>,
    /// Words per minute.
    pub rate: Option<u32>,
}

/// Speech as it is made: its encoding and its bytes, in order, as they come.
pub struct Speech {
    pub encoding: Encoding,
    pub bytes: mpsc::Receiver<Result<Bytes, String>>,
}

/// Why there is no speech: a reason for a 400 (the request) or a 502 (the TTS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TtsError {
    Bad(String),
    Failed(String),
}

/// The longest text one call may speak, in bytes.
pub const MAX_TEXT: usize = 16 << 10;

impl Request {
    /// Checks what a client sent: text present and bounded, a voice name that can only be
    /// a name, a rate in espeak-ng's range.
    pub fn check(&self) -> Result<(), TtsError> {
        if self.text.trim().is_empty() {
            return Err(TtsError::Bad("text: empty (nothing to say)".into()));
        }
        if self.text.len() > MAX_TEXT {
            return Err(TtsError::Bad(format!(
                "text: {} bytes; at most {MAX_TEXT}",
                self.text.len()
            )));
        }
        if let Some(v) = &self.voice {
            let ok = !v.is_empty()
                && v.len() <= 40
                && !v.starts_with('-')
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'_'));
            if !ok {
                return Err(TtsError::Bad(format!(
                    "voice: {:?} is not a voice name (letters, digits, '-', '+', '_'; e.g. en-us)",
                    framecast_proto::echo(v.get(..40).unwrap_or(v))
                )));
            }
        }
        if let Some(r) = self.rate.filter(|r| !(80..=450).contains(r)) {
            return Err(TtsError::Bad(format!(
                "rate: {r} words per minute; 80 to 450"
            )));
        }
        Ok(())
    }
}

impl Tts {
    /// Starts speaking `req`: once the speech has begun (the process started, or the
    /// service answered 200 with audio within `timeout`), its bytes as they come.
    pub async fn speak(&self, req: &Request, timeout: Duration) -> Result<Speech, TtsError> {
        req.check()?;
        match self {
            Tts::Espeak { program } => espeak(program, req).await,
            Tts::Http { url } => tokio::time::timeout(timeout, http(url, req, timeout))
                .await
                .map_err(|_| {
                    TtsError::Failed(format!(
                        "the TTS service at {url} did not answer within {} s",
                        timeout.as_secs_f64()
                    ))
                })?,
        }
    }
}

/// Reads `read` to its end into a channel of chunks (the channel's bound holds a reader
/// that is ahead of the speech).
fn pump<R>(
    mut read: R,
    tx: mpsc::Sender<Result<Bytes, String>>,
    on_end: impl FnOnce() -> Option<String> + Send + 'static,
) where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    use tokio::io::AsyncReadExt;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match read.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    if tx
                        .send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("reading the speech: {e}"))).await;
                    return;
                }
            }
        }
        if let Some(failure) = on_end() {
            let _ = tx.send(Err(failure)).await;
        }
    });
}

async fn espeak(program: &str, req: &Request) -> Result<Speech, TtsError> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg("--stdout");
    if let Some(v) = &req.voice {
        cmd.args(["-v", v]);
    }
    if let Some(r) = req.rate {
        cmd.args(["-s", &r.to_string()]);
    }
    // The text on stdin: never an argument a client could make look like a flag.
    cmd.arg("--stdin")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| TtsError::Failed(format!("espeak-ng: cannot start {program}: {e}")))?;
    let mut stdin = child.stdin.take().expect("piped");
    let text = req.text.clone();
    tokio::spawn(async move {
        let _ = stdin.write_all(text.as_bytes()).await;
    });
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel(8);
    // The process's end decides whether the speech ended well: its status and stderr.
    let status = std::sync::Arc::new(parking_lot::Mutex::new(None::<String>));
    let reported = status.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut err = String::new();
        let mut stderr = stderr;
        let _ = stderr.read_to_string(&mut err).await;
        let done = child.wait().await;
        let failure = match done {
            Ok(s) if s.success() => None,
            Ok(s) => Some(format!("espeak-ng failed ({s}): {}", err.trim())),
            Err(e) => Some(format!("espeak-ng: {e}")),
        };
        *reported.lock() = failure;
    });
    pump(stdout, tx, move || status.lock().take());
    Ok(Speech {
        encoding: Encoding::Wav,
        bytes: rx,
    })
}

/// The service's answer to the text, once its status and type say audio.
async fn http(url: &str, req: &Request, timeout: Duration) -> Result<Speech, TtsError> {
    use http_body_util::BodyExt;
    let failed = |why: String| TtsError::Failed(format!("the TTS service at {url}: {why}"));
    let uri: hyper::Uri = url.parse().map_err(|e| failed(format!("not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(failed("only http:// services are supported".into()));
    }
    let host = uri
        .host()
        .ok_or_else(|| failed("no host".into()))?
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let mut path = uri.path().to_string();
    let mut query: Vec<String> = uri.query().map(|q| vec![q.to_string()]).unwrap_or_default();
    if let Some(v) = &req.voice {
        query.push(format!("voice={v}"));
    }
    if let Some(r) = req.rate {
        query.push(format!("rate={r}"));
    }
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| failed(format!("cannot connect: {e}")))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| failed(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = hyper::Request::post(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(http_body_util::Full::new(Bytes::from(req.text.clone())))
        .map_err(|e| failed(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| failed(e.to_string()))?;
    if !response.status().is_success() {
        return Err(failed(format!("answered {}", response.status())));
    }
    let content_type = response
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let encoding = Encoding::of(&content_type)
        .map_err(failed)?
        .ok_or_else(|| failed(format!("answered {content_type:?}, not WAV or 16-bit PCM")))?;
    let (tx, rx) = mpsc::channel(8);
    let mut body = response.into_body();
    tokio::spawn(async move {
        loop {
            let frame = tokio::time::timeout(timeout, body.frame()).await;
            let item = match frame {
                Err(_) => Some(Err("the TTS service stalled".to_string())),
                Ok(None) => None,
                Ok(Some(Err(e))) => Some(Err(format!("the TTS service: {e}"))),
                Ok(Some(Ok(f))) => match f.into_data() {
                    Ok(d) => Some(Ok(d)),
                    Err(_) => continue,
                },
            };
            let Some(item) = item else { return };
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    Ok(Speech {
        encoding,
        bytes: rx,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_naming_the_field() {
        let bad = |r: Request| match r.check() {
            Err(TtsError::Bad(why)) => why,
            other => panic!("{other:?}"),
        };
        assert!(bad(Request::default()).starts_with("text"));
        let text = |t: &str| Request {
            text: t.into(),
            ..Default::default()
        };
        assert!(bad(Request {
            voice: Some("-x".into()),
            ..text("hi")
        })
        .starts_with("voice"));
        assert!(bad(Request {
            voice: Some("en; rm".into()),
            ..text("hi")
        })
        .starts_with("voice"));
        assert!(bad(Request {
            rate: Some(5),
            ..text("hi")
        })
        .starts_with("rate"));
        assert!(bad(text(&"a".repeat(MAX_TEXT + 1))).starts_with("text"));
        text("hello").check().unwrap();
    }
}

//! `framecast-bench speech`: sessions that speak at real-time pace, two ways side by side at
//! each number of sessions:
//!
//! - `stream`: an audio session per client, PCM in `--packet-ms` messages sent as the audio
//!   "happens" (real time), frames back as their audio arrives;
//! - `chunk`: the path before audio sessions: the client waits for `--chunk` frames' worth of
//!   audio, computes their features itself (the avatar's `[audio] features = "energy"`) and
//!   sends one request per chunk.
//!
//! `--mixes` sets what the sessions say: `speech` (the speech throughout, both paths),
//! `idle` (silence throughout: every frame idle, the prepared background itself) and
//! `dialogue` (2 s of speech, 2 s of listening, in turn); the last two run the stream path,
//! where the compositor marks silent frames idle by itself. With `--cpu NAME=PID` (processes
//! on this host, read from /proc), each level reports the CPU each process spent per frame.
//!
//! A frame's latency runs from the moment the audio completing its window was available to
//! the client (sent, on the stream path) to the frame's arrival; a frame later than
//! `--deadline-ms` is late. With `--inference`, the face model's statistics give the mean
//! number of requests (one per session at a time) merged into each GPU batch. Sessions start
//! spread evenly over one frame period, as independent clients would.

use crate::client::{self, Access};
use crate::demo;
use crate::stats::percentile;
use anyhow::{bail, Context, Result};
use framecast_audio::window::{self, WINDOW};
use framecast_audio::{mel, Resampler};
use framecast_proto::compositor::v1::compositor_client::CompositorClient;
use framecast_proto::compositor::v1::{RenderRequest, Tensor};
use framecast_proto::kserve::ModelStatisticsRequest;
use framecast_proto::tensor::{self, DataType};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

#[derive(clap::Args)]
pub struct SpeechArgs {
    /// Compositor URL.
    #[arg(long, default_value = "http://127.0.0.1:8011")]
    pub compositor: String,
    /// Inference URL: report requests merged per batch from its statistics.
    #[arg(long)]
    pub inference: Option<String>,
    #[command(flatten)]
    pub access: Access,
    #[arg(long, default_value = "demo")]
    pub avatar: String,
    /// What each session says (espeak-ng), looped to --seconds.
    #[arg(long, default_value = demo::DEFAULT_TEXT)]
    pub text: String,
    /// A WAV file (mono 16-bit) to speak instead of --text.
    #[arg(long)]
    pub wav: Option<PathBuf>,
    /// A directory of WAV files (mono 16-bit): session i speaks file i modulo their number
    /// (in name order), each looped to --seconds.
    #[arg(long, conflicts_with_all = ["wav", "text"])]
    pub wav_dir: Option<PathBuf>,
    /// Numbers of concurrent sessions to run, in turn.
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    pub sessions: Vec<usize>,
    /// Seconds each session speaks.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Milliseconds of audio per message on the stream path.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub packet_ms: u32,
    /// Frames per request on the chunk path.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(1..=3000))]
    pub chunk: u32,
    /// A frame arriving later than this after its audio is late, ms.
    #[arg(long, default_value_t = 250.0)]
    pub deadline_ms: f64,
    /// Where speech.wav goes, and each level's every frame latency
    /// (`latency-PATH-MIX-SESSIONS.csv`: session, frame index, ms).
    #[arg(long, default_value = "out/bench-speech")]
    pub out: PathBuf,
    /// What the sessions say, in turn: speech throughout, silence throughout (idle), or
    /// 2 s of speech and 2 s of silence in turn (dialogue).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "speech")]
    pub mixes: Vec<Mix>,
    /// How speech sessions send their audio: streamed as it is spoken, and in requests of
    /// --chunk frames (the other mixes are streamed only).
    #[arg(long, value_delimiter = ',', default_value = "stream,chunk", value_parser = ["stream", "chunk"])]
    pub paths: Vec<String>,
    /// A process on this host whose CPU time per frame to report, as NAME=PID (repeat for
    /// several, e.g. the compositor and the inference server).
    #[arg(long = "cpu", value_parser = parse_cpu)]
    pub cpu: Vec<(String, u32)>,
}

/// What the sessions of a level say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mix {
    Speech,
    Idle,
    Dialogue,
}

impl Mix {
    fn name(self) -> &'static str {
        match self {
            Mix::Speech => "speech",
            Mix::Idle => "idle",
            Mix::Dialogue => "dialogue",
        }
    }

    /// `samples` as this mix says them: silence over the listening parts.
    fn apply(self, samples: &[i16], rate: u32) -> Vec<i16> {
        let turn = 2 * rate as usize;
        samples
            .iter()
            .enumerate()
            .map(|(i, &s)| match self {
                Mix::Speech => s,
                Mix::Idle => 0,
                Mix::Dialogue if (i / turn) % 2 == 1 => 0,
                Mix::Dialogue => s,
            })
            .collect()
    }
}

pub(crate) fn parse_cpu(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=PID"))?;
    let pid = pid
        .parse::<u32>()
        .map_err(|_| format!("{s:?}: {pid:?} is not a process id"))?;
    cpu_seconds(pid).map_err(|e| format!("{s:?}: {e}"))?;
    Ok((name.to_string(), pid))
}

/// CPU seconds (user + system) process `pid` has used.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64, String> {
    crate::report::cpu_time_of(Some(pid)).map(|d| d.as_secs_f64())
}

/// One path at one number of sessions.
struct Level {
    path: &'static str,
    mix: Mix,
    sessions: usize,
    frames: usize,
    idle: usize,
    /// CPU ms per frame of each `--cpu` process.
    cpu: Vec<(String, f64)>,
    late: usize,
    /// Late frames by the second of the session their frame falls in (frame index / fps):
    /// a start-up cost shows at second 0, a stall of the host as one second of every session.
    late_by_second: std::collections::BTreeMap<u64, usize>,
    /// Client-side latency, µs, sorted.
    latency: Vec<u64>,
    /// Requests, and frames, per executed batch (forward pass) of the face model, when known.
    per_batch: Option<(f64, f64)>,
}

/// Input seconds after which frame `k`'s window is complete (16 kHz sample
/// `200 (start + 15) + 399`).
fn window_done(k: u64, fps: f64) -> f64 {
    let last = window::start(k, fps) + WINDOW - 1;
    (last * mel::HOP + mel::N_FFT / 2) as f64 / 16_000.0
}

pub async fn run(args: SpeechArgs) -> Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let speeches = match &args.wav_dir {
        Some(dir) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("wav")))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("{}: no .wav files", dir.display());
            }
            files
                .iter()
                .map(|f| demo::read_wav(f))
                .collect::<Result<Vec<_>>>()?
        }
        None => vec![demo::speech(&args.text, args.wav.as_deref(), &args.out)?],
    };
    let mut client = client::compositor(&args.compositor, &args.access)?;
    let info = demo::avatar_info(&mut client, &args.avatar).await?;
    let fps = info.fps;
    // Per voice: its rate, its samples looped to --seconds, and its frames' loudness.
    let mut voices = Vec::new();
    for (rate, speech) in speeches {
        if speech.is_empty() {
            bail!("a speech file is empty");
        }
        framecast_audio::pcm::check_rate(rate).map_err(anyhow::Error::msg)?;
        let n = (args.seconds * rate as f64) as usize;
        let samples: Arc<Vec<i16>> = Arc::new(speech.iter().copied().cycle().take(n).collect());
        let energies = Arc::new(frame_energies(&samples, rate, fps));
        voices.push((rate, samples, energies));
    }
    let mut levels = Vec::new();
    for &mix in &args.mixes {
        let paths: Vec<&'static str> = match mix {
            Mix::Speech => ["stream", "chunk"]
                .into_iter()
                .filter(|p| args.paths.iter().any(|a| a == p))
                .collect(),
            _ => vec!["stream"],
        };
        for &sessions in &args.sessions {
            for &path in &paths {
                let level = run_level(&args, &client, &info, &voices, mix, sessions, path).await?;
                print_level(&level);
                levels.push(level);
            }
        }
    }
    Ok(())
}

type Voice = (u32, Arc<Vec<i16>>, Arc<Vec<f32>>);

#[allow(clippy::too_many_arguments)]
async fn run_level(
    args: &SpeechArgs,
    client: &CompositorClient<client::Authed>,
    info: &framecast_proto::compositor::v1::AvatarInfo,
    voices: &[Voice],
    mix: Mix,
    sessions: usize,
    path: &'static str,
) -> Result<Level> {
    let fps = info.fps;
    let before = batch_stats(args, &info.model).await?;
    let cpu_before: Vec<f64> = args
        .cpu
        .iter()
        .map(|(_, pid)| cpu_seconds(*pid).map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    let mut tasks = Vec::new();
    for s in 0..sessions {
        // Sessions start spread evenly over one frame period, as independent clients
        // would, not in lockstep (lockstep would let every frame share a batch).
        let offset = Duration::from_secs_f64(s as f64 / sessions as f64 / fps);
        let client = client.clone();
        let (rate, samples, energies) = voices[s % voices.len()].clone();
        let samples = mix.apply(&samples, rate);
        let a = (args.avatar.clone(), args.packet_ms, args.chunk);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let id = format!("{path}-{}-{sessions}-{s}", mix.name());
            if path == "stream" {
                stream_session(client, id, a.0, rate, &samples, a.1, fps).await
            } else {
                chunk_session(client, id, a.0, rate, &samples, &energies, a.2, fps).await
            }
        }));
    }
    let (mut latency, mut idle) = (Vec::new(), 0);
    let mut late_by_second = std::collections::BTreeMap::new();
    // Every frame's latency, to see where in the run the slow ones fall.
    let mut csv = String::from("session,frame,latency_ms\n");
    for (s, t) in tasks.into_iter().enumerate() {
        let (l, i) = t.await??;
        for (k, us) in l {
            csv.push_str(&format!("{s},{k},{:.1}\n", us as f64 / 1e3));
            if us as f64 > args.deadline_ms * 1e3 {
                *late_by_second.entry((k as f64 / fps) as u64).or_insert(0) += 1;
            }
            latency.push(us);
        }
        idle += i;
    }
    let csv_path = args
        .out
        .join(format!("latency-{path}-{}-{sessions}.csv", mix.name()));
    std::fs::write(&csv_path, csv).with_context(|| format!("{}", csv_path.display()))?;
    let after = batch_stats(args, &info.model).await?;
    let frames = latency.len();
    let cpu = args
        .cpu
        .iter()
        .zip(cpu_before)
        .map(|((name, pid), t0)| {
            let spent = cpu_seconds(*pid).map_err(anyhow::Error::msg)? - t0;
            Ok((name.clone(), spent * 1e3 / frames.max(1) as f64))
        })
        .collect::<Result<_>>()?;
    latency.sort_unstable();
    let late = latency
        .iter()
        .filter(|&&l| l as f64 > args.deadline_ms * 1e3)
        .count();
    let per_batch = match (before, after) {
        (Some(b), Some(a)) if a.executions > b.executions => {
            let passes = (a.executions - b.executions) as f64;
            Some((
                (a.requests - b.requests) as f64 / passes,
                (a.frames - b.frames) as f64 / passes,
            ))
        }
        _ => None,
    };
    Ok(Level {
        path,
        mix,
        sessions,
        frames,
        idle,
        cpu,
        late,
        late_by_second,
        latency,
        per_batch,
    })
}

fn print_level(l: &Level) {
    let ms = |q| percentile(&l.latency, q).unwrap_or(0) as f64 / 1e3;
    let cpu: String = l
        .cpu
        .iter()
        .map(|(name, ms)| format!("  cpu/frame {name} {ms:.2} ms"))
        .collect();
    let by_second: String = if l.late_by_second.is_empty() {
        String::new()
    } else {
        let seconds: Vec<String> = l
            .late_by_second
            .iter()
            .map(|(s, n)| format!("{s}s:{n}"))
            .collect();
        format!("  late by second {}", seconds.join(","))
    };
    println!(
        "{:<6} {:<8} sessions {:>3}  frames {:>6}  idle {:>5}  late {:>5}  latency p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  requests/batch {}  frames/batch {}{cpu}{by_second}",
        l.path,
        l.mix.name(),
        l.sessions,
        l.frames,
        l.idle,
        l.late,
        ms(0.5),
        ms(0.99),
        ms(1.0),
        l.per_batch.map_or("-".to_string(), |v| format!("{:.2}", v.0)),
        l.per_batch.map_or("-".to_string(), |v| format!("{:.2}", v.1))
    );
}

/// What the inference service has counted for a model.
#[derive(Clone, Copy, Default)]
struct Counts {
    /// Successful requests.
    requests: u64,
    /// Frames (batch items) inferred.
    frames: u64,
    /// Forward passes.
    executions: u64,
}

/// The counts of `model`, when --inference is given. A model not loaded yet (loaded at its
/// first request) has counted nothing: zeros, not an error.
async fn batch_stats(args: &SpeechArgs, model: &str) -> Result<Option<Counts>> {
    let Some(url) = &args.inference else {
        return Ok(None);
    };
    let reply = client::kserve(url, &args.access)?
        .model_statistics(ModelStatisticsRequest {
            name: model.to_string(),
            version: String::new(),
        })
        .await;
    let stats = match reply {
        Ok(r) => r.into_inner(),
        Err(s) if s.message().contains("not loaded") => return Ok(Some(Counts::default())),
        Err(s) => {
            return Err(anyhow::anyhow!(
                "ModelStatistics of '{model}' at --inference {url}: {}",
                s.message()
            ))
        }
    };
    Ok(stats.model_stats.first().map(|s| Counts {
        requests: s
            .inference_stats
            .as_ref()
            .and_then(|i| i.success.as_ref())
            .map_or(0, |c| c.count),
        frames: s.inference_count,
        executions: s.execution_count,
    }))
}

/// Each frame's loudness, as the compositor computes it for `features = "energy"`.
fn frame_energies(samples: &[i16], rate: u32, fps: f64) -> Vec<f32> {
    let input: Vec<f32> = samples.iter().map(|&s| s as f32 / 32768.0).collect();
    let mut r = Resampler::new(rate).expect("a WAV rate checked by the reader");
    let mut s16k = Vec::new();
    r.push(&input, &mut s16k);
    r.finish(&mut s16k);
    let mels = mel::spectrogram(&s16k);
    (0..window::frames_for(s16k.len(), fps))
        .map(|k| window::energy(&window::window(&mels, 0, k, fps, true).unwrap_or_default()))
        .collect()
}

/// One audio session at real-time pace; each frame's index and latency, µs.
async fn stream_session(
    mut client: CompositorClient<client::Authed>,
    id: String,
    avatar: String,
    rate: u32,
    samples: &[i16],
    packet_ms: u32,
    fps: f64,
) -> Result<(Vec<(u64, u64)>, usize)> {
    let packet = (rate as usize * packet_ms as usize / 1000).max(1);
    let messages = demo::session(&id, &avatar, rate, samples, packet);
    let count = messages.len();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let t0 = Instant::now();
    let sent = Arc::new(std::sync::Mutex::new(vec![t0; count]));
    let sent_by_sender = sent.clone();
    let sender = tokio::spawn(async move {
        for (i, m) in messages.into_iter().enumerate() {
            // Packet i holds audio up to (i + 1) * packet samples: send it once that has
            // "happened".
            let due = t0 + Duration::from_secs_f64(((i + 1) * packet) as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
            if let Ok(mut s) = sent_by_sender.lock() {
                s[i] = Instant::now();
            }
            if tx.send(m).await.is_err() {
                return;
            }
        }
    });
    let mut stream = client
        .render(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let (mut arrivals, mut idle) = (Vec::new(), 0);
    while let Some(f) = stream.next().await {
        let f = f.context("render stream")?;
        idle += usize::from(f.timings.is_some_and(|t| t.idle));
        arrivals.push((f.frame_index, Instant::now()));
    }
    sender.await?;
    let sent = sent
        .lock()
        .map_err(|_| anyhow::anyhow!("sender panicked"))?;
    let latency = arrivals
        .into_iter()
        .map(|(k, at)| {
            let needed = (window_done(k, fps) * rate as f64).ceil() as usize;
            let p = (needed.div_ceil(packet)).clamp(1, count) - 1;
            (k, at.saturating_duration_since(sent[p]).as_micros() as u64)
        })
        .collect();
    Ok((latency, idle))
}

/// The chunk path at real-time pace: each `chunk` frames are asked for once the audio of the
/// chunk's last window is available; each frame's index and latency, µs.
#[allow(clippy::too_many_arguments)]
async fn chunk_session(
    mut client: CompositorClient<client::Authed>,
    id: String,
    avatar: String,
    rate: u32,
    samples: &[i16],
    energies: &[f32],
    chunk: u32,
    fps: f64,
) -> Result<(Vec<(u64, u64)>, usize)> {
    let total = energies.len() as u64;
    let duration = samples.len() as f64 / rate as f64;
    let per = 32 * 16 * 16;
    let mut requests = Vec::new();
    let mut start = 0u64;
    while start < total {
        let n = (chunk as u64).min(total - start);
        let data: Vec<f32> = (start..start + n)
            .flat_map(|k| std::iter::repeat_n(energies[k as usize], per))
            .collect();
        let due = window_done(start + n - 1, fps).min(duration);
        requests.push((
            due,
            RenderRequest {
                request_id: format!("{id}-{start}"),
                avatar_id: avatar.clone(),
                start_frame: start,
                frame_count: n as u32,
                conditioning: vec![Tensor {
                    name: "audio".into(),
                    datatype: DataType::F32.as_str().into(),
                    shape: vec![n as i64, 32, 16, 16],
                    data: tensor::encode(&data),
                }],
                ..Default::default()
            },
        ));
        start += n;
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let t0 = Instant::now();
    let sender = tokio::spawn(async move {
        for (due, r) in requests {
            tokio::time::sleep_until((t0 + Duration::from_secs_f64(due)).into()).await;
            if tx.send(r).await.is_err() {
                return;
            }
        }
    });
    let mut stream = client
        .render(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut latency = Vec::new();
    while let Some(f) = stream.next().await {
        let f = f.context("render stream")?;
        let ready = t0 + Duration::from_secs_f64(window_done(f.frame_index, fps).min(duration));
        let us = Instant::now().saturating_duration_since(ready).as_micros() as u64;
        latency.push((f.frame_index, us));
    }
    sender.await?;
    Ok((latency, 0))
}

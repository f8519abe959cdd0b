use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use framecast_compositor::avatar::{Avatar, Source};
use framecast_compositor::avatar_store::AvatarStore;
use framecast_compositor::demo::{self, DemoOptions};
use framecast_compositor::encode::Subsampling;
use framecast_compositor::import::{self, ImportOptions, Progress};
use framecast_compositor::inference::{ClientOptions, InferenceClient, RowSource};
use framecast_compositor::manifest::Channel;
use framecast_compositor::metrics::Metrics;
use framecast_compositor::render::{FaceInputs, RenderOptions};
use framecast_compositor::rpc::CompositorService;
use framecast_compositor::server::ServeOptions;
use framecast_telemetry::host_cpu::Headroom;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Composites generated faces into avatar video and streams JPEG frames over gRPC.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Render and avatar management API.
    Serve(Box<ServeArgs>),
    /// Work with avatar bundles on disk.
    #[command(subcommand)]
    Avatar(AvatarCommand),
}

#[derive(Subcommand)]
enum AvatarCommand {
    /// Validate a bundle and report every problem found (exit 1 if any), its prepared file
    /// included: one that exists but cannot be used (stale, other settings, corrupt) is a
    /// problem, since the server would then prepare the avatar at every load.
    Check {
        /// The bundle directory (holding avatar.toml).
        dir: PathBuf,
        /// Chroma subsampling the server encodes with (its --subsampling).
        #[arg(long, default_value_t = RenderOptions::default().subsampling)]
        subsampling: Subsampling,
    },
    /// Encode every frame once with restart markers and write the bundle's prepared file
    /// (DIR/prepared.fcp), so that the server's load is a read instead of a decode and
    /// re-encode of every frame. Run it again after changing the frames, boxes or manifest.
    Prepare {
        /// The bundle directory (holding avatar.toml).
        dir: PathBuf,
        /// Chroma subsampling the server encodes with (its --subsampling).
        #[arg(long, default_value_t = RenderOptions::default().subsampling)]
        subsampling: Subsampling,
    },
    /// Make an avatar from a video of a person (MP4/H.264, WebM, whatever Debian's ffmpeg
    /// reads): the face found in every frame (OpenCV's frontal-face cascade from Debian's
    /// opencv-data), boxes smoothed and padded as Wav2Lip does, the bundle written whole
    /// into ROOT/ID (frames, boxes.json, avatar.toml, prepared.fcp) or not at all. The video
    /// plays ping-pong as the avatar's loop.
    Import(Box<ImportArgs>),
    /// Generate the demo avatar bundle (no download).
    MakeDemo {
        /// Avatar root to write into; the bundle lands in ROOT/ID.
        #[arg(long, default_value = "avatars")]
        root: PathBuf,
        #[arg(long, default_value = "demo")]
        id: String,
        #[arg(long, default_value_t = 1280)]
        width: u32,
        #[arg(long, default_value_t = 720)]
        height: u32,
        #[arg(long, default_value_t = 200)]
        frames: u32,
        #[arg(long, default_value_t = 25.0)]
        fps: f64,
        #[arg(long, default_value_t = 320)]
        crop_size: u32,
        /// Model the avatar renders with.
        #[arg(long, default_value = "talking-demo")]
        model: String,
    },
}

#[derive(clap::Args)]
struct ImportArgs {
    /// The video file.
    video: PathBuf,
    /// Avatar root to write into; the bundle lands in ROOT/ID.
    #[arg(long, default_value = "avatars")]
    root: PathBuf,
    /// The avatar's id: its directory under ROOT (letters, digits, '.', '_', '-').
    #[arg(long)]
    id: String,
    /// Model the avatar renders with.
    #[arg(long, default_value = "wav2lip")]
    model: String,
    /// The model's crop size S (Wav2Lip: 96).
    #[arg(long, default_value_t = 96)]
    crop_size: u32,
    /// Order of the face input's two images (Wav2Lip: masked,reference).
    #[arg(long, value_delimiter = ',', default_value = "masked,reference")]
    channel_order: Vec<ChannelArg>,
    /// How the model hears speech: mel (Wav2Lip's mel window), encoder (embeddings of
    /// --encoder, SyncTalk_2D), energy, or none (a mute avatar).
    #[arg(long, default_value = "mel")]
    features: String,
    /// The model input the speech drives.
    #[arg(long, default_value = "mel")]
    audio_input: String,
    /// The audio-encoder model, with --features encoder.
    #[arg(long, default_value = "audio-encoder")]
    encoder: String,
    /// Padding of the detected face box in pixels: top,bottom,left,right (Wav2Lip's
    /// --pads).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,10,0,0",
        allow_negative_numbers = true
    )]
    pads: Vec<i64>,
    /// Frames each box is averaged over (Wav2Lip: 5; 1: none).
    #[arg(long, default_value_t = 5)]
    smooth: usize,
    /// Import only frames START..END of the video (END excluded).
    #[arg(long, value_parser = parse_trim)]
    trim: Option<(u64, u64)>,
    /// Most frames to import (the avatar's memory once loaded grows with them: 0.1 to
    /// 0.3 MiB a 720p frame).
    #[arg(long, default_value_t = 3000)]
    max_frames: u64,
    /// The face cascade (OpenCV XML).
    #[arg(long, default_value = framecast_compositor::face_detect::DEFAULT_CASCADE)]
    cascade: PathBuf,
    /// Smallest face side searched, pixels (0: a tenth of the frame's height).
    #[arg(long, default_value_t = 0)]
    min_face: u32,
    /// Replace an avatar already at ROOT/ID.
    #[arg(long)]
    force: bool,
    /// Progress as JSON lines on stdout (for a service), not a line on the terminal.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML file of settings; its keys are these flags' long names. Flags and environment
    /// variables override it.
    #[arg(long, env = "FRAMECAST_CONFIG")]
    config: Option<PathBuf>,
    /// Log lines as text or as one JSON object per line (stderr; level from RUST_LOG).
    #[arg(long, env = "FRAMECAST_LOG_FORMAT", value_enum, default_value_t = framecast_telemetry::LogFormat::Text)]
    log_format: framecast_telemetry::LogFormat,
    /// Directory holding one bundle directory per avatar.
    #[arg(long, env = "FRAMECAST_AVATARS", default_value = "avatars")]
    avatars: PathBuf,
    /// gRPC listen address.
    #[arg(
        long,
        env = "FRAMECAST_COMPOSITOR_LISTEN",
        default_value = "0.0.0.0:8011"
    )]
    listen: SocketAddr,
    /// Inference service URLs, comma-separated; batches are balanced across them. A host
    /// name stands for every address it resolves to (see --inference-resolve-s).
    #[arg(
        long,
        env = "FRAMECAST_INFERENCE_URL",
        default_value = "http://127.0.0.1:8001",
        value_delimiter = ','
    )]
    inference: Vec<String>,
    /// Seconds between DNS lookups of the --inference host names: each address found is a
    /// replica (a Kubernetes headless Service lists every ready pod), added and removed as the
    /// answer changes. 0: no lookups, each URL is one replica reached by name.
    #[arg(long, env = "FRAMECAST_INFERENCE_RESOLVE_S", default_value_t = ClientOptions::default().resolve_interval.as_secs())]
    inference_resolve_s: u64,
    /// Pass batches to inference replicas on this host through shared memory (/dev/shm)
    /// instead of the gRPC stream; replicas that cannot map it get them over gRPC.
    #[arg(long, env = "FRAMECAST_INFERENCE_SHARED_MEMORY", default_value_t = ClientOptions::default().shared_memory, action = clap::ArgAction::Set)]
    inference_shared_memory: bool,
    /// Bearer token clients must send (`authorization: Bearer <token>`) on every Render and
    /// avatar call; unset: no authentication. Health checks stay open.
    #[arg(long, env = "FRAMECAST_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Require the bearer token on /metrics too (Prometheus: `authorization.credentials`).
    /// Off: /metrics is open to whoever reaches --metrics-listen.
    #[arg(long, env = "FRAMECAST_METRICS_REQUIRE_TOKEN", default_value_t = false, action = clap::ArgAction::Set)]
    metrics_require_token: bool,
    /// Serve CPU profiles on the metrics port, under its TLS and token:
    /// /debug/pprof/profile?seconds=N (pprof protobuf) and /debug/flamegraph.svg?seconds=N.
    /// Off: those paths do not exist.
    #[arg(long, env = "FRAMECAST_PROFILING", default_value_t = false, action = clap::ArgAction::Set)]
    profiling: bool,
    /// Bearer token to send to the inference replicas, if they require one.
    #[arg(long, env = "FRAMECAST_INFERENCE_TOKEN", hide_env_values = true)]
    inference_token: Option<String>,
    #[command(flatten)]
    tls: framecast_telemetry::tls::ServerTlsArgs,
    /// PEM CA that signed the inference replicas' certificates: reach them over TLS (the
    /// --inference URLs must then be https://).
    #[arg(long, env = "FRAMECAST_INFERENCE_TLS_CA")]
    inference_tls_ca: Option<PathBuf>,
    /// PEM certificate to present to the inference replicas (mutual TLS; with
    /// --inference-tls-key).
    #[arg(long, env = "FRAMECAST_INFERENCE_TLS_CERT")]
    inference_tls_cert: Option<PathBuf>,
    /// PEM private key of --inference-tls-cert.
    #[arg(long, env = "FRAMECAST_INFERENCE_TLS_KEY")]
    inference_tls_key: Option<PathBuf>,
    /// Name to expect in the replicas' certificates, when it is not the URLs' host.
    #[arg(long, env = "FRAMECAST_INFERENCE_TLS_DOMAIN")]
    inference_tls_domain: Option<String>,
    /// Admission by measured margin: a new Render stream is refused (UNAVAILABLE, the reason)
    /// while the host's free cores are fewer than one open stream's measured share of the
    /// cores busy above the host's idle load, times this headroom (over the last 2 s;
    /// everything else on the host counted).
    /// off: streams are admitted up to --max-streams whatever the load.
    #[arg(long, env = "FRAMECAST_ADMISSION_HEADROOM", default_value = "1.25", value_parser = Headroom::parse)]
    admission_headroom: Headroom,
    /// Admission limit: open Render streams; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "FRAMECAST_MAX_STREAMS", default_value_t = framecast_compositor::rpc::DEFAULT_MAX_STREAMS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_streams: usize,
    /// Open Render streams one client may hold (its credential with authentication on, its
    /// address without); default three quarters of --max-streams. Set it to --max-streams
    /// when one front end is this compositor's only client.
    #[arg(long, env = "FRAMECAST_MAX_STREAMS_PER_CLIENT", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_streams_per_client: Option<usize>,
    /// A Render stream that renders no frame for this many seconds is ended
    /// (DEADLINE_EXCEEDED saying so), whatever empty packets it sends, and one whose client
    /// reads no frame for as long loses its unread frames: idle clients cannot hold
    /// --max-streams places.
    #[arg(long, env = "FRAMECAST_STREAM_IDLE_TIMEOUT_S", default_value_t = RenderOptions::default().idle_timeout.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    stream_idle_timeout_s: u64,
    /// Seconds of audio an audio session may send ahead of the frames it has received; more
    /// is refused with RESOURCE_EXHAUSTED (audio beyond real time is held back by HTTP/2 flow
    /// control until then).
    #[arg(long, env = "FRAMECAST_MAX_AUDIO_AHEAD_S", default_value_t = RenderOptions::default().max_audio_ahead.as_secs(), value_parser = clap::value_parser!(u64).range(1..=600))]
    max_audio_ahead_s: u64,
    /// Milliseconds the audio-encoder batcher waits to put mel windows of several audio
    /// sessions into one request (each embedding waits at most this long for company).
    #[arg(long, env = "FRAMECAST_ENCODER_BATCH_WAIT_MS", default_value_t = RenderOptions::default().encoder_batch_wait.as_millis() as u64, value_parser = clap::value_parser!(u64).range(0..=1000))]
    encoder_batch_wait_ms: u64,
    /// Milliseconds the face model's frame clock holds a batch so the frames other sessions
    /// ready in the same frame period share its forward pass (frames taken by due time, at
    /// most --batch a pass; a session alone on its model and avatar is never held). Each
    /// frame waits at most this long; 0 sends every request alone, as it comes. auto: 40 for
    /// models a replica runs on a GPU, 0 for models on a CPU (where one pass for many frames
    /// costs more per frame than a pass each).
    #[arg(long, env = "FRAMECAST_FRAME_TICK_MS", default_value_t = RenderOptions::default().frame_tick)]
    frame_tick_ms: framecast_compositor::render::FrameTick,
    /// An audio session's frame is idle, sent as its background's pre-encoded JPEG with no
    /// inference and no encode, when its mel window's loudness (0 silence .. 1 loud speech)
    /// is below this; 0 turns idle frames off.
    #[arg(long, env = "FRAMECAST_IDLE_LOUDNESS", default_value_t = RenderOptions::default().idle_loudness, value_parser = parse_unit)]
    idle_loudness: f32,
    /// MiB of background frames kept as raw I420 for all avatars, for sessions that take raw
    /// frames (a WebRTC gateway's): a kept frame costs no decode, idle or talking (a talking
    /// frame is it copied with the face put in); 0 keeps none. About 1.4 MiB a 720p frame.
    #[arg(long, env = "FRAMECAST_IDLE_FRAME_CACHE_MIB", default_value_t = framecast_compositor::render::DEFAULT_IDLE_FRAME_CACHE_MIB)]
    idle_frame_cache_mib: u64,
    /// On SIGTERM: stop accepting, let each stream finish the request it is rendering for at
    /// most this many seconds, then exit.
    #[arg(long, env = "FRAMECAST_SHUTDOWN_GRACE_S", default_value_t = ServeOptions::default().grace.as_secs())]
    shutdown_grace_s: u64,
    /// Longest wait for one inference batch, seconds.
    #[arg(long, env = "FRAMECAST_INFERENCE_TIMEOUT_S", default_value_t = ClientOptions::default().request_timeout.as_secs())]
    inference_timeout_s: u64,
    /// Avatars to load at start-up, comma-separated.
    #[arg(long, env = "FRAMECAST_PRELOAD", value_delimiter = ',')]
    preload: Vec<String>,
    /// RAM budget for decoded avatars, MiB (0: unlimited). Least recently used idle avatars
    /// are evicted to make room.
    #[arg(long, env = "FRAMECAST_AVATAR_BUDGET_MIB", default_value_t = 0)]
    avatar_budget_mib: u64,
    /// Prometheus /metrics listen address (HTTP).
    #[arg(
        long,
        env = "FRAMECAST_COMPOSITOR_METRICS_LISTEN",
        default_value = "0.0.0.0:8012"
    )]
    metrics_listen: SocketAddr,
    /// Load an avatar at its first request when it is not loaded yet.
    #[arg(long, env = "FRAMECAST_AVATAR_ON_DEMAND", default_value_t = true, action = clap::ArgAction::Set)]
    load_on_demand: bool,
    /// Frames per inference call (at most the model's max_batch_size).
    #[arg(long, env = "FRAMECAST_BATCH", default_value_t = RenderOptions::default().max_batch)]
    batch: usize,
    /// Inference calls in flight per render request (2 overlaps compositing with inference).
    #[arg(long, env = "FRAMECAST_PIPELINE_DEPTH", default_value_t = RenderOptions::default().pipeline_depth)]
    pipeline_depth: usize,
    /// Largest frame_count one render request may ask for.
    #[arg(long, env = "FRAMECAST_MAX_FRAMES_PER_REQUEST", default_value_t = RenderOptions::default().max_frames_per_request)]
    max_frames_per_request: u32,
    /// JPEG chroma subsampling: 4:4:4, 4:2:2, 4:2:0 or gray.
    #[arg(long, env = "FRAMECAST_SUBSAMPLING", default_value_t = RenderOptions::default().subsampling)]
    subsampling: Subsampling,
    /// Threads for blending and encoding (0: one per core); also how many lone frames (a
    /// live session's) are composited at once.
    #[arg(long, env = "FRAMECAST_WORKERS", default_value_t = 0)]
    workers: usize,
    /// HTTP/2 keep-alive ping interval to the inference service, seconds.
    #[arg(long, env = "FRAMECAST_KEEPALIVE_S", default_value_t = ClientOptions::default().keep_alive_interval.as_secs())]
    keepalive_s: u64,
    /// Keep-alive ping timeout, seconds.
    #[arg(long, env = "FRAMECAST_KEEPALIVE_TIMEOUT_S", default_value_t = ClientOptions::default().keep_alive_timeout.as_secs())]
    keepalive_timeout_s: u64,
    /// Largest gRPC message, bytes.
    #[arg(long, env = "FRAMECAST_MAX_MESSAGE_BYTES", default_value_t = ServeOptions::default().max_message_bytes)]
    max_message_bytes: usize,
}

fn main() -> Result<()> {
    framecast_telemetry::config_file::apply_for::<Cli>("serve")?;
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        framecast_telemetry::exit_quietly_when_stdout_closes();
    }
    framecast_telemetry::init_logs(match &cli.command {
        Command::Serve(args) => args.log_format,
        _ => Default::default(),
    });
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Avatar(AvatarCommand::Check { dir, subsampling }) => {
            let problems = match Avatar::load_with(&dir, subsampling) {
                Ok(a) => {
                    println!(
                        "{}: {} frames {}x{}, crop {}, model {}, {:.1} MiB in memory, {}",
                        dir.display(),
                        a.frames.len(),
                        a.manifest.width,
                        a.manifest.height,
                        a.manifest.crop_size,
                        a.manifest.model,
                        a.resident_bytes() as f64 / (1 << 20) as f64,
                        match &a.source {
                            Source::PreparedFile => "prepared file used",
                            Source::Prepared { .. } => "not prepared (no prepared file)",
                        }
                    );
                    match a.source {
                        Source::Prepared {
                            unused_file: Some(why),
                        } => vec![why],
                        _ => Vec::new(),
                    }
                }
                Err(problems) => problems,
            };
            if problems.is_empty() {
                println!("{}: ok", dir.display());
                return Ok(());
            }
            fail(&dir, &problems)
        }
        Command::Avatar(AvatarCommand::Prepare { dir, subsampling }) => {
            match Avatar::prepare(&dir, subsampling) {
                Ok((a, path)) => {
                    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    println!(
                        "wrote {} ({} frames, {:.1} MiB on disk, {:.2} MiB per frame in memory) in {:.1} s",
                        path.display(),
                        a.frames.len(),
                        bytes as f64 / (1 << 20) as f64,
                        a.resident_bytes() as f64 / a.frames.len().max(1) as f64 / (1 << 20) as f64,
                        a.load_time.as_secs_f64()
                    );
                    Ok(())
                }
                Err(problems) => fail(&dir, &problems),
            }
        }
        Command::Avatar(AvatarCommand::Import(args)) => {
            let a = *args;
            let [top, bottom, left, right] = a.pads[..] else {
                anyhow::bail!("--pads takes four numbers: top,bottom,left,right (pixels)");
            };
            let (input, features) = (&a.audio_input, a.features.as_str());
            let audio = match features {
                "none" => None,
                "mel" | "energy" => Some(format!(
                    "[audio]\ninput = \"{input}\"\nfeatures = \"{features}\"\n"
                )),
                "encoder" => Some(format!(
                    "[audio]\ninput = \"{input}\"\nfeatures = \"encoder\"\nencoder = \"{}\"\n",
                    a.encoder
                )),
                other => anyhow::bail!("--features {other:?}: mel, encoder, energy or none"),
            };
            let json = a.json;
            let opts = ImportOptions {
                channel_order: a.channel_order.into_iter().map(|c| c.0).collect(),
                audio,
                pads: [top, bottom, left, right],
                video: a.video,
                root: a.root,
                id: a.id,
                model: a.model,
                crop_size: a.crop_size,
                smooth: a.smooth,
                trim: a.trim,
                max_frames: a.max_frames,
                cascade: a.cascade,
                min_face: a.min_face,
                force: a.force,
            };
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let result = import::import(&opts, |p| report(&p, json, terminal));
            match result {
                Ok(_) => Ok(()),
                Err(e) => {
                    if json {
                        println!("{}", serde_json::json!({"event": "failed", "error": e}));
                    }
                    eprintln!("import failed: {e}");
                    std::process::exit(1);
                }
            }
        }
        Command::Avatar(AvatarCommand::MakeDemo {
            root,
            id,
            width,
            height,
            frames,
            fps,
            crop_size,
            model,
        }) => {
            let opts = DemoOptions {
                id,
                width,
                height,
                frames,
                fps,
                crop_size,
                model,
            };
            let dir = demo::write_demo(&root, &opts)?;
            println!("wrote {}", dir.display());
            Ok(())
        }
    }
}

/// Prints a bundle's problems, one a line, and exits 1.
fn fail(dir: &std::path::Path, problems: &[String]) -> ! {
    for p in problems {
        eprintln!("{p}");
    }
    eprintln!("{}: {} problem(s)", dir.display(), problems.len());
    std::process::exit(1);
}

/// One face-input image, as `--channel-order` names it.
#[derive(Clone)]
struct ChannelArg(Channel);

impl std::str::FromStr for ChannelArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reference" => Ok(ChannelArg(Channel::Reference)),
            "masked" => Ok(ChannelArg(Channel::Masked)),
            _ => Err(format!("{s:?}: reference or masked")),
        }
    }
}

/// `START:END`, frames.
fn parse_trim(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once(':').ok_or("START:END (frames)")?;
    let (a, b) = (a.parse::<u64>(), b.parse::<u64>());
    match (a, b) {
        (Ok(a), Ok(b)) if a < b => Ok((a, b)),
        _ => Err(format!("{s:?}: START:END frames with START < END")),
    }
}

/// An import's progress: JSON lines on stdout, or one line rewritten on a terminal.
fn report(p: &Progress, json: bool, terminal: bool) {
    if json {
        let v = match p {
            Progress::Probed {
                width,
                height,
                fps,
                frames,
            } => serde_json::json!({
                "event": "probed", "width": width, "height": height, "fps": fps, "frames": frames}),
            Progress::Detected { done, of } => {
                serde_json::json!({"event": "detected", "done": done, "of": of})
            }
            Progress::Warning(w) => serde_json::json!({"event": "warning", "message": w}),
            Progress::Preparing => serde_json::json!({"event": "preparing"}),
            Progress::Done { dir, frames } => serde_json::json!({
                "event": "done", "dir": dir.display().to_string(), "frames": frames}),
        };
        println!("{v}");
        return;
    }
    match p {
        Progress::Probed {
            width,
            height,
            fps,
            frames,
        } => {
            eprintln!("video: {width}x{height}, {fps:.2} fps, about {frames} frames")
        }
        Progress::Detected { done, of } if terminal => {
            eprint!("\rfinding the face: frame {done} of {of}   ")
        }
        Progress::Detected { .. } => {}
        Progress::Warning(w) => eprintln!("\nwarning: {w}"),
        Progress::Preparing => eprintln!("\npreparing the frames"),
        Progress::Done { dir, frames } => println!("wrote {} ({frames} frames)", dir.display()),
    }
}

fn parse_unit(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number in 0..=1")),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    if let Some(path) = &args.config {
        tracing::info!(path = %path.display(), "settings read from file");
    }
    anyhow::ensure!(args.batch >= 1, "batch: must be at least 1");
    anyhow::ensure!(
        args.pipeline_depth >= 1,
        "pipeline-depth: must be at least 1"
    );
    if args.workers > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(args.workers)
            .thread_name(|i| format!("compose-{i}"))
            .build_global()
            .context("workers: cannot size the compositing pool")?;
    }
    let tls = args.tls.load()?;
    let inference_tls = framecast_telemetry::tls::ClientTls::from_files(
        "inference-tls",
        args.inference_tls_ca.as_deref(),
        args.inference_tls_cert.as_deref(),
        args.inference_tls_key.as_deref(),
        args.inference_tls_domain.clone(),
    )?;
    let metrics = Arc::new(Metrics::new());
    let budget = (args.avatar_budget_mib > 0).then_some(args.avatar_budget_mib << 20);
    let store = Arc::new(
        AvatarStore::new(&args.avatars, args.load_on_demand, budget, metrics.clone())
            .with_context(|| format!("avatars: cannot open {}", args.avatars.display()))?
            .with_subsampling(args.subsampling),
    );
    let client_opts = ClientOptions {
        keep_alive_interval: Duration::from_secs(args.keepalive_s),
        keep_alive_timeout: Duration::from_secs(args.keepalive_timeout_s),
        max_message_bytes: args.max_message_bytes,
        request_timeout: Duration::from_secs(args.inference_timeout_s),
        resolve_interval: Duration::from_secs(args.inference_resolve_s),
        shared_memory: args.inference_shared_memory,
        token: args.inference_token.clone(),
        tls: inference_tls,
        replicas_gauge: Some(metrics.inference_replicas.clone()),
        hop_bytes: Some(metrics.inference_bytes.clone()),
        ..Default::default()
    };
    let opts = RenderOptions {
        max_batch: args.batch,
        max_frames_per_request: args.max_frames_per_request,
        pipeline_depth: args.pipeline_depth,
        subsampling: args.subsampling,
        idle_timeout: Duration::from_secs(args.stream_idle_timeout_s),
        max_audio_ahead: Duration::from_secs(args.max_audio_ahead_s),
        encoder_batch_wait: Duration::from_millis(args.encoder_batch_wait_ms),
        frame_tick: args.frame_tick_ms,
        idle_loudness: args.idle_loudness,
        idle_budget: framecast_compositor::idle_frames::IdleBudget::new(
            args.idle_frame_cache_mib.saturating_mul(1 << 20),
            Some(metrics.idle_frame_cache_bytes.clone()),
        ),
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        // The channel's connection task needs the runtime, so the client is made inside it.
        let inference = InferenceClient::connect_lazy(&args.inference, &client_opts)
            .map_err(anyhow::Error::msg)?;
        let access = framecast_telemetry::MetricsAccess::new(
            tls.as_ref(),
            args.auth_token.as_deref(),
            args.metrics_require_token,
        )
        .with_profiling(args.profiling);
        framecast_telemetry::serve_metrics(args.metrics_listen, metrics.registry.clone(), access)
            .await?;
        let mut preloaded = Vec::new();
        for id in &args.preload {
            let avatar = store
                .load(id)
                .await
                .with_context(|| format!("preload: avatar '{id}'"))?;
            preloaded.push(Arc::downgrade(&avatar));
        }
        // Their face inputs go to the inference replicas' tensor caches now, not with the
        // first session's first batch (which every session's frames would wait for). Weak:
        // an avatar unloaded or replaced since is not kept alive for this.
        inference.register_ahead(Arc::new(move || {
            preloaded
                .iter()
                .filter_map(std::sync::Weak::upgrade)
                .map(|a| Arc::new(FaceInputs::new(a)) as Arc<dyn RowSource>)
                .collect()
        }));
        let per_client = args.max_streams_per_client.unwrap_or_else(|| {
            framecast_compositor::rpc::default_streams_per_client(args.max_streams)
        });
        let mut svc = CompositorService::new(store, inference, opts, metrics)
            .with_max_streams(args.max_streams, per_client);
        if let Headroom(Some(headroom)) = args.admission_headroom {
            svc = svc.with_admission(headroom);
        }
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listen: cannot bind {}", args.listen))?;
        tracing::info!(
            addr = %listener.local_addr()?,
            max_streams = args.max_streams,
            max_streams_per_client = per_client.min(args.max_streams),
            "framecast-compositor serving (one client, by credential or address, holds at most max_streams_per_client streams)"
        );
        let serve_opts = ServeOptions {
            max_message_bytes: args.max_message_bytes,
            grace: Duration::from_secs(args.shutdown_grace_s),
            auth_token: args.auth_token,
            tls,
        };
        framecast_compositor::server::serve(
            listener,
            svc,
            serve_opts,
            framecast_telemetry::shutdown_signal(),
        )
        .await
    })
}

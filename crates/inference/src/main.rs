use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use framecast_inference::metrics::Metrics;
use framecast_inference::models::{ExecOptions, ModelManager};
use framecast_inference::repository::Repository;
use framecast_inference::server::{self, ServeOptions};
use framecast_inference::tensor_cache::TensorLimits;
use framecast_inference::zoo::{self, Builtin, ZooOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Batched TorchScript inference over the KServe v2 / Open Inference Protocol (gRPC).
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the models of a repository.
    Serve(Box<ServeArgs>),
    /// Write the built-in models (passthrough, lipsync-ref, talking-demo) into a repository.
    Models(ModelsArgs),
    /// Time one model in this process, with no server: frames/s and median input, forward
    /// and output times per batch size, to set beside the same model served.
    Time(TimeArgs),
}

#[derive(clap::Args)]
struct TimeArgs {
    /// Model directory (model.pt and config.toml).
    #[arg(long)]
    model: PathBuf,
    /// Device: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Batch sizes to time, each at most the model's max_batch_size.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch: Vec<usize>,
    /// Seconds per batch size (after one untimed run).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
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
    /// Model repository: one directory per model holding model.pt and config.toml.
    #[arg(long, env = "FRAMECAST_REPOSITORY", default_value = "models")]
    repository: PathBuf,
    /// gRPC listen address (KServe v2, health, reflection).
    #[arg(
        long,
        env = "FRAMECAST_INFERENCE_LISTEN",
        default_value = "0.0.0.0:8001"
    )]
    listen: SocketAddr,
    /// Devices to run on: `cpu`, or a list such as `cuda:0,cuda:1`.
    #[arg(long, env = "FRAMECAST_DEVICES", default_value = "cpu")]
    devices: String,
    /// Worker threads (model instances) per device and model.
    #[arg(long, env = "FRAMECAST_INSTANCES", default_value_t = ExecOptions::default().instances)]
    instances: usize,
    /// Models to load at start-up, comma-separated.
    #[arg(long, env = "FRAMECAST_LOAD", value_delimiter = ',')]
    load: Vec<String>,
    /// Load a model at its first request when it is not loaded yet.
    #[arg(long, env = "FRAMECAST_LOAD_ON_DEMAND", default_value_t = true, action = clap::ArgAction::Set)]
    load_on_demand: bool,
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "FRAMECAST_MAX_MESSAGE_BYTES", default_value_t = ServeOptions::default().max_message_bytes)]
    max_message_bytes: usize,
    /// Requests slower than this (milliseconds, end to end) are logged at WARN.
    #[arg(long, env = "FRAMECAST_SLOW_REQUEST_MS", default_value_t = ServeOptions::default().slow_request.as_millis() as u64)]
    slow_request_ms: u64,
    /// Device-memory budget per device for loaded models and cached tensors together, MiB (0:
    /// unlimited). Least recently used idle ones, of either kind, are evicted to make room.
    #[arg(long, env = "FRAMECAST_MEMORY_BUDGET_MIB", default_value_t = 0)]
    memory_budget_mib: u64,
    /// Working memory accounted per model on top of its weights, MiB.
    #[arg(long, env = "FRAMECAST_MODEL_OVERHEAD_MIB", default_value_t = ExecOptions::default().model_overhead >> 20)]
    model_overhead_mib: u64,
    /// Admission limit: requests one model's queue holds; past it requests get
    /// RESOURCE_EXHAUSTED at once instead of waiting without bound.
    #[arg(long, env = "FRAMECAST_MAX_QUEUE", default_value_t = ExecOptions::default().max_queue as u64, value_parser = clap::value_parser!(u64).range(1..))]
    max_queue: u64,
    /// Models never evicted, comma-separated (a config may also say `pinned = true`).
    #[arg(long, env = "FRAMECAST_PIN", value_delimiter = ',')]
    pin: Vec<String>,
    /// Prometheus /metrics listen address (HTTP).
    #[arg(
        long,
        env = "FRAMECAST_INFERENCE_METRICS_LISTEN",
        default_value = "0.0.0.0:8002"
    )]
    metrics_listen: SocketAddr,
    /// Bearer token clients must send (`authorization: Bearer <token>`) on every KServe call;
    /// several, comma-separated, give each client its own (its shared-memory regions are
    /// then its own). Unset: no authentication. Health checks stay open.
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
    #[command(flatten)]
    tls: framecast_telemetry::tls::ServerTlsArgs,
    /// Accept the system shared-memory extension: clients on this host may have the server
    /// map their /dev/shm objects for tensors. Off: every tensor travels over gRPC.
    #[arg(long, env = "FRAMECAST_SHARED_MEMORY", default_value_t = ServeOptions::default().shared_memory, action = clap::ArgAction::Set)]
    shared_memory: bool,
    /// Offer framecast's own protocol extensions (the tensor cache, I420 outputs). Off, the
    /// server looks like a plain KServe v2 server and clients send every tensor.
    #[arg(long, env = "FRAMECAST_EXTENSIONS", default_value_t = ServeOptions::default().framecast_extensions, action = clap::ArgAction::Set)]
    framecast_extensions: bool,
    /// Shared-memory regions registered at once, all clients together; past it registration
    /// gets RESOURCE_EXHAUSTED.
    #[arg(long, env = "FRAMECAST_MAX_SHM_REGIONS", default_value_t = ServeOptions::default().max_shm_regions as u64, value_parser = clap::value_parser!(u64).range(1..=framecast_proto::fault_guard::CAPACITY as u64 / 2))]
    max_shm_regions: u64,
    /// Shared-memory regions one client may hold (its credential with authentication on,
    /// its address without); past it its registrations get RESOURCE_EXHAUSTED.
    #[arg(long, env = "FRAMECAST_MAX_SHM_REGIONS_PER_CLIENT", default_value_t = ServeOptions::default().max_shm_regions_per_client as u64, value_parser = clap::value_parser!(u64).range(1..))]
    max_shm_regions_per_client: u64,
    /// MiB of unanswered requests, and MiB of answers not yet sent, one client's
    /// ModelStreamInfer streams may hold (each): past it a stream stops reading requests
    /// until the client reads its answers.
    #[arg(long, env = "FRAMECAST_STREAM_BUFFER_MIB", default_value_t = ServeOptions::default().stream_buffer >> 20, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    stream_buffer_mib: u64,
    /// Host memory the tensor cache extension may hold, all clients together, MiB, at least 1
    /// (least recently used tensors are evicted; a tensor larger than this is refused; to
    /// turn the extension off, --framecast-extensions false). Tensors count against
    /// --memory-budget-mib too.
    #[arg(long, env = "FRAMECAST_TENSOR_CACHE_MIB", default_value_t = TensorLimits::default().budget >> 20, value_parser = parse_tensor_cache_mib)]
    tensor_cache_mib: u64,
    /// One client's share of the tensor cache, MiB (a client is its credential with
    /// authentication on, its address without): default half of --tensor-cache-mib.
    #[arg(long, env = "FRAMECAST_TENSOR_CACHE_CLIENT_MIB", value_parser = clap::value_parser!(u64).range(1..))]
    tensor_cache_client_mib: Option<u64>,
    /// Tensors one client may keep registered; at the limit its least recently used idle
    /// one makes room.
    #[arg(long, env = "FRAMECAST_TENSOR_CACHE_MAX_NAMES", default_value_t = TensorLimits::default().client_names as u64, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    tensor_cache_max_names: u64,
    /// On SIGTERM: stop accepting, finish in-flight requests for at most this many seconds,
    /// then exit.
    #[arg(long, env = "FRAMECAST_SHUTDOWN_GRACE_S", default_value_t = ServeOptions::default().grace.as_secs())]
    shutdown_grace_s: u64,
    /// libtorch intra-op threads per process; 0: libtorch's default, a thread per core. One
    /// by default: lip-sync batches are small, and extra threads mostly spin (measured here:
    /// 3.1 ms of inference CPU a frame with one thread against 14.8 with a thread per core
    /// and 16.1 with two, at the same latency; docs/performance.md). A large model on an
    /// otherwise idle CPU runs a batch faster with more (lipsync-ref: 1.6 against 1.3
    /// frames/s), at 45% more CPU a frame.
    #[arg(long, env = "FRAMECAST_TORCH_THREADS", default_value_t = 1)]
    torch_threads: i32,
}

#[derive(clap::Args)]
struct ModelsArgs {
    /// Repository directory to write into (created if missing).
    #[arg(long, default_value = "models")]
    out: PathBuf,
    /// Which models; by default all but wav2lip-arch (Wav2Lip's architecture with untrained
    /// weights, 140 MB: for checking how a user's Wav2Lip is served, not for the demo).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Builtin>,
    /// Crop size of passthrough and talking-demo (lipsync-ref is fixed at 320, wav2lip-arch
    /// at 96).
    #[arg(long, default_value_t = zoo::LIPSYNC_CROP)]
    crop: i64,
    /// max_batch_size written to each config.
    #[arg(long, default_value_t = 24)]
    max_batch_size: usize,
    /// max_queue_delay_us written to each config.
    #[arg(long, default_value_t = 2000)]
    max_queue_delay_us: u64,
    /// Precision the models are traced in and run at: fp16 traces the weights in half and
    /// writes `precision = "fp16"` (for GPUs with tensor cores).
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "fp16"])]
    precision: String,
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
        Command::Models(args) => {
            let opts = ZooOptions {
                crop: args.crop,
                max_batch_size: args.max_batch_size,
                max_queue_delay_us: args.max_queue_delay_us,
            };
            let which = if args.only.is_empty() {
                Builtin::DEFAULT.to_vec()
            } else {
                args.only
            };
            let precision = if args.precision == "fp16" {
                framecast_inference::config::Precision::Fp16
            } else {
                framecast_inference::config::Precision::Fp32
            };
            for m in which {
                let dir = zoo::write_with(&args.out, m, &opts, zoo::AUDIO_DIMS, precision)?;
                println!("wrote {}", dir.display());
            }
            Ok(())
        }
        Command::Time(args) => {
            let device = match framecast_inference::parse_devices(&args.device)
                .map_err(anyhow::Error::msg)?[..]
            {
                [d] => d,
                _ => anyhow::bail!("device: give one device, not a list"),
            };
            framecast_inference::check_visible(&[device]).map_err(anyhow::Error::msg)?;
            let timings = framecast_inference::inprocess::time(
                &args.model,
                device,
                &args.batch,
                args.seconds,
            )
            .map_err(anyhow::Error::msg)?;
            println!("batch  runs  frames/s  input ms  forward ms  output ms");
            for t in timings {
                let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
                println!(
                    "{:>5}  {:>4}  {:>8.1}  {:>8.2}  {:>10.2}  {:>9.2}",
                    t.batch,
                    t.runs,
                    t.frames_per_s,
                    ms(t.median.input),
                    ms(t.median.infer),
                    ms(t.median.output)
                );
            }
            Ok(())
        }
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    if let Some(path) = &args.config {
        tracing::info!(path = %path.display(), "settings read from file");
    }
    let devices = framecast_inference::parse_devices(&args.devices).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(args.instances >= 1, "instances: must be at least 1");
    framecast_inference::check_visible(&devices).map_err(anyhow::Error::msg)?;
    if args.torch_threads > 0 {
        tch::set_num_threads(args.torch_threads);
    }
    let repo = Repository::open(&args.repository)
        .with_context(|| format!("repository: cannot open {}", args.repository.display()))?;
    let exec = ExecOptions {
        devices,
        instances: args.instances,
        memory_budget: (args.memory_budget_mib > 0).then_some(args.memory_budget_mib << 20),
        model_overhead: args.model_overhead_mib << 20,
        pinned: args.pin.iter().cloned().collect(),
        max_queue: args.max_queue as usize,
    };
    let tls = args.tls.load()?;
    let metrics = Arc::new(Metrics::new());
    framecast_inference::gpu::watch(metrics.clone(), &exec.devices);
    let models = Arc::new(ModelManager::new(
        repo,
        exec,
        args.load_on_demand,
        metrics.clone(),
    ));
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let access = framecast_telemetry::MetricsAccess::new(
            tls.as_ref(),
            args.auth_token.as_deref(),
            args.metrics_require_token,
        )
        .with_profiling(args.profiling);
        framecast_telemetry::serve_metrics(args.metrics_listen, metrics.registry.clone(), access)
            .await?;
        for name in &args.load {
            models
                .load(name)
                .await
                .with_context(|| format!("load: model '{name}'"))?;
        }
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listen: cannot bind {}", args.listen))?;
        tracing::info!(addr = %listener.local_addr()?, "framecast-inference serving");
        let opts = ServeOptions {
            max_message_bytes: args.max_message_bytes,
            slow_request: Duration::from_millis(args.slow_request_ms),
            grace: Duration::from_secs(args.shutdown_grace_s),
            auth_token: args.auth_token,
            shared_memory: args.shared_memory,
            max_shm_regions: args.max_shm_regions as usize,
            max_shm_regions_per_client: args.max_shm_regions_per_client as usize,
            stream_buffer: args.stream_buffer_mib << 20,
            tensor_cache: TensorLimits {
                budget: args.tensor_cache_mib << 20,
                client_bytes: args
                    .tensor_cache_client_mib
                    .map_or(args.tensor_cache_mib << 19, |m| m << 20),
                client_names: args.tensor_cache_max_names as usize,
            },
            framecast_extensions: args.framecast_extensions,
            tls,
        };
        server::serve(
            listener,
            models,
            opts,
            framecast_telemetry::shutdown_signal(),
        )
        .await
    })
}

/// `--tensor-cache-mib`: a finite, positive bound (0 once meant "unlimited", which let one
/// client's declared size exhaust the host's memory).
fn parse_tensor_cache_mib(s: &str) -> Result<u64, String> {
    let mib: u64 = s
        .parse()
        .map_err(|e| format!("{e}: give the tensor cache's size in MiB"))?;
    match mib {
        0 => Err("0 is not a size: the tensor cache always has a finite budget (0 no longer means unlimited); give a size in MiB, or turn the extension off with --framecast-extensions false".into()),
        m if m > 1 << 30 => Err(format!("{m} MiB is more than any host has")),
        m => Ok(m),
    }
}

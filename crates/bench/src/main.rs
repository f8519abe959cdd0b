//! framecast-bench: load client for framecast and any KServe v2 server, and the demo client.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use framecast_bench::load::{self, Phase};
use framecast_bench::report::{self, Report};
use framecast_bench::target::{self, Fill, Target};
use framecast_bench::{charts, client, demo, gateway, speech};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    version,
    about = "Load client for framecast and KServe v2 servers; renders the demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a framecast compositor with Render streams.
    Compositor {
        /// Compositor URL.
        #[arg(long, default_value = "http://127.0.0.1:8011")]
        url: String,
        #[arg(long, default_value = "demo")]
        avatar: String,
        /// Frames per Render request.
        #[arg(long, default_value_t = 24)]
        chunk: u32,
        /// Avatar frame rate, for `realtime`.
        #[arg(long, default_value_t = 25.0)]
        fps: f64,
        /// Realtime: how late after its play time a frame may arrive, ms (default: one chunk).
        #[arg(long)]
        deadline_ms: Option<f64>,
        /// Realtime: most sessions to try.
        #[arg(long, default_value_t = 64)]
        max_sessions: usize,
        /// Realtime: run exactly this many sessions once (a soak) instead of searching.
        #[arg(long)]
        sessions: Option<usize>,
        /// Frames as JPEG or as raw I420 (what a WebRTC gateway's video encoder takes).
        #[arg(long, value_enum, default_value = "jpeg")]
        frame_format: FrameFormat,
        #[command(flatten)]
        common: Common,
    },
    /// Load any KServe v2 inference server with ModelInfer (or ModelStreamInfer).
    Kserve {
        /// Inference server URL.
        #[arg(long, default_value = "http://127.0.0.1:8001")]
        url: String,
        #[arg(long)]
        model: String,
        /// Batch size (the first dimension where the model's metadata says -1).
        #[arg(long, default_value_t = 1)]
        batch: u64,
        /// Use ModelStreamInfer instead of ModelInfer.
        #[arg(long)]
        stream: bool,
        /// Input data: zero, random, or file:PATH (raw bytes, repeated to size).
        #[arg(long, default_value = "random")]
        data: Fill,
        #[command(flatten)]
        common: Common,
    },
    /// Wait until every URL reports grpc.health.v1 SERVING.
    Wait {
        /// gRPC URLs, e.g. http://127.0.0.1:8001
        #[arg(required = true)]
        urls: Vec<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
        #[command(flatten)]
        access: client::Access,
    },
    /// The demo avatar speaks a sentence: frames, an MJPEG AVI with sound, a contact sheet.
    Demo(demo::DemoArgs),
    /// Sessions speaking at real-time pace: audio sessions vs chunk requests, side by side.
    Speech(speech::SpeechArgs),
    /// WebRTC sessions against framecast-gateway (str0m peers speaking Opus, taking the
    /// video): frames/s, gaps, latency, CPU per frame; --sweep for sessions per machine.
    Gateway(gateway::GatewayArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FrameFormat {
    Jpeg,
    I420,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// About 30 s at one concurrency: 5 s warm-up, 25 s measured.
    Quick,
    /// Fixed concurrency for --duration-s.
    Full,
    /// Each concurrency of --sweep in turn.
    Sweep,
    /// Fixed request rate (--rate, --poisson), whatever the latency.
    Rate,
    /// Highest concurrency whose p99 stays under --p99-ms.
    Sustained,
    /// Compositor only: most real-time sessions with every frame on time.
    Realtime,
}

#[derive(Args)]
struct Common {
    #[arg(long, value_enum, default_value = "quick")]
    mode: Mode,
    #[command(flatten)]
    access: client::Access,
    /// Concurrent requests in flight (closed loop).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Measured seconds per level (quick: 25).
    #[arg(long, default_value_t = 30.0)]
    duration_s: f64,
    /// Unmeasured seconds before each level.
    #[arg(long, default_value_t = 5.0)]
    warmup_s: f64,
    /// Measurement window for throughput over time and the stability check, seconds.
    #[arg(long, default_value_t = 5.0)]
    window_s: f64,
    /// Most requests per level, whatever the duration.
    #[arg(long, default_value_t = 1_000_000)]
    max_requests: u64,
    /// Sweep range FIRST:LAST[:STEP].
    #[arg(long, default_value = "1:8:1")]
    sweep: String,
    /// Requests per second for `rate`.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Poisson arrivals for `rate` (default: evenly spaced).
    #[arg(long)]
    poisson: bool,
    /// p99 bound for `sustained`, ms.
    #[arg(long, default_value_t = 500.0)]
    p99_ms: f64,
    /// Highest concurrency `sustained` tries (also the in-flight cap of `rate`).
    #[arg(long, default_value_t = 256)]
    max_concurrency: usize,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write one CSV row per level.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write SVG charts into this directory.
    #[arg(long)]
    charts: Option<PathBuf>,
}

impl Common {
    /// An empty report of this run against `target` at `url`.
    fn report(&self, target: String, url: String) -> Report {
        Report {
            target,
            mode: self
                .mode
                .to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default(),
            url,
            ..Default::default()
        }
    }

    fn phase(&self) -> Phase {
        Phase {
            warmup: Duration::from_secs_f64(self.warmup_s),
            duration: Duration::from_secs_f64(if self.mode == Mode::Quick {
                25.0
            } else {
                self.duration_s
            }),
            window: Duration::from_secs_f64(self.window_s.max(0.5)),
            max_requests: self.max_requests,
        }
    }

    fn sweep_range(&self) -> Result<Vec<usize>> {
        let parts: Vec<usize> = self
            .sweep
            .split(':')
            .map(|p| p.parse::<usize>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("--sweep {:?} is not FIRST:LAST[:STEP]", self.sweep))?;
        let (first, last, step) = match parts[..] {
            [a, b] => (a, b, 1),
            [a, b, c] => (a, b, c),
            _ => bail!("--sweep {:?} is not FIRST:LAST[:STEP]", self.sweep),
        };
        if first == 0 || last < first || step == 0 {
            bail!(
                "--sweep {:?}: need 1 <= FIRST <= LAST and STEP >= 1",
                self.sweep
            );
        }
        Ok((first..=last).step_by(step).collect())
    }

    fn validate(&self) -> Result<()> {
        if self.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        if !(self.duration_s > 0.0 && self.warmup_s >= 0.0) {
            bail!("--duration-s must be positive and --warmup-s non-negative");
        }
        if self.mode == Mode::Rate && (self.rate.is_nan() || self.rate <= 0.0) {
            bail!("--rate must be positive");
        }
        Ok(())
    }
}

async fn run_levels(target: Arc<dyn Target>, common: &Common, report: &mut Report) -> Result<()> {
    let phase = common.phase();
    match common.mode {
        Mode::Quick | Mode::Full => report
            .levels
            .push(load::closed_loop(target, common.concurrency, &phase).await),
        Mode::Sweep => {
            for c in common.sweep_range()? {
                report
                    .levels
                    .push(load::closed_loop(target.clone(), c, &phase).await);
            }
        }
        Mode::Rate => report.levels.push(
            load::open_loop(
                target,
                common.rate,
                common.poisson,
                common.max_concurrency,
                &phase,
            )
            .await,
        ),
        Mode::Sustained => {
            let (best, levels) =
                load::sustained(target, common.p99_ms, common.max_concurrency, &phase).await;
            report.sustained_concurrency = best;
            report.levels = levels;
        }
        Mode::Realtime => bail!("--mode realtime is for the compositor target"),
    }
    Ok(())
}

fn write_outputs(report: &Report, common: &Common) -> Result<()> {
    report.print();
    if let Some(p) = &common.json {
        std::fs::write(p, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("writing {}", p.display()))?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = &common.csv {
        std::fs::write(p, report.csv()).with_context(|| format!("writing {}", p.display()))?;
        println!("wrote {}", p.display());
    }
    if let Some(dir) = &common.charts {
        for p in charts::write(report, dir)? {
            println!("wrote {}", p.display());
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Wait {
            urls,
            timeout_s,
            access,
        } => client::wait_healthy(&urls, &access, Duration::from_secs(timeout_s)).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Speech(args) => speech::run(args).await,
        Command::Gateway(args) => gateway::run(args).await,
        Command::Compositor {
            url,
            avatar,
            chunk,
            fps,
            deadline_ms,
            max_sessions,
            sessions,
            frame_format,
            common,
        } => {
            common.validate()?;
            if chunk == 0 || fps.is_nan() || fps <= 0.0 {
                bail!("--chunk and --fps must be positive");
            }
            use framecast_proto::compositor::v1::ImageFormat;
            let target = Arc::new(target::Compositor {
                frame_format: match frame_format {
                    FrameFormat::Jpeg => ImageFormat::Jpeg,
                    FrameFormat::I420 => ImageFormat::I420,
                } as i32,
                ..target::Compositor::new(client::compositor(&url, &common.access)?, &avatar, chunk)
            });
            let mut report = common.report("compositor".into(), url);
            if common.mode == Mode::Realtime {
                let deadline =
                    Duration::from_secs_f64(deadline_ms.unwrap_or(chunk as f64 / fps * 1e3) / 1e3);
                let duration = Duration::from_secs_f64(common.duration_s);
                report.realtime = Some(match sessions {
                    Some(n) => {
                        let trial =
                            load::realtime_trial(target.clone(), n.max(1), fps, deadline, duration)
                                .await;
                        report::Realtime {
                            fps,
                            chunk: target.chunk,
                            deadline_ms: deadline.as_secs_f64() * 1e3,
                            max_sessions: if trial.passed { n } else { 0 },
                            trials: vec![trial],
                        }
                    }
                    None => {
                        load::realtime(target, fps, deadline, duration, max_sessions.max(1)).await
                    }
                });
            } else {
                run_levels(target, &common, &mut report).await?;
            }
            write_outputs(&report, &common)
        }
        Command::Kserve {
            url,
            model,
            batch,
            stream,
            data,
            common,
        } => {
            common.validate()?;
            if batch == 0 {
                bail!("--batch must be at least 1");
            }
            let client = client::kserve(&url, &common.access)?;
            let target = Arc::new(
                target::Kserve::new(client, &model, batch, &data, stream)
                    .await
                    .with_context(|| format!("preparing requests for model '{model}' at {url}"))?,
            );
            let mut report = common.report(format!("kserve:{model}"), url);
            run_levels(target, &common, &mut report).await?;
            write_outputs(&report, &common)
        }
    }
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run(Cli::parse()))
}

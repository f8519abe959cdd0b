//! `framecast-gateway`: the WebRTC front end (see the crate docs and docs/frontend.md).

use anyhow::{Context, Result};
use clap::Parser;
use framecast_gateway::{router, Gateway, GatewayOptions};
use framecast_telemetry::{metrics_http, LogFormat};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// A browser's microphone in, the avatar's video and voice out, over WebRTC.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// HTTP address: the page, the avatar list and session signalling (WHIP/WHEP style).
    #[arg(long, env = "FRAMECAST_GATEWAY_LISTEN", default_value = "0.0.0.0:8021")]
    listen: SocketAddr,
    /// Prometheus metrics address (`/metrics`).
    #[arg(
        long,
        env = "FRAMECAST_GATEWAY_METRICS_LISTEN",
        default_value = "0.0.0.0:9093"
    )]
    metrics_listen: SocketAddr,
    /// The compositor's gRPC URL.
    #[arg(
        long,
        env = "FRAMECAST_COMPOSITOR_URL",
        default_value = "http://127.0.0.1:8011"
    )]
    compositor_url: String,
    /// Bearer token for the compositor, when its authentication is on.
    #[arg(long, env = "FRAMECAST_COMPOSITOR_TOKEN", hide_env_values = true)]
    compositor_token: Option<String>,
    /// The address browsers reach this host on, put in the ICE host candidates (each session
    /// takes one UDP port on it). Behind NAT, use a TURN server (docs/deploy.md).
    #[arg(long, env = "FRAMECAST_GATEWAY_UDP_HOST", default_value = "127.0.0.1")]
    udp_host: IpAddr,
    /// The address the UDP sockets bind, when it is not --udp-host (in a container, or
    /// behind a 1:1 NAT: 0.0.0.0 here, the public address in --udp-host).
    #[arg(long, env = "FRAMECAST_GATEWAY_UDP_BIND")]
    udp_bind: Option<IpAddr>,
    /// UDP ports for sessions, FIRST-LAST (one per session; open them in the firewall or the
    /// Service). Default: any port the kernel gives.
    #[arg(long, env = "FRAMECAST_GATEWAY_UDP_PORTS", value_parser = parse_ports)]
    udp_ports: Option<(u16, u16)>,
    /// Most sessions open at once; past it a new one gets 503 with the reason.
    #[arg(long, env = "FRAMECAST_GATEWAY_MAX_SESSIONS", default_value_t = GatewayOptions::default().max_sessions)]
    max_sessions: usize,
    /// A session not connected this long after its answer, or whose browser then sends no
    /// voice for this long, is ended (datagrams from anyone else never count).
    #[arg(
        long,
        env = "FRAMECAST_GATEWAY_SESSION_TIMEOUT_S",
        default_value_t = GatewayOptions::default().session_timeout.as_secs_f64()
    )]
    session_timeout_s: f64,
    /// Video bitrate per session, kbit/s (H.264).
    #[arg(long, env = "FRAMECAST_GATEWAY_VIDEO_KBPS", default_value_t = GatewayOptions::default().video_bitrate_bps / 1000)]
    video_kbps: u32,
    /// Margin between a frame's arrival and its play time, ms: absorbs the compositor's
    /// batches; the voice is delayed by the same amount.
    #[arg(long, env = "FRAMECAST_GATEWAY_JITTER_MS", default_value_t = GatewayOptions::default().jitter.as_millis() as u64)]
    jitter_ms: u64,
    /// A WAV file the page offers as "play a sample sentence".
    #[arg(long, env = "FRAMECAST_GATEWAY_SAMPLE_WAV")]
    sample_wav: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or("FIRST-LAST, e.g. 40000-40063")?;
    let (a, b): (u16, u16) = (
        a.trim()
            .parse()
            .map_err(|_| format!("{a:?} is not a port"))?,
        b.trim()
            .parse()
            .map_err(|_| format!("{b:?} is not a port"))?,
    );
    if a == 0 || b < a {
        return Err(format!("{a}-{b}: need 1 <= FIRST <= LAST"));
    }
    Ok((a, b))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    framecast_telemetry::init_logs(args.log_format);
    let timeout_ok = args.session_timeout_s.is_finite() && args.session_timeout_s > 0.0;
    if args.max_sessions == 0 || !timeout_ok || args.video_kbps == 0 {
        anyhow::bail!("--max-sessions, --session-timeout-s and --video-kbps must be positive");
    }
    if let Some((a, b)) = args.udp_ports {
        if ((b - a) as usize + 1) < args.max_sessions {
            anyhow::bail!(
                "--udp-ports {a}-{b} has {} ports for --max-sessions {}: one port per session",
                b - a + 1,
                args.max_sessions
            );
        }
    }
    if let Some(p) = &args.sample_wav {
        std::fs::metadata(p).with_context(|| format!("--sample-wav {}", p.display()))?;
    }
    let channel = tonic::transport::Endpoint::from_shared(args.compositor_url.clone())
        .with_context(|| format!("--compositor-url {}", args.compositor_url))?
        .connect_lazy();
    let client = framecast_gateway::compositor(channel, args.compositor_token.as_deref())
        .map_err(anyhow::Error::msg)?;
    let opts = GatewayOptions {
        udp_host: args.udp_host,
        udp_bind: args.udp_bind,
        udp_ports: args.udp_ports,
        max_sessions: args.max_sessions,
        session_timeout: Duration::from_secs_f64(args.session_timeout_s),
        video_bitrate_bps: args.video_kbps * 1000,
        jitter: Duration::from_millis(args.jitter_ms),
        sample_wav: args.sample_wav,
        ..Default::default()
    };
    let gw = Gateway::new(client, opts);
    let metrics_addr = metrics_http::serve_metrics(
        args.metrics_listen,
        gw.metrics.registry.clone(),
        metrics_http::MetricsAccess::new(None, None, false),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    tracing::info!(
        http = %listener.local_addr()?, metrics = %metrics_addr, compositor = %args.compositor_url,
        "gateway serving: open http://{}/ in a browser", listener.local_addr()?
    );
    let stopping = gw.clone();
    axum::serve(listener, router(gw))
        .with_graceful_shutdown(async move {
            framecast_telemetry::shutdown_signal().await;
            tracing::info!("shutting down: ending the sessions");
            stopping.shut_down();
        })
        .await?;
    Ok(())
}

//! `framecast-gateway`: the WebRTC front end (see the crate docs and docs/frontend.md).

use anyhow::{Context, Result};
use clap::Parser;
use framecast_gateway::media::VideoCodec;
use framecast_gateway::{Gateway, GatewayOptions};
use framecast_telemetry::host_cpu::Headroom;
use framecast_telemetry::tls::ClientTls;
use framecast_telemetry::{metrics_http, LogFormat};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// A browser's microphone in, the avatar's video and voice out, over WebRTC.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML file of settings, keys named as the flags (`listen`, `max-sessions`, ...);
    /// flags and environment variables override it.
    #[arg(long, env = "FRAMECAST_CONFIG")]
    config: Option<PathBuf>,
    /// HTTP address: the page, the avatar list and session signalling (WHIP/WHEP style);
    /// HTTPS with --tls-cert (browsers give the microphone only to https pages, or localhost).
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
    /// PEM CA of the compositor's certificate: reach it over TLS (an https:// URL).
    #[arg(long, env = "FRAMECAST_COMPOSITOR_TLS_CA")]
    compositor_tls_ca: Option<PathBuf>,
    /// PEM certificate to present to the compositor, where it requires mutual TLS.
    #[arg(long, env = "FRAMECAST_COMPOSITOR_TLS_CERT")]
    compositor_tls_cert: Option<PathBuf>,
    /// PEM private key of --compositor-tls-cert.
    #[arg(long, env = "FRAMECAST_COMPOSITOR_TLS_KEY")]
    compositor_tls_key: Option<PathBuf>,
    /// Name to expect in the compositor's certificate, when it is not the URL's host.
    #[arg(long, env = "FRAMECAST_COMPOSITOR_TLS_DOMAIN")]
    compositor_tls_domain: Option<String>,
    #[command(flatten)]
    tls: framecast_telemetry::tls::ServerTlsArgs,
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
    /// Most sessions one client address may have open at once (its share of
    /// --max-sessions; behind a reverse proxy every browser has the proxy's address).
    #[arg(long, env = "FRAMECAST_GATEWAY_MAX_SESSIONS_PER_CLIENT", default_value_t = GatewayOptions::default().max_sessions_per_client, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_sessions_per_client: usize,
    /// Most HTTP connections one client address may hold open at once; more are closed on
    /// accept.
    #[arg(long, env = "FRAMECAST_GATEWAY_MAX_CONNECTIONS_PER_CLIENT", default_value_t = GatewayOptions::default().max_connections_per_client, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_connections_per_client: usize,
    /// Seconds a request's body may take to arrive after its headers (headers have 10 s);
    /// past it the request gets 408 and its connection is closed.
    #[arg(long, env = "FRAMECAST_GATEWAY_BODY_TIMEOUT_S", default_value_t = GatewayOptions::default().body_timeout.as_secs_f64())]
    body_timeout_s: f64,
    /// A session not connected this long after its answer, or whose browser then sends no
    /// voice for this long, is ended (datagrams from anyone else never count).
    #[arg(
        long,
        env = "FRAMECAST_GATEWAY_SESSION_TIMEOUT_S",
        default_value_t = GatewayOptions::default().session_timeout.as_secs_f64()
    )]
    session_timeout_s: f64,
    /// Video bitrate per session, kbit/s (H.264 or VP8).
    #[arg(long, env = "FRAMECAST_GATEWAY_VIDEO_KBPS", default_value_t = GatewayOptions::default().video_bitrate_bps / 1000)]
    video_kbps: u32,
    /// Video codecs sessions may use, most preferred first (h264, vp8): a session gets the
    /// first one its browser offers; an offer with none of them is refused (400). H.264 is
    /// first by default: VP8 needs about a quarter more bitrate for the same quality on a
    /// 720p avatar (docs/performance.md), and most devices decode H.264 in hardware.
    #[arg(
        long,
        env = "FRAMECAST_GATEWAY_VIDEO_CODECS",
        value_delimiter = ',',
        default_value = "h264,vp8"
    )]
    video_codecs: Vec<VideoCodec>,
    /// Margin between a frame's arrival and its play time, ms: absorbs the compositor's
    /// batches; the voice is delayed by the same amount.
    #[arg(long, env = "FRAMECAST_GATEWAY_JITTER_MS", default_value_t = GatewayOptions::default().jitter.as_millis() as u64)]
    jitter_ms: u64,
    /// Longest a frame may show after the voice of its moment reached the gateway, ms (the
    /// jitter margin and the compositor's time for the frame included): later frames are
    /// dropped (counted in frames_dropped), so a compositor that falls behind costs frames,
    /// never a delay that grows. Normal sessions hold 300-400 ms here.
    #[arg(long, env = "FRAMECAST_GATEWAY_MAX_LATENCY_MS", default_value_t = GatewayOptions::default().max_latency.as_millis() as u64)]
    max_latency_ms: u64,
    /// A WAV file the page offers as "play a sample sentence".
    #[arg(long, env = "FRAMECAST_GATEWAY_SAMPLE_WAV")]
    sample_wav: Option<PathBuf>,
    /// Bearer token session creation (`POST /sessions`, as WHIP's) and the agent endpoints
    /// (`/sessions/ID/speech`, `interrupt`, `events`, `microphone`) require; several,
    /// comma-separated. Unset: anyone may open sessions, and whoever knows a session's id may
    /// make its avatar speak and hear its user (set it beyond a single machine).
    #[arg(long, env = "FRAMECAST_GATEWAY_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Origins whose pages may call the gateway across origins (CORS: a page served
    /// elsewhere opening sessions); comma-separated, `*` for any. Unset: same origin only.
    #[arg(long, env = "FRAMECAST_GATEWAY_CORS_ORIGIN", value_delimiter = ',')]
    cors_origin: Vec<String>,
    /// STUN or TURN servers the browser should gather with (stun:, stuns:, turn:, turns:
    /// URIs; comma-separated), sent as `Link: <...>; rel="ice-server"` headers with each
    /// answer and OPTIONS (RFC 9725). The gateway itself offers host candidates only.
    #[arg(long, env = "FRAMECAST_GATEWAY_ICE_SERVER", value_delimiter = ',')]
    ice_server: Vec<String>,
    /// The TURN servers' username (--ice-server turn: URIs).
    #[arg(long, env = "FRAMECAST_GATEWAY_ICE_USERNAME")]
    ice_username: Option<String>,
    /// The TURN servers' credential.
    #[arg(long, env = "FRAMECAST_GATEWAY_ICE_CREDENTIAL", hide_env_values = true)]
    ice_credential: Option<String>,
    /// Admission by measured margin: a new session is refused (503 with Retry-After and the
    /// reason) while an open session misses frames or sends under 90% of its frame rate, or
    /// while the host's free cores are fewer than one session's measured share of the cores
    /// busy above the host's idle load times this headroom. 0 keeps the frame-rate rule only;
    /// off admits up to --max-sessions whatever the load.
    #[arg(long, env = "FRAMECAST_GATEWAY_ADMISSION_HEADROOM", default_value = "1.25", value_parser = Headroom::parse)]
    admission_headroom: Headroom,
    /// MiB the idle loops' shared encodes (one per codec) may hold, all avatars together: an
    /// avatar's idle frames are encoded once and sent to each of its sessions between
    /// utterances (a 10 s 720p loop at 2 Mbit/s is about 3 MiB). 0: every session encodes its own.
    #[arg(long, env = "FRAMECAST_GATEWAY_IDLE_CACHE_MIB", default_value_t = GatewayOptions::default().idle_cache_bytes >> 20)]
    idle_cache_mib: usize,
    /// H.264 talking frames made from the avatar's shared stream with the session's own face
    /// region spliced in: a session encodes only its face region (about 5% of a 720p frame),
    /// not the whole frame. Needs the shared stream (--idle-cache-mib above 0). false: every
    /// talking frame encoded whole by its session.
    #[arg(long, env = "FRAMECAST_GATEWAY_FACE_SPLICE", default_value_t = true, action = clap::ArgAction::Set)]
    face_splice: bool,
    /// A TTS service for agent sessions' text: an http:// URL the text is POSTed to
    /// (text/plain; voice and rate as query parameters) answering WAV or 16-bit PCM
    /// (audio/L16; rate=N or audio/pcm; rate=N), streamed. Unset: espeak-ng.
    #[arg(long, env = "FRAMECAST_GATEWAY_TTS_URL")]
    tts_url: Option<String>,
    /// Seconds the TTS may take to start speaking, or pause while it speaks; past it the
    /// speech call gets 502 (or the utterance ends with what came).
    #[arg(long, env = "FRAMECAST_GATEWAY_TTS_TIMEOUT_S", default_value_t = GatewayOptions::default().tts_timeout.as_secs_f64())]
    tts_timeout_s: f64,
    /// Largest speech body (text or audio), bytes; past it 413 (or, for a body that did not
    /// say its length, the rest is not spoken).
    #[arg(long, env = "FRAMECAST_GATEWAY_MAX_SPEECH_BYTES", default_value_t = GatewayOptions::default().max_speech_bytes, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1024..))]
    max_speech_bytes: usize,
    /// Utterances an agent session holds waiting; past it the speech call gets 429.
    #[arg(long, env = "FRAMECAST_GATEWAY_MAX_UTTERANCES", default_value_t = GatewayOptions::default().max_utterances, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    max_utterances: usize,
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
    framecast_telemetry::config_file::apply_for_root::<Args>()?;
    let args = Args::parse();
    framecast_telemetry::init_logs(args.log_format);
    let positive = |s: f64| s.is_finite() && s > 0.0 && s < 1e6;
    if args.max_sessions == 0
        || !positive(args.session_timeout_s)
        || !positive(args.body_timeout_s)
        || !positive(args.tts_timeout_s)
        || args.video_kbps == 0
    {
        anyhow::bail!("--max-sessions, --session-timeout-s, --body-timeout-s, --tts-timeout-s and --video-kbps must be positive");
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
    if let Some(url) = &args.tts_url {
        let ok = url
            .parse::<hyper::Uri>()
            .is_ok_and(|u| u.scheme_str() == Some("http") && u.host().is_some());
        anyhow::ensure!(ok, "--tts-url {url:?}: an http://host[:port]/path URL");
    }
    if let Some(p) = &args.sample_wav {
        std::fs::metadata(p).with_context(|| format!("--sample-wav {}", p.display()))?;
    }
    let compositor_tls = ClientTls::from_files(
        "compositor-tls",
        args.compositor_tls_ca.as_deref(),
        args.compositor_tls_cert.as_deref(),
        args.compositor_tls_key.as_deref(),
        args.compositor_tls_domain.clone(),
    )?;
    let client = framecast_gateway::connect(
        &args.compositor_url,
        compositor_tls.as_ref(),
        args.compositor_token.as_deref(),
    )
    .with_context(|| format!("--compositor-url {}", args.compositor_url))?;
    let tls = args.tls.load()?;
    let opts = GatewayOptions {
        udp_host: args.udp_host,
        udp_bind: args.udp_bind,
        udp_ports: args.udp_ports,
        max_sessions: args.max_sessions,
        max_sessions_per_client: args.max_sessions_per_client,
        max_connections_per_client: args.max_connections_per_client,
        body_timeout: Duration::from_secs_f64(args.body_timeout_s),
        session_timeout: Duration::from_secs_f64(args.session_timeout_s),
        video_bitrate_bps: args.video_kbps * 1000,
        video_codecs: args.video_codecs,
        jitter: Duration::from_millis(args.jitter_ms),
        max_latency: Duration::from_millis(args.max_latency_ms),
        sample_wav: args.sample_wav,
        api_token: args.api_token,
        tts: match args.tts_url {
            Some(url) => framecast_gateway::tts::Tts::Http { url },
            None => Default::default(),
        },
        tts_timeout: Duration::from_secs_f64(args.tts_timeout_s),
        max_speech_bytes: args.max_speech_bytes,
        max_utterances: args.max_utterances,
        cors_origins: args.cors_origin,
        ice_servers: args
            .ice_server
            .iter()
            .map(|url| {
                framecast_gateway::whip::IceServer::new(
                    url,
                    args.ice_username.as_deref(),
                    args.ice_credential.as_deref(),
                )
            })
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?,
        https: tls.is_some(),
        idle_cache_bytes: args.idle_cache_mib.saturating_mul(1 << 20),
        face_splice: args.face_splice,
        admission: args.admission_headroom.0,
        ..Default::default()
    };
    if opts.api_token.is_none() {
        tracing::warn!(
            "no --api-token: anyone may open sessions, and the agent endpoints of a session answer whoever knows its id"
        );
    }
    let gw = Gateway::new(client, opts);
    let metrics_addr = metrics_http::serve_metrics(
        args.metrics_listen,
        gw.metrics.registry.clone(),
        metrics_http::MetricsAccess::new(tls.as_ref(), None, false),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    let page = format!(
        "{}://{}/",
        if tls.is_some() { "https" } else { "http" },
        listener.local_addr()?
    );
    tracing::info!(
        http = %listener.local_addr()?, metrics = %metrics_addr, compositor = %args.compositor_url,
        "gateway serving: open {page} in a browser"
    );
    let stopping = gw.clone();
    framecast_gateway::serve(listener, gw, tls, async move {
        framecast_telemetry::shutdown_signal().await;
        tracing::info!("shutting down: ending the sessions");
        stopping.shut_down();
    })
    .await;
    Ok(())
}

//! The gateway's HTTP side: the page, the avatar list, and sessions signalled WHIP/WHEP
//! style (the offer is the body of `POST /sessions?avatar=ID`, `application/sdp`; the answer
//! comes back with `201 Created` and `Location: /sessions/ID`; `DELETE` that location ends
//! the session). Every refusal is an HTTP status with a one-line reason in the body.

use crate::admission::{Admission, Counters, Verdict};
use crate::api;
use crate::events::Events;
use crate::idle_video::IdleVideo;
use crate::media::VideoCodec;
use crate::metrics::Metrics;
use crate::offer;
use crate::session::{self, Mode, Session, SessionConfig};
use crate::speech::Speaker;
use crate::tts::Tts;
use crate::Compositor;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use framecast_proto::auth::BearerCheck;
use framecast_proto::compositor::v1::{ListAvatarsRequest, LoadAvatarRequest};
use framecast_telemetry::http_server::{self, HttpLimits};
use framecast_telemetry::places::{Place, Places, Refused};
use framecast_telemetry::tls::ServerTls;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::change::SdpOffer;
use str0m::{Candidate, RtcConfig};

const PAGE: &str = include_str!("../static/index.html");

#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// The address put in the host candidates, where browsers send their media.
    pub udp_host: IpAddr,
    /// The address the sessions' UDP sockets bind (`None`: `udp_host`). In a container or
    /// behind a 1:1 NAT it is the local interface while `udp_host` is the public address.
    pub udp_bind: Option<IpAddr>,
    /// The UDP ports sessions may take, first to last (`None`: any the kernel gives). A
    /// firewall or a Kubernetes Service then opens exactly these; one port per session.
    pub udp_ports: Option<(u16, u16)>,
    pub max_sessions: usize,
    /// Sessions one client address may have open (or being answered) at once.
    pub max_sessions_per_client: usize,
    /// HTTP connections one client address may hold at once.
    pub max_connections_per_client: usize,
    /// How long a request's body may take to arrive after its headers.
    pub body_timeout: Duration,
    /// A session whose browser sends nothing for this long is ended.
    pub session_timeout: Duration,
    /// Largest request body (an SDP offer is a few KB).
    pub max_body_bytes: usize,
    pub video_bitrate_bps: u32,
    /// The video codecs sessions may use, most preferred first: a session gets the first
    /// its browser's offer has.
    pub video_codecs: Vec<VideoCodec>,
    /// Margin between a frame's arrival and its play time.
    pub jitter: Duration,
    /// Longest a frame may show after its voice reached the gateway: later frames are dropped
    /// (counted), so a compositor that falls behind costs frames, never a growing delay.
    pub max_latency: Duration,
    /// A WAV file the page offers as "play a sample sentence".
    pub sample_wav: Option<PathBuf>,
    /// Bearer tokens the agent endpoints (speech, interrupt, events, microphone) require,
    /// comma-separated; `None`: open to whoever knows the session's id.
    pub api_token: Option<String>,
    /// Where text is spoken.
    pub tts: Tts,
    /// How long the TTS may take to start speaking (and may pause while it speaks).
    pub tts_timeout: Duration,
    /// Largest speech body (audio or text), bytes.
    pub max_speech_bytes: usize,
    /// Utterances an agent session holds waiting.
    pub max_utterances: usize,
    /// Origins whose pages may call the gateway (CORS); `*` any.
    pub cors_origins: Vec<String>,
    /// STUN and TURN servers for the browser, sent as `Link` headers (RFC 9725).
    pub ice_servers: Vec<crate::whip::IceServer>,
    /// The page and signalling are served over HTTPS (for the absolute `Location`).
    pub https: bool,
    /// Bytes the shared encodes of the avatars' idle loops may hold (0: each session encodes
    /// its own idle frames).
    pub idle_cache_bytes: usize,
    /// H.264 talking frames are the shared stream with the session's face region spliced
    /// in ([`crate::splice`]): only the region is encoded per session.
    pub face_splice: bool,
    /// Admission by measured margin ([`crate::admission`]): `None` admits up to
    /// `max_sessions` whatever the load (the library's default; the binary's is on), else the
    /// headroom one more session's CPU needs (0: frame rates only).
    pub admission: Option<f64>,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            udp_host: IpAddr::from([127, 0, 0, 1]),
            udp_bind: None,
            udp_ports: None,
            max_sessions: 8,
            max_sessions_per_client: 4,
            max_connections_per_client: 32,
            body_timeout: http_server::BODY_TIMEOUT,
            session_timeout: Duration::from_secs(10),
            max_body_bytes: 64 * 1024,
            video_bitrate_bps: 2_000_000,
            video_codecs: vec![VideoCodec::H264, VideoCodec::Vp8],
            jitter: Duration::from_millis(150),
            max_latency: Duration::from_millis(600),
            sample_wav: None,
            api_token: None,
            tts: Tts::default(),
            tts_timeout: Duration::from_secs(10),
            max_speech_bytes: 32 << 20,
            max_utterances: 16,
            cors_origins: Vec::new(),
            ice_servers: Vec::new(),
            https: false,
            idle_cache_bytes: 64 << 20,
            face_splice: true,
            admission: None,
        }
    }
}

pub struct Gateway {
    compositor: Compositor,
    pub(crate) opts: GatewayOptions,
    /// Open sessions, each with the place it holds under `--max-sessions`.
    sessions: Mutex<HashMap<String, (Session, Place)>>,
    /// Ids of sessions that ended lately (the newest [`ENDED_KEPT`]): a call naming one gets
    /// 410, not 404.
    ended: Mutex<std::collections::VecDeque<String>>,
    /// The agent endpoints' token check.
    pub(crate) api_auth: BearerCheck,
    places: Arc<Places>,
    pub metrics: Metrics,
    /// The avatars' idle loops, encoded once for all sessions.
    idle_video: Arc<IdleVideo>,
    admission: Option<Mutex<Admission>>,
    draining: AtomicBool,
}

impl Gateway {
    pub fn new(compositor: Compositor, opts: GatewayOptions) -> Arc<Gateway> {
        // str0m's DTLS and SRTP through the pure-Rust provider, once per process.
        static CRYPTO: std::sync::Once = std::sync::Once::new();
        CRYPTO.call_once(|| str0m::crypto::from_feature_flags().install_process_default());
        let metrics = Metrics::new();
        let gw = Arc::new(Gateway {
            compositor,
            opts: opts.clone(),
            sessions: Mutex::new(HashMap::new()),
            ended: Mutex::default(),
            api_auth: BearerCheck::new(opts.api_token.as_deref()),
            places: Places::new(opts.max_sessions, opts.max_sessions_per_client),
            idle_video: IdleVideo::new(opts.idle_cache_bytes, metrics.clone()),
            admission: opts.admission.map(|h| Mutex::new(Admission::new(h))),
            metrics,
            draining: AtomicBool::new(false),
        });
        // Sessions whose thread ended (browser gone, reaped, compositor failed) are forgotten.
        framecast_telemetry::periodic::every(&gw, Duration::from_secs(1), |gw| async move {
            gw.forget_finished();
            gw.sample_margin();
            true
        });
        gw
    }

    fn forget_finished(&self) {
        let mut sessions = self.sessions.lock();
        let done: Vec<String> = sessions
            .iter()
            .filter(|(_, (s, _))| s.finished())
            .map(|(id, _)| id.clone())
            .collect();
        for id in done {
            sessions.remove(&id);
            self.remember_ended(id);
        }
        self.metrics.sessions.set(sessions.len() as i64);
    }

    /// Feeds admission a sample of the open sessions' counters.
    fn sample_margin(&self) {
        let Some(admission) = &self.admission else {
            return;
        };
        let counters = self
            .sessions
            .lock()
            .iter()
            .map(|(id, (s, _))| {
                let st = &s.stats;
                let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                let c = Counters {
                    sent: n(&st.frames_sent),
                    missed: n(&st.frames_dropped) + n(&st.frames_lost),
                    fps: s.config.fps,
                    connected: *st.state.lock() == "connected",
                };
                (id.clone(), c)
            })
            .collect();
        let mut a = admission.lock();
        a.sample(counters, self.idle_video.shared_work());
        self.metrics
            .admission_open
            .set((*a.verdict() == Verdict::Admit) as i64);
    }

    /// Why no session may be admitted now, if so; else the session counts as admitted.
    fn no_margin(&self) -> Option<String> {
        self.admission.as_ref()?.lock().admit().err()
    }

    fn remember_ended(&self, id: String) {
        let mut ended = self.ended.lock();
        ended.push_back(id);
        while ended.len() > ENDED_KEPT {
            ended.pop_front();
        }
    }

    /// What the agent endpoints use of session `id`, or the status saying why not: 404 for
    /// an id never seen, 410 for a session that has ended.
    pub(crate) fn session(&self, id: &str) -> Result<Handle, (StatusCode, String)> {
        if let Some((s, _)) = self.sessions.lock().get(id) {
            if !s.finished() {
                return Ok(Handle {
                    mode: s.config.mode,
                    speaker: s.speaker.clone(),
                    events: s.events.clone(),
                    microphone: s.microphone.clone(),
                });
            }
        }
        if self.ended.lock().iter().any(|e| e == id) || self.sessions.lock().contains_key(id) {
            return Err((StatusCode::GONE, "the session has ended".into()));
        }
        Err((StatusCode::NOT_FOUND, "no such session".into()))
    }

    /// Stops taking sessions and ends the open ones (graceful shutdown).
    pub fn shut_down(&self) {
        self.draining.store(true, Ordering::Release);
        for (s, _) in self.sessions.lock().values() {
            s.stop();
        }
    }

    /// Sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.forget_finished();
        self.sessions.lock().len()
    }

    /// A place for one more session of `client`, if the open sessions and offers being
    /// answered leave one, in all and in its share.
    fn place(&self, client: &str) -> Result<Place, Refused> {
        self.forget_finished();
        self.places.take(client)
    }
}

/// Ids of ended sessions remembered for 410 answers.
const ENDED_KEPT: usize = 4096;

/// What the agent endpoints need of a session.
pub(crate) struct Handle {
    pub mode: Mode,
    pub speaker: Option<Speaker>,
    pub events: Events,
    pub microphone: Option<Arc<Mutex<Option<tokio::sync::mpsc::Receiver<bytes::Bytes>>>>>,
}

/// The routes, over `gw`.
fn router(gw: Arc<Gateway>) -> Router {
    let limit = gw.opts.max_body_bytes;
    let signalling = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/healthz", get(health))
        .route("/avatars", get(avatars))
        .route("/sample.wav", get(sample))
        .route(
            "/sessions",
            axum::routing::post(create).options(crate::whip::options),
        )
        .route("/sessions/{id}", get(stats).delete(end))
        .route(
            "/sessions/{id}/interrupt",
            axum::routing::post(api::interrupt),
        )
        .route("/sessions/{id}/events", get(api::events))
        .route("/sessions/{id}/microphone", get(api::microphone))
        .layer(DefaultBodyLimit::max(limit));
    // Speech bodies stream (a TTS piped through): their own size limit.
    let speech = Router::new()
        .route("/sessions/{id}/speech", axum::routing::post(api::speech))
        .layer(DefaultBodyLimit::max(gw.opts.max_speech_bytes));
    signalling
        .merge(speech)
        .layer(axum::middleware::from_fn_with_state(
            gw.clone(),
            crate::whip::cors,
        ))
        .with_state(gw)
}

/// The speech route's bodies may stream for as long as they keep coming.
fn streams_its_body(path: &str) -> bool {
    path.starts_with("/sessions/") && path.ends_with("/speech")
}

/// Connections the page and signalling port serves at once: a page load and a session's
/// calls take a few each, so this is room for hundreds of browsers arriving together.
pub const MAX_CONNECTIONS: usize = 1024;

/// Serves the page, the avatar list and signalling on `listener` (HTTPS with `tls`) until
/// `shutdown` resolves, defended as every framecast HTTP port is (deadlines on request
/// headers and bodies, caps on connections in all and per client address).
pub async fn serve(
    listener: tokio::net::TcpListener,
    gw: Arc<Gateway>,
    tls: Option<ServerTls>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let limits = HttpLimits {
        body_timeout: gw.opts.body_timeout,
        streaming: Some(streams_its_body),
        ..HttpLimits::new(tls, MAX_CONNECTIONS, gw.opts.max_connections_per_client)
    };
    http_server::serve(listener, router(gw), limits, "gateway", shutdown).await
}

pub(crate) fn refuse(status: StatusCode, reason: impl Into<String>) -> Response {
    let mut reason = reason.into();
    reason.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        reason,
    )
        .into_response()
}

async fn health(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.draining.load(Ordering::Acquire) {
        refuse(StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn avatars(State(gw): State<Arc<Gateway>>) -> Response {
    match gw
        .compositor
        .clone()
        .list_avatars(ListAvatarsRequest {})
        .await
    {
        Ok(r) => {
            let list: Vec<serde_json::Value> = r
                .into_inner()
                .avatars
                .into_iter()
                .map(|a| {
                    serde_json::json!({
                        "id": a.avatar_id, "state": a.state, "reason": a.reason,
                        "loaded": a.state == "ready", "width": a.width, "height": a.height,
                        "fps": a.fps, "frames": a.frame_count, "model": a.model,
                        "speaks": a.speaks,
                    })
                })
                .collect();
            axum::Json(list).into_response()
        }
        Err(e) => refuse(
            StatusCode::BAD_GATEWAY,
            format!("compositor: {}", e.message()),
        ),
    }
}

async fn sample(State(gw): State<Arc<Gateway>>) -> Response {
    let Some(path) = &gw.opts.sample_wav else {
        return refuse(StatusCode::NOT_FOUND, "no sample sentence (--sample-wav)");
    };
    let path = path.clone();
    match tokio::task::spawn_blocking(move || std::fs::read(path))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    {
        Ok(bytes) => ([(header::CONTENT_TYPE, "audio/wav")], bytes).into_response(),
        Err(e) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("sample sentence: {e}"),
        ),
    }
}

async fn stats(State(gw): State<Arc<Gateway>>, Path(id): Path<String>) -> Response {
    match gw.sessions.lock().get(&id) {
        Some((s, _)) => axum::Json(s.stats.snapshot()).into_response(),
        None => refuse(StatusCode::NOT_FOUND, "no such session"),
    }
}

async fn end(State(gw): State<Arc<Gateway>>, Path(id): Path<String>) -> Response {
    let removed = gw.sessions.lock().remove(&id);
    match removed {
        Some((s, _)) => {
            s.stop();
            gw.remember_ended(id);
            StatusCode::OK.into_response()
        }
        None => refuse(StatusCode::NOT_FOUND, "no such session"),
    }
}

async fn create(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let outcome = |label: &str| {
        gw.metrics
            .session_requests
            .with_label_values(&[label])
            .inc()
    };
    let auth = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    if gw.api_auth.check(auth).is_err() {
        outcome("unauthorized");
        return refuse(
            StatusCode::UNAUTHORIZED,
            "authorization: send 'Authorization: Bearer <token>' with the gateway's --api-token",
        );
    }
    let sdp = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/sdp"));
    if !sdp {
        outcome("bad_offer");
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type: an offer is application/sdp (RFC 9725)",
        );
    }
    let Some(avatar) = query.get("avatar").filter(|a| !a.is_empty()) else {
        outcome("bad_offer");
        return refuse(
            StatusCode::BAD_REQUEST,
            "the avatar query parameter is required: POST /sessions?avatar=ID",
        );
    };
    let mode = match query.get("mode").map(String::as_str) {
        None | Some("mirror") => Mode::Mirror,
        Some("agent") => Mode::Agent,
        Some(other) => {
            outcome("bad_offer");
            return refuse(
                StatusCode::BAD_REQUEST,
                format!(
                    "mode: {:?} is not mirror (the browser's own voice) or agent (the application speaks)",
                    framecast_proto::echo(other.get(..32).unwrap_or(other))
                ),
            );
        }
    };
    if gw.draining.load(Ordering::Acquire) {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is shutting down",
        );
    }
    if let Some(why) = gw.no_margin() {
        outcome("no_margin");
        let mut refusal = refuse(StatusCode::SERVICE_UNAVAILABLE, why);
        refusal.headers_mut().insert(
            header::RETRY_AFTER,
            header::HeaderValue::from(crate::admission::WINDOW.as_secs()),
        );
        return refusal;
    }
    let client = framecast_proto::client::address(peer.ip());
    let place = match gw.place(&client) {
        Ok(place) => place,
        Err(refused) => {
            let (label, status, reason) = match refused {
                Refused::Full { max } => (
                    "full",
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the gateway has its maximum of {max} sessions open (--max-sessions): try again later"),
                ),
                Refused::ClientFull { max } => (
                    "client_full",
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("this address has {max} sessions open, its share (--max-sessions-per-client): end one first"),
                ),
            };
            outcome(label);
            return refuse(status, reason);
        }
    };
    let offered = match offer::check(&body) {
        Ok(offered) => offered,
        Err(reason) => {
            outcome("bad_offer");
            return refuse(StatusCode::BAD_REQUEST, reason);
        }
    };
    let Some(codec) = offered.choose(&gw.opts.video_codecs) else {
        outcome("bad_offer");
        let names = |c: &[VideoCodec]| c.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ");
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "the offer's video has {} and this gateway sends {} (--video-codecs)",
                names(&offered.video),
                names(&gw.opts.video_codecs)
            ),
        );
    };
    let offer = match SdpOffer::from_sdp_string(&body) {
        Ok(o) => o,
        Err(e) => {
            outcome("bad_offer");
            // The parser's own message shows its internal state (pointers): said in words.
            tracing::debug!(error = %e, "an SDP offer did not parse");
            return refuse(
                StatusCode::BAD_REQUEST,
                "the SDP offer does not parse: a line is not valid SDP (RFC 8866) as browsers write it",
            );
        }
    };
    let info = match gw
        .compositor
        .clone()
        .load_avatar(LoadAvatarRequest {
            avatar_id: avatar.clone(),
        })
        .await
    {
        Ok(r) => r.into_inner().avatar.unwrap_or_default(),
        Err(e) if e.code() == tonic::Code::NotFound => {
            outcome("unknown_avatar");
            return refuse(StatusCode::NOT_FOUND, format!("avatar: {}", e.message()));
        }
        Err(e) if e.code() == tonic::Code::InvalidArgument => {
            outcome("unknown_avatar");
            return refuse(StatusCode::BAD_REQUEST, format!("avatar: {}", e.message()));
        }
        Err(e) => {
            outcome("error");
            return refuse(
                StatusCode::BAD_GATEWAY,
                format!("compositor: {}", e.message()),
            );
        }
    };
    if info.speaks == Some(false) {
        outcome("mute_avatar");
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "avatar: '{}' cannot lip-sync a voice: its avatar.toml has no [audio] table (how its model takes speech)",
                framecast_proto::echo(avatar)
            ),
        );
    }
    match answer(&gw, avatar, mode, codec, &info, offer, place) {
        Ok((id, sdp)) => {
            outcome("answered");
            let mut r = (
                StatusCode::CREATED,
                [
                    (header::CONTENT_TYPE, "application/sdp".to_string()),
                    (
                        header::LOCATION,
                        crate::whip::location(&headers, gw.opts.https, &format!("/sessions/{id}")),
                    ),
                ],
                sdp,
            )
                .into_response();
            for (k, v) in crate::whip::ice_links(&gw) {
                if let Ok(v) = axum::http::HeaderValue::from_str(&v) {
                    r.headers_mut().append(k, v);
                }
            }
            r
        }
        Err((status, reason)) => {
            outcome(if status == StatusCode::BAD_REQUEST {
                "bad_offer"
            } else {
                "error"
            });
            refuse(status, reason)
        }
    }
}

/// Where talking frames of the avatar can splice their face region into the shared stream:
/// the region the compositor reports, widened to macroblocks (of the even size H.264 codes).
fn face_layout(
    enabled: bool,
    info: &framecast_proto::compositor::v1::AvatarInfo,
) -> Option<framecast_h264::Layout> {
    let r = info.face_region.as_ref().filter(|_| enabled)?;
    let coded = (info.width & !1, info.height & !1);
    match framecast_h264::Layout::around(coded.0, coded.1, (r.x, r.y, r.width, r.height)) {
        Ok(layout) => Some(layout),
        Err(e) => {
            // Talking frames are then encoded whole, as they always were.
            tracing::info!(avatar = %info.avatar_id, reason = %e, "face region not spliced");
            None
        }
    }
}

/// Makes the session's connection and answer and starts it: (id, answer SDP).
fn answer(
    gw: &Arc<Gateway>,
    avatar: &str,
    mode: Mode,
    codec: VideoCodec,
    info: &framecast_proto::compositor::v1::AvatarInfo,
    offer: SdpOffer,
    place: Place,
) -> Result<(String, String), (StatusCode, String)> {
    let internal = |e: String| (StatusCode::INTERNAL_SERVER_ERROR, e);
    let socket = bind_udp(&gw.opts).map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e))?;
    let port = socket
        .local_addr()
        .map_err(|e| internal(e.to_string()))?
        .port();
    let addr = std::net::SocketAddr::new(gw.opts.udp_host, port);
    // Stats once a second: the browser's round-trip time from its receiver reports.
    let mut rtc = RtcConfig::new()
        .set_stats_interval(Some(Duration::from_secs(1)))
        .build(Instant::now());
    let candidate =
        Candidate::host(addr, "udp").map_err(|e| internal(format!("host candidate: {e}")))?;
    rtc.add_local_candidate(candidate);
    // The offer was checked (offer::check), but the library is not trusted with hostile
    // input: a panic answers 400 instead of dropping the request.
    let accepted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rtc.sdp_api().accept_offer(offer)
    }));
    let answer =
        match accepted {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    format!("the offer cannot be answered: {}", in_words(&e.to_string())),
                ))
            }
            Err(_) => return Err((
                StatusCode::BAD_REQUEST,
                "the offer cannot be answered: the WebRTC library rejected its media description"
                    .to_string(),
            )),
        };
    let id = session_id().map_err(internal)?;
    let config = SessionConfig {
        id: id.clone(),
        mode,
        max_utterances: gw.opts.max_utterances,
        avatar: avatar.to_string(),
        width: info.width as usize,
        height: info.height as usize,
        fps: if info.fps > 0.0 { info.fps } else { 25.0 },
        video_bitrate_bps: gw.opts.video_bitrate_bps,
        video_codec: codec,
        timeout: gw.opts.session_timeout,
        jitter: gw.opts.jitter,
        max_latency: gw.opts.max_latency,
        shared_idle: gw.opts.idle_cache_bytes > 0,
        face_layout: face_layout(gw.opts.face_splice, info),
        backgrounds: info.frame_count,
    };
    let session = session::start(
        config,
        rtc,
        socket,
        addr,
        gw.compositor.clone(),
        gw.metrics.clone(),
        &gw.idle_video,
    )
    .map_err(internal)?;
    let mut sessions = gw.sessions.lock();
    sessions.insert(id.clone(), (session, place));
    gw.metrics.sessions.set(sessions.len() as i64);
    Ok((id, crate::answer::one_stream(&answer.to_sdp_string())))
}

/// A UDP socket for one session: on a port of `--udp-ports`, or any.
fn bind_udp(opts: &GatewayOptions) -> Result<UdpSocket, String> {
    let ip = opts.udp_bind.unwrap_or(opts.udp_host);
    let Some((first, last)) = opts.udp_ports else {
        return UdpSocket::bind((ip, 0)).map_err(|e| format!("UDP port on {ip}: {e}"));
    };
    (first..=last)
        .find_map(|port| UdpSocket::bind((ip, port)).ok())
        .ok_or_else(|| format!("no free UDP port in {first}-{last} (--udp-ports) on {ip}"))
}

/// 128 random bits as hex: a session's name is also what ends it, so it must not be guessed.
fn session_id() -> Result<String, String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("session id: /dev/urandom: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A library's error message without what only its debugger could read: hexadecimal
/// addresses (`0x7f…`) are left out.
fn in_words(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("0x") {
        out.push_str(&rest[..at]);
        let hex = rest[at + 2..]
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(rest.len() - at - 2);
        if hex >= 6 {
            out.push('…');
        } else {
            out.push_str(&rest[at..at + 2 + hex]);
        }
        rest = &rest[at + 2 + hex..];
    }
    out.push_str(rest);
    framecast_proto::echo(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses_are_left_out_of_library_errors() {
        let said = super::in_words("bad PointerOffset(0x7f3a9c001234) at 0x10");
        assert_eq!(said, "bad PointerOffset(…) at 0x10");
    }
}

//! The gateway's signalling against the real compositor and inference service: every bad
//! request gets its HTTP status and a reason, sessions past `--max-sessions` get 503, a
//! browser that vanishes without a DELETE is reaped, and connect/disconnect cycles leave the
//! process's memory flat. The offers come from str0m acting as the browser (the Chromium test
//! in browser.rs covers a real one).

use framecast_e2e::{gateway_stack, GatewayStack};
use framecast_gateway::GatewayOptions;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use str0m::media::{Direction, MediaKind};
use str0m::RtcConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 request on a fresh connection: (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let (status, _, body) = http_full(addr, method, path, body).await;
    (status, body)
}

/// (status, head, body), from 127.0.0.1.
async fn http_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, String, String) {
    http_from([127, 0, 0, 1], addr, method, path, body).await
}

/// An offer as a browser makes it: the microphone (sendrecv) and video to receive.
fn offer(audio: bool) -> String {
    let mut rtc = RtcConfig::new().build(Instant::now());
    let mut api = rtc.sdp_api();
    if audio {
        api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    }
    api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    let (offer, _pending) = api.apply().unwrap();
    offer.to_sdp_string()
}

/// A browser's offer for the `small` avatar to `f`'s gateway: (status, head, body).
async fn post_offer(f: &GatewayStack) -> (u16, String, String) {
    http_full(
        f.addr,
        "POST",
        "/sessions?avatar=small",
        offer(true).as_bytes(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_status_and_reason() {
    let f = gateway_stack(GatewayOptions {
        max_sessions: 1,
        ..Default::default()
    })
    .await;
    let post = |path: &str, body: Vec<u8>| {
        let (addr, path) = (f.addr, path.to_string());
        async move { http(addr, "POST", &path, &body).await }
    };
    let (status, page) = http(f.addr, "GET", "/", b"").await;
    assert_eq!(status, 200);
    assert!(page.contains("RTCPeerConnection"), "the page");
    let (status, list) = http(f.addr, "GET", "/avatars", b"").await;
    assert_eq!(status, 200);
    assert!(list.contains("\"small\""), "{list}");

    let (status, why) = post("/sessions", offer(true).into_bytes()).await;
    assert_eq!(status, 400);
    assert!(why.contains("avatar query parameter"), "{why}");
    let (status, why) = post("/sessions?avatar=small", b"not sdp at all".to_vec()).await;
    assert_eq!(status, 400);
    assert!(why.contains("not an SDP offer"), "{why}");
    let broken = offer(true)
        .replace("a=ice-ufrag", "a=ice-ufrag-broken")
        .replace("c=IN", "c=XX");
    let (status, why) = post("/sessions?avatar=small", broken.into_bytes()).await;
    assert_eq!(status, 400, "{why}");
    let (status, why) = post("/sessions?avatar=small", offer(false).into_bytes()).await;
    assert_eq!(status, 400);
    assert!(why.contains("no audio m-line"), "{why}");
    let (status, why) = post("/sessions?avatar=nobody", offer(true).into_bytes()).await;
    assert_eq!(status, 404);
    assert!(why.contains("avatar"), "{why}");
    let (status, why) = post("/sessions?avatar=..%2Fsmall", offer(true).into_bytes()).await;
    assert!(status == 400 || status == 404, "{status} {why}");
    let huge = vec![b'v'; 200 * 1024];
    let (status, _) = post("/sessions?avatar=small", huge).await;
    assert_eq!(status, 413);
    let (status, _) = http(f.addr, "DELETE", "/sessions/0123", b"").await;
    assert_eq!(status, 404);

    // One session is the maximum: the next is refused with the reason, until it ends.
    let (status, answer) = post("/sessions?avatar=small", offer(true).into_bytes()).await;
    assert_eq!(status, 201, "{answer}");
    assert!(answer.starts_with("v=0"), "{answer}");
    let (status, why) = post("/sessions?avatar=small", offer(true).into_bytes()).await;
    assert_eq!(status, 503);
    assert!(why.contains("--max-sessions"), "{why}");
    assert_eq!(f.gateway.open_sessions(), 1);
}

/// A browser that answers nothing (it vanished before connecting, or closed its tab without a
/// DELETE) is reaped after the session timeout, and its Render stream with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_browser_is_reaped_and_cycles_leave_memory_flat() {
    let f = gateway_stack(GatewayOptions {
        session_timeout: Duration::from_millis(500),
        max_sessions: 64,
        ..Default::default()
    })
    .await;
    assert_eq!(post_offer(&f).await.0, 201);
    assert_eq!(f.gateway.open_sessions(), 1);
    assert_eq!(
        f.settled().await,
        0,
        "the vanished browser's session was not reaped"
    );

    // Connect/disconnect cycles (answer, then DELETE its location): memory comes back.
    let cycle = || async {
        let (status, head, _) = post_offer(&f).await;
        assert_eq!(status, 201);
        // Absolute (RFC 9725): the path after the authority is what to DELETE.
        let location = head
            .lines()
            .find_map(|l| l.strip_prefix("location: "))
            .expect("a Location header");
        assert!(
            location.starts_with("http://gateway/sessions/"),
            "{location}"
        );
        let location = location.trim_start_matches("http://gateway").to_string();
        let (status, _) = http(f.addr, "DELETE", &location, b"").await;
        assert_eq!(status, 200);
    };
    for _ in 0..10 {
        cycle().await;
    }
    assert_eq!(f.settled().await, 0);
    let before = rss_kib();
    for _ in 0..40 {
        cycle().await;
    }
    assert_eq!(f.settled().await, 0);
    let grown = rss_kib() as i64 - before as i64;
    assert!(
        grown < 24 * 1024,
        "RSS grew {grown} KiB over 40 connect/disconnect cycles"
    );
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// With `--udp-ports`, each session takes one port of the range; when none is free the next
/// session is refused with 503 naming the range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_take_ports_from_the_range_and_are_refused_when_it_is_full() {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let f = gateway_stack(GatewayOptions {
        udp_ports: Some((port, port)),
        ..Default::default()
    })
    .await;
    let (status, _, answer) = post_offer(&f).await;
    assert_eq!(status, 201);
    assert!(answer.contains(&format!(" {port} typ host")), "{answer}");
    let (status, _, why) = post_offer(&f).await;
    assert_eq!(status, 503);
    assert!(why.contains("--udp-ports"), "{why}");
}

/// Offers arriving together never open a session past `--max-sessions`: of eight at once
/// with room for two, two are answered and six refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offers_arriving_together_respect_the_session_limit() {
    let f = gateway_stack(GatewayOptions {
        max_sessions: 2,
        ..Default::default()
    })
    .await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let addr = f.addr;
        tasks.spawn(async move {
            http(
                addr,
                "POST",
                "/sessions?avatar=small",
                offer(true).as_bytes(),
            )
            .await
            .0
        });
    }
    let mut statuses = tasks.join_all().await;
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 201, 503, 503, 503, 503, 503, 503]);
    assert_eq!(f.gateway.open_sessions(), 2);
}

/// Datagrams from someone else at a session's port (noise, or STUN-shaped packets without
/// the session's credentials) do not keep it alive: a browser that never connects is reaped
/// on time all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_datagrams_do_not_keep_a_session_alive() {
    let f = gateway_stack(GatewayOptions {
        session_timeout: Duration::from_millis(500),
        ..Default::default()
    })
    .await;
    let (status, _, answer) = post_offer(&f).await;
    assert_eq!(status, 201);
    let port: u16 = answer
        .lines()
        .find_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "typ")?;
            words.get(at.checked_sub(1)?)?.parse().ok()
        })
        .expect("a host candidate in the answer");
    let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    // A STUN binding request header (type 0x0001, magic cookie) with nothing valid after it.
    let mut stun = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    stun.extend_from_slice(&[7u8; 12]);
    let started = Instant::now();
    let mut reaped = None;
    while started.elapsed() < Duration::from_secs(3) {
        for packet in [&b"hello, is anyone there?"[..], &stun] {
            let _ = stranger.send_to(packet, ("127.0.0.1", port));
        }
        if f.gateway.open_sessions() == 0 {
            reaped = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reaped = reaped.expect("the session outlived its timeout under a stranger's datagrams");
    assert!(reaped < Duration::from_secs(2), "reaped after {reaped:?}");
}

/// One HTTP/1.1 request on a fresh connection from the loopback address `from` (127.0.0.1
/// is one client, 127.0.0.2 another, as far as the gateway can tell): (status, head, body).
async fn http_from(
    from: [u8; 4],
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, String, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("binding a loopback source address");
    let mut s = socket.connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/sdp\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // A body past the limit may be refused before it is all read: that is the point.
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    framecast_e2e::http_response(&out)
}

/// Lets this process hold `n` more descriptors than it usually may (up to the hard limit).
fn allow_descriptors(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read only the struct given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max.min(lim.rlim_cur.max(n));
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

/// 1,024 connections that send complete headers and then never the body they announce do
/// not lock the port: they hold at most their address's share of connections, each only
/// until the body deadline (then 408 and closed), and an honest client on another address
/// gets in at once while they are held; one on the attacker's address once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_never_come_cannot_lock_the_http_port() {
    allow_descriptors(4096);
    let f = gateway_stack(GatewayOptions {
        body_timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let head = "POST /sessions?avatar=small HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/sdp\r\nContent-Length: 1000\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..1024 {
        let mut s = tokio::net::TcpStream::connect(f.addr).await.unwrap();
        // Connections past the address's share are closed on accept: a write may fail.
        let _ = s.write_all(head.as_bytes()).await;
        held.push(s);
    }
    let started = Instant::now();
    let (status, _, body) = http_from([127, 0, 0, 2], f.addr, "GET", "/healthz", b"").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "an honest client waited {:?}",
        started.elapsed()
    );
    // Every held connection ends: those served are answered 408, the rest were closed.
    let mut timed_out = 0;
    for s in &mut held {
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        assert!(
            read.is_ok(),
            "a connection was still held 10 s after its deadline"
        );
        if String::from_utf8_lossy(&out).starts_with("HTTP/1.1 408") {
            timed_out += 1;
        }
    }
    let share = GatewayOptions::default().max_connections_per_client;
    assert!(
        (1..=share).contains(&timed_out),
        "{timed_out} connections were served (the address's share is {share})"
    );
    let (status, _) = http(f.addr, "GET", "/healthz", b"").await;
    assert_eq!(
        status, 200,
        "the attacker's own address after its connections ended"
    );
}

/// One address cannot take every session: past its share it gets 429 naming the flag, and
/// another address still gets a session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_address_has_its_share_of_sessions() {
    let f = gateway_stack(GatewayOptions {
        max_sessions: 4,
        max_sessions_per_client: 2,
        ..Default::default()
    })
    .await;
    let post = |from: [u8; 4]| {
        let addr = f.addr;
        async move {
            let (status, _, body) = http_from(
                from,
                addr,
                "POST",
                "/sessions?avatar=small",
                offer(true).as_bytes(),
            )
            .await;
            (status, body)
        }
    };
    assert_eq!(post([127, 0, 0, 1]).await.0, 201);
    assert_eq!(post([127, 0, 0, 1]).await.0, 201);
    let (status, why) = post([127, 0, 0, 1]).await;
    assert_eq!(status, 429, "{why}");
    assert!(why.contains("--max-sessions-per-client"), "{why}");
    assert_eq!(post([127, 0, 0, 2]).await.0, 201);
    assert_eq!(f.gateway.open_sessions(), 3);
}

/// An avatar without an `[audio]` table cannot lip-sync the browser's voice: its offer is
/// refused with the reason (422), not answered with a session that then fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_avatar_that_cannot_speak_is_refused_at_offer_time() {
    let f = gateway_stack(GatewayOptions::default()).await;
    framecast_e2e::copy_avatar(&f.root().join("avatars"), "small", "mute", None);
    let (status, why) = http(
        f.addr,
        "POST",
        "/sessions?avatar=mute",
        offer(true).as_bytes(),
    )
    .await;
    assert_eq!(status, 422, "{why}");
    assert!(why.contains("[audio]"), "{why}");
    assert_eq!(f.gateway.open_sessions(), 0);
}

/// Hostile offers get a 400 in words: an audio m-line listing a video codec (the WebRTC
/// library once panicked on it and left the request unanswered), and an offer that does not
/// parse (whose parser error once carried heap addresses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_offers_are_refused_in_words() {
    let f = gateway_stack(GatewayOptions::default()).await;
    let good = offer(true);
    let audio_pt = good
        .lines()
        .find_map(|l| l.strip_prefix("a=rtpmap:"))
        .and_then(|m| m.split(' ').next())
        .unwrap()
        .to_string();
    let h264_in_audio = good.replacen(
        &format!("a=rtpmap:{audio_pt} "),
        &format!("a=rtpmap:102 H264/90000\r\na=rtpmap:{audio_pt} "),
        1,
    );
    let (status, why) = http(
        f.addr,
        "POST",
        "/sessions?avatar=small",
        h264_in_audio.as_bytes(),
    )
    .await;
    assert_eq!(status, 400, "{why}");
    assert!(why.contains("payload type 102"), "{why}");
    let garbled = good
        .replace("a=ice-ufrag", "a=ice-ufrag-broken")
        .replace("c=IN", "c=XX");
    let (status, why) = http(f.addr, "POST", "/sessions?avatar=small", garbled.as_bytes()).await;
    assert_eq!(status, 400, "{why}");
    assert!(!why.contains("0x"), "an address in the reason: {why}");
}

/// [`framecast_e2e::http_request`] with the head in lower case (header names as HTTP/2 and
/// hyper write them, values as they are compared here).
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, String) {
    let (status, head, body) = framecast_e2e::http_request(addr, method, path, headers, body).await;
    (status, head.to_ascii_lowercase(), body)
}

/// WHIP (RFC 9725) where it applies: OPTIONS says what POST takes and names the ICE
/// servers; an offer that is not `application/sdp` is 415; the answer's `Location` is
/// absolute and the ICE servers come as `Link` headers; CORS answers the allowed origin's
/// preflight and responses, and nothing for another origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_where_it_applies() {
    use framecast_gateway::whip::IceServer;
    let f = gateway_stack(GatewayOptions {
        cors_origins: vec!["https://app.example".into()],
        ice_servers: vec![
            IceServer::new("stun:stun.example.net:3478", None, None).unwrap(),
            IceServer::new("turn:turn.example.net?transport=udp", Some("u"), Some("p")).unwrap(),
        ],
        ..Default::default()
    })
    .await;
    let stun = "link: <stun:stun.example.net:3478>; rel=\"ice-server\"";
    let turn = "link: <turn:turn.example.net?transport=udp>; rel=\"ice-server\"; username=\"u\"; credential=\"p\"; credential-type=\"password\"";
    let (status, head, _) = request(f.addr, "OPTIONS", "/sessions", &[], b"").await;
    assert_eq!(status, 204, "{head}");
    assert!(head.contains("accept-post: application/sdp"), "{head}");
    assert!(head.contains(stun) && head.contains(turn), "{head}");

    let sdp = offer(true);
    let post = |content_type: &'static str, origin: &'static str| {
        let sdp = sdp.clone();
        async move {
            request(
                f.addr,
                "POST",
                "/sessions?avatar=small",
                &[("Content-Type", content_type), ("Origin", origin)],
                sdp.as_bytes(),
            )
            .await
        }
    };
    let (status, _, body) = post("text/plain", "https://app.example").await;
    assert_eq!(status, 415, "{body}");
    assert!(body.contains("application/sdp"), "{body}");
    let (status, head, body) = post("application/sdp; charset=utf-8", "https://app.example").await;
    assert_eq!(status, 201, "{body}");
    assert!(
        head.contains("location: http://gateway/sessions/"),
        "{head}"
    );
    assert!(head.contains(stun) && head.contains(turn), "{head}");
    assert!(
        head.contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
    assert!(
        head.contains("access-control-expose-headers: location, link"),
        "{head}"
    );
    // A page of another origin: answered (the browser enforces CORS), but never allowed.
    let (status, head, _) = post("application/sdp", "https://evil.example").await;
    assert_eq!(status, 201);
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    // The allowed origin's preflight.
    let preflight = |origin: &'static str| async move {
        let headers = [
            ("Origin", origin),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization, content-type",
            ),
        ];
        request(f.addr, "OPTIONS", "/sessions", &headers, b"").await
    };
    let (status, head, _) = preflight("https://app.example").await;
    assert_eq!(status, 204, "{head}");
    assert!(
        head.contains("access-control-allow-methods: get, post, delete, options"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-headers: authorization, content-type"),
        "{head}"
    );
    let (_, head, _) = preflight("https://evil.example").await;
    assert!(!head.contains("access-control-allow-origin"), "{head}");
}

/// Admission by measured margin: with a session open and the host's free cores short of what
/// one more needs (here a headroom no host has), the next offer is refused at once with 503,
/// `Retry-After` and the reason, counted as `no_margin`; `--max-sessions` was not reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_past_the_measured_margin_are_refused_at_once() {
    let f = gateway_stack(GatewayOptions {
        admission: Some(1000.0),
        session_timeout: std::time::Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    let (status, _, body) = post_offer(&f).await;
    assert_eq!(status, 201, "the first session, with no history: {body}");
    // Two samples a window apart (one a second).
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    let started = Instant::now();
    let (status, head, why) = post_offer(&f).await;
    assert_eq!(status, 503, "{why}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "not at once"
    );
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 2"),
        "{head}"
    );
    assert!(
        why.contains("no margin") && why.contains("cores free"),
        "{why}"
    );
    let m = &f.gateway.metrics;
    assert_eq!(
        m.session_requests.with_label_values(&["no_margin"]).get(),
        1
    );
    assert_eq!(m.admission_open.get(), 0);
    assert_eq!(f.gateway.open_sessions(), 1);
}

/// The gateway sends the codec the offer allows, by its `--video-codecs` order: the load
/// client offering VP8 only gets VP8 and offering both gets H.264 (the default order), each
/// decoded frame for frame with no undecodable one; a gateway that sends only H.264 refuses a
/// VP8-only offer naming what each side has.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_get_the_codec_their_offer_allows() {
    use framecast_bench::gateway::{GatewayArgs, Offer};
    let f = gateway_stack(GatewayOptions::default()).await;
    let out = tempfile::tempdir().unwrap();
    for (offer, want) in [(Offer::Vp8, "VP8"), (Offer::Both, "H264")] {
        let args = GatewayArgs {
            url: format!("http://{}", f.addr),
            avatar: "small".into(),
            token: None,
            sessions: 1,
            sweep: None,
            seconds: 2.0,
            text: "Testing one two.".into(),
            wav: None,
            decode: true,
            codec: offer,
            min_fps: 20.0,
            max_gap_ms: 500.0,
            cpu: Vec::new(),
            out: out.path().to_path_buf(),
        };
        framecast_bench::gateway::run(args).await.unwrap();
        let levels: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap())
                .unwrap();
        let level = &levels[0];
        assert_eq!(level["codecs"], serde_json::json!([want]), "{level}");
        let seen = &level["per_session"][0];
        assert!(seen["failed"].is_null(), "{seen}");
        assert!(seen["decoded"].as_u64().unwrap() >= 25, "{seen}");
        assert_eq!(seen["undecodable"], 0, "{seen}");
    }

    let h264_only = gateway_stack(GatewayOptions {
        video_codecs: vec![framecast_gateway::media::VideoCodec::H264],
        ..Default::default()
    })
    .await;
    let vp8_offer = {
        let mut rtc = RtcConfig::new()
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .build(Instant::now());
        let mut api = rtc.sdp_api();
        api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        api.apply().unwrap().0.to_sdp_string()
    };
    let (status, why) = http(
        h264_only.addr,
        "POST",
        "/sessions?avatar=small",
        vp8_offer.as_bytes(),
    )
    .await;
    assert_eq!(status, 400, "{why}");
    assert!(
        why.contains("has VP8") && why.contains("sends H264 (--video-codecs)"),
        "{why}"
    );
}

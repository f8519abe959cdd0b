//! The compositor and both metrics ports against hostile or careless clients: streams that
//! never send, duplicated tensors, oversized ids and messages, half-sent HTTP requests and
//! unauthenticated scrapes (issue 13).

use framecast_compositor::inference::{ClientOptions, InferenceClient};
use framecast_compositor::render::RenderOptions;
use framecast_compositor::server::{Running, ServeOptions};
use framecast_e2e::{
    count_in_order, request, spawn_compositor_with, spawn_inference, write_fixtures, zero_audio,
};
use framecast_proto::compositor::v1::compositor_client::CompositorClient;
use framecast_proto::compositor::v1::{LoadAvatarRequest, RenderRequest};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::Code;

/// Both services on loopback: (inference, compositor, client).
async fn stack(
    root: &std::path::Path,
    opts: RenderOptions,
    max_streams: Option<usize>,
    serve: ServeOptions,
) -> (
    framecast_inference::server::Running,
    Running,
    CompositorClient<Channel>,
) {
    let (models, avatars) = write_fixtures(root, 500);
    let inference = spawn_inference(&models, Default::default()).await;
    let pool = InferenceClient::connect_lazy(&[inference.url()], &ClientOptions::default())
        .expect("inference client");
    let compositor = spawn_compositor_with(&avatars, pool, opts, max_streams, serve).await;
    let client = CompositorClient::connect(compositor.url())
        .await
        .expect("connect");
    (inference, compositor, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_is_ended_and_frees_its_admission_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = RenderOptions {
        max_batch: 4,
        idle_timeout: Duration::from_millis(800),
        ..Default::default()
    };
    let (_inference, _compositor, client) =
        stack(tmp.path(), opts, Some(1), Default::default()).await;

    // A client that opens a stream and never sends anything holds the only slot...
    let opened = Instant::now();
    let mut idle = client
        .clone()
        .render(futures::stream::pending::<RenderRequest>())
        .await
        .unwrap()
        .into_inner();
    let refused = client
        .clone()
        .render(tokio_stream::iter(vec![request("small", 0, 2)]))
        .await;
    let refused = match refused {
        Err(e) => e,
        Ok(r) => r.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    // ...until the idle timeout ends its stream with a status that says why.
    let e = tokio::time::timeout(Duration::from_secs(20), idle.message())
        .await
        .expect("an idle stream was held open")
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(
        e.message().contains("idle") && e.message().contains("--stream-idle-timeout-s"),
        "{}",
        e.message()
    );
    assert!(opened.elapsed() >= Duration::from_millis(800));

    // The slot is free again: a working client gets every frame.
    let mut ok = None;
    for _ in 0..50 {
        match client
            .clone()
            .render(tokio_stream::iter(vec![request("small", 0, 3)]))
            .await
        {
            Ok(r) => {
                ok = Some(r.into_inner());
                break;
            }
            Err(e) if e.code() == Code::ResourceExhausted => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    let mut stream = ok.expect("the slot was never freed");
    assert_eq!(count_in_order(&mut stream, 0).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_tensors_oversized_ids_and_messages_get_precise_statuses() {
    let tmp = tempfile::tempdir().unwrap();
    let serve = ServeOptions {
        max_message_bytes: 256 << 10,
        ..Default::default()
    };
    let opts = RenderOptions {
        max_batch: 4,
        ..Default::default()
    };
    let (_inference, _compositor, client) = stack(tmp.path(), opts, None, serve).await;
    let first_error = |reqs: Vec<RenderRequest>| {
        let mut c = client.clone();
        async move {
            match c.render(tokio_stream::iter(reqs)).await {
                Err(e) => e,
                Ok(r) => {
                    let mut s = r.into_inner();
                    loop {
                        match s.message().await {
                            Ok(Some(_)) => continue,
                            Ok(None) => panic!("the stream ended without an error"),
                            Err(e) => break e,
                        }
                    }
                }
            }
        }
    };

    let mut twice = request("small", 0, 1);
    twice.conditioning.push(zero_audio(1));
    let e = first_error(vec![twice]).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("conditioning[1]") && e.message().contains("twice"),
        "{}",
        e.message()
    );

    let huge = "a".repeat(50_000);
    let e = first_error(vec![request(&huge, 0, 1)]).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().len() < 1024, "{} bytes", e.message().len());
    assert!(e.message().contains("50000 bytes"), "{}", e.message());
    let e = client
        .clone()
        .load_avatar(LoadAvatarRequest {
            avatar_id: huge.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().len() < 1024, "{} bytes", e.message().len());

    // Over the message limit: RESOURCE_EXHAUSTED, as gRPC core answers, on the stream and on
    // a unary call.
    let e = first_error(vec![request("small", 0, 12)]).await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let e = client
        .clone()
        .load_avatar(LoadAvatarRequest {
            avatar_id: "b".repeat(300 << 10),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
}

/// Sends `head` (an HTTP request, possibly incomplete) to `addr` and returns what came back
/// before the server closed the connection.
async fn http(addr: std::net::SocketAddr, head: &str) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut out))
        .await
        .expect("the server kept the connection open")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

/// CPU profiles on the metrics port: absent unless enabled; then under the same token, the
/// duration checked, a flame graph and a pprof profile served, one profile at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_are_served_only_when_enabled_and_under_the_token() {
    let get = |path: &str, auth: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n")
    };
    let registry = framecast_telemetry::prometheus::Registry::new();
    let off = framecast_telemetry::MetricsAccess::new(None, Some("s3cret"), true);
    let addr = framecast_telemetry::serve_metrics("127.0.0.1:0".parse().unwrap(), registry, off)
        .await
        .unwrap();
    let token = "Authorization: Bearer s3cret\r\n";
    let reply = http(addr, &get("/debug/flamegraph.svg?seconds=1", token)).await;
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");

    let registry = framecast_telemetry::prometheus::Registry::new();
    let on =
        framecast_telemetry::MetricsAccess::new(None, Some("s3cret"), true).with_profiling(true);
    let addr = framecast_telemetry::serve_metrics("127.0.0.1:0".parse().unwrap(), registry, on)
        .await
        .unwrap();
    let reply = http(addr, &get("/debug/flamegraph.svg?seconds=1", "")).await;
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    // /metrics open to all, profiles still not: a token is configured.
    let registry = framecast_telemetry::prometheus::Registry::new();
    let open_metrics =
        framecast_telemetry::MetricsAccess::new(None, Some("s3cret"), false).with_profiling(true);
    let open =
        framecast_telemetry::serve_metrics("127.0.0.1:0".parse().unwrap(), registry, open_metrics)
            .await
            .unwrap();
    let reply = http(open, &get("/metrics", "")).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let reply = http(open, &get("/debug/pprof/profile?seconds=1", "")).await;
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    // Percent-encoded values are decoded: %31 is 1.
    let reply = http(open, &get("/debug/pprof/profile?seconds=%31", token)).await;
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "{}",
        &reply[..reply.len().min(300)]
    );
    for bad in ["0", "61", "abc"] {
        let reply = http(
            addr,
            &get(&format!("/debug/pprof/profile?seconds={bad}"), token),
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{bad}: {reply}");
        assert!(reply.contains("seconds:"), "{reply}");
    }
    // A profile already being taken (held here, in the same process): the next one is refused.
    let held = pprof::ProfilerGuardBuilder::default()
        .frequency(99)
        .build()
        .unwrap();
    let busy = http(addr, &get("/debug/pprof/profile?seconds=1", token)).await;
    assert!(busy.starts_with("HTTP/1.1 409"), "{busy}");
    drop(held);
    // Busy work, so the flame graph has samples to draw.
    let spin = std::thread::spawn(|| {
        let until = Instant::now() + Duration::from_millis(2500);
        let mut x = 0u64;
        while Instant::now() < until {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        x
    });
    let svg = http(addr, &get("/debug/flamegraph.svg?seconds=1", token)).await;
    assert!(svg.starts_with("HTTP/1.1 200"), "{svg}");
    assert!(
        svg.contains("image/svg+xml") && svg.contains("<svg"),
        "{}",
        &svg[..svg.len().min(400)]
    );
    let pprof = http(addr, &get("/debug/pprof/profile?seconds=1", token)).await;
    spin.join().unwrap();
    assert!(
        pprof.starts_with("HTTP/1.1 200"),
        "{}",
        &pprof[..pprof.len().min(300)]
    );
    assert!(pprof.contains("application/octet-stream"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_require_the_token_and_drop_half_sent_requests() {
    let registry = framecast_telemetry::prometheus::Registry::new();
    let probe = framecast_telemetry::prometheus::IntCounter::new("probe_total", "probe").unwrap();
    registry.register(Box::new(probe)).unwrap();
    let mut access = framecast_telemetry::MetricsAccess::new(None, Some("s3cret,other"), true);
    access.header_timeout = Duration::from_millis(500);
    let addr = framecast_telemetry::serve_metrics("127.0.0.1:0".parse().unwrap(), registry, access)
        .await
        .unwrap();
    let get =
        |auth: &str| format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    let open = http(addr, &get("")).await;
    assert!(open.starts_with("HTTP/1.1 401"), "{open}");
    assert!(!open.contains("probe_total"));
    let wrong = http(addr, &get("Authorization: Bearer nope\r\n")).await;
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    let right = http(addr, &get("Authorization: Bearer s3cret\r\n")).await;
    assert!(right.starts_with("HTTP/1.1 200"), "{right}");
    assert!(right.contains("probe_total"));

    // A request whose headers never finish is cut off after the header timeout, not held.
    let started = Instant::now();
    let reply = http(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n").await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "held {:?}",
        started.elapsed()
    );
    assert!(!reply.contains("probe_total"), "{reply}");

    // Without require_token the token is not asked for (the documented default).
    let registry = framecast_telemetry::prometheus::Registry::new();
    let access = framecast_telemetry::MetricsAccess::new(None, Some("s3cret"), false);
    let addr = framecast_telemetry::serve_metrics("127.0.0.1:0".parse().unwrap(), registry, access)
        .await
        .unwrap();
    assert!(http(addr, &get("")).await.starts_with("HTTP/1.1 200"));
}

//! How Render streams end and who may open them: shutdown, the admission limit, bearer
//! tokens, deadlines and clients that leave.

use framecast_e2e::stack::{open_render, poll_until, render, stack, stack_with, Opts};
use framecast_e2e::{count_in_order, passthrough_stats, request};
use tonic::Code;

/// Shutdown while a stream renders: the request in flight completes, in order, then the stream
/// ends with UNAVAILABLE; the inference service, whose stream from the compositor stays open,
/// still stops at once rather than waiting out its grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_finishes_the_request_in_flight_then_ends_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 2).await;
    let (req_tx, mut stream) = open_render(&s.client, request("small", 0, 30)).await;
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.frame_index, 0);
    let stopping = tokio::spawn(s.compositor_server.shutdown());
    let mut next = 1;
    let end = loop {
        match stream.message().await {
            Ok(Some(f)) => {
                assert_eq!(
                    f.frame_index, next,
                    "frames out of order after shutdown began"
                );
                next += 1;
            }
            other => break other,
        }
    };
    assert_eq!(next, 30, "frames of the request in flight were lost");
    match end {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(None) => {}
        Ok(Some(_)) => unreachable!(),
    }
    tokio::time::timeout(std::time::Duration::from_secs(10), stopping)
        .await
        .expect("compositor did not stop")
        .unwrap();
    drop(req_tx);
    let started = std::time::Instant::now();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.inference_server.shutdown(),
    )
    .await
    .expect("inference server did not stop");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

/// A health watcher sees the server go NOT_SERVING as soon as the shutdown begins, while the
/// request in flight is still being rendered (load balancers stop sending before the port
/// closes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_turns_not_serving_when_the_drain_begins() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 2).await;
    let channel = tonic::transport::Endpoint::from_shared(s.compositor_server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let (req_tx, mut stream) = open_render(&s.client, request("small", 0, 30)).await;
    stream.message().await.unwrap().unwrap();
    let stopping = tokio::spawn(s.compositor_server.shutdown());
    let next = tokio::time::timeout(std::time::Duration::from_secs(10), watch.message())
        .await
        .expect("no health update after the shutdown began");
    match next {
        Ok(Some(update)) => assert_eq!(update.status, ServingStatus::NotServing as i32),
        other => panic!("the watch ended without NOT_SERVING: {other:?}"),
    }
    // An open watch would hold the server for its whole grace period.
    drop((watch, health));
    while let Ok(Some(_)) = stream.message().await {}
    drop(req_tx);
    stopping.await.unwrap();
}

/// Reflection on each port lists exactly what that port serves: its own API, health and
/// reflection, not the other service's protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_only_what_each_port_serves() {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 2).await;
    for (url, apis) in [
        (
            s.inference_server.url(),
            &[
                "inference.GRPCInferenceService",
                "framecast.tensorcache.v1.TensorCache",
            ][..],
        ),
        (
            s.compositor_server.url(),
            &["framecast.compositor.v1.Compositor"][..],
        ),
    ] {
        let api = apis[0];
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = ServerReflectionClient::new(channel);
        let ask = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = client
            .server_reflection_info(tokio_stream::iter([ask]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            answers.message().await.unwrap().unwrap().message_response
        else {
            panic!("{api}: no service list");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        let mut want: Vec<String> = apis
            .iter()
            .chain(&[
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
            ])
            .map(|s| s.to_string())
            .collect();
        want.sort();
        assert_eq!(names, want);
    }
}

/// Admission: past `--max-streams` open Render streams, a new one is refused at once with
/// RESOURCE_EXHAUSTED; when one closes, the next is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_past_the_limit_are_refused_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = Opts {
        max_streams: 1,
        ..Default::default()
    };
    let s = stack_with(tmp.path(), 4, opts).await;
    let (req_tx, mut open) = open_render(&s.client, request("small", 0, 2)).await;
    assert!(open.message().await.unwrap().is_some());
    let e = render(&s.client, vec![request("small", 0, 2)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--max-streams"), "{}", e.message());
    assert_eq!(s.metrics.streams_limit.get(), 1);
    drop(req_tx);
    while open.message().await.unwrap().is_some() {}
    // The first stream's task releases its slot as it ends; allow it a moment.
    let mut admitted = false;
    for _ in 0..50 {
        if render(&s.client, vec![request("small", 0, 2)])
            .await
            .is_ok()
        {
            admitted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(admitted, "a stream was refused after the open one closed");
}

/// Admission by measured margin: with a stream open and the host's free cores short of what
/// one more needs (a headroom no host has), a new Render stream is refused at once with
/// UNAVAILABLE and the reason, counted as `no_margin`, below `--max-streams`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_past_the_measured_margin_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = Opts {
        admission: Some(1000.0),
        ..Default::default()
    };
    let s = stack_with(tmp.path(), 4, opts).await;
    let (_req_tx, mut open) = open_render(&s.client, request("small", 0, 2)).await;
    assert!(open.message().await.unwrap().is_some());
    // Two samples (one a second) with the stream open.
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    let e = render(&s.client, vec![request("small", 0, 2)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("no margin") && e.message().contains("cores free"),
        "{}",
        e.message()
    );
    assert_eq!(
        s.metrics.requests.with_label_values(&["no_margin"]).get(),
        1
    );
}

/// Bearer tokens on both services: the compositor authenticates its clients and itself to the
/// inference service; calls without the right token get UNAUTHENTICATED; health stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_services_require_their_bearer_token() {
    use framecast_proto::auth::authorize;
    use framecast_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
    use tonic::Request;
    let tmp = tempfile::tempdir().unwrap();
    let opts = Opts {
        tokens: (Some("inference-secret"), Some("compositor-secret")),
        ..Default::default()
    };
    let s = stack_with(tmp.path(), 4, opts).await;
    let call = |token: Option<&str>| {
        let req = tokio_stream::iter(vec![request("small", 0, 3)]);
        authorize(Request::new(req), token).unwrap()
    };
    for bad in [None, Some("inference-secret"), Some("wrong")] {
        let e = s.client.clone().render(call(bad)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{bad:?}: {e:?}");
    }
    let mut frames = s
        .client
        .clone()
        .render(call(Some("compositor-secret")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        count_in_order(&mut frames, 0).await,
        3,
        "an authenticated render must reach inference with its token"
    );

    let url = s.inference_server.url();
    let mut kserve = GrpcInferenceServiceClient::connect(url.clone())
        .await
        .unwrap();
    let e = kserve
        .server_ready(framecast_proto::kserve::ServerReadyRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

/// A deadline on the Render call reaches the inference queue: the batch still waiting there
/// when it passes is dropped before the model runs, and the client gets DEADLINE_EXCEEDED.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_render_deadline_drops_queued_work_before_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    // Batches of 4 frames wait up to 3 s at the model for batch-mates.
    let opts = Opts {
        queue_delay_us: 3_000_000,
        ..Default::default()
    };
    let s = stack_with(tmp.path(), 4, opts).await;
    // Load the avatar and the model first, so the deadline is spent in the queue.
    s.client
        .clone()
        .load_avatar(framecast_proto::compositor::v1::LoadAvatarRequest {
            avatar_id: "small".into(),
        })
        .await
        .unwrap();
    let url = s.inference_server.url();
    framecast_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient::connect(
        url.clone(),
    )
    .await
    .unwrap()
    .repository_model_load(framecast_proto::kserve::RepositoryModelLoadRequest {
        model_name: "passthrough".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (executions_before, _) = passthrough_stats(url.clone()).await;

    let mut req = tonic::Request::new(tokio_stream::iter(vec![request("small", 0, 4)]));
    req.set_timeout(std::time::Duration::from_millis(500));
    let started = std::time::Instant::now();
    let outcome = async {
        let mut stream = s.client.clone().render(req).await?.into_inner();
        while stream.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    }
    .await;
    let e = outcome.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_millis(2500),
        "DEADLINE_EXCEEDED came only after the batch window: {:?}",
        started.elapsed()
    );
    // Once the batch window has closed the inference server has judged the request: failed
    // as expired, and the model never ran it.
    let stats = poll_until(
        std::time::Duration::from_secs(10),
        || passthrough_stats(url.clone()),
        |s| s.1 > 0,
    )
    .await;
    assert_eq!(stats, (executions_before, 1), "(executions, failures)");
}

/// A client that closes its Render stream stops the work for it: of a 40-batch request, only
/// the batches already at the inference service when the client left are executed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closed_render_stream_stops_further_inference() {
    let tmp = tempfile::tempdir().unwrap();
    // Each 4-frame batch waits 200 ms at the model, so the request takes ~4 s at depth 2.
    let opts = Opts {
        queue_delay_us: 200_000,
        ..Default::default()
    };
    let s = stack_with(tmp.path(), 4, opts).await;
    let url = s.inference_server.url();
    let (tx, mut frames) = open_render(&s.client, request("small", 0, 160)).await;
    let first = frames.message().await.unwrap().unwrap();
    assert_eq!(first.frame_index, 0);
    let (executed_then, _) = passthrough_stats(url.clone()).await;
    drop(frames);
    drop(tx);
    // Long enough for the whole request to have run had it gone on.
    tokio::time::sleep(std::time::Duration::from_millis(4500)).await;
    let (executed, _) = passthrough_stats(url).await;
    assert!(
        executed <= executed_then + 2,
        "{executed} batches executed after the client left at {executed_then} (depth 2)"
    );
    let frames_sent = s.metrics.frames.get();
    assert!(
        frames_sent < 40,
        "{frames_sent} frames composited for a client that left"
    );
}

//! Several inference replicas behind one compositor: a replica that stops under load, and
//! replicas found through a host name as its addresses change.

use framecast_compositor::discovery::Resolve;
use framecast_compositor::inference::{ClientOptions, InferenceClient};
use framecast_e2e::stack::{poll_until, render};
use framecast_e2e::{count_in_order, model_manager, request, spawn_compositor, write_fixtures};
use framecast_inference::server::{self as inf_server, ServeOptions};
use framecast_proto::compositor::v1::compositor_client::CompositorClient;
use std::sync::Arc;

/// Shared-memory regions the inference server at `url` holds registered.
async fn shm_regions(url: String) -> usize {
    use framecast_proto::kserve::{
        grpc_inference_service_client::GrpcInferenceServiceClient, SystemSharedMemoryStatusRequest,
    };
    GrpcInferenceServiceClient::connect(url)
        .await
        .unwrap()
        .system_shared_memory_status(SystemSharedMemoryStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .regions
        .len()
}

/// A replica that stops under load: the render loses no frame and keeps its order (batches
/// bound for the stopped replica go to the other), and the replica is used again once it is
/// back on the same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_stops_under_load_loses_no_frames_and_is_used_when_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (models, avatars) = write_fixtures(tmp.path(), 1000);
    let spawn = |addr, metrics| {
        inf_server::spawn(
            addr,
            model_manager(&models, Default::default(), metrics),
            ServeOptions::default(),
        )
    };
    let mut a = Some(
        spawn(([127, 0, 0, 1], 0).into(), Default::default())
            .await
            .unwrap(),
    );
    let b = spawn(([127, 0, 0, 1], 0).into(), Default::default())
        .await
        .unwrap();
    let (a_addr, a_url) = a.as_ref().map(|a| (a.addr, a.url())).unwrap();
    let client_opts = ClientOptions {
        health_interval: std::time::Duration::from_millis(100),
        ..Default::default()
    };
    let inference = InferenceClient::connect_lazy(&[a_url, b.url()], &client_opts).unwrap();
    let compositor = spawn_compositor(&avatars, inference.clone(), 2, Default::default()).await;
    let client = CompositorClient::connect(compositor.url()).await.unwrap();

    let mut frames = client
        .clone()
        .render(tokio_stream::iter(vec![request("small", 0, 200)]))
        .await
        .unwrap()
        .into_inner();
    let mut next = 0u64;
    let mut stopping = None;
    while let Some(f) = frames.message().await.unwrap() {
        assert_eq!(f.frame_index, next, "frames out of order");
        next += 1;
        if next == 10 {
            stopping = a.take().map(|a| tokio::spawn(a.shutdown()));
        }
    }
    assert_eq!(next, 200, "frames lost when a replica stopped");
    stopping.unwrap().await.unwrap();

    // Back on the same address, with fresh state: health checks find it, batches reach it.
    let back_metrics = Arc::new(framecast_inference::metrics::Metrics::new());
    let _a = spawn(a_addr, back_metrics.clone()).await.unwrap();
    let all_healthy = |h: &Vec<(String, bool)>| h.iter().all(|(_, ok)| *ok);
    let health = poll_until(
        std::time::Duration::from_secs(5),
        || async { inference.health() },
        all_healthy,
    )
    .await;
    assert!(
        all_healthy(&health),
        "restarted replica never reported healthy: {health:?}"
    );
    let frames = render(&client, vec![request("small", 0, 40)])
        .await
        .unwrap();
    assert_eq!(frames.len(), 40);
    let served = back_metrics
        .requests
        .with_label_values(&["passthrough", "ok"])
        .get();
    assert!(served > 0, "the restarted replica got no batch");
    // It forgot the old shared-memory regions; the compositor noticed and registered anew.
    assert!(
        shm_regions(format!("http://{a_addr}")).await > 0,
        "no shared memory registered with the restarted replica"
    );
    drop(b);
}

/// The answer a test's resolver gives for every name, changed by the test as it goes.
struct Dns(std::sync::Mutex<std::io::Result<Vec<std::net::SocketAddr>>>);

impl Dns {
    fn answer(&self, a: std::io::Result<Vec<std::net::SocketAddr>>) {
        *self.0.lock().unwrap() = a;
    }
}

impl Resolve for Dns {
    fn lookup(
        &self,
        _host: &str,
        _port: u16,
    ) -> futures::future::BoxFuture<'static, std::io::Result<Vec<std::net::SocketAddr>>> {
        let a = match &*self.0.lock().unwrap() {
            Ok(addrs) => Ok(addrs.clone()),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        };
        Box::pin(async move { a })
    }
}

/// Waits up to 5 s for the pool to list exactly `want` (labels), in any order.
async fn wait_for_replicas(inference: &InferenceClient, want: &[String]) {
    let mut want = want.to_vec();
    want.sort();
    let seen = poll_until(
        std::time::Duration::from_secs(5),
        || async {
            let mut seen: Vec<String> = inference.health().into_iter().map(|(l, _)| l).collect();
            seen.sort();
            seen
        },
        |seen| seen == &want,
    )
    .await;
    assert_eq!(seen, want, "replicas in the pool");
}

/// Replicas behind one host name: each address it resolves to joins the pool and gets
/// batches; a failed lookup keeps the pool; an address that leaves the answer gets no more
/// batches, its shared-memory regions are unregistered, and no frame is lost on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_behind_a_host_name_join_and_leave_as_its_addresses_change() {
    let tmp = tempfile::tempdir().unwrap();
    let (models, avatars) = write_fixtures(tmp.path(), 1000);
    let spawn = |metrics| {
        inf_server::spawn_on_loopback(
            model_manager(&models, Default::default(), metrics),
            ServeOptions::default(),
        )
    };
    let (a_metrics, b_metrics) = (Arc::default(), Arc::default());
    let a = spawn(Arc::clone(&a_metrics)).await.unwrap();
    let b = spawn(Arc::clone(&b_metrics)).await.unwrap();
    // Batches each replica served.
    let served = |m: &framecast_inference::metrics::Metrics| {
        m.requests.with_label_values(&["passthrough", "ok"]).get()
    };
    let name = "http://inference.test:8001".to_string();
    let label = |addr| format!("{name} ({addr})");
    let dns = Arc::new(Dns(std::sync::Mutex::new(Ok(vec![a.addr]))));
    let gauge = framecast_compositor::metrics::Metrics::new().inference_replicas;
    let client_opts = ClientOptions {
        resolve_interval: std::time::Duration::from_millis(50),
        health_interval: std::time::Duration::from_millis(100),
        replicas_gauge: Some(gauge.clone()),
        ..Default::default()
    };
    // Waits up to 5 s for the exported gauge to count `n` healthy replicas and no other.
    let gauge_reads = |n: i64| {
        let gauge = gauge.clone();
        async move {
            let read = |h| gauge.with_label_values(&[h]).get();
            let counts = poll_until(
                std::time::Duration::from_secs(5),
                || async { (read("healthy"), read("unhealthy")) },
                |c| *c == (n, 0),
            )
            .await;
            assert_eq!(counts, (n, 0), "gauge (healthy, unhealthy)");
        }
    };
    let inference =
        InferenceClient::connect_lazy_with(std::slice::from_ref(&name), &client_opts, dns.clone())
            .unwrap();
    wait_for_replicas(&inference, &[label(a.addr)]).await;
    let compositor = spawn_compositor(&avatars, inference.clone(), 2, Default::default()).await;
    let client = CompositorClient::connect(compositor.url()).await.unwrap();
    let render_in_order = |n: u32| {
        let client = client.clone();
        async move {
            let mut frames = client
                .clone()
                .render(tokio_stream::iter(vec![request("small", 0, n)]))
                .await
                .unwrap()
                .into_inner();
            count_in_order(&mut frames, 0).await
        }
    };

    assert_eq!(render_in_order(20).await, 20);
    assert!(
        served(&a_metrics) > 0,
        "the one address resolved got no batch"
    );
    assert_eq!(served(&b_metrics), 0);

    // The name now resolves to both: the new address joins and shares the batches.
    dns.answer(Ok(vec![a.addr, b.addr]));
    wait_for_replicas(&inference, &[label(a.addr), label(b.addr)]).await;
    gauge_reads(2).await;
    assert_eq!(render_in_order(200).await, 200);
    assert!(
        served(&b_metrics) > 0,
        "the address that joined got no batch"
    );

    // A failed lookup changes nothing.
    dns.answer(Err(std::io::Error::other("SERVFAIL")));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    wait_for_replicas(&inference, &[label(a.addr), label(b.addr)]).await;

    // `a` leaves the answer: it gets no more batches, and forgets our shared memory.
    dns.answer(Ok(vec![b.addr]));
    wait_for_replicas(&inference, &[label(b.addr)]).await;
    gauge_reads(1).await;
    let a_left = served(&a_metrics);
    assert_eq!(render_in_order(40).await, 40);
    assert_eq!(
        served(&a_metrics),
        a_left,
        "a replica that left got a batch"
    );
    let regions = poll_until(
        std::time::Duration::from_secs(5),
        || shm_regions(a.url()),
        |r| *r == 0,
    )
    .await;
    assert_eq!(regions, 0, "the replica that left still holds our regions");
}

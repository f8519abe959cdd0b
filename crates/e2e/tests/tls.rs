//! TLS on every port: mutual TLS between the compositor and the inference service, TLS from
//! a client to the compositor, /metrics over mutual TLS, and the gateway's page over HTTPS
//! with TLS to its compositor; plaintext and strangers refused.

use framecast_bench::client::{self, Access};
use framecast_compositor::inference::{ClientOptions, InferenceClient};
use framecast_compositor::server as comp_server;
use framecast_e2e::{
    count_in_order, request, spawn_compositor, spawn_inference, write_fixtures, TestPki,
};
use framecast_inference::server::ServeOptions;
use framecast_proto::kserve::ServerReadyRequest;
use framecast_telemetry::tls::{ClientTls, ServerTls};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

fn server_tls(pki: &TestPki, mutual: bool) -> ServerTls {
    let ca = mutual.then(|| pki.ca.clone().into_bytes());
    ServerTls::from_pem(
        pki.server_cert.clone().into_bytes(),
        pki.server_key.clone().into_bytes(),
        ca,
    )
    .unwrap()
}

/// The bench's access flags for `dir`'s PEM files: the CA, and a client identity if given.
fn access(dir: &Path, pki: &TestPki, identity: Option<(&str, &str)>) -> Access {
    let write = |name: &str, pem: &str| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    Access {
        tls_ca: Some(write("ca.pem", &pki.ca)),
        tls_cert: identity.map(|(c, _)| write("client.pem", c)),
        tls_key: identity.map(|(_, k)| write("client.key", k)),
        ..Default::default()
    }
}

async fn ready(url: &str, access: &Access) -> Result<bool, String> {
    let mut c = client::kserve(url, access).map_err(|e| format!("{e:#}"))?;
    c.server_ready(ServerReadyRequest {})
        .await
        .map(|r| r.into_inner().ready)
        .map_err(|s| format!("{s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_between_the_services_and_tls_to_the_compositor() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let (models, avatars) = write_fixtures(tmp.path(), 1000);
    let inference_opts = ServeOptions {
        tls: Some(server_tls(&pki, true)),
        ..Default::default()
    };
    let inference = spawn_inference(&models, inference_opts).await;
    let inference_url = format!("https://127.0.0.1:{}", inference.addr.port());

    // Who gets into the inference service: only holders of a certificate from its CA.
    let with_cert = access(tmp.path(), &pki, Some((&pki.client_cert, &pki.client_key)));
    assert_eq!(ready(&inference_url, &with_cert).await, Ok(true));
    let dir = tempfile::tempdir().unwrap();
    let no_cert = access(dir.path(), &pki, None);
    assert!(ready(&inference_url, &no_cert).await.is_err());
    let dir = tempfile::tempdir().unwrap();
    let stranger = access(
        dir.path(),
        &pki,
        Some((&pki.stranger_cert, &pki.stranger_key)),
    );
    assert!(ready(&inference_url, &stranger).await.is_err());
    let plaintext = format!("http://127.0.0.1:{}", inference.addr.port());
    assert!(ready(&plaintext, &Access::default()).await.is_err());

    // The compositor reaches it with its client certificate and serves over TLS itself.
    let client_tls = ClientTls::from_pem(
        "inference-tls",
        pki.ca.clone().into_bytes(),
        Some((
            pki.client_cert.clone().into_bytes(),
            pki.client_key.clone().into_bytes(),
        )),
        None,
    )
    .unwrap();
    let client_opts = ClientOptions {
        tls: Some(client_tls),
        ..Default::default()
    };
    let pool = InferenceClient::connect_lazy(&[inference_url], &client_opts).unwrap();
    let serve_opts = comp_server::ServeOptions {
        tls: Some(server_tls(&pki, false)),
        ..Default::default()
    };
    let compositor = spawn_compositor(&avatars, pool.clone(), 4, serve_opts).await;
    let port = compositor.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let mut c = client::compositor(
        &format!("https://localhost:{port}"),
        &access(dir.path(), &pki, None),
    )
    .unwrap();
    let mut frames = c
        .render(tokio_stream::iter(vec![request("small", 0, 12)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(count_in_order(&mut frames, 0).await, 12);
    // Same host: the tensors still bypassed the (now encrypted) socket.
    assert!(pool.shared_memory_batches() > 0);

    let mut plain =
        client::compositor(&format!("http://127.0.0.1:{port}"), &Access::default()).unwrap();
    let refused = plain
        .render(tokio_stream::iter(vec![request("small", 0, 1)]))
        .await;
    assert!(refused.is_err(), "plaintext Render reached a TLS port");
}

/// GET `path` over TLS with `identity` as the client certificate; the response, or why the
/// connection failed.
async fn https_get(
    addr: std::net::SocketAddr,
    path: &str,
    pki: &TestPki,
    identity: Option<(&str, &str)>,
) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pki.ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    // Offered as browsers and curl offer it; they speak what the server picks.
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = "localhost".try_into().unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    match tls.get_ref().1.alpn_protocol() {
        None | Some(b"http/1.1") => {}
        Some(p) => {
            let p = String::from_utf8_lossy(p);
            return Err(format!("ALPN picked {p}, but the port speaks HTTP/1.1"));
        }
    }
    let head = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    tls.read_to_string(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok(body)
}

#[tokio::test]
async fn metrics_are_served_over_mutual_tls() {
    let pki = TestPki::new();
    let registry = framecast_telemetry::prometheus::Registry::new();
    let probe =
        framecast_telemetry::prometheus::IntCounter::new("tls_probe_total", "probe").unwrap();
    probe.inc();
    registry.register(Box::new(probe)).unwrap();
    let tls = server_tls(&pki, true);
    let access = framecast_telemetry::MetricsAccess::new(Some(&tls), None, false);
    let addr = framecast_telemetry::serve_metrics("127.0.0.1:0".parse().unwrap(), registry, access)
        .await
        .unwrap();
    let body = https_get(
        addr,
        "/metrics",
        &pki,
        Some((&pki.client_cert, &pki.client_key)),
    )
    .await
    .unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("tls_probe_total 1"), "{body}");
    // Without a certificate, or with one from another CA, no metrics.
    for identity in [
        None,
        Some((pki.stranger_cert.as_str(), pki.stranger_key.as_str())),
    ] {
        let got = https_get(addr, "/metrics", &pki, identity).await;
        assert!(
            got.as_ref()
                .map_or(true, |b| !b.contains("tls_probe_total")),
            "{got:?}"
        );
    }
    // Plain HTTP on the TLS port gets no metrics either.
    assert!(!plain_get(addr, "/metrics")
        .await
        .contains("tls_probe_total"));
}

/// GET `path` in plain HTTP: whatever comes back before the connection closes.
async fn plain_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let _ = tcp.read_to_end(&mut raw).await;
    String::from_utf8_lossy(&raw).into_owned()
}

/// The gateway serves its page and signalling over HTTPS and reaches a compositor that serves
/// only TLS; plain HTTP on its port gets nothing, and an https:// compositor without a CA is
/// refused at start-up naming the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_https_and_reaches_its_compositor_over_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let (models, avatars) = write_fixtures(tmp.path(), 0);
    let inference = spawn_inference(&models, ServeOptions::default()).await;
    let pool =
        InferenceClient::connect_lazy(&[inference.url()], &ClientOptions::default()).unwrap();
    let serve_opts = comp_server::ServeOptions {
        tls: Some(server_tls(&pki, false)),
        ..Default::default()
    };
    let compositor = spawn_compositor(&avatars, pool, 4, serve_opts).await;
    let compositor_url = format!("https://localhost:{}", compositor.addr.port());

    let why = match framecast_gateway::connect(&compositor_url, None, None) {
        Ok(_) => panic!("an https:// compositor without a CA was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(why.contains("--compositor-tls-ca"), "{why}");

    let to_compositor =
        ClientTls::from_pem("compositor-tls", pki.ca.clone().into_bytes(), None, None).unwrap();
    let (_gateway, addr) = framecast_e2e::spawn_gateway_with(
        &compositor_url,
        Some(&to_compositor),
        Some(server_tls(&pki, false)),
        Default::default(),
    )
    .await;
    let page = https_get(addr, "/", &pki, None).await.unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("RTCPeerConnection"), "the page");
    // The avatar list comes from the compositor, through the TLS channel.
    let list = https_get(addr, "/avatars", &pki, None).await.unwrap();
    assert!(list.starts_with("HTTP/1.1 200"), "{list}");
    assert!(list.contains("\"small\""), "{list}");
    assert!(!plain_get(addr, "/").await.contains("RTCPeerConnection"));
}

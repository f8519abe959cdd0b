//! Connections to the services under test.

use anyhow::Result;
use framecast_proto::auth::AddToken;
use framecast_proto::compositor::v1::compositor_client::CompositorClient;
use framecast_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use framecast_telemetry::tls::{self, ClientTls};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

/// How the bench reaches a server: its bearer token and TLS.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Access {
    /// Bearer token the server requires, if any.
    #[arg(long, env = "FRAMECAST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA of the server's certificate: connect over TLS (the URL must be https://).
    #[arg(long, env = "FRAMECAST_BENCH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate to present, where the server requires mutual TLS (with --tls-key).
    #[arg(long, env = "FRAMECAST_BENCH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "FRAMECAST_BENCH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Name to expect in the server's certificate, when it is not the URL's host.
    #[arg(long, env = "FRAMECAST_BENCH_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
}

impl Access {
    fn tls(&self) -> Result<Option<ClientTls>> {
        ClientTls::from_files(
            "tls",
            self.tls_ca.as_deref(),
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_domain.clone(),
        )
    }
}

/// A connection that sends the bearer token, if any, with every call.
pub type Authed = InterceptedService<Channel, AddToken>;

pub fn channel(url: &str, access: &Access) -> Result<Authed> {
    let channel = tls::endpoint(url, access.tls()?.as_ref(), "tls")?
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(64 << 20))
        .max_frame_size(1u32 << 20)
        .tcp_nodelay(true)
        .connect_lazy();
    let token =
        AddToken::new(access.token.as_deref()).map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    Ok(InterceptedService::new(channel, token))
}

pub fn compositor(url: &str, access: &Access) -> Result<CompositorClient<Authed>> {
    Ok(CompositorClient::new(channel(url, access)?)
        .max_decoding_message_size(framecast_proto::DEFAULT_MAX_MESSAGE_BYTES))
}

pub fn kserve(url: &str, access: &Access) -> Result<GrpcInferenceServiceClient<Authed>> {
    Ok(GrpcInferenceServiceClient::new(channel(url, access)?)
        .max_decoding_message_size(framecast_proto::DEFAULT_MAX_MESSAGE_BYTES)
        .max_encoding_message_size(framecast_proto::DEFAULT_MAX_MESSAGE_BYTES))
}

/// Waits until every URL answers grpc.health.v1 SERVING, or fails after `timeout`.
pub async fn wait_healthy(urls: &[String], access: &Access, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for url in urls {
        let mut client = HealthClient::new(channel(url, access)?);
        loop {
            let status = client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|r| r.into_inner().status);
            match status {
                Ok(s) if s == ServingStatus::Serving as i32 => break,
                other => {
                    if Instant::now() > deadline {
                        anyhow::bail!("{url} not healthy after {timeout:?}: {other:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        eprintln!("{url}: healthy");
    }
    Ok(())
}

//! Connections to the services under test.

use anyhow::{Context, Result};
use framecast_proto::auth::AddToken;
use framecast_proto::compositor::v1::compositor_client::CompositorClient;
use framecast_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

/// A connection that sends the bearer token, if any, with every call.
pub type Authed = InterceptedService<Channel, AddToken>;

pub fn channel(url: &str, token: Option<&str>) -> Result<Authed> {
    let channel = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("bad URL {url:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(64 << 20))
        .max_frame_size(1u32 << 20)
        .tcp_nodelay(true)
        .connect_lazy();
    let token = AddToken::new(token).map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    Ok(InterceptedService::new(channel, token))
}

pub fn compositor(url: &str, token: Option<&str>) -> Result<CompositorClient<Authed>> {
    Ok(CompositorClient::new(channel(url, token)?)
        .max_decoding_message_size(framecast_proto::DEFAULT_MAX_MESSAGE_BYTES))
}

pub fn kserve(url: &str, token: Option<&str>) -> Result<GrpcInferenceServiceClient<Authed>> {
    Ok(GrpcInferenceServiceClient::new(channel(url, token)?)
        .max_decoding_message_size(framecast_proto::DEFAULT_MAX_MESSAGE_BYTES)
        .max_encoding_message_size(framecast_proto::DEFAULT_MAX_MESSAGE_BYTES))
}

/// Waits until every URL answers grpc.health.v1 SERVING, or fails after `timeout`.
pub async fn wait_healthy(urls: &[String], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for url in urls {
        let mut client = HealthClient::new(channel(url, None)?);
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

//! Connections to the services under test.

use anyhow::{Context, Result};
use framecast_proto::compositor::v1::compositor_client::CompositorClient;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

pub fn channel(url: &str) -> Result<Channel> {
    Ok(Endpoint::from_shared(url.to_string())
        .with_context(|| format!("bad URL {url:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(64 << 20))
        .max_frame_size(1u32 << 20)
        .tcp_nodelay(true)
        .connect_lazy())
}

pub fn compositor(url: &str) -> Result<CompositorClient<Channel>> {
    Ok(CompositorClient::new(channel(url)?)
        .max_decoding_message_size(framecast_proto::DEFAULT_MAX_MESSAGE_BYTES))
}

/// Waits until every URL answers grpc.health.v1 SERVING, or fails after `timeout`.
pub async fn wait_healthy(urls: &[String], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for url in urls {
        let mut client = HealthClient::new(channel(url)?);
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

//! The background readiness probe: every replica's `ServerReady`, each interval, for as long
//! as the pool exists; batches avoid replicas that fail it.

use super::Replicas;
use framecast_proto::auth::authorize;
use framecast_proto::kserve::ServerReadyRequest;
use framecast_telemetry::prometheus::IntGaugeVec;
use parking_lot::RwLock;
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;
use tonic::Request;

/// Probes every replica's `ServerReady` each `interval`, for as long as the pool exists.
pub(super) fn spawn_checks(
    replicas: Weak<RwLock<Replicas>>,
    interval: Duration,
    gauge: Option<IntGaugeVec>,
) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let Some(replicas) = replicas.upgrade().map(|r| r.read().clone()) else {
                return;
            };
            for r in replicas.iter() {
                let mut client = r.client.clone();
                let probe = async {
                    let req = authorize(Request::new(ServerReadyRequest {}), r.token.as_deref())?;
                    client.server_ready(req).await
                };
                let ok = matches!(
                    tokio::time::timeout(interval, probe).await,
                    Ok(Ok(resp)) if resp.get_ref().ready
                );
                if ok != r.healthy.swap(ok, Ordering::AcqRel) {
                    tracing::info!(replica = %r.label, healthy = ok, "inference replica health changed");
                }
            }
            if let Some(gauge) = &gauge {
                let healthy = replicas
                    .iter()
                    .filter(|r| r.healthy.load(Ordering::Acquire))
                    .count();
                gauge.with_label_values(&["healthy"]).set(healthy as i64);
                gauge
                    .with_label_values(&["unhealthy"])
                    .set((replicas.len() - healthy) as i64);
            }
        }
    });
}

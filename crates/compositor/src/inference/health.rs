//! The background readiness probe: every replica's `ServerReady`, each interval, for as long
//! as the pool exists; batches avoid replicas that fail it. A replica that is ready gets the
//! tensors registered ahead ([`super::InferenceClient::register_ahead`]), once each time it
//! turns ready.

use super::replica::Replica;
use super::tensors::AheadSources;
use super::Replicas;
use framecast_proto::auth::authorize;
use framecast_proto::kserve::ServerReadyRequest;
use framecast_telemetry::prometheus::IntGaugeVec;
use parking_lot::RwLock;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tonic::Request;

/// Probes every replica's `ServerReady` each `interval`, for as long as the pool exists.
pub(super) fn spawn_checks(
    replicas: Weak<RwLock<Replicas>>,
    ahead: Arc<RwLock<Option<AheadSources>>>,
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
                let was = r.healthy.swap(ok, Ordering::AcqRel);
                if ok != was {
                    tracing::info!(replica = %r.label, healthy = ok, "inference replica health changed");
                }
                match ahead.read().clone() {
                    Some(sources) if ok => register_ahead(r, sources, !was),
                    _ if !ok => r.ahead.store(false, Ordering::Release),
                    _ => {}
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

/// Hands `replica` the tensors to hold ahead of the first batch, unless that is done or under
/// way since it last turned healthy; on a failure the next probe tries again. `again`: it was
/// unhealthy since, so what it held may be gone.
pub(super) fn register_ahead(replica: &Arc<Replica>, sources: AheadSources, again: bool) {
    if replica.ahead.swap(true, Ordering::AcqRel) {
        return;
    }
    let r = replica.clone();
    tokio::spawn(async move {
        let list = tokio::task::spawn_blocking(move || sources()).await;
        let result = match list {
            Ok(list) => r.tensors.register_ahead(&r.client, &list, again).await,
            Err(e) => Err(tonic::Status::internal(e.to_string())),
        };
        match result {
            Ok(0) => {}
            Ok(held) => {
                tracing::info!(replica = %r.label, tensors = held, "registered ahead of the first batch")
            }
            Err(e) => {
                tracing::debug!(replica = %r.label, error = %e.message(), "registering ahead; tried again at the next probe");
                r.ahead.store(false, Ordering::Release);
            }
        }
    });
}

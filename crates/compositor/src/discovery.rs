//! Finding the inference replicas behind a DNS name.
//!
//! On Kubernetes the GPU workers sit behind a headless Service, whose name resolves to the
//! address of every ready pod. The compositor balances batches itself, so it needs one
//! connection per pod, not one to whichever address the resolver lists first. So each
//! `--inference` URL whose host is a name is looked up again every `--inference-resolve-s`,
//! and every address it yields is a replica of its own:
//! - pods that scale up join the pool at the next lookup;
//! - pods that go away, or stop being ready (a headless Service lists only ready pods), leave
//!   it; the batches already in flight to them finish first;
//! - a failed or empty lookup keeps the replicas already known. A DNS blip must not empty the
//!   pool, and the health checks already steer batches away from dead replicas.
//!
//! Until the first lookup answers, the name is one replica reached by name, as without
//! discovery. A URL whose host is an IP address is always exactly one replica.
//!
//! A connection to a resolved address keeps the name in its URI, so the `:authority` header
//! and the TLS server name are still the name; only the TCP dial goes to the address.

use crate::inference::{ClientOptions, Replica, Replicas};
use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use parking_lot::RwLock;
use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use tokio::net::TcpStream;
use tonic::codegen::Service;
use tonic::transport::Uri;

/// Looks up the addresses behind a host name.
pub trait Resolve: Send + Sync {
    fn lookup(&self, host: &str, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>>;
}

/// The operating system's resolver (`getaddrinfo`, through tokio).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn lookup(&self, host: &str, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> {
        let host = host.to_string();
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    }
}

/// A configured URL whose host is a name, so it may stand for several replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    pub url: String,
    pub host: String,
    pub port: u16,
}

/// `Some` when `url`'s host is a name rather than an IP address.
pub fn named(url: &str) -> Result<Option<Named>, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("inference: endpoint {url:?}: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("inference: endpoint {url:?} has no host"))?;
    if host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok() {
        return Ok(None);
    }
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    Ok(Some(Named {
        url: url.to_string(),
        host: host.to_string(),
        port,
    }))
}

/// A change to the pool after a round of lookups.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// Indices of the current replicas that stay.
    pub keep: Vec<usize>,
    /// New replicas: configured URL and the address to dial.
    pub add: Vec<(String, SocketAddr)>,
}

impl Plan {
    pub fn changes(&self, current: usize) -> bool {
        !self.add.is_empty() || self.keep.len() != current
    }
}

/// What to keep and add, given the current replicas (configured URL, dialled address or
/// `None` when reached by name) and the lookups that answered this round. A URL absent from
/// `resolved` (an IP address, or a lookup that failed) keeps its replicas as they are.
pub fn plan(
    current: &[(&str, Option<SocketAddr>)],
    resolved: &[(String, Vec<SocketAddr>)],
) -> Plan {
    let answer = |url: &str| resolved.iter().find(|(u, _)| u == url).map(|(_, a)| a);
    let keep = current
        .iter()
        .enumerate()
        .filter(|(_, (url, addr))| match answer(url) {
            None => true,
            Some(addrs) => addr.is_some_and(|a| addrs.contains(&a)),
        })
        .map(|(i, _)| i)
        .collect();
    let add = resolved
        .iter()
        .flat_map(|(url, addrs)| addrs.iter().map(move |a| (url, *a)))
        .filter(|(url, a)| !current.contains(&(url.as_str(), Some(*a))))
        .map(|(url, a)| (url.clone(), a))
        .collect();
    Plan { keep, add }
}

/// Dials one address, whatever host the URI names.
#[derive(Clone, Copy)]
pub struct Dial(pub SocketAddr);

impl Service<Uri> for Dial {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<Self::Response>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            // Batches are single large writes followed by a wait: Nagle only adds delay.
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// Starts the task that looks `names` up every `opts.resolve_interval` and reshapes the pool
/// to the answers, for as long as the pool exists; new replicas are numbered from
/// `next_replica`.
pub(crate) fn spawn(
    replicas: Weak<RwLock<Replicas>>,
    names: Vec<Named>,
    resolver: Arc<dyn Resolve>,
    opts: ClientOptions,
    next_replica: u64,
) {
    let task = Discovery {
        replicas,
        names,
        resolver,
        opts,
        next_replica,
        failing: HashSet::new(),
    };
    tokio::spawn(task.run());
}

/// The task that looks the URLs' host names up and reshapes the pool to their answers.
struct Discovery {
    replicas: Weak<RwLock<Replicas>>,
    names: Vec<Named>,
    resolver: Arc<dyn Resolve>,
    opts: ClientOptions,
    next_replica: u64,
    /// URLs whose last lookup failed, so a lasting failure is logged once.
    failing: HashSet<String>,
}

impl Discovery {
    async fn run(mut self) {
        loop {
            let resolved = self.lookup_all().await;
            let Some(replicas) = self.replicas.upgrade() else {
                return;
            };
            self.apply(&replicas, &resolved);
            drop(replicas);
            tokio::time::sleep(self.opts.resolve_interval).await;
        }
    }

    /// The addresses of every name that answered with at least one.
    async fn lookup_all(&mut self) -> Vec<(String, Vec<SocketAddr>)> {
        let mut resolved = Vec::new();
        for n in &self.names {
            let wait = self.opts.connect_timeout;
            let why = match tokio::time::timeout(wait, self.resolver.lookup(&n.host, n.port)).await
            {
                Ok(Ok(mut addrs)) if !addrs.is_empty() => {
                    addrs.sort();
                    addrs.dedup();
                    if self.failing.remove(&n.url) {
                        tracing::info!(url = %n.url, "inference host name resolves again");
                    }
                    resolved.push((n.url.clone(), addrs));
                    continue;
                }
                Ok(Ok(_)) => "it has no address".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {wait:?}"),
            };
            if self.failing.insert(n.url.clone()) {
                tracing::warn!(url = %n.url, reason = %why, "inference host name not resolved; keeping the replicas known");
            }
        }
        resolved
    }

    /// Only this task changes the pool, so reading it and then replacing it is not a race.
    fn apply(&mut self, replicas: &RwLock<Replicas>, resolved: &[(String, Vec<SocketAddr>)]) {
        let current = replicas.read().clone();
        let keys: Vec<(&str, Option<SocketAddr>)> =
            current.iter().map(|r| (r.url.as_str(), r.addr)).collect();
        let plan = plan(&keys, resolved);
        if !plan.changes(current.len()) {
            return;
        }
        let mut next: Vec<Arc<Replica>> = plan.keep.iter().map(|&i| current[i].clone()).collect();
        for (url, addr) in &plan.add {
            match Replica::open(self.next_replica, url, Some(*addr), &self.opts) {
                Ok(r) => {
                    self.next_replica += 1;
                    tracing::info!(replica = %r.label, "inference replica joined");
                    next.push(r);
                }
                Err(e) => {
                    tracing::warn!(url = %url, addr = %addr, error = %e, "inference replica not added")
                }
            }
        }
        for (i, r) in current.iter().enumerate() {
            if !plan.keep.contains(&i) {
                tracing::info!(replica = %r.label, "inference replica left");
                if let Some(pool) = &r.shm {
                    pool.retire();
                }
            }
        }
        *replicas.write() = Arc::new(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn names_and_addresses_are_told_apart() {
        assert_eq!(named("http://127.0.0.1:8001").unwrap(), None);
        assert_eq!(named("http://[::1]:8001").unwrap(), None);
        let n = named("http://framecast-inference:8001").unwrap().unwrap();
        assert_eq!((n.host.as_str(), n.port), ("framecast-inference", 8001));
        assert_eq!(named("https://gpu.example").unwrap().unwrap().port, 443);
        assert_eq!(named("http://gpu.example").unwrap().unwrap().port, 80);
        let err = named("http://").unwrap_err();
        assert!(err.contains("\"http://\""), "{err}");
    }

    #[test]
    fn lookups_add_new_addresses_and_drop_vanished_ones() {
        let name = "http://inf:8001";
        let fixed = "http://10.9.9.9:8001";
        let current = [
            (fixed, None),
            (name, Some(addr("10.0.0.1:8001"))),
            (name, Some(addr("10.0.0.2:8001"))),
        ];
        let resolved = vec![(
            name.to_string(),
            vec![addr("10.0.0.2:8001"), addr("10.0.0.3:8001")],
        )];
        let p = plan(&current, &resolved);
        assert_eq!(p.keep, vec![0, 2], "the fixed URL stays, 10.0.0.1 leaves");
        assert_eq!(p.add, vec![(name.to_string(), addr("10.0.0.3:8001"))]);
        assert!(p.changes(current.len()));
    }

    #[test]
    fn the_replica_reached_by_name_gives_way_to_the_addresses() {
        let name = "http://inf:8001";
        let p = plan(
            &[(name, None)],
            &[(name.to_string(), vec![addr("10.0.0.1:8001")])],
        );
        assert_eq!(p.keep, Vec::<usize>::new());
        assert_eq!(p.add, vec![(name.to_string(), addr("10.0.0.1:8001"))]);
    }

    #[test]
    fn an_unanswered_lookup_or_the_same_answer_changes_nothing() {
        let name = "http://inf:8001";
        let current = [(name, Some(addr("10.0.0.1:8001")))];
        let p = plan(&current, &[]);
        assert!(!p.changes(1), "{p:?}");
        let same = plan(&current, &[(name.to_string(), vec![addr("10.0.0.1:8001")])]);
        assert!(!same.changes(1), "{same:?}");
    }
}

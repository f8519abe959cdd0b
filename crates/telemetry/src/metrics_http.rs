//! The Prometheus `/metrics` endpoint both services serve on their own port.
//!
//! The port faces the same network as the gRPC one, so it defends itself the same way
//! ([`crate::http_server`]: a deadline of [`HEADER_TIMEOUT`] on request headers and one on
//! their body, at most [`MAX_CONNECTIONS`] at once and [`MAX_CONNECTIONS_PER_CLIENT`] from
//! one address), and with `require_token` the bearer token of the gRPC port is
//! required here too (Prometheus sends it with `authorization.credentials`).
//!
//! With profiling on (`--profiling`), the same port, under the same TLS and token, also serves
//! `GET /debug/pprof/profile?seconds=N` (a CPU profile of the whole process in pprof's
//! protobuf format, for `go tool pprof` or any pprof viewer) and
//! `GET /debug/flamegraph.svg?seconds=N` (the same samples as a flame graph), N in 1..=60,
//! default 10; one profile at a time.

use crate::http_server::{self, HttpLimits, HEADER_TIMEOUT};
use framecast_proto::auth::{BearerCheck, Refusal};
use std::net::SocketAddr;
use std::time::Duration;

/// Connections served at once on the metrics port.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections served at once on the metrics port from one client address (a Prometheus
/// server needs one or two).
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 16;

/// Who may read `/metrics`, and how patient the port is.
#[derive(Clone, Debug)]
pub struct MetricsAccess {
    /// Serve over TLS (with the gRPC port's client-certificate rule).
    pub tls: Option<crate::tls::ServerTls>,
    /// Require this bearer check on `/metrics`; `None`: open to whoever reaches the port.
    pub auth: Option<BearerCheck>,
    /// The bearer check on the profiling endpoints: the token whenever one is configured,
    /// whatever `/metrics` requires (a profile shows far more than metrics do).
    pub profile_auth: Option<BearerCheck>,
    pub header_timeout: Duration,
    /// Serve the CPU-profile endpoints.
    pub profiling: bool,
}

impl MetricsAccess {
    /// `tls` as given; the token required when `require_token` and a token is configured.
    pub fn new(
        tls: Option<&crate::tls::ServerTls>,
        token: Option<&str>,
        require_token: bool,
    ) -> Self {
        let check = BearerCheck::new(token);
        MetricsAccess {
            tls: tls.cloned(),
            auth: (require_token && check.is_on()).then(|| check.clone()),
            profile_auth: check.is_on().then_some(check),
            header_timeout: HEADER_TIMEOUT,
            profiling: false,
        }
    }

    /// The same access, serving the CPU-profile endpoints when `on`.
    pub fn with_profiling(mut self, on: bool) -> Self {
        self.profiling = on;
        self
    }
}

/// Serves `GET /metrics` (Prometheus text format) of `registry` on `addr` on a task of its own.
pub async fn serve_metrics(
    addr: SocketAddr,
    registry: prometheus::Registry,
    access: MetricsAccess,
) -> anyhow::Result<SocketAddr> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics-listen: cannot bind {addr}"))?;
    let local = listener.local_addr()?;
    let auth = access.auth.clone();
    let mut app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let registry = registry.clone();
            let auth = auth.clone();
            async move { metrics(&registry, auth.as_ref(), &headers) }
        }),
    );
    if access.profiling {
        for (path, kind) in [
            ("/debug/pprof/profile", Profile::Pprof),
            ("/debug/flamegraph.svg", Profile::Flamegraph),
        ] {
            let auth = access.profile_auth.clone();
            app = app.route(
                path,
                axum::routing::get(
                    move |headers: axum::http::HeaderMap, query: axum::extract::RawQuery| {
                        let auth = auth.clone();
                        async move { profile(kind, auth.as_ref(), &headers, query.0).await }
                    },
                ),
            );
        }
    }
    let scheme = if access.tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(addr = %local, protected = access.auth.is_some(), "metrics on {scheme}://{local}/metrics");
    let limits = HttpLimits {
        header_timeout: access.header_timeout,
        ..HttpLimits::new(access.tls, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT)
    };
    tokio::spawn(http_server::serve(
        listener,
        app,
        limits,
        "metrics",
        std::future::pending(),
    ));
    Ok(local)
}

/// The refusal for a request without the required bearer token, if it lacks it.
fn refused(
    auth: Option<&BearerCheck>,
    headers: &axum::http::HeaderMap,
) -> Option<(axum::http::StatusCode, String)> {
    use axum::http::StatusCode;
    let check = auth?;
    let header = headers.get("authorization").map(|v| v.as_bytes());
    match check.check(header) {
        Ok(()) => None,
        Err(Refusal::Missing) => Some((
            StatusCode::UNAUTHORIZED,
            "authorization: missing; send 'authorization: Bearer <token>'\n".into(),
        )),
        Err(Refusal::Invalid) => Some((
            StatusCode::UNAUTHORIZED,
            "authorization: invalid bearer token\n".into(),
        )),
    }
}

fn metrics(
    registry: &prometheus::Registry,
    auth: Option<&BearerCheck>,
    headers: &axum::http::HeaderMap,
) -> (axum::http::StatusCode, String) {
    use axum::http::StatusCode;
    if let Some(refusal) = refused(auth, headers) {
        return refusal;
    }
    let mut out = String::new();
    match prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out) {
        Ok(()) => (StatusCode::OK, out),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Clone, Copy)]
enum Profile {
    Pprof,
    Flamegraph,
}

/// Samples the process's CPU for `seconds` (query `seconds=N`, 1..=60, default 10) on a
/// blocking thread and answers the profile, or the reason there is none.
async fn profile(
    kind: Profile,
    auth: Option<&BearerCheck>,
    headers: &axum::http::HeaderMap,
    query: Option<String>,
) -> axum::response::Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    if let Some(refusal) = refused(auth, headers) {
        return refusal.into_response();
    }
    let mut seconds = 10u64;
    for pair in query.as_deref().unwrap_or_default().split('&') {
        if let Some(v) = pair.strip_prefix("seconds=") {
            let v = percent_decoded(v);
            match v.parse::<u64>() {
                Ok(n) if (1..=60).contains(&n) => seconds = n,
                _ => {
                    let echo = framecast_proto::echo(&v);
                    let msg = format!("seconds: {echo:?} is not a whole number in 1..=60\n");
                    return (StatusCode::BAD_REQUEST, msg).into_response();
                }
            }
        }
    }
    let taken = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, (StatusCode, String)> {
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(99)
            .build()
            .map_err(|e| {
                (
                    StatusCode::CONFLICT,
                    format!("no profile: {e} (one at a time)\n"),
                )
            })?;
        std::thread::sleep(Duration::from_secs(seconds));
        let report = guard.report().build().map_err(|e| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("profile report: {e}\n"),
            )
        })?;
        let mut out = Vec::new();
        match kind {
            // No samples (the process was idle): a graph that says so, not an empty body.
            Profile::Flamegraph if report.data.is_empty() => {
                out.extend_from_slice(idle_flamegraph(seconds).as_bytes());
                Ok(())
            }
            Profile::Flamegraph => report.flamegraph(&mut out).map_err(|e| e.to_string()),
            Profile::Pprof => {
                use pprof::protos::Message;
                report
                    .pprof()
                    .map_err(|e| e.to_string())
                    .and_then(|p| p.encode(&mut out).map_err(|e| e.to_string()))
            }
        }
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("profile: {e}\n")))?;
        Ok(out)
    })
    .await;
    let content_type = match kind {
        Profile::Pprof => "application/octet-stream",
        Profile::Flamegraph => "image/svg+xml",
    };
    match taken {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        Ok(Err(refusal)) => refusal.into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("profiler: {e}\n"),
        )
            .into_response(),
    }
}

/// A query value with its `%XX` escapes (and `+`) decoded; a malformed escape stays as it is.
fn percent_decoded(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The flame graph of a profile without a sample.
fn idle_flamegraph(seconds: u64) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"640\" height=\"40\"><text x=\"10\" y=\"25\" font-family=\"monospace\">No CPU samples in {seconds} s: the process was idle.</text></svg>\n"
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(super::percent_decoded("%31"), "1");
        assert_eq!(super::percent_decoded("1%30"), "10");
        assert_eq!(super::percent_decoded("%3"), "%3");
        assert_eq!(super::percent_decoded("%zz5"), "%zz5");
        assert_eq!(super::percent_decoded("a+b"), "a b");
    }
}

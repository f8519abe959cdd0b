//! What WHIP (RFC 9725) asks of session creation beyond the offer and the answer, so that
//! WHIP clients and pages served from another origin work unchanged: `OPTIONS` with
//! `Accept-Post: application/sdp`, CORS for the origins the operator allows, the ICE servers
//! the operator configures as `Link: <...>; rel="ice-server"` headers, and an absolute
//! `Location`. (415 for a body that is not `application/sdp` and the bearer token on creation
//! are checked where the offer is taken, in [`crate::http`].)

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

use crate::http::Gateway;

/// An ICE server for the browser (the gateway itself answers with host candidates only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceServer {
    /// `stun:`, `stuns:`, `turn:` or `turns:` URI (RFC 7064, 7065).
    pub url: String,
    /// For TURN: the long-term credential.
    pub username: Option<String>,
    pub credential: Option<String>,
}

impl IceServer {
    /// Checks `url` (a scheme browsers take, nothing that would break the header) and
    /// attaches the TURN credential to `turn:`/`turns:` ones.
    pub fn new(
        url: &str,
        username: Option<&str>,
        credential: Option<&str>,
    ) -> Result<Self, String> {
        let turn = url.starts_with("turn:") || url.starts_with("turns:");
        if !(turn || url.starts_with("stun:") || url.starts_with("stuns:")) {
            return Err(format!(
                "--ice-server {url:?}: a stun:, stuns:, turn: or turns: URI"
            ));
        }
        let clean = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_graphic() && !matches!(c, '<' | '>' | '"' | ',' | ';'))
        };
        if !clean(url) {
            return Err(format!("--ice-server {url:?}: not a plain URI"));
        }
        for (what, v) in [
            ("--ice-username", username),
            ("--ice-credential", credential),
        ] {
            if v.is_some_and(|v| !clean(v)) {
                return Err(format!(
                    "{what}: printable ASCII without quotes, commas, semicolons or angle brackets"
                ));
            }
        }
        if turn && (username.is_none() || credential.is_none()) {
            return Err(format!(
                "--ice-server {url:?}: a TURN server needs --ice-username and --ice-credential"
            ));
        }
        Ok(IceServer {
            url: url.to_string(),
            username: username.filter(|_| turn).map(str::to_string),
            credential: credential.filter(|_| turn).map(str::to_string),
        })
    }

    /// The `Link` header value RFC 9725 section 4.4 gives for it.
    pub fn link(&self) -> String {
        let mut v = format!("<{}>; rel=\"ice-server\"", self.url);
        if let (Some(u), Some(c)) = (&self.username, &self.credential) {
            v += &format!("; username=\"{u}\"; credential=\"{c}\"; credential-type=\"password\"");
        }
        v
    }
}

/// `Link` headers for the configured ICE servers.
pub fn ice_links(gw: &Gateway) -> Vec<(header::HeaderName, String)> {
    gw.opts
        .ice_servers
        .iter()
        .map(|s| (header::LINK, s.link()))
        .collect()
}

/// `OPTIONS /sessions`: what the endpoint takes, and the ICE servers to gather with.
pub async fn options(State(gw): State<Arc<Gateway>>) -> Response {
    let mut headers = vec![
        (header::ALLOW, "OPTIONS, POST".to_string()),
        (
            header::HeaderName::from_static("accept-post"),
            "application/sdp".to_string(),
        ),
    ];
    headers.extend(ice_links(&gw));
    let mut r = StatusCode::NO_CONTENT.into_response();
    for (k, v) in headers {
        if let Ok(v) = HeaderValue::from_str(&v) {
            r.headers_mut().append(k, v);
        }
    }
    r
}

/// The session's absolute URL, from the request's `Host` (a name or an address and a port,
/// nothing else); just `path` when the request has no such `Host`.
pub fn location(headers: &HeaderMap, https: bool, path: &str) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        });
    match host {
        Some(h) => format!("{}://{h}{path}", if https { "https" } else { "http" }),
        None => path.to_string(),
    }
}

/// Whether the gateway answers `origin` across origins (`--cors-origin`, `*` for any).
fn allowed(gw: &Gateway, origin: &str) -> bool {
    gw.opts
        .cors_origins
        .iter()
        .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
}

/// CORS for the origins the operator allows: preflights answered here, and every answer to
/// an allowed origin saying so (with `Location` and `Link` readable by its script). Other
/// origins get no CORS headers, so their scripts cannot read the answers.
pub async fn cors(State(gw): State<Arc<Gateway>>, req: Request, next: Next) -> Response {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .filter(|o| allowed(&gw, o))
        .map(str::to_string);
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut r = if preflight && origin.is_some() {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Authorization, Content-Type"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        r
    } else {
        next.run(req).await
    };
    if let Some(origin) = origin.and_then(|o| HeaderValue::from_str(&o).ok()) {
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("Location, Link"),
        );
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ice_servers_become_link_headers_and_bad_ones_are_refused() {
        let stun = IceServer::new("stun:stun.example.net:3478", None, None).unwrap();
        assert_eq!(
            stun.link(),
            "<stun:stun.example.net:3478>; rel=\"ice-server\""
        );
        let turn =
            IceServer::new("turn:turn.example.net?transport=udp", Some("u"), Some("p")).unwrap();
        assert_eq!(
            turn.link(),
            "<turn:turn.example.net?transport=udp>; rel=\"ice-server\"; username=\"u\"; credential=\"p\"; credential-type=\"password\""
        );
        for (url, user, why) in [
            ("http://x", None, "a stun:"),
            ("stun:x>; rel=evil", None, "not a plain URI"),
            ("turn:x", None, "needs --ice-username"),
            ("turn:x", Some("a\"b"), "--ice-username"),
        ] {
            let e = IceServer::new(url, user, Some("p")).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn the_location_is_absolute_from_a_plain_host_only() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("gw.example:8021"));
        assert_eq!(
            location(&h, true, "/sessions/a"),
            "https://gw.example:8021/sessions/a"
        );
        h.insert(header::HOST, HeaderValue::from_static("evil.example/x?"));
        assert_eq!(location(&h, false, "/sessions/a"), "/sessions/a");
        assert_eq!(
            location(&HeaderMap::new(), false, "/sessions/a"),
            "/sessions/a"
        );
    }
}

//! Who a caller is when limits are shared out: every bound a client can fill (streams,
//! sessions, shared-memory regions, cached tensors) gives each client its own share of it,
//! so one client cannot take it all.
//!
//! A client is its credential where authentication is on (the bearer token and/or client
//! certificate: clients sharing a token share a share), else its network address. IPv6
//! addresses count by their /64 prefix, since one host usually holds a whole /64; an
//! IPv4-mapped IPv6 address is its IPv4 address. The key holds a hash of the credential,
//! never the credential, so it may be logged.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use tonic::Request;

/// What a caller proved it is: its TLS client certificate (the leaf, verified by the
/// transport) and, when `authenticated` (the server checks tokens), its `authorization`
/// header.
pub struct Credentials {
    pub cert: Option<Vec<u8>>,
    pub token: Option<Vec<u8>>,
}

impl Credentials {
    pub fn of<T>(req: &Request<T>, authenticated: bool) -> Credentials {
        let certs = req.peer_certs();
        Credentials {
            cert: certs
                .as_ref()
                .and_then(|c| c.first())
                .map(|c| c.as_ref().to_vec()),
            token: authenticated
                .then(|| req.metadata().get("authorization"))
                .flatten()
                .map(|v| v.as_bytes().to_vec()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.cert.is_none() && self.token.is_none()
    }
}

/// The share key of `req`'s caller: its credential when it presented one ([`Credentials`]),
/// else its address. A caller whose transport has no address (an in-process test channel)
/// is `"local"`.
pub fn of<T>(req: &Request<T>, authenticated: bool) -> String {
    let c = Credentials::of(req, authenticated);
    if !c.is_empty() {
        let part = |p: &Option<Vec<u8>>| p.clone().unwrap_or_default();
        return credential(&[&part(&c.cert), &part(&c.token)]);
    }
    req.remote_addr()
        .map_or_else(|| "local".to_string(), |a| address(a.ip()))
}

/// The share key of a caller known by its credential parts.
pub fn credential(parts: &[&[u8]]) -> String {
    // SipHash with a per-process key: stable for the process's life, and not a way back to
    // the credential.
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let mut h = std::hash::BuildHasher::build_hasher(KEYS.get_or_init(Default::default));
    parts.hash(&mut h);
    format!("credential {:016x}", h.finish())
}

/// The share key of a caller at `ip`.
pub fn address(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("address {v4}"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("address {v4}"),
            None => {
                let s = v6.segments();
                format!("address {:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_group_by_host_and_credentials_are_hashed() {
        let a = |s: &str| address(s.parse().unwrap());
        assert_eq!(a("10.0.0.1"), "address 10.0.0.1");
        assert_eq!(a("::ffff:10.0.0.1"), "address 10.0.0.1");
        assert_eq!(a("2001:db8:1:2::1"), a("2001:db8:1:2:ffff::9"));
        assert_ne!(a("2001:db8:1:2::1"), a("2001:db8:1:3::1"));
        let k = credential(&[b"", b"Bearer secret"]);
        assert!(!k.contains("secret"));
        assert_eq!(k, credential(&[b"", b"Bearer secret"]));
        assert_ne!(k, credential(&[b"", b"Bearer other"]));
        // A token and a certificate with the same bytes are different credentials.
        assert_ne!(credential(&[b"x", b""]), credential(&[b"", b"x"]));
    }

    #[test]
    fn a_request_without_an_address_or_credential_is_local() {
        let req = Request::new(());
        assert_eq!(of(&req, true), "local");
    }
}

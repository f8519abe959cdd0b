//! TLS for every port of both services (rustls, ring provider): server certificates, mutual
//! TLS through a client CA, and the client side the compositor and the bench use.
//!
//! PEM files are read and checked when the settings are loaded, so a wrong path or a file
//! that is not what its flag says fails at start-up with a message naming the flag, not at
//! the first connection.

use anyhow::{anyhow, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// Server TLS flags, the same on every service.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTlsArgs {
    /// PEM certificate chain: serve this service's port (gRPC, or the gateway's HTTP) and
    /// /metrics over TLS (with --tls-key).
    #[arg(long, env = "FRAMECAST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "FRAMECAST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: every client must present a certificate it signed (mutual TLS), on the
    /// service's port and the metrics port.
    #[arg(long, env = "FRAMECAST_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl ServerTlsArgs {
    /// The TLS material, read and checked; None when TLS is off.
    pub fn load(&self) -> Result<Option<ServerTls>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let ca = match &self.tls_client_ca {
            Some(p) => Some(read(p, "tls-client-ca")?),
            None => None,
        };
        ServerTls::from_pem(read(cert, "tls-cert")?, read(key, "tls-key")?, ca).map(Some)
    }
}

/// A server's certificate, key and optional client CA, checked.
#[derive(Clone)]
pub struct ServerTls {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
    rustls: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// From PEM text: certificate chain, private key and, for mutual TLS, the client CA.
    pub fn from_pem(cert: Vec<u8>, key: Vec<u8>, client_ca: Option<Vec<u8>>) -> Result<Self> {
        let chain = certificates(&cert).context("tls-cert")?;
        let private = private_key(&key, "tls-key")?;
        let builder = rustls::ServerConfig::builder();
        let builder = match &client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certificates(ca).context("tls-client-ca")? {
                    roots
                        .add(c)
                        .map_err(|e| anyhow!("tls-client-ca: unusable certificate: {e}"))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .map_err(|e| anyhow!("tls-client-ca: {e}"))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, private)
            .map_err(|e| anyhow!("tls-cert/tls-key: {e}"))?;
        // This config serves the HTTP ports (`acceptor`), which speak HTTP/1.1 only; offering
        // h2 made curl and browsers choose it and then fail (tonic builds its own config).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls {
            cert,
            key,
            client_ca,
            rustls: Arc::new(config),
        })
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.client_ca.is_some()
    }

    /// The settings for a tonic server.
    pub fn tonic(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(Identity::from_pem(&self.cert, &self.key));
        match &self.client_ca {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }

    /// An acceptor for the HTTP ports (metrics, the gateway's page): HTTP/1.1 by ALPN.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.rustls.clone())
    }
}

/// `server` with TLS turned on when `tls` is given.
pub fn server(
    server: tonic::transport::Server,
    tls: Option<&ServerTls>,
) -> Result<tonic::transport::Server> {
    match tls {
        Some(t) => server
            .tls_config(t.tonic())
            .map_err(|e| anyhow!("tls-cert: {e}")),
        None => Ok(server),
    }
}

/// What a client needs to reach a TLS server: the CA that signed the server's certificate,
/// its own certificate and key where the server wants mutual TLS, and the name to expect in
/// the server's certificate when it differs from the URL's host.
#[derive(Clone)]
pub struct ClientTls {
    ca: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("identity", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// From PEM files; `flag` is the prefix of the flags they came from (`inference-tls`,
    /// `tls`), for error messages. Without `ca` TLS is off: None.
    pub fn from_files(
        flag: &str,
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        domain: Option<String>,
    ) -> Result<Option<Self>> {
        let Some(ca) = ca else {
            anyhow::ensure!(
                cert.is_none() && key.is_none() && domain.is_none(),
                "{flag}-ca: required with {flag}-cert, {flag}-key or {flag}-domain"
            );
            return Ok(None);
        };
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((
                read(c, &format!("{flag}-cert"))?,
                read(k, &format!("{flag}-key"))?,
            )),
            (None, None) => None,
            _ => anyhow::bail!("{flag}-cert and {flag}-key: give both or neither"),
        };
        Self::from_pem(flag, read(ca, &format!("{flag}-ca"))?, identity, domain).map(Some)
    }

    /// From PEM text; checks that the CA and the identity parse.
    pub fn from_pem(
        flag: &str,
        ca: Vec<u8>,
        identity: Option<(Vec<u8>, Vec<u8>)>,
        domain: Option<String>,
    ) -> Result<Self> {
        certificates(&ca).with_context(|| format!("{flag}-ca"))?;
        if let Some((cert, key)) = &identity {
            certificates(cert).with_context(|| format!("{flag}-cert"))?;
            private_key(key, &format!("{flag}-key"))?;
        }
        Ok(ClientTls {
            ca,
            identity,
            domain,
        })
    }

    /// The settings for a tonic endpoint.
    pub fn tonic(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca));
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(d) = &self.domain {
            config = config.domain_name(d.clone());
        }
        config
    }
}

/// An endpoint for `url`, with `tls` applied; an `https` URL needs `tls` and an `http` one
/// must not have it, so a forgotten scheme or CA fails here rather than as a hung handshake.
/// `flag` is the prefix of the TLS flags, for the message.
pub fn endpoint(url: &str, tls: Option<&ClientTls>, flag: &str) -> Result<Endpoint> {
    let endpoint =
        Endpoint::from_shared(url.to_string()).map_err(|e| anyhow!("endpoint {url:?}: {e}"))?;
    let https = endpoint.uri().scheme_str() == Some("https");
    match tls {
        Some(tls) if https => endpoint
            .tls_config(tls.tonic())
            .map_err(|e| anyhow!("endpoint {url:?}: TLS: {e}")),
        Some(_) => anyhow::bail!("endpoint {url:?}: TLS is configured, so use an https:// URL"),
        None if https => anyhow::bail!(
            "endpoint {url:?}: an https:// URL needs the CA of its certificate (--{flag}-ca)"
        ),
        None => Ok(endpoint),
    }
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag}: cannot read {}", path.display()))
}

fn private_key(pem: &[u8], flag: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| anyhow!("{flag}: no PEM private key ({e})"))
}

fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("not PEM certificates: {e}"))?;
    anyhow::ensure!(!certs.is_empty(), "no PEM certificate found");
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(r: Result<impl std::fmt::Debug>) -> String {
        format!("{:#}", r.expect_err("should fail"))
    }

    #[test]
    fn bad_files_fail_naming_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let missing = dir.path().join("missing.pem");
        let args = |cert: &Path, key: &Path, ca: Option<&Path>| ServerTlsArgs {
            tls_cert: Some(cert.into()),
            tls_key: Some(key.into()),
            tls_client_ca: ca.map(Into::into),
        };
        let e = err(args(&missing, &junk, None).load());
        assert!(
            e.starts_with("tls-cert: cannot read") && e.contains("missing.pem"),
            "{e}"
        );
        let e = err(args(&junk, &junk, None).load());
        assert!(e.starts_with("tls-cert: no PEM certificate"), "{e}");
        let e = err(args(&junk, &junk, Some(&missing)).load());
        assert!(e.starts_with("tls-client-ca: cannot read"), "{e}");
        assert!(ServerTlsArgs::default().load().unwrap().is_none());

        let e = err(ClientTls::from_files(
            "inference-tls",
            Some(&junk),
            None,
            None,
            None,
        ));
        assert!(e.starts_with("inference-tls-ca: no PEM certificate"), "{e}");
        let e = err(ClientTls::from_files(
            "inference-tls",
            Some(&junk),
            Some(&junk),
            None,
            None,
        ));
        assert!(
            e.contains("inference-tls-cert and inference-tls-key"),
            "{e}"
        );
        let e = err(ClientTls::from_files(
            "tls",
            None,
            Some(&junk),
            Some(&junk),
            None,
        ));
        assert!(e.starts_with("tls-ca: required"), "{e}");
        assert!(ClientTls::from_files("tls", None, None, None, None)
            .unwrap()
            .is_none());
    }

    #[test]
    fn url_scheme_and_tls_must_agree() {
        let e = err(endpoint("https://inference:8001", None, "inference-tls"));
        assert!(
            e.contains("needs the CA of its certificate (--inference-tls-ca)"),
            "{e}"
        );
        assert!(endpoint("http://inference:8001", None, "tls").is_ok());
        let e = err(endpoint("not a url", None, "tls"));
        assert!(e.contains("\"not a url\""), "{e}");
    }
}

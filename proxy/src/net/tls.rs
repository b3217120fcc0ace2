//! rustls configurations for both TLS roles the proxy plays: server towards MySQL clients and
//! client towards TiDB backends.
//!
//! Everything is built with the ring provider explicitly rather than the process default, so
//! the result does not depend on whether [`install_crypto_provider`] ran first.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    CertificateDer, DnsName, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime,
};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme, SupportedProtocolVersion,
};

use crate::config::{ClientTlsConfig, ServerTlsConfig};

const PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

const AUTO_CERT_SANS: [&str; 2] = ["localhost", "127.0.0.1"];
const AUTO_CERT_CN: &str = "tiproxy auto-generated";
const AUTO_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 60 * 60);
/// Backdating tolerates clients whose clock runs slightly behind ours.
const AUTO_CERT_BACKDATE: Duration = Duration::from_secs(60 * 60);

/// Why a TLS configuration could not be built. File problems name the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot parse PEM in {path}: {source}")]
    Pem { path: PathBuf, source: io::Error },
    #[error("no certificate found in {path}")]
    NoCertificate { path: PathBuf },
    #[error("no private key found in {path}")]
    NoPrivateKey { path: PathBuf },
    #[error("invalid certificate in {path}: {source}")]
    InvalidCertificate {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot use CA {path}: {source}")]
    InvalidCa {
        path: PathBuf,
        source: VerifierBuilderError,
    },
    #[error("certificate {cert} with key {key} cannot be used: {source}")]
    InvalidKeyPair {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration error: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Makes ring the process-wide rustls provider, for code that builds its own configs without
/// naming one (e.g. third-party clients). Safe to call more than once.
pub fn install_crypto_provider() {
    // Err only means some provider is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The TLS server config offered to clients, or `None` when server TLS is not configured.
///
/// With `ca` set, clients must present a certificate that chains to it.
pub fn server_config(cfg: &ServerTlsConfig) -> Result<Option<Arc<ServerConfig>>, TlsError> {
    if !cfg.enabled() {
        return Ok(None);
    }
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(PROTOCOL_VERSIONS)?;
    let builder = match &cfg.ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider)
                    .build()
                    .map_err(|source| TlsError::InvalidCa {
                        path: ca.clone(),
                        source,
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = match &cfg.cert {
        Some(cert) => {
            let key = key_path(cert, cfg.key.as_deref());
            builder
                .with_single_cert(load_certs(cert)?, load_key(key)?)
                .map_err(|source| TlsError::InvalidKeyPair {
                    cert: cert.clone(),
                    key: key.to_path_buf(),
                    source,
                })?
        }
        // `enabled()` without a cert means `auto_certs`.
        None => {
            let (certs, key) = generate_self_signed()?;
            builder.with_single_cert(certs, key)?
        }
    };
    Ok(Some(Arc::new(config)))
}

/// The TLS client config used towards backends, or `None` when backend TLS is not configured.
///
/// With `ca`, the certificate chain is verified but the hostname is not: backends are usually
/// addressed by IP and their certificates rarely list it (the reference TiProxy does the same).
/// With only `skip_ca`, any certificate is accepted and only encryption is gained.
pub fn client_config(cfg: &ClientTlsConfig) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    if !cfg.enabled() {
        return Ok(None);
    }
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match &cfg.ca {
        Some(ca) => {
            let inner = WebPkiServerVerifier::builder_with_provider(
                Arc::new(load_roots(ca)?),
                provider.clone(),
            )
            .build()
            .map_err(|source| TlsError::InvalidCa {
                path: ca.clone(),
                source,
            })?;
            Arc::new(ChainOnlyVerifier { inner })
        }
        None => Arc::new(AnyCertVerifier {
            algorithms: provider.signature_verification_algorithms,
        }),
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(PROTOCOL_VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match &cfg.cert {
        Some(cert) => {
            let key = key_path(cert, cfg.key.as_deref());
            builder
                .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                .map_err(|source| TlsError::InvalidKeyPair {
                    cert: cert.clone(),
                    key: key.to_path_buf(),
                    source,
                })?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Some(Arc::new(config)))
}

/// The name to present (and nominally verify) when connecting to `host`: an IP address when it
/// parses as one (brackets allowed), otherwise a DNS name, otherwise `localhost`.
pub fn server_name(host: &str) -> ServerName<'static> {
    let unbracketed = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return ServerName::IpAddress(ip.into());
    }
    match DnsName::try_from(host.to_owned()) {
        Ok(name) => ServerName::DnsName(name),
        // Hostnames are not verified (see `client_config`), so any syntactically valid SNI will
        // do for a host that is not a valid DNS name.
        Err(_) => match DnsName::try_from_str("localhost") {
            Ok(localhost) => ServerName::DnsName(localhost),
            // Unreachable: "localhost" is a valid DNS name.
            Err(_) => ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()),
        },
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A key may live in the certificate file itself when no separate key file is given.
fn key_path<'a>(cert: &'a Path, key: Option<&'a Path>) -> &'a Path {
    key.unwrap_or(cert)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Accepts PKCS#8, PKCS#1 (RSA) and SEC1 (EC) keys; the first key in the file wins.
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|source| TlsError::Pem {
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        })
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|source| TlsError::InvalidCertificate {
                path: path.to_path_buf(),
                source,
            })?;
    }
    Ok(roots)
}

/// A certificate chain and its private key.
type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// A fresh self-signed ECDSA P-256 certificate for `auto-certs`.
fn generate_self_signed() -> Result<Identity, TlsError> {
    let mut params = rcgen::CertificateParams::new(AUTO_CERT_SANS.map(String::from).to_vec())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, AUTO_CERT_CN);
    let now = SystemTime::now();
    params.not_before = now.checked_sub(AUTO_CERT_BACKDATE).unwrap_or(now).into();
    params.not_after = now.checked_add(AUTO_CERT_VALIDITY).unwrap_or(now).into();
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    ))
}

/// Verifies the chain with webpki but accepts a certificate that does not name the host.
#[derive(Debug)]
struct ChainOnlyVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnlyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the name only after the chain has verified, so a name error implies a
        // trusted chain.
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `skip-ca`: accepts any certificate, but still checks that the peer holds its private key so
/// the handshake itself stays sound.
#[derive(Debug)]
struct AnyCertVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    /// A file under the temp dir, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "tiproxy-tls-test-{}-{}-{name}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, contents).unwrap();
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A self-signed identity written to disk: (cert PEM file, key PEM file).
    fn identity(sans: &[&str]) -> (TempFile, TempFile) {
        let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(
            sans.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        (
            TempFile::new("cert.pem", &cert.pem()),
            TempFile::new("key.pem", &signing_key.serialize_pem()),
        )
    }

    fn skip_ca_client() -> Arc<ClientConfig> {
        client_config(&ClientTlsConfig {
            skip_ca: true,
            ..Default::default()
        })
        .unwrap()
        .unwrap()
    }

    /// Runs a handshake over an in-memory pipe and exchanges a few bytes each way.
    async fn exchange(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<()> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let serve = async {
            let mut tls = TlsAcceptor::from(server).accept(server_io).await?;
            let mut buf = [0; 4];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"ping");
            tls.write_all(b"pong").await?;
            tls.flush().await
        };
        let connect = async {
            let mut tls = TlsConnector::from(client).connect(name, client_io).await?;
            tls.write_all(b"ping").await?;
            tls.flush().await?;
            let mut buf = [0; 4];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"pong");
            Ok::<_, io::Error>(())
        };
        let (served, connected) = tokio::join!(serve, connect);
        connected?;
        served
    }

    #[test]
    fn disabled_configs_are_none() {
        assert!(server_config(&ServerTlsConfig::default())
            .unwrap()
            .is_none());
        assert!(client_config(&ClientTlsConfig::default())
            .unwrap()
            .is_none());
    }

    #[test]
    fn auto_cert_names_localhost_and_loopback() {
        let (certs, _key) = generate_self_signed().unwrap();
        assert_eq!(certs.len(), 1);
        let mut roots = RootCertStore::empty();
        roots.add(certs[0].clone()).unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap();
        for name in AUTO_CERT_SANS {
            verifier
                .verify_server_cert(&certs[0], &[], &server_name(name), &[], UnixTime::now())
                .unwrap();
        }
        // Still valid in 89 days, expired in 91.
        let day = Duration::from_secs(24 * 60 * 60);
        let at = |d: Duration| {
            UnixTime::since_unix_epoch(Duration::from_secs(UnixTime::now().as_secs()) + d)
        };
        verifier
            .verify_server_cert(&certs[0], &[], &server_name("localhost"), &[], at(89 * day))
            .unwrap();
        assert!(verifier
            .verify_server_cert(&certs[0], &[], &server_name("localhost"), &[], at(91 * day))
            .is_err());
    }

    #[tokio::test]
    async fn auto_cert_server_and_skip_ca_client_talk() {
        let server = server_config(&ServerTlsConfig {
            auto_certs: true,
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        exchange(server, skip_ca_client(), server_name("10.1.2.3"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn ca_verifies_chain_but_not_hostname() {
        let (cert, key) = identity(&["tidb.example"]);
        let server = server_config(&ServerTlsConfig {
            cert: Some(cert.0.clone()),
            key: Some(key.0.clone()),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        let client = client_config(&ClientTlsConfig {
            ca: Some(cert.0.clone()),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        exchange(server.clone(), client, server_name("10.9.8.7"))
            .await
            .unwrap();

        // The same CA with stock webpki verification fails on the name alone, so the success
        // above is the hostname check being skipped, not the name happening to match.
        let mut roots = RootCertStore::empty();
        roots.add(load_certs(&cert.0).unwrap().remove(0)).unwrap();
        let strict = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(PROTOCOL_VERSIONS)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let err = exchange(server.clone(), Arc::new(strict), server_name("10.9.8.7"))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err.get_ref()
                    .and_then(|e| e.downcast_ref::<rustls::Error>()),
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. }
                ))
            ),
            "{err}"
        );

        // A different CA must still be refused.
        let (other, _other_key) = identity(&["tidb.example"]);
        let wrong = client_config(&ClientTlsConfig {
            ca: Some(other.0.clone()),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        assert!(exchange(server, wrong, server_name("tidb.example"))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn server_ca_requires_client_certificates() {
        let (client_cert, client_key) = identity(&["client"]);
        let server = server_config(&ServerTlsConfig {
            ca: Some(client_cert.0.clone()),
            auto_certs: true,
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        let with_cert = client_config(&ClientTlsConfig {
            skip_ca: true,
            cert: Some(client_cert.0.clone()),
            key: Some(client_key.0.clone()),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        exchange(server.clone(), with_cert, server_name("localhost"))
            .await
            .unwrap();
        assert!(exchange(server, skip_ca_client(), server_name("localhost"))
            .await
            .is_err());
    }

    #[test]
    fn file_errors_name_the_file() {
        let missing = std::env::temp_dir().join("tiproxy-tls-test-does-not-exist.pem");
        let err = server_config(&ServerTlsConfig {
            cert: Some(missing.clone()),
            key: Some(missing.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err}");
        assert!(
            err.to_string().contains(&*missing.to_string_lossy()),
            "{err}"
        );

        let err = client_config(&ClientTlsConfig {
            ca: Some(missing.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            err.to_string().contains(&*missing.to_string_lossy()),
            "{err}"
        );

        let empty = TempFile::new("empty.pem", "");
        let err = client_config(&ClientTlsConfig {
            ca: Some(empty.0.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");

        let (cert, _key) = identity(&["localhost"]);
        let err = server_config(&ServerTlsConfig {
            cert: Some(cert.0.clone()),
            key: Some(cert.0.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err}");
        assert!(
            err.to_string().contains(&*cert.0.to_string_lossy()),
            "{err}"
        );
    }

    #[test]
    fn server_names() {
        assert!(matches!(server_name("10.0.0.1"), ServerName::IpAddress(_)));
        assert!(matches!(server_name("::1"), ServerName::IpAddress(_)));
        assert!(matches!(server_name("[::1]"), ServerName::IpAddress(_)));
        assert_eq!(
            server_name("tidb-0.tidb-peer"),
            ServerName::try_from("tidb-0.tidb-peer").unwrap()
        );
        assert_eq!(
            server_name("not a name!"),
            ServerName::try_from("localhost").unwrap()
        );
    }

    #[test]
    fn install_is_idempotent() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(CryptoProvider::get_default().is_some());
    }
}

//! Secrets the operator creates once and then leaves alone: the admin API token and, when
//! asked for, the session-token signing certificate shared with TiDB.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::ResourceExt;
use ring::rand::SecureRandom;

use super::object_meta;
use crate::api::TiProxy;
use crate::names;

/// TiDB verifies session tokens with the certificate it loaded, not against its validity
/// period, but keep it long-lived anyway so nothing else ever has to rotate it.
const SIGNING_CERT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot generate the session-token signing certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("the system random generator failed")]
    Random,
}

/// The Secret holding the bearer token the proxies require on their mutating admin endpoints.
/// Owned by the TiProxy.
pub fn api_token_secret(tp: &TiProxy) -> Result<Secret, SecretError> {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| SecretError::Random)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(Secret {
        metadata: object_meta(tp, names::api_token_secret(&tp.name_any())),
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([(
            names::API_TOKEN_KEY.to_string(),
            ByteString(token.into_bytes()),
        )])),
        ..Default::default()
    })
}

/// A `kubernetes.io/tls` Secret with a fresh self-signed ECDSA P-256 certificate for TiDB's
/// `security.session-token-signing-cert` / `-key`. It has no owner reference: TiDB servers
/// mount it, and deleting the TiProxy must not pull their signing key away.
pub fn session_token_secret(tp: &TiProxy) -> Result<Secret, SecretError> {
    let name = tp.name_any();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("tidb-session-token.{name}"),
    );
    let now = SystemTime::now();
    params.not_before = now.into();
    params.not_after = now.checked_add(SIGNING_CERT_VALIDITY).unwrap_or(now).into();
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;

    let mut metadata = object_meta(tp, names::session_token_secret(&name));
    metadata.owner_references = None;
    Ok(Secret {
        metadata,
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_string(), ByteString(cert.pem().into_bytes())),
            (
                "tls.key".to_string(),
                ByteString(key.serialize_pem().into_bytes()),
            ),
        ])),
        ..Default::default()
    })
}

//! Why a session ended, and what (if anything) the client is told.

use crate::backend::DialError;
use crate::net::proxy_protocol::ProxyProtocolError;
use crate::protocol::codec::Malformed;
use crate::protocol::conn::ConnError;
use crate::protocol::error_code;
use crate::protocol::response::ErrPacket;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client connection: {0}")]
    Client(ConnError),
    #[error("client sent a malformed packet: {0}")]
    ClientMalformed(Malformed),
    #[error("client TLS handshake failed: {0}")]
    ClientTls(std::io::Error),
    #[error("invalid PROXY protocol header from client: {0}")]
    ProxyProtocol(ProxyProtocolError),
    #[error("backend connection: {0}")]
    Backend(ConnError),
    #[error("backend connection: {0}")]
    BackendIo(std::io::Error),
    #[error("backend sent a malformed packet: {0}")]
    BackendMalformed(Malformed),
    #[error("backend TLS handshake failed: {0}")]
    BackendTls(std::io::Error),
    #[error("backend refused the connection: {0}")]
    BackendRefused(ErrPacket),
    #[error("{0}")]
    BackendCapability(&'static str),
    #[error(transparent)]
    NoBackend(DialError),
    #[error("authentication failed: {0}")]
    AuthFailed(ErrPacket),
    #[error("backend connection lost: {0}")]
    BackendLost(String),
    #[error("migration failed: {0}")]
    Migration(String),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("proxy is shutting down")]
    Shutdown,
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl SessionError {
    /// The ERR packet the client should get, when the client can still be told anything.
    /// Errors the backend already delivered to the client (a failed login) return `None`.
    pub fn client_error(&self) -> Option<ErrPacket> {
        let (code, state, message) = match self {
            SessionError::Client(_) | SessionError::ClientTls(_) | SessionError::AuthFailed(_) => {
                return None
            }
            SessionError::BackendRefused(err) => return Some(err.clone()),
            SessionError::ClientMalformed(m) => {
                (error_code::MALFORMED_PACKET, "HY000", m.to_string())
            }
            SessionError::ProxyProtocol(e) => (error_code::HANDSHAKE_ERROR, "08S01", e.to_string()),
            SessionError::NoBackend(e) => (
                error_code::BACKEND_UNAVAILABLE,
                "HY000",
                format!("No available TiDB instances, please make sure TiDB is available: {e}"),
            ),
            SessionError::BackendCapability(m) => {
                (error_code::BACKEND_UNAVAILABLE, "HY000", (*m).to_string())
            }
            SessionError::Backend(_)
            | SessionError::BackendLost(_)
            | SessionError::Migration(_)
            | SessionError::BackendIo(_)
            | SessionError::BackendMalformed(_)
            | SessionError::BackendTls(_) => (
                error_code::BACKEND_UNAVAILABLE,
                "HY000",
                format!("TiProxy lost the connection to TiDB: {self}"),
            ),
            SessionError::HandshakeTimeout => (
                error_code::HANDSHAKE_ERROR,
                "08S01",
                "Bad handshake: timed out".into(),
            ),
            SessionError::Shutdown => (
                error_code::SERVER_SHUTDOWN,
                "08S01",
                "Server shutdown in progress".into(),
            ),
            SessionError::Internal(m) => {
                (error_code::BACKEND_UNAVAILABLE, "HY000", (*m).to_string())
            }
        };
        Some(ErrPacket::new(code, state, message))
    }

    /// Whether this ending is routine (the client left, a login was refused) rather than a
    /// fault worth a warning.
    pub fn is_routine(&self) -> bool {
        match self {
            SessionError::Client(e) => e.is_disconnect(),
            SessionError::AuthFailed(_) | SessionError::Shutdown => true,
            _ => false,
        }
    }
}

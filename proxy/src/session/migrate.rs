//! Moving a session to another TiDB at a safe point: export the session with
//! `SHOW SESSION_STATES`, log in to the target with the signed session token (auth plugin
//! `tidb_session_token`), replay the state with `SET SESSION_STATES`. Any failure leaves the
//! session on its old backend, except a dead old backend, which ends the session.

use std::time::Duration;

use bytes::Bytes;

use super::auth::{compression_for, open_backend, start_backend_tls, ClientAddr, Identity};
use super::query::{quote, run_query, QueryError};
use super::{SessionContext, SessionError};
use crate::backend::Backend;
use crate::protocol::capability as cap;
use crate::protocol::conn::PacketConn;
use crate::protocol::handshake::{HandshakeResponse, SESSION_TOKEN_PLUGIN};
use crate::protocol::header;
use crate::protocol::response::ErrPacket;

/// Time allowed for the TCP connect to the target (one attempt: a failed migration is simply
/// retried later).
const DIAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Time allowed for the whole exchange with the target.
const TARGET_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The old backend is gone: the session cannot continue anywhere.
    #[error("old backend lost while exporting the session: {0}")]
    OldBackendLost(String),
    /// The old backend refused to export the session (ERROR 8146: temporary tables, locks...).
    #[error("backend refused to export the session: {0}")]
    Refused(ErrPacket),
    #[error("backend returned no session token (is security.session-token-signing-cert set?)")]
    NoToken,
    #[error("target {addr}: {reason}")]
    Target { addr: String, reason: String },
}

impl MigrateError {
    /// A short, stable cause for metrics.
    pub fn cause(&self) -> String {
        match self {
            MigrateError::OldBackendLost(_) => "old backend lost".into(),
            MigrateError::Refused(e) => e
                .message
                .strip_prefix("cannot migrate the current session: ")
                .unwrap_or(&e.message)
                .chars()
                .take(64)
                .collect(),
            MigrateError::NoToken => "no session token".into(),
            MigrateError::Target { .. } => "target failed".into(),
        }
    }
}

/// What the session needs to know about itself to log in elsewhere.
pub struct MigrationInput<'a> {
    pub identity: &'a Identity,
    /// Address of the backend the session is on.
    pub source: &'a str,
    pub client_addr: &'a ClientAddr,
    /// Capabilities in force on the current backend leg (reused for the new one).
    pub backend_caps: u32,
    /// Whether the current backend leg uses TLS (the new one will too).
    pub tls: bool,
    /// Whether packet numbers are rewritten on the backend leg (some leg is compressed).
    pub resequence: bool,
}

/// Exports the session from `old` and restores it on `target`. Returns the new backend leg
/// and the current database the session had.
pub async fn migrate(
    ctx: &SessionContext,
    old: &mut PacketConn,
    input: &MigrationInput<'_>,
    target: &Backend,
) -> Result<(PacketConn, Option<String>), MigrateError> {
    let deprecate_eof = input.backend_caps & cap::DEPRECATE_EOF != 0;
    let started = std::time::Instant::now();
    let target_err = |reason: String| MigrateError::Target {
        addr: target.addr.clone(),
        reason,
    };
    let mut response = HandshakeResponse {
        capability: input.backend_caps & !cap::SSL,
        max_packet_size: input.identity.max_packet_size,
        collation: input.identity.collation,
        user: input.identity.user.clone(),
        auth_plugin: SESSION_TOKEN_PLUGIN.into(),
        attrs: input.identity.attrs.clone(),
        zstd_level: input.identity.zstd_level,
        // Session migration is TiDB's; TiDB has no MariaDB extensions.
        mariadb_caps: 0,
        ..Default::default()
    };
    if input.tls {
        response.capability |= cap::SSL;
    }
    // Exporting the session and connecting to the target do not depend on each other: doing
    // them at once takes the connect (and TLS) off the pause the client sees, and the login as
    // well when a fresh token of the user is at hand. That login names no database: SET
    // SESSION_STATES restores the current one.
    let cached = ctx.session_tokens.fresh(&input.identity.user, input.source);
    let early_login = cached.as_ref().map(|token| HandshakeResponse {
        auth_data: token.clone(),
        ..response.clone()
    });
    let export = run_query(old, "SHOW SESSION_STATES", deprecate_eof);
    let connect = tokio::time::timeout(TARGET_TIMEOUT, async {
        let (conn, seq) = open_target(ctx, input, target, &response).await?;
        match &early_login {
            Some(login_packet) => login(conn, seq, login_packet, input)
                .await
                .map(Target::LoggedIn),
            None => Ok(Target::Greeted(conn, seq)),
        }
    });
    let (states, connected) = tokio::join!(export, connect);
    let states = match states {
        Ok(r) => r,
        Err(QueryError::Server(e)) => return Err(MigrateError::Refused(e)),
        Err(QueryError::Conn(e)) => return Err(MigrateError::OldBackendLost(e.to_string())),
    };
    let exported = started.elapsed();
    let state_json = states.first("Session_states").unwrap_or_default().to_vec();
    let token = match states.first("Session_token") {
        Some(t) if !t.is_empty() => Bytes::copy_from_slice(t),
        _ => return Err(MigrateError::NoToken),
    };
    ctx.session_tokens
        .remember(&input.identity.user, input.source, token.clone());
    let database = current_db(&state_json);
    response.auth_data = token;
    response.database.clone_from(&database);
    let connected = connected.map_err(|_| target_err("connect timed out".into()))?;
    let finish = async {
        let mut conn = match connected {
            Ok(Target::LoggedIn(conn)) => conn,
            Ok(Target::Greeted(conn, seq)) => login(conn, seq, &response, input).await?,
            Err(e) => {
                // A refused early login (the target's cert changed, say) leaves the session
                // where it is until the next attempt, which uses the token exported just now.
                if let (true, Some(stale)) = (e.refused, &cached) {
                    ctx.session_tokens
                        .forget(&input.identity.user, input.source, stale);
                }
                return Err(e);
            }
        };
        let logged_in = started.elapsed();
        let sql = format!(
            "SET SESSION_STATES {}",
            quote(&String::from_utf8_lossy(&state_json))
        );
        match run_query(&mut conn, &sql, deprecate_eof).await {
            Ok(_) => {
                tracing::debug!(
                    target_backend = %target.addr,
                    ?exported,
                    ?logged_in,
                    imported = ?started.elapsed(),
                    early_login = early_login.is_some(),
                    "migration steps (cumulative)"
                );
                Ok(conn)
            }
            Err(QueryError::Server(e)) => Err(format!("SET SESSION_STATES failed: {e}").into()),
            Err(QueryError::Conn(e)) => Err(format!("SET SESSION_STATES: {e}").into()),
        }
    };
    let conn = tokio::time::timeout(TARGET_TIMEOUT, finish)
        .await
        .map_err(|_| target_err("timed out".into()))?
        .map_err(|e| target_err(e.reason))?;
    Ok((conn, database))
}

/// The `current-db` of exported session states. Only that key is decoded: the states hold every
/// session variable (tens of KiB), and building a JSON tree of them sat on the client's pause.
fn current_db(states: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct States {
        #[serde(rename = "current-db")]
        current_db: Option<String>,
    }
    serde_json::from_slice::<States>(states)
        .ok()
        .and_then(|s| s.current_db)
        .filter(|d| !d.is_empty())
}

/// The new backend leg before the session's state is imported.
enum Target {
    /// Greeted; the login packet (with this sequence number) is still to be sent.
    Greeted(PacketConn, u8),
    LoggedIn(PacketConn),
}

/// Why the target could not be made ready.
struct TargetFailure {
    /// TiDB answered the token login with an error (rather than the connection failing).
    refused: bool,
    reason: String,
}

impl From<String> for TargetFailure {
    fn from(reason: String) -> Self {
        TargetFailure {
            refused: false,
            reason,
        }
    }
}

/// Sends the token login and reads TiDB's answer; from then on the leg speaks like the old one
/// (compression, packet renumbering).
async fn login(
    mut conn: PacketConn,
    seq: u8,
    response: &HandshakeResponse,
    input: &MigrationInput<'_>,
) -> Result<PacketConn, TargetFailure> {
    conn.write_packet(seq, &response.encode())
        .await
        .map_err(|e| e.to_string())?;
    let (_, reply) = conn
        .read_packet(super::auth::MAX_HANDSHAKE_PACKET)
        .await
        .map_err(|e| e.to_string())?;
    match reply.first().copied() {
        Some(header::OK) => {}
        Some(header::ERR) => {
            let e = ErrPacket::parse(&reply).map_err(|e| e.to_string())?;
            return Err(TargetFailure {
                refused: true,
                reason: format!("token login refused: {e}"),
            });
        }
        _ => return Err("unexpected reply to the token login".to_string().into()),
    }
    conn.set_compression(compression_for(
        response.capability,
        input.identity.zstd_level,
    ));
    conn.set_resequence(input.resequence);
    Ok(conn)
}

/// Connects to the target up to the point where the login packet goes: TCP, the PROXY header,
/// the greeting and TLS. Returns the connection and the sequence number of the login packet.
async fn open_target(
    ctx: &SessionContext,
    input: &MigrationInput<'_>,
    target: &Backend,
    response: &HandshakeResponse,
) -> Result<(PacketConn, u8), String> {
    let tcp = tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(&target.addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let (conn, greeting) = open_backend(ctx, tcp, input.client_addr)
        .await
        .map_err(|e| e.to_string())?;
    if input.backend_caps & cap::DEPRECATE_EOF != 0 && greeting.capability & cap::DEPRECATE_EOF == 0
    {
        return Err("target does not support CLIENT_DEPRECATE_EOF".to_string());
    }
    if !input.tls {
        return Ok((conn, 1));
    }
    let conn = start_backend_tls(ctx, conn, response, &target.addr)
        .await
        .map_err(|e| e.to_string())?;
    Ok((conn, 2))
}

impl From<MigrateError> for SessionError {
    fn from(e: MigrateError) -> Self {
        match e {
            MigrateError::OldBackendLost(reason) => SessionError::BackendLost(reason),
            other => SessionError::Migration(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::current_db;

    #[test]
    fn current_db_is_read_from_the_states() {
        let states = br#"{"sys-vars": {"autocommit": "ON", "sql_mode": "a,b"}, "current-db": "app", "prepared-stmts": {"1": {"text": "select ?"}}}"#;
        assert_eq!(current_db(states).as_deref(), Some("app"));
        assert_eq!(current_db(br#"{"sys-vars": {}}"#), None);
        assert_eq!(current_db(br#"{"current-db": ""}"#), None);
        assert_eq!(current_db(b"not json"), None);
    }
}

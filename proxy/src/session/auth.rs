//! Establishing a session: greet the client with the proxy's own salt, connect a backend and
//! let the backend authenticate the client through a forced auth switch. The proxy relays the
//! exchange packet by packet and never learns a password, so every auth plugin works.

use std::net::SocketAddr;

use bytes::Bytes;

use super::error::SessionError;
use super::SessionContext;
use tokio::sync::mpsc;

use crate::backend::{dial_any, Control, DialPolicy, SessionLease};
use crate::net::keepalive;
use crate::net::proxy_protocol::{self, Decoded, ProxyHeader};
use crate::net::stream::Stream;
use crate::protocol::capability as cap;
use crate::protocol::compress::{Algorithm, Compression};
use crate::protocol::conn::PacketConn;
use crate::protocol::handshake::{
    new_salt, ChangeUser, Greeting, HandshakeResponse, DEFAULT_COLLATION, NATIVE_PASSWORD,
    SSL_REQUEST_LEN, UNKNOWN_AUTH_PLUGIN,
};
use crate::protocol::header;
use crate::protocol::response::ErrPacket;
use crate::protocol::status;

/// Handshake packets are small; anything bigger is hostile or broken.
pub const MAX_HANDSHAKE_PACKET: usize = 1 << 20;

/// Who the session is, as needed to log in again elsewhere.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub user: String,
    pub database: Option<String>,
    pub collation: u8,
    pub attrs: Option<Bytes>,
    pub zstd_level: Option<u8>,
    pub max_packet_size: u32,
}

/// Where the client really is: the socket peer, unless a PROXY header said otherwise.
#[derive(Debug, Clone)]
pub struct ClientAddr {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub proxy_header: Option<ProxyHeader>,
}

impl ClientAddr {
    pub fn source(&self) -> SocketAddr {
        self.proxy_header.as_ref().map_or(self.peer, |h| h.source)
    }
}

/// A session whose client is authenticated by its first backend.
pub struct Established {
    pub client: PacketConn,
    pub backend: PacketConn,
    pub lease: SessionLease,
    pub control: mpsc::Receiver<Control>,
    /// Capabilities in force on the client leg.
    pub client_caps: u32,
    /// Capabilities in force on the backend leg.
    pub backend_caps: u32,
    pub identity: Identity,
}

/// Runs the whole handshake. `client_seq` tracks the client leg's sequence number so that the
/// caller can send an ERR packet that the client will accept if this fails.
pub async fn establish(
    ctx: &SessionContext,
    client: &mut Option<PacketConn>,
    addr: &mut ClientAddr,
    connection_id: u32,
    client_seq: &mut u8,
) -> Result<Established, SessionError> {
    let greeting = Greeting {
        server_version: ctx.server_version().to_string(),
        connection_id,
        salt: new_salt(),
        capability: if ctx.server_tls.is_some() {
            cap::PROXY_SUPPORTED
        } else {
            cap::PROXY_SUPPORTED & !cap::SSL
        },
        collation: DEFAULT_COLLATION,
        status: status::AUTOCOMMIT,
        auth_plugin: NATIVE_PASSWORD.into(),
        mariadb_caps: ctx.mariadb_caps(),
    };
    let conn = client
        .as_mut()
        .ok_or(SessionError::Internal("client leg missing"))?;
    conn.write_packet(0, &greeting.encode())
        .await
        .map_err(SessionError::Client)?;
    read_proxy_header(conn, addr).await?;

    let (seq, first) = conn
        .read_packet(MAX_HANDSHAKE_PACKET)
        .await
        .map_err(SessionError::Client)?;
    *client_seq = seq.wrapping_add(1);
    let prefix = HandshakeResponse::parse_prefix(&first).map_err(SessionError::ClientMalformed)?;
    let payload = if prefix.capability & cap::SSL != 0 && first.len() == SSL_REQUEST_LEN {
        let tls = ctx.server_tls.clone().ok_or(SessionError::Internal(
            "client requested TLS that was not offered",
        ))?;
        let plain = client
            .take()
            .ok_or(SessionError::Internal("client leg missing"))?;
        let (stream, early) = plain.into_parts();
        let stream = stream
            .accept_tls(tls, early)
            .await
            .map_err(SessionError::ClientTls)?;
        let conn = client.insert(PacketConn::new(stream, ctx.buffer_size()));
        let (seq, payload) = conn
            .read_packet(MAX_HANDSHAKE_PACKET)
            .await
            .map_err(SessionError::Client)?;
        *client_seq = seq.wrapping_add(1);
        payload
    } else {
        first
    };
    let response = HandshakeResponse::parse(&payload).map_err(SessionError::ClientMalformed)?;
    let client_caps = response.capability & greeting.capability;

    let (lease, control, mut backend, backend_greeting) = connect_backend(ctx, addr).await?;
    if client_caps & cap::DEPRECATE_EOF != 0
        && backend_greeting.capability & cap::DEPRECATE_EOF == 0
    {
        return Err(SessionError::BackendCapability(
            "the backend does not support CLIENT_DEPRECATE_EOF (TiDB >= 6.3 does)",
        ));
    }
    let use_tls = backend_tls(ctx, client_caps & cap::SSL != 0, &backend_greeting)?;
    let identity = Identity {
        user: response.user.clone(),
        database: response.database.clone(),
        collation: response.collation,
        attrs: response.attrs.clone(),
        zstd_level: response.zstd_level,
        max_packet_size: response.max_packet_size,
    };
    let mut backend_response = HandshakeResponse {
        capability: (client_caps | cap::PLUGIN_AUTH) & backend_greeting.capability & !cap::SSL,
        max_packet_size: response.max_packet_size,
        collation: response.collation,
        user: response.user.clone(),
        // The client's scramble is useless to the backend, but keeps "using password: YES/NO"
        // in the backend's error messages truthful.
        auth_data: response.auth_data.clone(),
        database: response.database.clone(),
        auth_plugin: UNKNOWN_AUTH_PLUGIN.into(),
        attrs: response.attrs.clone(),
        zstd_level: response.zstd_level,
        mariadb_caps: response.mariadb_caps & greeting.mariadb_caps,
    };
    ctx.remember_mariadb_caps(backend_greeting.mariadb_caps);
    if backend_response.mariadb_caps & !backend_greeting.mariadb_caps != 0 {
        // The client agreed to MariaDB extensions this backend lacks (backends changed kind).
        return Err(SessionError::BackendCapability(
            "the backend does not support the MariaDB protocol extensions announced to this client; reconnect",
        ));
    }
    if backend_response.capability & cap::ZSTD_COMPRESSION_ALGORITHM == 0 {
        backend_response.zstd_level = None;
    }
    let mut backend_seq = 1u8;
    if use_tls {
        backend_response.capability |= cap::SSL;
        backend = start_backend_tls(
            ctx,
            backend,
            &backend_response,
            lease.backend().addr.as_str(),
        )
        .await?;
        backend_seq = 2;
    }
    let backend_caps = backend_response.capability;
    backend
        .write_packet(backend_seq, &backend_response.encode())
        .await
        .map_err(SessionError::Backend)?;
    backend_seq = backend_seq.wrapping_add(1);

    let conn = client
        .as_mut()
        .ok_or(SessionError::Internal("client leg missing"))?;
    if let Some(err) = relay_auth(conn, &mut backend, client_seq, &mut backend_seq).await? {
        return Err(SessionError::AuthFailed(err));
    }
    let mut client_conn = client
        .take()
        .ok_or(SessionError::Internal("client leg missing"))?;
    client_conn.set_compression(compression_for(client_caps, response.zstd_level));
    backend.set_compression(compression_for(backend_caps, response.zstd_level));
    let resequence = client_conn.is_compressed() || backend.is_compressed();
    client_conn.set_resequence(resequence);
    backend.set_resequence(resequence);
    ctx.remember_server_version(&backend_greeting.server_version);
    Ok(Established {
        client: client_conn,
        backend,
        lease,
        control,
        client_caps,
        backend_caps,
        identity,
    })
}

/// Accepts an optional PROXY v2 header in front of the client's first packet.
async fn read_proxy_header(
    conn: &mut PacketConn,
    addr: &mut ClientAddr,
) -> Result<(), SessionError> {
    loop {
        match proxy_protocol::decode(conn.buffered()).map_err(SessionError::ProxyProtocol)? {
            Decoded::NotProxy => return Ok(()),
            Decoded::Incomplete => conn.fill().await.map_err(SessionError::Client)?,
            Decoded::Header { header, consumed } => {
                conn.consume(consumed);
                addr.proxy_header = header;
                return Ok(());
            }
        }
    }
}

/// Dials the best backend (retrying others), counts the session against it and reads its
/// greeting.
async fn connect_backend(
    ctx: &SessionContext,
    addr: &ClientAddr,
) -> Result<(SessionLease, mpsc::Receiver<Control>, PacketConn, Greeting), SessionError> {
    let policy = DialPolicy::new(ctx.connect_timeout());
    let (backend, tcp) = dial_any(&ctx.registry, &ctx.balance, policy)
        .await
        .map_err(SessionError::NoBackend)?;
    let (lease, control) = ctx.registry.register(backend);
    let (conn, greeting) = open_backend(ctx, tcp, addr).await?;
    Ok((lease, control, conn, greeting))
}

/// Starts the protocol on a fresh backend socket: the PROXY header when configured, then the
/// backend's greeting (an ERR greeting is returned as `BackendRefused`).
pub(super) async fn open_backend(
    ctx: &SessionContext,
    tcp: tokio::net::TcpStream,
    addr: &ClientAddr,
) -> Result<(PacketConn, Greeting), SessionError> {
    if let Err(e) = keepalive::apply(&tcp, &keepalive::Keepalive::BACKEND_HEALTHY) {
        tracing::debug!(error = %e, "cannot set backend keepalive");
    }
    let backend_addr = tcp.peer_addr().map_err(SessionError::BackendIo)?;
    let mut conn = PacketConn::new(Stream::Tcp(tcp), ctx.buffer_size());
    if ctx.config.proxy.send_proxy_protocol() {
        let header = ProxyHeader {
            source: addr.source(),
            destination: backend_addr,
            tlvs: addr
                .proxy_header
                .as_ref()
                .map(|h| h.tlvs.clone())
                .unwrap_or_default(),
        };
        conn.send_framed(&proxy_protocol::encode(&header))
            .await
            .map_err(SessionError::Backend)?;
    }
    let (_, payload) = conn
        .read_packet(MAX_HANDSHAKE_PACKET)
        .await
        .map_err(SessionError::Backend)?;
    if payload.first() == Some(&header::ERR) {
        let err = ErrPacket::parse(&payload).map_err(SessionError::BackendMalformed)?;
        return Err(SessionError::BackendRefused(err));
    }
    let greeting = Greeting::parse(&payload).map_err(SessionError::BackendMalformed)?;
    Ok((conn, greeting))
}

/// TLS goes to the backend when the client itself used TLS (so a cleartext password a plugin
/// sends stays encrypted end to end) or when `require-backend-tls` is set.
fn backend_tls(
    ctx: &SessionContext,
    client_tls: bool,
    greeting: &Greeting,
) -> Result<bool, SessionError> {
    let offered = greeting.capability & cap::SSL != 0;
    if ctx.config.security.require_backend_tls {
        if !offered {
            return Err(SessionError::BackendCapability(
                "require-backend-tls is set but the backend does not offer TLS",
            ));
        }
        return Ok(true);
    }
    Ok(client_tls && offered && ctx.sql_tls.is_some())
}

pub(super) async fn start_backend_tls(
    ctx: &SessionContext,
    mut backend: PacketConn,
    response: &HandshakeResponse,
    addr: &str,
) -> Result<PacketConn, SessionError> {
    let config = ctx.sql_tls.clone().ok_or(SessionError::Internal(
        "backend TLS without [security.sql-tls]",
    ))?;
    backend
        .write_packet(1, &response.encode_ssl_request())
        .await
        .map_err(SessionError::Backend)?;
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let (stream, early) = backend.into_parts();
    if !early.is_empty() {
        return Err(SessionError::BackendMalformed(
            crate::protocol::codec::Malformed("backend sent data before the TLS handshake"),
        ));
    }
    let stream = stream
        .connect_tls(config, crate::net::tls::server_name(host))
        .await
        .map_err(SessionError::BackendTls)?;
    Ok(PacketConn::new(stream, ctx.buffer_size()))
}

/// Relays an authentication exchange until the backend says OK or ERR. Every backend packet
/// goes to the client; the client answers each one except caching_sha2_password's
/// "fast auth succeeded", which the OK follows directly. Sequence numbers are rewritten per leg
/// because TLS may have added a packet on one leg only.
pub async fn relay_auth(
    client: &mut PacketConn,
    backend: &mut PacketConn,
    client_seq: &mut u8,
    backend_seq: &mut u8,
) -> Result<Option<ErrPacket>, SessionError> {
    loop {
        let (seq, packet) = backend
            .read_packet(MAX_HANDSHAKE_PACKET)
            .await
            .map_err(SessionError::Backend)?;
        *backend_seq = seq.wrapping_add(1);
        *client_seq = client
            .write_packet(*client_seq, &packet)
            .await
            .map_err(SessionError::Client)?;
        match packet.first().copied() {
            Some(header::OK) => return Ok(None),
            Some(header::ERR) => {
                return Ok(Some(
                    ErrPacket::parse(&packet).map_err(SessionError::BackendMalformed)?,
                ))
            }
            Some(header::AUTH_MORE_DATA) if packet[..] == [header::AUTH_MORE_DATA, 3] => continue,
            _ => {
                let (seq, reply) = client
                    .read_packet(MAX_HANDSHAKE_PACKET)
                    .await
                    .map_err(SessionError::Client)?;
                *client_seq = seq.wrapping_add(1);
                *backend_seq = backend
                    .write_packet(*backend_seq, &reply)
                    .await
                    .map_err(SessionError::Backend)?;
            }
        }
    }
}

/// Rewrites a client's `COM_CHANGE_USER` so the backend asks for a fresh authentication
/// (the client may have scrambled its password with the proxy's salt).
pub fn rewrite_change_user(
    request: &[u8],
    client_caps: u32,
    backend_caps: u32,
) -> Result<(ChangeUser, bytes::BytesMut), SessionError> {
    let mut change =
        ChangeUser::parse(request, client_caps).map_err(SessionError::ClientMalformed)?;
    let original = change.clone();
    change.auth_plugin = UNKNOWN_AUTH_PLUGIN.into();
    change.auth_data = Bytes::new();
    Ok((original, change.encode(backend_caps)))
}

/// The compression a leg uses after authentication, from the capabilities in force on it.
pub(super) fn compression_for(caps: u32, zstd_level: Option<u8>) -> Option<Compression> {
    if caps & cap::COMPRESS != 0 {
        Some(Compression::new(Algorithm::Zlib))
    } else if caps & cap::ZSTD_COMPRESSION_ALGORITHM != 0 {
        Some(Compression::new(Algorithm::Zstd {
            level: i32::from(zstd_level.unwrap_or(3)),
        }))
    } else {
        None
    }
}

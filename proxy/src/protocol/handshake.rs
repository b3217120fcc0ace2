//! Handshake-phase packets: the server greeting, the client's response (and its SSLRequest
//! prefix) and `COM_CHANGE_USER`.

use bytes::{BufMut, Bytes, BytesMut};

use super::capability as cap;
use super::codec::{put_lenenc, put_lenenc_bytes, put_nul_bytes, Malformed, Reader};
use super::status;

/// The plugin name the proxy puts in responses it forwards, so that the backend answers with an
/// AuthSwitchRequest for the user's real plugin and a fresh salt of its own: the client then
/// authenticates directly against the backend and the proxy never sees a usable credential.
pub const UNKNOWN_AUTH_PLUGIN: &str = "auth_unknown_plugin";
pub const NATIVE_PASSWORD: &str = "mysql_native_password";
pub const CACHING_SHA2_PASSWORD: &str = "caching_sha2_password";
pub const SESSION_TOKEN_PLUGIN: &str = "tidb_session_token";
/// MariaDB extended capabilities the proxy passes through: they change only contents the proxy
/// does not parse (column definitions may be omitted, or carry extra type info), never framing.
pub const MARIADB_EXTENDED_METADATA: u32 = 1 << 3;
pub const MARIADB_CACHE_METADATA: u32 = 1 << 4;
pub const MARIADB_PASSTHROUGH: u32 = MARIADB_EXTENDED_METADATA | MARIADB_CACHE_METADATA;
/// utf8mb4_bin, TiDB's default collation.
pub const DEFAULT_COLLATION: u8 = 46;

/// The initial handshake packet a server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub server_version: String,
    pub connection_id: u32,
    /// 20 bytes of salt.
    pub salt: Vec<u8>,
    pub capability: u32,
    pub collation: u8,
    pub status: u16,
    pub auth_plugin: String,
    /// MariaDB's extended capabilities (the upper 32 bits), present when the server does not
    /// set `CLIENT_MYSQL` (`LONG_PASSWORD`).
    pub mariadb_caps: u32,
}

impl Greeting {
    pub fn parse(payload: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(payload);
        let protocol = r.u8("greeting protocol")?;
        if protocol != 10 {
            return Err(Malformed("greeting protocol version is not 10"));
        }
        let server_version = String::from_utf8_lossy(r.nul_bytes()).into_owned();
        let connection_id = r.u32("greeting connection id")?;
        let mut salt = r.bytes(8, "greeting salt")?.to_vec();
        r.u8("greeting filler")?;
        let mut capability = u32::from(r.u16("greeting capability")?);
        let mut collation = DEFAULT_COLLATION;
        let mut status_flags = status::AUTOCOMMIT;
        let mut auth_plugin = String::new();
        let mut mariadb_caps = 0;
        if !r.is_empty() {
            collation = r.u8("greeting collation")?;
            status_flags = r.u16("greeting status")?;
            capability |= u32::from(r.u16("greeting capability")?) << 16;
            let salt_len = r.u8("greeting salt length")?;
            let reserved = r.bytes(10, "greeting reserved")?;
            if capability & cap::LONG_PASSWORD == 0 {
                mariadb_caps =
                    u32::from_le_bytes([reserved[6], reserved[7], reserved[8], reserved[9]]);
            }
            if capability & cap::SECURE_CONNECTION != 0 {
                let n = (usize::from(salt_len).saturating_sub(8)).max(13);
                let part2 = r.bytes(n.min(r.remaining()), "greeting salt")?;
                // The last byte of part 2 is a NUL terminator.
                let part2 = part2.strip_suffix(&[0]).unwrap_or(part2);
                salt.extend_from_slice(part2);
            }
            if capability & cap::PLUGIN_AUTH != 0 {
                auth_plugin = String::from_utf8_lossy(r.nul_bytes()).into_owned();
            }
        }
        Ok(Self {
            server_version,
            connection_id,
            salt,
            capability,
            collation,
            status: status_flags,
            auth_plugin,
            mariadb_caps,
        })
    }

    pub fn encode(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(96);
        out.put_u8(10);
        put_nul_bytes(&mut out, self.server_version.as_bytes());
        out.put_u32_le(self.connection_id);
        out.put_slice(&self.salt[..8]);
        out.put_u8(0);
        // Announcing MariaDB capabilities means not claiming CLIENT_MYSQL.
        let capability = if self.mariadb_caps != 0 {
            self.capability & !cap::LONG_PASSWORD
        } else {
            self.capability
        };
        out.put_u16_le(capability as u16);
        out.put_u8(self.collation);
        out.put_u16_le(self.status);
        out.put_u16_le((capability >> 16) as u16);
        out.put_u8(self.salt.len() as u8 + 1);
        out.put_bytes(0, 6);
        out.put_u32_le(self.mariadb_caps);
        put_nul_bytes(&mut out, &self.salt[8..]);
        put_nul_bytes(&mut out, self.auth_plugin.as_bytes());
        out
    }
}

/// A fresh 20-byte salt of printable-safe bytes (no NUL, no `$`), as servers generate.
pub fn new_salt() -> Vec<u8> {
    let mut salt: [u8; 20] = rand::random();
    for b in &mut salt {
        *b &= 0x7f;
        if *b == 0 || *b == b'$' {
            *b += 1;
        }
    }
    salt.to_vec()
}

/// `HandshakeResponse41`, or just its 32-byte SSLRequest prefix when `ssl_request` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandshakeResponse {
    pub capability: u32,
    pub max_packet_size: u32,
    pub collation: u8,
    pub user: String,
    pub auth_data: Bytes,
    pub database: Option<String>,
    pub auth_plugin: String,
    /// Raw connect attributes (the key/value list without its length prefix).
    pub attrs: Option<Bytes>,
    pub zstd_level: Option<u8>,
    /// MariaDB extended capabilities the client asks for (only when it does not set
    /// `CLIENT_MYSQL`).
    pub mariadb_caps: u32,
}

/// Length of an SSLRequest packet.
pub const SSL_REQUEST_LEN: usize = 32;

impl HandshakeResponse {
    /// Parses the fixed 32-byte prefix (enough for an SSLRequest).
    pub fn parse_prefix(payload: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(payload);
        let capability = r.u32("response capability")?;
        if capability & cap::PROTOCOL_41 == 0 {
            return Err(Malformed("client does not speak protocol 4.1"));
        }
        let max_packet_size = r.u32("response max packet size")?;
        let collation = r.u8("response collation")?;
        let filler = r.bytes(23, "response filler")?;
        let mariadb_caps = if capability & cap::LONG_PASSWORD == 0 {
            u32::from_le_bytes([filler[19], filler[20], filler[21], filler[22]])
        } else {
            0
        };
        Ok(Self {
            capability,
            max_packet_size,
            collation,
            mariadb_caps,
            ..Default::default()
        })
    }

    pub fn parse(payload: &[u8]) -> Result<Self, Malformed> {
        let mut resp = Self::parse_prefix(payload)?;
        let mut r = Reader::new(&payload[SSL_REQUEST_LEN..]);
        resp.user = String::from_utf8_lossy(r.nul_bytes()).into_owned();
        let c = resp.capability;
        resp.auth_data = if c & cap::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
            Bytes::copy_from_slice(r.lenenc_bytes("auth data")?)
        } else if c & cap::SECURE_CONNECTION != 0 {
            let n = r.u8("auth data length")?;
            Bytes::copy_from_slice(r.bytes(usize::from(n), "auth data")?)
        } else {
            Bytes::copy_from_slice(r.nul_bytes())
        };
        if c & cap::CONNECT_WITH_DB != 0 && !r.is_empty() {
            let db = r.nul_bytes();
            if !db.is_empty() {
                resp.database = Some(String::from_utf8_lossy(db).into_owned());
            }
        }
        if c & cap::PLUGIN_AUTH != 0 && !r.is_empty() {
            resp.auth_plugin = String::from_utf8_lossy(r.nul_bytes()).into_owned();
        }
        if c & cap::CONNECT_ATTRS != 0 && !r.is_empty() {
            resp.attrs = Some(Bytes::copy_from_slice(
                r.lenenc_bytes("connect attributes")?,
            ));
        }
        if c & cap::ZSTD_COMPRESSION_ALGORITHM != 0 && !r.is_empty() {
            resp.zstd_level = Some(r.u8("zstd level")?);
        }
        Ok(resp)
    }

    /// Encodes a full response. Flags that describe optional trailing fields are derived from
    /// what is present, so the result is always self-consistent.
    pub fn encode(&self) -> BytesMut {
        let mut c = self.capability | cap::PROTOCOL_41 | cap::SECURE_CONNECTION;
        if self.database.is_some() {
            c |= cap::CONNECT_WITH_DB;
        } else {
            c &= !cap::CONNECT_WITH_DB;
        }
        if !self.auth_plugin.is_empty() {
            c |= cap::PLUGIN_AUTH;
        }
        if self.attrs.is_some() {
            c |= cap::CONNECT_ATTRS;
        } else {
            c &= !cap::CONNECT_ATTRS;
        }
        if self.auth_data.len() > 250 {
            c |= cap::PLUGIN_AUTH_LENENC_CLIENT_DATA;
        }
        if self.zstd_level.is_none() {
            c &= !cap::ZSTD_COMPRESSION_ALGORITHM;
        }
        let mut out = BytesMut::with_capacity(64 + self.user.len() + self.auth_data.len());
        if self.mariadb_caps != 0 {
            c &= !cap::LONG_PASSWORD;
        }
        out.put_u32_le(c);
        out.put_u32_le(self.max_packet_size);
        out.put_u8(self.collation);
        out.put_bytes(0, 19);
        out.put_u32_le(self.mariadb_caps);
        put_nul_bytes(&mut out, self.user.as_bytes());
        if c & cap::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
            put_lenenc_bytes(&mut out, &self.auth_data);
        } else {
            out.put_u8(self.auth_data.len() as u8);
            out.put_slice(&self.auth_data);
        }
        if let Some(db) = &self.database {
            put_nul_bytes(&mut out, db.as_bytes());
        }
        if c & cap::PLUGIN_AUTH != 0 {
            put_nul_bytes(&mut out, self.auth_plugin.as_bytes());
        }
        if let Some(attrs) = &self.attrs {
            put_lenenc_bytes(&mut out, attrs);
        }
        if let Some(level) = self.zstd_level {
            out.put_u8(level);
        }
        out
    }

    /// The SSLRequest prefix for this response.
    pub fn encode_ssl_request(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(SSL_REQUEST_LEN);
        let mut c = self.capability | cap::SSL;
        if self.mariadb_caps != 0 {
            c &= !cap::LONG_PASSWORD;
        }
        out.put_u32_le(c);
        out.put_u32_le(self.max_packet_size);
        out.put_u8(self.collation);
        out.put_bytes(0, 19);
        out.put_u32_le(self.mariadb_caps);
        out
    }
}

/// `COM_CHANGE_USER`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeUser {
    pub user: String,
    pub auth_data: Bytes,
    pub database: Option<String>,
    pub collation: Option<u16>,
    pub auth_plugin: String,
    pub attrs: Option<Bytes>,
}

impl ChangeUser {
    /// Parses the packet (including the command byte) sent by a client with `capability`.
    pub fn parse(payload: &[u8], capability: u32) -> Result<Self, Malformed> {
        let mut r = Reader::new(payload);
        r.u8("command")?;
        let user = String::from_utf8_lossy(r.nul_bytes()).into_owned();
        let auth_data = if capability & cap::SECURE_CONNECTION != 0 {
            let n = r.u8("auth data length")?;
            Bytes::copy_from_slice(r.bytes(usize::from(n), "auth data")?)
        } else {
            Bytes::copy_from_slice(r.nul_bytes())
        };
        let db = r.nul_bytes();
        let database = (!db.is_empty()).then(|| String::from_utf8_lossy(db).into_owned());
        let mut out = Self {
            user,
            auth_data,
            database,
            ..Default::default()
        };
        if r.remaining() >= 2 {
            out.collation = Some(r.u16("collation")?);
        }
        if capability & cap::PLUGIN_AUTH != 0 && !r.is_empty() {
            out.auth_plugin = String::from_utf8_lossy(r.nul_bytes()).into_owned();
        }
        if capability & cap::CONNECT_ATTRS != 0 && !r.is_empty() {
            out.attrs = Some(Bytes::copy_from_slice(
                r.lenenc_bytes("connect attributes")?,
            ));
        }
        Ok(out)
    }

    pub fn encode(&self, capability: u32) -> BytesMut {
        let mut out = BytesMut::with_capacity(64 + self.user.len());
        out.put_u8(super::command::CHANGE_USER);
        put_nul_bytes(&mut out, self.user.as_bytes());
        out.put_u8(self.auth_data.len() as u8);
        out.put_slice(&self.auth_data);
        put_nul_bytes(
            &mut out,
            self.database.as_deref().unwrap_or_default().as_bytes(),
        );
        out.put_u16_le(self.collation.unwrap_or(u16::from(DEFAULT_COLLATION)));
        if capability & cap::PLUGIN_AUTH != 0 {
            put_nul_bytes(&mut out, self.auth_plugin.as_bytes());
        }
        if capability & cap::CONNECT_ATTRS != 0 {
            match &self.attrs {
                Some(attrs) => put_lenenc_bytes(&mut out, attrs),
                None => put_lenenc(&mut out, 0),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_round_trip() {
        let g = Greeting {
            server_version: "8.0.11-TiDB-v8.5.0".into(),
            connection_id: 42,
            salt: new_salt(),
            capability: cap::PROXY_SUPPORTED,
            collation: DEFAULT_COLLATION,
            status: status::AUTOCOMMIT,
            auth_plugin: NATIVE_PASSWORD.into(),
            mariadb_caps: 0,
        };
        assert_eq!(Greeting::parse(&g.encode()).unwrap(), g);
        let maria = Greeting {
            capability: cap::PROXY_SUPPORTED & !cap::LONG_PASSWORD,
            mariadb_caps: MARIADB_CACHE_METADATA,
            ..g
        };
        assert_eq!(Greeting::parse(&maria.encode()).unwrap(), maria);
    }

    #[test]
    fn response_round_trip_with_long_token() {
        let r = HandshakeResponse {
            capability: cap::PROTOCOL_41 | cap::PLUGIN_AUTH | cap::SECURE_CONNECTION,
            max_packet_size: 1 << 24,
            collation: 45,
            user: "root".into(),
            auth_data: Bytes::from(vec![b'x'; 400]),
            database: Some("test".into()),
            auth_plugin: SESSION_TOKEN_PLUGIN.into(),
            attrs: Some(Bytes::from_static(b"\x04_pid\x0212")),
            zstd_level: None,
            mariadb_caps: MARIADB_CACHE_METADATA,
        };
        let parsed = HandshakeResponse::parse(&r.encode()).unwrap();
        assert_eq!(parsed.mariadb_caps, MARIADB_CACHE_METADATA);
        assert_eq!(parsed.capability & cap::LONG_PASSWORD, 0);
        assert_eq!(parsed.user, r.user);
        assert_eq!(parsed.auth_data, r.auth_data);
        assert_eq!(parsed.database, r.database);
        assert_eq!(parsed.auth_plugin, r.auth_plugin);
        assert_eq!(parsed.attrs, r.attrs);
        assert!(parsed.capability & cap::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0);
    }

    #[test]
    fn change_user_round_trip() {
        let caps =
            cap::PROTOCOL_41 | cap::SECURE_CONNECTION | cap::PLUGIN_AUTH | cap::CONNECT_ATTRS;
        let c = ChangeUser {
            user: "u".into(),
            auth_data: Bytes::from_static(b"12345678901234567890"),
            database: Some("db".into()),
            collation: Some(45),
            auth_plugin: NATIVE_PASSWORD.into(),
            attrs: Some(Bytes::from_static(b"\x01a\x01b")),
        };
        assert_eq!(ChangeUser::parse(&c.encode(caps), caps).unwrap(), c);
    }

    #[test]
    fn truncated_packets_are_errors_not_panics() {
        let full = HandshakeResponse {
            capability: cap::PROXY_SUPPORTED,
            user: "someone".into(),
            auth_data: Bytes::from_static(b"abcdefgh"),
            database: Some("db".into()),
            auth_plugin: NATIVE_PASSWORD.into(),
            attrs: Some(Bytes::from_static(b"\x01a\x01b")),
            ..Default::default()
        }
        .encode();
        for n in 0..full.len() {
            let _ = HandshakeResponse::parse(&full[..n]);
        }
        let greeting = Greeting {
            server_version: "v".into(),
            connection_id: 1,
            salt: new_salt(),
            capability: cap::PROXY_SUPPORTED,
            collation: 46,
            status: 2,
            auth_plugin: NATIVE_PASSWORD.into(),
            mariadb_caps: 0,
        }
        .encode();
        for n in 0..greeting.len() {
            let _ = Greeting::parse(&greeting[..n]);
        }
        for n in 0..20 {
            let _ = ChangeUser::parse(&vec![0xFFu8; n], cap::PROXY_SUPPORTED);
        }
    }
}

//! The MySQL client/server protocol as far as a forwarding proxy needs it: packet framing,
//! compression, the handshake packets and the few response packets whose contents matter
//! (OK, ERR, EOF). Everything else is forwarded without being parsed.

pub mod buffer_pool;
pub mod codec;
pub mod compress;
pub mod conn;
pub mod handshake;
pub mod response;

/// Largest payload of one physical packet; a payload of exactly this length is continued by
/// the next packet.
pub const MAX_PAYLOAD: usize = 0xFF_FFFF;

/// Capability flags (`CLIENT_*`).
pub mod capability {
    pub const LONG_PASSWORD: u32 = 1;
    pub const FOUND_ROWS: u32 = 1 << 1;
    pub const LONG_FLAG: u32 = 1 << 2;
    pub const CONNECT_WITH_DB: u32 = 1 << 3;
    pub const NO_SCHEMA: u32 = 1 << 4;
    pub const COMPRESS: u32 = 1 << 5;
    pub const ODBC: u32 = 1 << 6;
    pub const LOCAL_FILES: u32 = 1 << 7;
    pub const IGNORE_SPACE: u32 = 1 << 8;
    pub const PROTOCOL_41: u32 = 1 << 9;
    pub const INTERACTIVE: u32 = 1 << 10;
    pub const SSL: u32 = 1 << 11;
    pub const IGNORE_SIGPIPE: u32 = 1 << 12;
    pub const TRANSACTIONS: u32 = 1 << 13;
    pub const RESERVED: u32 = 1 << 14;
    pub const SECURE_CONNECTION: u32 = 1 << 15;
    pub const MULTI_STATEMENTS: u32 = 1 << 16;
    pub const MULTI_RESULTS: u32 = 1 << 17;
    pub const PS_MULTI_RESULTS: u32 = 1 << 18;
    pub const PLUGIN_AUTH: u32 = 1 << 19;
    pub const CONNECT_ATTRS: u32 = 1 << 20;
    pub const PLUGIN_AUTH_LENENC_CLIENT_DATA: u32 = 1 << 21;
    pub const CAN_HANDLE_EXPIRED_PASSWORDS: u32 = 1 << 22;
    pub const SESSION_TRACK: u32 = 1 << 23;
    pub const DEPRECATE_EOF: u32 = 1 << 24;
    pub const OPTIONAL_RESULTSET_METADATA: u32 = 1 << 25;
    pub const ZSTD_COMPRESSION_ALGORITHM: u32 = 1 << 26;
    pub const QUERY_ATTRIBUTES: u32 = 1 << 27;

    /// What the proxy offers clients. Flags that would change the shape of packets the proxy
    /// must understand (session tracking, optional metadata, query attributes) are left out,
    /// so clients and backends always speak the framing the proxy parses.
    pub const PROXY_SUPPORTED: u32 = LONG_PASSWORD
        | FOUND_ROWS
        | LONG_FLAG
        | CONNECT_WITH_DB
        | ODBC
        | LOCAL_FILES
        | INTERACTIVE
        | SSL
        | IGNORE_SIGPIPE
        | TRANSACTIONS
        | RESERVED
        | SECURE_CONNECTION
        | MULTI_STATEMENTS
        | MULTI_RESULTS
        | PS_MULTI_RESULTS
        | PLUGIN_AUTH
        | CONNECT_ATTRS
        | PLUGIN_AUTH_LENENC_CLIENT_DATA
        | CAN_HANDLE_EXPIRED_PASSWORDS
        | COMPRESS
        | ZSTD_COMPRESSION_ALGORITHM
        | PROTOCOL_41
        | DEPRECATE_EOF;
}

/// Server status flags (`SERVER_STATUS_*`) carried by OK and EOF packets.
pub mod status {
    pub const IN_TRANS: u16 = 0x0001;
    pub const AUTOCOMMIT: u16 = 0x0002;
    pub const MORE_RESULTS_EXISTS: u16 = 0x0008;
    pub const CURSOR_EXISTS: u16 = 0x0040;
    pub const LAST_ROW_SENT: u16 = 0x0080;
}

/// Command bytes (`COM_*`).
pub mod command {
    pub const QUIT: u8 = 0x01;
    pub const INIT_DB: u8 = 0x02;
    pub const QUERY: u8 = 0x03;
    pub const FIELD_LIST: u8 = 0x04;
    pub const STATISTICS: u8 = 0x09;
    pub const PROCESS_INFO: u8 = 0x0a;
    pub const PING: u8 = 0x0e;
    pub const CHANGE_USER: u8 = 0x11;
    pub const BINLOG_DUMP: u8 = 0x12;
    pub const REGISTER_SLAVE: u8 = 0x15;
    pub const STMT_PREPARE: u8 = 0x16;
    pub const STMT_EXECUTE: u8 = 0x17;
    pub const STMT_SEND_LONG_DATA: u8 = 0x18;
    pub const STMT_CLOSE: u8 = 0x19;
    pub const STMT_RESET: u8 = 0x1a;
    pub const SET_OPTION: u8 = 0x1b;
    pub const STMT_FETCH: u8 = 0x1c;
    pub const BINLOG_DUMP_GTID: u8 = 0x1e;
    pub const RESET_CONNECTION: u8 = 0x1f;

    /// The name used in metrics and logs, matching TiDB's command names.
    pub fn name(cmd: u8) -> &'static str {
        match cmd {
            0x00 => "Sleep",
            QUIT => "Quit",
            INIT_DB => "InitDB",
            QUERY => "Query",
            FIELD_LIST => "FieldList",
            0x05 => "CreateDB",
            0x06 => "DropDB",
            0x07 => "Refresh",
            0x08 => "Shutdown",
            STATISTICS => "Statistics",
            PROCESS_INFO => "ProcessInfo",
            0x0c => "ProcessKill",
            0x0d => "Debug",
            PING => "Ping",
            CHANGE_USER => "ChangeUser",
            STMT_PREPARE => "StmtPrepare",
            STMT_EXECUTE => "StmtExecute",
            STMT_SEND_LONG_DATA => "StmtSendLongData",
            STMT_CLOSE => "StmtClose",
            STMT_RESET => "StmtReset",
            SET_OPTION => "SetOption",
            STMT_FETCH => "StmtFetch",
            RESET_CONNECTION => "ResetConnection",
            _ => "Other",
        }
    }
}

/// Packet header bytes.
pub mod header {
    pub const OK: u8 = 0x00;
    pub const AUTH_MORE_DATA: u8 = 0x01;
    pub const LOCAL_INFILE: u8 = 0xFB;
    pub const EOF: u8 = 0xFE;
    pub const ERR: u8 = 0xFF;
}

/// MySQL error codes the proxy itself sends.
pub mod error_code {
    pub const CON_COUNT_ERROR: u16 = 1040;
    pub const HANDSHAKE_ERROR: u16 = 1043;
    pub const NOT_SUPPORTED_AUTH_MODE: u16 = 1251;
    pub const NET_PACKET_TOO_LARGE: u16 = 1153;
    pub const NET_READ_INTERRUPTED: u16 = 1159;
    pub const MALFORMED_PACKET: u16 = 2027;
    pub const UNKNOWN_COM_ERROR: u16 = 1047;
    /// "Server shutdown in progress": the proxy is closing.
    pub const SERVER_SHUTDOWN: u16 = 1053;
    /// Reused for "no backend reachable", like the reference proxy.
    pub const BACKEND_UNAVAILABLE: u16 = 1105;
}

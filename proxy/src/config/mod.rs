//! The proxy's TOML configuration: the schema, its defaults and its validation.
//!
//! Key names follow the reference TiProxy where it has them. Unknown keys are rejected so that a
//! typo never silently falls back to a default.

mod backend;
pub mod reload;
mod token;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use backend::BackendAddr;
pub use token::{ApiToken, TOKEN_FILE_MAX_BYTES};

/// Everything the proxy reads from its config file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    pub proxy: ProxyConfig,
    pub api: ApiConfig,
    pub security: SecurityConfig,
    pub log: LogConfig,
    pub balance: BalanceSection,
    pub health: HealthSection,
    /// The proxy's own labels; `zone` makes backends in the same zone preferred.
    pub labels: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct BalanceSection {
    /// Keep sessions on backends whose value of this label equals the proxy's (`[labels]`).
    pub label_name: String,
    /// Seconds within which every session leaves a draining or unhealthy backend.
    pub status_drain_seconds: f64,
    /// Session-count imbalance tolerated before sessions move (must be > 1).
    pub conn_count_ratio_threshold: f64,
    /// Sessions per second moved for connection-count balance; 0 = the built-in formula.
    pub conn_migrations_per_second: f64,
}

impl Default for BalanceSection {
    fn default() -> Self {
        Self {
            label_name: String::new(),
            status_drain_seconds: 5.0,
            conn_count_ratio_threshold: 1.2,
            conn_migrations_per_second: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct HealthSection {
    /// Seconds between health probes of each backend.
    pub interval: f64,
    /// Seconds each probe (status port, SQL port) may take.
    pub timeout: f64,
    /// Consecutive slow probes before a backend counts as unhealthy.
    pub slow_probes_to_unhealthy: u32,
    /// Consecutive good probes before an unhealthy backend takes sessions again.
    pub successes_to_recover: u32,
}

impl Default for HealthSection {
    fn default() -> Self {
        Self {
            interval: 3.0,
            timeout: 2.0,
            slow_probes_to_unhealthy: 3,
            successes_to_recover: 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ProxyConfig {
    /// SQL listen address.
    pub addr: String,
    /// Static backends: `"host:port"`, or a table `{ addr = "host:port", status-addr = "host:port" }`.
    pub backends: Vec<BackendAddr>,
    /// Maximum concurrent client connections; 0 means unlimited.
    pub max_connections: u64,
    /// Initial size of each per-connection buffer, in bytes; 0 means 32 KiB.
    pub conn_buffer_size: usize,
    /// `""` (off) or `"v2"`: send a PROXY protocol v2 header to backends.
    pub proxy_protocol: String,
    /// Seconds to keep serving after SIGTERM before the listener closes.
    pub graceful_wait_before_shutdown: u64,
    /// Seconds to wait for sessions to reach a transaction boundary during shutdown.
    pub graceful_close_conn_timeout: u64,
    /// Seconds a client or backend has to finish its handshake.
    pub handshake_timeout: u64,
    /// Seconds allowed for connecting to backends (all retries) before the client gets an error.
    pub connect_timeout: u64,
    /// The server version announced to clients before any backend has been seen.
    pub server_version: String,
    /// PD (etcd) endpoints to discover TiDB servers from, comma-separated; empty = off.
    pub pd_addrs: String,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            addr: "0.0.0.0:6000".into(),
            backends: Vec::new(),
            max_connections: 0,
            conn_buffer_size: 0,
            proxy_protocol: String::new(),
            graceful_wait_before_shutdown: 0,
            graceful_close_conn_timeout: 15,
            handshake_timeout: 15,
            connect_timeout: 15,
            server_version: "8.0.11-TiDB-v8.5.0".into(),
            pd_addrs: String::new(),
        }
    }
}

impl ProxyConfig {
    pub const DEFAULT_CONN_BUFFER_SIZE: usize = 32 * 1024;

    /// The buffer size with the `0 = default` rule applied.
    pub fn buffer_size(&self) -> usize {
        if self.conn_buffer_size == 0 {
            Self::DEFAULT_CONN_BUFFER_SIZE
        } else {
            self.conn_buffer_size
        }
    }

    pub fn send_proxy_protocol(&self) -> bool {
        self.proxy_protocol == "v2"
    }

    pub fn pd_endpoints(&self) -> Vec<String> {
        self.pd_addrs
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ApiConfig {
    pub addr: String,
    /// File holding the bearer token that mutating endpoints (`PUT /api/v1/backends`) require;
    /// empty = no token. Re-read every poll so that a rotated Kubernetes Secret takes effect.
    pub token_file: PathBuf,
    /// `/readyz` answers 503 until at least one backend is active and usable, so a fresh pod
    /// is not put behind a Service before it has somewhere to send clients.
    pub ready_requires_backend: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            addr: "0.0.0.0:3080".into(),
            token_file: PathBuf::new(),
            ready_requires_backend: false,
        }
    }
}

impl ApiConfig {
    /// The configured token file, or `None` when mutating endpoints are open.
    pub fn token_path(&self) -> Option<&Path> {
        (!self.token_file.as_os_str().is_empty()).then_some(self.token_file.as_path())
    }

    /// Reads the token file when one is configured. The error names the key and the path.
    pub fn load_token(&self) -> Result<Option<ApiToken>, ConfigError> {
        self.token_path().map(ApiToken::read).transpose()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct SecurityConfig {
    /// TLS offered to clients.
    pub server_tls: ServerTlsConfig,
    /// TLS used towards backends' SQL ports.
    pub sql_tls: ClientTlsConfig,
    /// Always use TLS to backends and refuse backends that do not offer it.
    pub require_backend_tls: bool,
}

/// A TLS server identity. TLS is offered when `cert`+`key` are set or `auto-certs` is on.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerTlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// When set, clients must present a certificate signed by this CA.
    pub ca: Option<PathBuf>,
    /// Generate a self-signed certificate at start-up when no `cert` is given.
    pub auto_certs: bool,
}

impl ServerTlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.auto_certs
    }
}

/// A TLS client identity. TLS is used when `ca` is set or `skip-ca` is on.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClientTlsConfig {
    /// Verify the backend's certificate chain against this CA.
    pub ca: Option<PathBuf>,
    /// Client certificate for mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Encrypt without verifying the backend's certificate.
    pub skip_ca: bool,
}

impl ClientTlsConfig {
    pub fn enabled(&self) -> bool {
        self.ca.is_some() || self.skip_ca
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// Why a config file was refused; the message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    /// `api.token-file` is set but gives no usable token.
    #[error("api.token-file {path}: {message}")]
    TokenFile { path: PathBuf, message: String },
}

/// `value > min`, false for NaN.
fn greater(value: f64, min: f64) -> bool {
    value.partial_cmp(&min) == Some(std::cmp::Ordering::Greater)
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.proxy;
        p.addr
            .parse::<SocketAddr>()
            .map_err(|e| invalid("proxy.addr", format!("{:?}: {e}", p.addr)))?;
        self.api
            .addr
            .parse::<SocketAddr>()
            .map_err(|e| invalid("api.addr", format!("{:?}: {e}", self.api.addr)))?;
        for backend in &p.backends {
            backend.validate()?;
        }
        if p.conn_buffer_size != 0 && !(1024..=16 * 1024 * 1024).contains(&p.conn_buffer_size) {
            return Err(invalid(
                "proxy.conn-buffer-size",
                format!(
                    "{} is outside 1024..=16777216 (0 means the default)",
                    p.conn_buffer_size
                ),
            ));
        }
        if !matches!(p.proxy_protocol.as_str(), "" | "v2") {
            return Err(invalid(
                "proxy.proxy-protocol",
                format!("{:?}: expected \"\" or \"v2\"", p.proxy_protocol),
            ));
        }
        if p.handshake_timeout == 0 {
            return Err(invalid(
                "proxy.handshake-timeout",
                "must be at least 1 second",
            ));
        }
        if p.connect_timeout == 0 {
            return Err(invalid(
                "proxy.connect-timeout",
                "must be at least 1 second",
            ));
        }
        if p.server_version.is_empty() || p.server_version.contains('\0') {
            return Err(invalid(
                "proxy.server-version",
                "must be non-empty and contain no NUL byte",
            ));
        }
        let b = &self.balance;
        if !greater(b.conn_count_ratio_threshold, 1.0) {
            return Err(invalid(
                "balance.conn-count-ratio-threshold",
                "must be greater than 1",
            ));
        }
        if !greater(b.status_drain_seconds, 0.0) {
            return Err(invalid("balance.status-drain-seconds", "must be positive"));
        }
        if b.conn_migrations_per_second < 0.0 {
            return Err(invalid(
                "balance.conn-migrations-per-second",
                "must not be negative",
            ));
        }
        let h = &self.health;
        if !greater(h.interval, 0.099) || !greater(h.timeout, 0.099) {
            return Err(invalid(
                "health",
                "interval and timeout must be at least 0.1 seconds",
            ));
        }
        if h.slow_probes_to_unhealthy == 0 || h.successes_to_recover == 0 {
            return Err(invalid(
                "health",
                "slow-probes-to-unhealthy and successes-to-recover must be at least 1",
            ));
        }
        let s = &self.security;
        if s.server_tls.cert.is_some() != s.server_tls.key.is_some() {
            return Err(invalid(
                "security.server-tls",
                "`cert` and `key` must be set together",
            ));
        }
        if s.sql_tls.cert.is_some() != s.sql_tls.key.is_some() {
            return Err(invalid(
                "security.sql-tls",
                "`cert` and `key` must be set together",
            ));
        }
        if s.require_backend_tls && !s.sql_tls.enabled() {
            return Err(invalid(
                "security.require-backend-tls",
                "needs [security.sql-tls] with `ca` or `skip-ca = true`",
            ));
        }
        if !matches!(
            self.log.level.as_str(),
            "error" | "warn" | "info" | "debug" | "trace"
        ) {
            return Err(invalid(
                "log.level",
                format!(
                    "{:?}: expected error, warn, info, debug or trace",
                    self.log.level
                ),
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(invalid(
                "log.format",
                format!("{:?}: expected text or json", self.log.format),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_reference_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.proxy.addr, "0.0.0.0:6000");
        assert_eq!(c.api.addr, "0.0.0.0:3080");
        assert_eq!(c.proxy.graceful_close_conn_timeout, 15);
        assert_eq!(c.proxy.buffer_size(), 32 * 1024);
        assert_eq!(c.log.level, "info");
        assert!(!c.security.server_tls.enabled());
        assert!(!c.security.sql_tls.enabled());
        assert_eq!(c.api.token_path(), None);
        assert!(c.api.load_token().unwrap().is_none());
        assert!(!c.api.ready_requires_backend);
    }

    #[test]
    fn api_keys_parse() {
        let c = Config::parse(
            "[api]\ntoken-file = \"/run/secrets/tiproxy/token\"\nready-requires-backend = true\n",
        )
        .unwrap();
        assert_eq!(
            c.api.token_path(),
            Some(Path::new("/run/secrets/tiproxy/token"))
        );
        assert!(c.api.ready_requires_backend);
        // Parsing does not read the file (a reload must not fail because a Secret is briefly
        // missing); loading it names the key and the path.
        let err = c.api.load_token().unwrap_err().to_string();
        assert!(
            err.contains("api.token-file") && err.contains("/run/secrets/tiproxy/token"),
            "{err}"
        );
        let err = Config::parse("[api]\nready-requires-backend = \"yes\"\n").unwrap_err();
        assert!(err.to_string().contains("ready-requires-backend"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[proxy]\nadr = \"1.2.3.4:5\"\n").unwrap_err();
        assert!(err.to_string().contains("adr"), "{err}");
        let err = Config::parse("[nonsense]\n").unwrap_err();
        assert!(err.to_string().contains("nonsense"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("[proxy]\naddr = \"nope\"", "proxy.addr"),
            ("[proxy]\nproxy-protocol = \"v1\"", "proxy.proxy-protocol"),
            ("[proxy]\nconn-buffer-size = 10", "proxy.conn-buffer-size"),
            ("[log]\nformat = \"xml\"", "log.format"),
            ("[log]\nlevel = \"loud\"", "log.level"),
            (
                "[security]\nrequire-backend-tls = true",
                "security.require-backend-tls",
            ),
            (
                "[security.server-tls]\ncert = \"/a.pem\"",
                "security.server-tls",
            ),
            ("[proxy]\nbackends = [\"nohost\"]", "proxy.backends"),
        ] {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn full_config_parses() {
        let c = Config::parse(
            r#"
            [proxy]
            addr = "127.0.0.1:6000"
            backends = ["127.0.0.1:4000", { addr = "127.0.0.2:4000", status-addr = "127.0.0.2:10080" }]
            max-connections = 100
            conn-buffer-size = 4096
            proxy-protocol = "v2"
            graceful-wait-before-shutdown = 5
            graceful-close-conn-timeout = 10
            [api]
            addr = "127.0.0.1:3080"
            [security]
            require-backend-tls = true
            [security.server-tls]
            auto-certs = true
            [security.sql-tls]
            skip-ca = true
            [log]
            level = "debug"
            format = "json"
            "#,
        )
        .unwrap();
        assert_eq!(c.proxy.backends.len(), 2);
        assert_eq!(c.proxy.backends[0].addr, "127.0.0.1:4000");
        assert_eq!(c.proxy.backends[0].status_addr, None);
        assert_eq!(
            c.proxy.backends[1].status_addr.as_deref(),
            Some("127.0.0.2:10080")
        );
        assert!(c.proxy.send_proxy_protocol());
        assert!(c.security.server_tls.enabled());
        assert!(c.security.sql_tls.enabled());
    }
}

#[cfg(test)]
mod example_tests {
    use super::Config;

    /// The shipped examples must stay valid as the schema evolves.
    #[test]
    fn examples_parse() {
        for text in [
            include_str!("../../../examples/proxy.toml"),
            include_str!("../../../examples/minimal.toml"),
        ] {
            Config::parse(text).unwrap();
        }
    }
}

//! The proxy configuration file (`proxy.toml`) rendered for a TiProxy: the user's overrides
//! merged over what the operator manages, validated with the proxy's own parser.

use toml::{Table, Value};

use crate::api::TiProxy;
use crate::names;

/// Where the admin API token Secret is mounted.
pub const API_TOKEN_DIR: &str = "/etc/tiproxy-api-token";
/// Where the client-facing TLS Secret is mounted.
pub const SERVER_TLS_DIR: &str = "/var/lib/tiproxy-server-tls";
/// Where the Secret with the CA that verifies TiDB is mounted.
pub const BACKEND_CA_DIR: &str = "/var/lib/tiproxy-backend-ca";

/// Keys the operator owns, with the spec field to use instead.
const MANAGED_KEYS: &[(&str, &str)] = &[
    (
        "proxy.addr",
        "spec.service.port (the container always listens on 6000)",
    ),
    ("proxy.backends", "spec.backends"),
    ("proxy.pd-addrs", "spec.backends.pdAddrs"),
    (
        "proxy.graceful-wait-before-shutdown",
        "spec.gracefulWaitBeforeShutdownSeconds",
    ),
    (
        "proxy.graceful-close-conn-timeout",
        "spec.gracefulCloseConnTimeoutSeconds",
    ),
    ("api", "nothing: the admin API is managed by the operator"),
    ("security.server-tls", "spec.tls.server"),
    ("security.sql-tls.ca", "spec.tls.backendCA"),
];

/// Keys the proxy applies without a restart; changing only these does not roll the pods.
const HOT_RELOADED_KEYS: &[&str] = &[
    "proxy.backends",
    "proxy.max-connections",
    "log.level",
    "api.token-file",
    "api.ready-requires-backend",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("spec.config is not valid TOML: {0}")]
    Syntax(String),
    #[error("spec.config sets `{key}`, which the operator manages; use {instead}")]
    Managed { key: String, instead: &'static str },
    #[error("the rendered proxy configuration is invalid: {0}")]
    Invalid(String),
}

/// The rendered `proxy.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedConfig {
    pub text: String,
    /// SHA-256 (hex) of the settings the proxy only reads at start-up; a change rolls the pods.
    pub restart_hash: String,
}

/// Renders the configuration of `tp`'s proxies.
pub fn render(tp: &TiProxy) -> Result<RenderedConfig, ConfigError> {
    let overrides: Table = match tp.spec.config.as_deref() {
        Some(text) => text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax(e.message().to_string()))?,
        None => Table::new(),
    };
    for (key, instead) in MANAGED_KEYS {
        if lookup(&overrides, key).is_some() {
            return Err(ConfigError::Managed {
                key: key.to_string(),
                instead,
            });
        }
    }
    let mut config = managed(tp);
    merge(&mut config, overrides);
    let text = toml::to_string(&config).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    tiproxy::config::Config::parse(&text).map_err(|e| ConfigError::Invalid(e.to_string()))?;

    let mut restart_only = config;
    for key in HOT_RELOADED_KEYS {
        remove(&mut restart_only, key);
    }
    let canonical =
        toml::to_string(&restart_only).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    Ok(RenderedConfig {
        text,
        restart_hash: sha256_hex(canonical.as_bytes()),
    })
}

/// What the operator sets for every proxy of `tp`.
fn managed(tp: &TiProxy) -> Table {
    let spec = &tp.spec;
    let mut proxy = Table::new();
    proxy.insert(
        "addr".into(),
        Value::String(format!("0.0.0.0:{}", names::SQL_PORT)),
    );
    if let Some(pd) = &spec.backends.pd_addrs {
        proxy.insert("pd-addrs".into(), Value::String(pd.join(",")));
    }
    // The pod's preStop sleep does the waiting (see deployment.rs): by SIGTERM the pod is
    // already out of the Service endpoints, so the proxy can start closing at once.
    proxy.insert("graceful-wait-before-shutdown".into(), Value::Integer(0));
    proxy.insert(
        "graceful-close-conn-timeout".into(),
        Value::Integer(spec.graceful_close_conn_timeout_seconds.into()),
    );

    let mut api = Table::new();
    api.insert(
        "addr".into(),
        Value::String(format!("0.0.0.0:{}", names::API_PORT)),
    );
    api.insert(
        "token-file".into(),
        Value::String(format!("{API_TOKEN_DIR}/{}", names::API_TOKEN_KEY)),
    );
    // A fresh pod joins the Service only once it knows a backend (pushed by the operator or
    // discovered through PD).
    api.insert("ready-requires-backend".into(), Value::Boolean(true));

    let mut security = Table::new();
    let tls = spec.tls.clone().unwrap_or_default();
    if tls.server.is_some() {
        let mut server = Table::new();
        server.insert(
            "cert".into(),
            Value::String(format!("{SERVER_TLS_DIR}/tls.crt")),
        );
        server.insert(
            "key".into(),
            Value::String(format!("{SERVER_TLS_DIR}/tls.key")),
        );
        security.insert("server-tls".into(), Value::Table(server));
    }
    if tls.backend_ca.is_some() {
        let mut sql = Table::new();
        sql.insert(
            "ca".into(),
            Value::String(format!("{BACKEND_CA_DIR}/ca.crt")),
        );
        security.insert("sql-tls".into(), Value::Table(sql));
        // The CA is there to be used: TLS towards TiDB even for plain-text clients.
        security.insert("require-backend-tls".into(), Value::Boolean(true));
    }

    let mut config = Table::new();
    config.insert("proxy".into(), Value::Table(proxy));
    config.insert("api".into(), Value::Table(api));
    if !security.is_empty() {
        config.insert("security".into(), Value::Table(security));
    }
    config
}

/// Merges `over` into `base`, table by table; `over` wins on scalars and arrays.
fn merge(base: &mut Table, over: Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn lookup<'a>(table: &'a Table, dotted: &str) -> Option<&'a Value> {
    let mut parts = dotted.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

fn remove(table: &mut Table, dotted: &str) {
    match dotted.split_once('.') {
        None => {
            table.remove(dotted);
        }
        Some((head, rest)) => {
            if let Some(Value::Table(inner)) = table.get_mut(head) {
                remove(inner, rest);
            }
        }
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

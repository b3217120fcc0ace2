//! A statically configured backend: either `"host:port"` or a table that also names the TiDB
//! status address.

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BackendAddr {
    /// SQL address, `host:port`.
    pub addr: String,
    /// TiDB status (HTTP) address, `host:port`, used for health checks when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_addr: Option<String>,
}

impl BackendAddr {
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            status_addr: None,
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        check_host_port("proxy.backends", &self.addr)?;
        if let Some(status) = &self.status_addr {
            check_host_port("proxy.backends", status)?;
        }
        Ok(())
    }
}

fn check_host_port(key: &'static str, value: &str) -> Result<(), ConfigError> {
    let bad = || invalid(key, format!("{value:?}: expected \"host:port\""));
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Plain(String),
    Table(Table),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Table {
    addr: String,
    status_addr: Option<String>,
}

impl<'de> Deserialize<'de> for BackendAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Raw::deserialize(d)? {
            Raw::Plain(addr) => BackendAddr {
                addr,
                status_addr: None,
            },
            Raw::Table(t) => BackendAddr {
                addr: t.addr,
                status_addr: t.status_addr,
            },
        })
    }
}

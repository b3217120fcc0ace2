//! TiDB discovery through PD's etcd: the `/topology/tidb/<addr>/{info,ttl}` keys every TiDB
//! writes (also under `/keyspaces/tidb/<keyspace>/…` in keyspace deployments).
//!
//! A TiDB is alive while its `ttl` key exists: TiDB puts it under a 45 s lease and refreshes it
//! every 30 s, while `info` has no lease and outlives the process. So a backend is listed only
//! when both keys are present. Note that a TiDB that stops shows up here only once its lease
//! runs out (up to ~45 s); a health check on the status port notices much sooner.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions, WatchStream};
use serde::Deserialize;
use tokio::sync::watch;

/// `/topology/tidb/<addr>/{info,ttl}`.
pub const TOPOLOGY_PREFIX: &str = "/topology/tidb/";
/// `/keyspaces/tidb/<keyspace>/topology/tidb/<addr>/{info,ttl}`.
pub const KEYSPACE_TOPOLOGY_PREFIX: &str = "/keyspaces/tidb/";

/// Dial timeout for the etcd endpoints (TiProxy's `DialTimeout`).
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of the initial Get of both prefixes (TiProxy's `topologyFetchTimeout` is 2 s; a
/// little more here because the first request also pays for the dial).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// gRPC (HTTP/2) keepalive, so that a dead etcd breaks a quiet watch stream.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// Reconnect backoff: 1 s, 2 s, then 3 s for every later attempt.
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(3);

/// One TiDB found in the topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredBackend {
    /// SQL address, `ip:port` exactly as in the key (TiDB's advertise address and port).
    pub addr: String,
    /// Status (HTTP) address, `ip:status_port` from `info`; `None` when `info` has no status port.
    pub status_addr: Option<String>,
    /// `info.labels` (e.g. `zone`).
    pub labels: BTreeMap<String, String>,
    /// `info.version`, TiDB's release version such as `v8.5.3` (not the MySQL version string).
    pub version: Option<String>,
}

/// TiDB's `serverinfo.TopologyInfo` as far as we use it. Unknown fields are ignored, missing
/// ones default; a value of the wrong type makes the whole `info` unusable.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TopologyInfo {
    version: Option<String>,
    ip: Option<String>,
    #[serde(deserialize_with = "de_port")]
    status_port: Option<u16>,
    labels: Option<BTreeMap<String, String>>,
}

/// TiDB writes `status_port` as a JSON number; accept a numeric string too, and treat 0 or null
/// as absent.
fn de_port<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Port {
        Num(u64),
        Str(String),
    }
    let port = match Option::<Port>::deserialize(d)? {
        None => return Ok(None),
        Some(Port::Num(n)) => n,
        Some(Port::Str(s)) => s
            .trim()
            .parse::<u64>()
            .map_err(|_| serde::de::Error::custom(format!("invalid status_port {s:?}")))?,
    };
    match port {
        0 => Ok(None),
        n => u16::try_from(n)
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("status_port {n} out of range"))),
    }
}

/// Which key of a TiDB a topology key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Info,
    Ttl,
}

/// Splits a topology key into (keyspace, addr, kind); `None` for keys that are not a TiDB's
/// `info` or `ttl` (other components, malformed keys).
fn split_key(key: &str) -> Option<(Option<&str>, &str, KeyKind)> {
    let (keyspace, rest) = if let Some(rest) = key.strip_prefix(TOPOLOGY_PREFIX) {
        (None, rest)
    } else {
        let rest = key.strip_prefix(KEYSPACE_TOPOLOGY_PREFIX)?;
        let (keyspace, rest) = rest.split_once('/')?;
        if keyspace.is_empty() {
            return None;
        }
        // `rest` has lost the leading '/' of "/topology/tidb/".
        (Some(keyspace), rest.strip_prefix(&TOPOLOGY_PREFIX[1..])?)
    };
    let (addr, suffix) = rest.rsplit_once('/')?;
    if addr.is_empty() || addr.contains('/') {
        return None;
    }
    let kind = match suffix {
        "info" => KeyKind::Info,
        "ttl" => KeyKind::Ttl,
        _ => return None,
    };
    Some((keyspace, addr, kind))
}

/// `host:port`, bracketing an IPv6 host.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The host part of an `addr` key component (`1.2.3.4:4000`, `[::1]:4000`, `name:4000`).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

fn backend_from_info(addr: &str, value: &[u8]) -> Result<DiscoveredBackend, serde_json::Error> {
    let info: TopologyInfo = serde_json::from_slice(value)?;
    let ip = info
        .ip
        .filter(|ip| !ip.trim().is_empty())
        .unwrap_or_else(|| host_of(addr).to_string());
    Ok(DiscoveredBackend {
        addr: addr.to_string(),
        status_addr: info.status_port.map(|port| join_host_port(&ip, port)),
        labels: info.labels.unwrap_or_default(),
        version: info.version.filter(|v| !v.is_empty()),
    })
}

/// The live TiDBs in a set of etcd key-values (from both prefixes; other keys are ignored).
///
/// A TiDB is listed only when both its `info` and its `ttl` key exist (in the same keyspace, or
/// both without one); an `info` that is not valid JSON drops that TiDB (with a warning). The
/// result is sorted by `addr`, one entry per `addr`: if the same address appears more than once
/// (several keyspaces), the entry without a keyspace wins, else the first keyspace in key order.
pub fn parse_topology(kvs: &[(String, Vec<u8>)]) -> Vec<DiscoveredBackend> {
    // (keyspace, addr) -> info value; (keyspace, addr) with a ttl.
    let mut infos: BTreeMap<(Option<&str>, &str), &[u8]> = BTreeMap::new();
    let mut ttls: BTreeSet<(Option<&str>, &str)> = BTreeSet::new();
    for (key, value) in kvs {
        match split_key(key) {
            Some((keyspace, addr, KeyKind::Info)) => {
                infos.insert((keyspace, addr), value);
            }
            Some((keyspace, addr, KeyKind::Ttl)) => {
                ttls.insert((keyspace, addr));
            }
            None => {}
        }
    }
    // BTreeMap order puts `None` (no keyspace) before any keyspace, so the first one kept wins.
    let mut out: BTreeMap<&str, DiscoveredBackend> = BTreeMap::new();
    for ((keyspace, addr), value) in infos {
        if !ttls.contains(&(keyspace, addr)) || out.contains_key(addr) {
            continue;
        }
        match backend_from_info(addr, value) {
            Ok(backend) => {
                out.insert(addr, backend);
            }
            Err(e) => tracing::warn!(
                addr,
                keyspace = keyspace.unwrap_or(""),
                error = %e,
                value = %String::from_utf8_lossy(value),
                "ignoring TiDB with an unreadable topology info"
            ),
        }
    }
    out.into_values().collect()
}

/// Why one connect-and-watch attempt ended.
#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    #[error("etcd response without a header")]
    NoHeader,
    #[error("watch stream closed by etcd")]
    StreamClosed,
    #[error("watch canceled by etcd (compact revision {compact_revision}): {reason}")]
    Canceled {
        reason: String,
        compact_revision: i64,
    },
}

async fn with_timeout<T>(
    what: &'static str,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, WatchError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| WatchError::Timeout(limit, what))?
        .map_err(WatchError::from)
}

/// Current key-values of both prefixes, by key.
type KvState = BTreeMap<String, Vec<u8>>;

fn publish(tx: &watch::Sender<Vec<DiscoveredBackend>>, state: &KvState) -> usize {
    let kvs: Vec<(String, Vec<u8>)> = state.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let backends = parse_topology(&kvs);
    let n = backends.len();
    tx.send_if_modified(|current| {
        if *current == backends {
            false
        } else {
            tracing::info!(
                backends = ?backends.iter().map(|b| b.addr.as_str()).collect::<Vec<_>>(),
                "TiDB topology from etcd changed"
            );
            *current = backends;
            true
        }
    });
    n
}

/// Connects, reads both prefixes at one revision, publishes, then follows the changes. Returns
/// only with an error (the caller reconnects). `synced` is set once the first list is published.
async fn watch_once(
    endpoints: &[String],
    tx: &watch::Sender<Vec<DiscoveredBackend>>,
    synced: &mut bool,
) -> Result<(), WatchError> {
    let options = ConnectOptions::new()
        .with_connect_timeout(DIAL_TIMEOUT)
        .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
        .with_keep_alive_while_idle(true);
    let mut client = with_timeout(
        "the etcd connection",
        DIAL_TIMEOUT,
        Client::connect(endpoints, Some(options)),
    )
    .await?;

    // Both prefixes at the same revision, so that the watch can start right after it.
    let first = with_timeout(
        "the topology Get",
        FETCH_TIMEOUT,
        client.get(TOPOLOGY_PREFIX, Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let revision = first.header().ok_or(WatchError::NoHeader)?.revision();
    let second = with_timeout(
        "the keyspace topology Get",
        FETCH_TIMEOUT,
        client.get(
            KEYSPACE_TOPOLOGY_PREFIX,
            Some(GetOptions::new().with_prefix().with_revision(revision)),
        ),
    )
    .await?;
    let mut state = KvState::new();
    for kv in first.kvs().iter().chain(second.kvs()) {
        if let Ok(key) = std::str::from_utf8(kv.key()) {
            state.insert(key.to_string(), kv.value().to_vec());
        }
    }
    let n = publish(tx, &state);
    *synced = true;
    tracing::debug!(revision, backends = n, "TiDB topology read from etcd");

    let watch_options = || {
        WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1)
    };
    let mut stream: WatchStream = with_timeout(
        "the topology Watch",
        FETCH_TIMEOUT,
        client.watch(TOPOLOGY_PREFIX, Some(watch_options())),
    )
    .await?;
    stream
        .watch(KEYSPACE_TOPOLOGY_PREFIX, Some(watch_options()))
        .await?;

    loop {
        let resp = stream.message().await?.ok_or(WatchError::StreamClosed)?;
        if resp.canceled() {
            return Err(WatchError::Canceled {
                reason: resp.cancel_reason().to_string(),
                compact_revision: resp.compact_revision(),
            });
        }
        if resp.events().is_empty() {
            continue; // creation or progress notification
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let Ok(key) = std::str::from_utf8(kv.key()) else {
                continue;
            };
            match event.event_type() {
                EventType::Put => {
                    state.insert(key.to_string(), kv.value().to_vec());
                }
                EventType::Delete => {
                    state.remove(key);
                }
            }
        }
        publish(tx, &state);
    }
}

/// Resolves when `stop` becomes true, or when its sender is dropped (nobody could stop us then).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Keeps `tx` equal to the live TiDBs in the etcd at `endpoints` (PD's client URLs, `host:port`
/// or `http://host:port`) until `stop` becomes true (or its sender, or every receiver of `tx`,
/// is dropped).
///
/// Connects (dial timeout 5 s), reads `/topology/tidb/` and `/keyspaces/tidb/` at one revision,
/// then watches both from the next revision and republishes the list whenever it actually
/// changes. On any error it logs a warning, keeps the last published list, and reconnects after
/// 1 s, 2 s, then 3 s between attempts (back to 1 s after a successful read).
pub async fn run_topology_watch(
    endpoints: Vec<String>,
    tx: watch::Sender<Vec<DiscoveredBackend>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_INITIAL;
    loop {
        if *stop.borrow() {
            return;
        }
        let mut synced = false;
        let result = tokio::select! {
            r = watch_once(&endpoints, &tx, &mut synced) => r,
            _ = stopped(&mut stop) => return,
            _ = tx.closed() => return,
        };
        if synced {
            backoff = BACKOFF_INITIAL;
        }
        if let Err(e) = result {
            tracing::warn!(
                error = %e,
                endpoints = ?endpoints,
                retry_in = ?backoff,
                "etcd topology watch failed; reconnecting"
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(&mut stop) => return,
            _ = tx.closed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str) -> (String, Vec<u8>) {
        (key.to_string(), value.as_bytes().to_vec())
    }

    fn info(ip: &str, status_port: u16, labels: &str) -> String {
        format!(
            r#"{{"version":"v8.5.3","git_hash":"abc","ip":"{ip}","status_port":{status_port},"deploy_path":"/opt/tidb/bin","start_timestamp":1700000000,"labels":{labels}}}"#
        )
    }

    #[test]
    fn plain_prefix() {
        let kvs = vec![
            kv(
                "/topology/tidb/10.0.0.2:4000/info",
                &info("10.0.0.2", 10080, "{}"),
            ),
            kv("/topology/tidb/10.0.0.2:4000/ttl", "1700000000000000000"),
            kv(
                "/topology/tidb/10.0.0.1:4000/info",
                &info("10.0.0.1", 10081, "null"),
            ),
            kv("/topology/tidb/10.0.0.1:4000/ttl", "1700000000000000000"),
        ];
        let got = parse_topology(&kvs);
        assert_eq!(
            got,
            vec![
                DiscoveredBackend {
                    addr: "10.0.0.1:4000".into(),
                    status_addr: Some("10.0.0.1:10081".into()),
                    labels: BTreeMap::new(),
                    version: Some("v8.5.3".into()),
                },
                DiscoveredBackend {
                    addr: "10.0.0.2:4000".into(),
                    status_addr: Some("10.0.0.2:10080".into()),
                    labels: BTreeMap::new(),
                    version: Some("v8.5.3".into()),
                },
            ]
        );
    }

    #[test]
    fn keyspace_prefix() {
        let kvs = vec![
            kv(
                "/keyspaces/tidb/ks1/topology/tidb/10.0.0.3:4000/info",
                &info("10.0.0.3", 10080, r#"{"keyspace":"ks1"}"#),
            ),
            kv("/keyspaces/tidb/ks1/topology/tidb/10.0.0.3:4000/ttl", "1"),
            kv(
                "/topology/tidb/10.0.0.1:4000/info",
                &info("10.0.0.1", 10080, "{}"),
            ),
            kv("/topology/tidb/10.0.0.1:4000/ttl", "1"),
            // ttl in another keyspace does not make this one alive
            kv(
                "/keyspaces/tidb/ks2/topology/tidb/10.0.0.4:4000/info",
                &info("10.0.0.4", 10080, "{}"),
            ),
            kv("/keyspaces/tidb/ks3/topology/tidb/10.0.0.4:4000/ttl", "1"),
            // malformed keyspace keys are ignored
            kv("/keyspaces/tidb//topology/tidb/10.0.0.5:4000/info", "{}"),
            kv("/keyspaces/tidb//topology/tidb/10.0.0.5:4000/ttl", "1"),
            kv("/keyspaces/tidb/ks1/other/tidb/10.0.0.6:4000/info", "{}"),
            kv("/keyspaces/tidb/ks1/other/tidb/10.0.0.6:4000/ttl", "1"),
        ];
        let got = parse_topology(&kvs);
        let addrs: Vec<_> = got.iter().map(|b| b.addr.as_str()).collect();
        assert_eq!(addrs, ["10.0.0.1:4000", "10.0.0.3:4000"]);
        assert_eq!(
            got[1].labels.get("keyspace").map(String::as_str),
            Some("ks1")
        );
    }

    #[test]
    fn same_addr_in_two_scopes_is_listed_once() {
        let kvs = vec![
            kv(
                "/keyspaces/tidb/ks1/topology/tidb/10.0.0.1:4000/info",
                &info("10.0.0.1", 1, "{}"),
            ),
            kv("/keyspaces/tidb/ks1/topology/tidb/10.0.0.1:4000/ttl", "1"),
            kv(
                "/topology/tidb/10.0.0.1:4000/info",
                &info("10.0.0.1", 2, "{}"),
            ),
            kv("/topology/tidb/10.0.0.1:4000/ttl", "1"),
        ];
        let got = parse_topology(&kvs);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].status_addr.as_deref(), Some("10.0.0.1:2"));
    }

    #[test]
    fn missing_ttl_or_info() {
        let kvs = vec![
            kv(
                "/topology/tidb/10.0.0.1:4000/info",
                &info("10.0.0.1", 10080, "{}"),
            ),
            kv("/topology/tidb/10.0.0.2:4000/ttl", "1"),
            kv(
                "/keyspaces/tidb/ks/topology/tidb/10.0.0.3:4000/info",
                &info("10.0.0.3", 10080, "{}"),
            ),
        ];
        assert!(parse_topology(&kvs).is_empty());
        assert!(parse_topology(&[]).is_empty());
    }

    #[test]
    fn garbage_json_skips_only_that_backend() {
        let kvs = vec![
            kv("/topology/tidb/10.0.0.1:4000/info", "{not json"),
            kv("/topology/tidb/10.0.0.1:4000/ttl", "1"),
            kv(
                "/topology/tidb/10.0.0.2:4000/info",
                r#"{"status_port":"abc"}"#,
            ),
            kv("/topology/tidb/10.0.0.2:4000/ttl", "1"),
            kv(
                "/topology/tidb/10.0.0.3:4000/info",
                r#"{"labels":{"zone":1}}"#,
            ),
            kv("/topology/tidb/10.0.0.3:4000/ttl", "1"),
            kv("/topology/tidb/10.0.0.4:4000/info", r#"[1,2,3]"#),
            kv("/topology/tidb/10.0.0.4:4000/ttl", "1"),
            (
                "/topology/tidb/10.0.0.5:4000/info".to_string(),
                vec![0xff, 0xfe, 0x00],
            ),
            kv("/topology/tidb/10.0.0.5:4000/ttl", "1"),
            kv(
                "/topology/tidb/10.0.0.6:4000/info",
                r#"{"status_port":70000}"#,
            ),
            kv("/topology/tidb/10.0.0.6:4000/ttl", "1"),
            kv(
                "/topology/tidb/10.0.0.9:4000/info",
                &info("10.0.0.9", 10080, "{}"),
            ),
            kv("/topology/tidb/10.0.0.9:4000/ttl", "1"),
        ];
        let got = parse_topology(&kvs);
        let addrs: Vec<_> = got.iter().map(|b| b.addr.as_str()).collect();
        assert_eq!(addrs, ["10.0.0.9:4000"]);
    }

    #[test]
    fn minimal_and_odd_info() {
        let kvs = vec![
            // no ip: the host from the key; no status port: no status address
            kv(
                "/topology/tidb/db-tidb-0.db-tidb-peer.ns.svc:4000/info",
                "{}",
            ),
            kv("/topology/tidb/db-tidb-0.db-tidb-peer.ns.svc:4000/ttl", "1"),
            kv(
                "/topology/tidb/[::1]:4000/info",
                r#"{"ip":"::1","status_port":10080,"version":""}"#,
            ),
            kv("/topology/tidb/[::1]:4000/ttl", "1"),
            kv(
                "/topology/tidb/127.0.0.1:4000/info",
                r#"{"status_port":"10080","extra":[1]}"#,
            ),
            kv("/topology/tidb/127.0.0.1:4000/ttl", "1"),
            // not TiDB keys
            kv("/topology/tidb/127.0.0.1:4001/info/x", "{}"),
            kv("/topology/tidb/127.0.0.1:4001/ttl", "1"),
            kv("/topology/tiproxy/127.0.0.1:6000/info", "{}"),
            kv("/topology/tiproxy/127.0.0.1:6000/ttl", "1"),
            kv("/topology/tidb//info", "{}"),
            kv("/topology/tidb//ttl", "1"),
        ];
        let got = parse_topology(&kvs);
        assert_eq!(
            got,
            vec![
                DiscoveredBackend {
                    addr: "127.0.0.1:4000".into(),
                    status_addr: Some("127.0.0.1:10080".into()),
                    labels: BTreeMap::new(),
                    version: None,
                },
                DiscoveredBackend {
                    addr: "[::1]:4000".into(),
                    status_addr: Some("[::1]:10080".into()),
                    labels: BTreeMap::new(),
                    version: None,
                },
                DiscoveredBackend {
                    addr: "db-tidb-0.db-tidb-peer.ns.svc:4000".into(),
                    status_addr: None,
                    labels: BTreeMap::new(),
                    version: None,
                },
            ]
        );
    }

    #[test]
    fn labels() {
        let kvs = vec![
            kv(
                "/topology/tidb/10.0.0.1:4000/info",
                &info(
                    "10.0.0.1",
                    10080,
                    r#"{"zone":"east","host":"h1","tiproxy-port":"6001"}"#,
                ),
            ),
            kv("/topology/tidb/10.0.0.1:4000/ttl", "1"),
        ];
        let got = parse_topology(&kvs);
        assert_eq!(got.len(), 1);
        let want: BTreeMap<String, String> =
            [("zone", "east"), ("host", "h1"), ("tiproxy-port", "6001")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        assert_eq!(got[0].labels, want);
    }

    // ---- against a real etcd (tests/scripts/etcd.sh) -----------------------------------------

    const IT_PORT: u16 = 2489;

    fn script() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scripts/etcd.sh")
    }

    fn run_script(dir: &std::path::Path, args: &[&str]) -> Result<String, String> {
        let out = std::process::Command::new("bash")
            .arg(script())
            .args(args)
            .arg("--dir")
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script().display()))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "etcd.sh {args:?} failed ({}):\n{stderr}",
                out.status
            ))
        }
    }

    /// Stops the test etcd (and its keep-alives) even when an assertion fails.
    struct EtcdGuard(std::path::PathBuf);

    impl Drop for EtcdGuard {
        fn drop(&mut self) {
            if let Err(e) = run_script(&self.0, &["stop"]) {
                eprintln!("{e}");
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn etcd_installed() -> bool {
        std::path::Path::new("/usr/bin/etcd").exists()
            || std::env::var_os("PATH").is_some_and(|paths| {
                std::env::split_paths(&paths).any(|p| p.join("etcd").is_file())
            })
    }

    async fn wait_for_addrs(
        rx: &mut watch::Receiver<Vec<DiscoveredBackend>>,
        want: &[&str],
        within: Duration,
    ) -> Vec<DiscoveredBackend> {
        let res = tokio::time::timeout(
            within,
            rx.wait_for(|list| {
                list.iter()
                    .map(|b| b.addr.as_str())
                    .eq(want.iter().copied())
            }),
        )
        .await
        .map(|r| r.map(|list| list.clone()));
        match res {
            Ok(Ok(list)) => list,
            Ok(Err(_)) => panic!("topology watch ended before publishing {want:?}"),
            Err(_) => panic!(
                "topology watch did not publish {want:?} within {within:?}; last: {:?}",
                *rx.borrow()
            ),
        }
    }

    #[tokio::test]
    async fn watch_real_etcd() {
        assert!(
            etcd_installed(),
            "etcd is not installed (no /usr/bin/etcd, none on PATH): this test needs a real etcd; \
             install it with `bash tests/scripts/install-deps.sh` (Debian packages etcd-server etcd-client)"
        );
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("tiproxy=debug")
            .try_init();
        let dir = std::env::temp_dir().join(format!("tiproxy-etcd-test-{IT_PORT}"));
        // A previous run that was killed may have left its etcd behind.
        let _ = run_script(&dir, &["stop"]);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let guard = EtcdGuard(dir.clone());
        let port = IT_PORT.to_string();
        let script = |args: &[&str]| run_script(&dir, args).unwrap_or_else(|e| panic!("{e}"));

        // The watcher starts before etcd: it must keep retrying until etcd is up.
        let (tx, mut rx) = watch::channel(Vec::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_topology_watch(
            vec![format!("127.0.0.1:{IT_PORT}")],
            tx,
            stop_rx,
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        script(&["start", "--port", &port]);

        script(&[
            "put-tidb",
            "127.0.0.1:4000",
            "10080",
            "--labels",
            "zone=east,host=h1",
        ]);
        wait_for_addrs(&mut rx, &["127.0.0.1:4000"], Duration::from_secs(15)).await;
        script(&["put-tidb", "127.0.0.1:4001", "10081", "--ttl", "10"]);
        let list = wait_for_addrs(
            &mut rx,
            &["127.0.0.1:4000", "127.0.0.1:4001"],
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(list[0].status_addr.as_deref(), Some("127.0.0.1:10080"));
        assert_eq!(list[0].labels.get("zone").map(String::as_str), Some("east"));
        assert_eq!(list[0].labels.get("host").map(String::as_str), Some("h1"));
        assert_eq!(list[0].version.as_deref(), Some("v8.5.3"));
        assert_eq!(list[1].status_addr.as_deref(), Some("127.0.0.1:10081"));
        assert!(list[1].labels.is_empty());

        // A TiDB that is gone.
        script(&["del-tidb", "127.0.0.1:4000"]);
        wait_for_addrs(&mut rx, &["127.0.0.1:4001"], Duration::from_secs(5)).await;

        // The keyspace prefix is watched too.
        script(&["put-tidb", "127.0.0.1:4002", "10082", "--keyspace", "ks1"]);
        wait_for_addrs(
            &mut rx,
            &["127.0.0.1:4001", "127.0.0.1:4002"],
            Duration::from_secs(5),
        )
        .await;

        // etcd restarts (empty): the watcher reconnects and follows the new contents.
        script(&["stop"]);
        script(&["start", "--port", &port]);
        wait_for_addrs(&mut rx, &[], Duration::from_secs(15)).await;
        script(&["put-tidb", "127.0.0.1:4003", "10083"]);
        wait_for_addrs(&mut rx, &["127.0.0.1:4003"], Duration::from_secs(5)).await;

        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("run_topology_watch did not return after stop")
            .unwrap();
        drop(guard);
    }
}

//! One probe of one backend, piece by piece: the status port (`/status`, `/config`,
//! `/metrics`) and the SQL port (first packet). Each piece returns plain data; `probe_backend`
//! in the parent module runs them together and combines them into a [`ProbeReport`].

use std::borrow::Cow;
use std::io;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::timeout_at;

use super::http::{HttpError, StatusClient};

/// The largest first packet accepted from the SQL port (a real greeting is ~100 bytes).
pub const MAX_FIRST_PACKET: usize = 64 << 10;

/// MySQL `ER_CON_COUNT_ERROR`: "Too many connections".
const ER_CON_COUNT_ERROR: u16 = 1040;

/// What one probe round says about a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// Both ports answered correctly.
    Healthy,
    /// `GET /status` answered non-200: TiDB is shutting down (or still starting). It keeps
    /// serving SQL for `graceful-wait-before-shutdown` seconds, which is the time sessions have
    /// to move away.
    Draining,
    /// A port did not answer in time. A busy TiDB does this now and then; not down by itself.
    Slow { reason: String },
    /// A port refused, closed, or answered with an error.
    Down { reason: String },
}

impl ProbeOutcome {
    pub fn is_healthy(&self) -> bool {
        matches!(self, ProbeOutcome::Healthy)
    }

    /// A human-readable explanation.
    pub fn reason(&self) -> Cow<'_, str> {
        match self {
            ProbeOutcome::Healthy => Cow::Borrowed("healthy"),
            ProbeOutcome::Draining => Cow::Borrowed(DRAINING_REASON),
            ProbeOutcome::Slow { reason } | ProbeOutcome::Down { reason } => Cow::Borrowed(reason),
        }
    }

    /// Precedence when the parts of a probe disagree: Down > Draining > Slow > Healthy.
    fn rank(&self) -> u8 {
        match self {
            ProbeOutcome::Healthy => 0,
            ProbeOutcome::Slow { .. } => 1,
            ProbeOutcome::Draining => 2,
            ProbeOutcome::Down { .. } => 3,
        }
    }

    /// Combines the outcomes of the parts of one probe: the most severe wins; the reasons of
    /// equally severe parts are joined.
    pub fn combine(self, other: ProbeOutcome) -> ProbeOutcome {
        use std::cmp::Ordering::*;
        match self.rank().cmp(&other.rank()) {
            Greater => self,
            Less => other,
            Equal => match (self, other) {
                (ProbeOutcome::Slow { reason: a }, ProbeOutcome::Slow { reason: b }) => {
                    ProbeOutcome::Slow {
                        reason: format!("{a}; {b}"),
                    }
                }
                (ProbeOutcome::Down { reason: a }, ProbeOutcome::Down { reason: b }) => {
                    ProbeOutcome::Down {
                        reason: format!("{a}; {b}"),
                    }
                }
                (a, _) => a,
            },
        }
    }
}

pub(crate) const DRAINING_REASON: &str =
    "TiDB is shutting down or still starting (GET /status did not answer 200)";

/// The result of one probe round.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    pub outcome: ProbeOutcome,
    /// MySQL server version string (`8.0.11-TiDB-v8.5.3`), from `/status` or else from the
    /// greeting.
    pub server_version: Option<String>,
    /// `security.session-token-signing-cert` is set, so sessions can migrate from/to it.
    /// `None`: not fetched this round or the fetch failed.
    pub supports_migration: Option<bool>,
    /// `graceful-wait-before-shutdown` in seconds.
    pub graceful_wait: Option<u64>,
    /// CPU usage, 0..1 (of `tidb_server_maxprocs` cores; may exceed 1 briefly). Needs two
    /// scrapes, so a stateless probe leaves it `None` (see [`CpuTracker`]).
    pub cpu: Option<f64>,
    /// Resident memory / memory quota, 0..1+. `None` when unknown (quota 0 or not scraped).
    pub memory: Option<f64>,
    /// Wall time of the probe round.
    pub took: Duration,
    /// The raw `/metrics` sample of this round, if scraped.
    pub metrics: Option<MetricsSample>,
}

// ---------------------------------------------------------------------------------------------
// GET /status

/// The body of a 200 `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    pub connections: Option<u64>,
    pub version: Option<String>,
    pub git_hash: Option<String>,
}

pub fn parse_status(body: &[u8]) -> Result<StatusInfo, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid JSON ({e})"))
}

/// Probes `GET /status` on `addr`: 200 with JSON is healthy; any other code means TiDB has
/// cleared its health flag (shutting down or starting); refused is down; timeout is slow.
pub async fn probe_status(
    client: &StatusClient,
    addr: &str,
    timeout: Duration,
) -> (ProbeOutcome, Option<StatusInfo>) {
    match client.get_with_timeout(addr, "/status", timeout).await {
        Ok(r) if r.status == StatusCode::OK => match parse_status(&r.body) {
            Ok(info) => (ProbeOutcome::Healthy, Some(info)),
            Err(e) => (
                ProbeOutcome::Down {
                    reason: format!("status port {addr}: GET /status: {e}"),
                },
                None,
            ),
        },
        Ok(r) => {
            tracing::debug!(addr, status = %r.status, "GET /status not OK");
            (ProbeOutcome::Draining, None)
        }
        Err(e) => (http_failure("status port", addr, "GET /status", &e), None),
    }
}

fn http_failure(port: &str, addr: &str, what: &str, e: &HttpError) -> ProbeOutcome {
    let reason = format!("{port} {addr}: {what}: {e}");
    if e.is_timeout() {
        ProbeOutcome::Slow { reason }
    } else {
        ProbeOutcome::Down { reason }
    }
}

// ---------------------------------------------------------------------------------------------
// SQL port

/// What the first packet of the SQL port was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPacket {
    /// Protocol-10 handshake with the server version string.
    Greeting { server_version: String },
    /// An ERR packet.
    Error {
        code: u16,
        sql_state: Option<String>,
        message: String,
    },
}

/// Parses the payload of the first packet a MySQL server sends.
pub fn parse_first_packet(payload: &[u8]) -> Result<FirstPacket, String> {
    match payload.first() {
        None => Err("empty first packet".into()),
        Some(0x0a) => {
            let rest = &payload[1..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            Ok(FirstPacket::Greeting {
                server_version: String::from_utf8_lossy(&rest[..end]).into_owned(),
            })
        }
        Some(0xff) => {
            if payload.len() < 3 {
                return Err("truncated ERR packet".into());
            }
            let code = u16::from_le_bytes([payload[1], payload[2]]);
            let (sql_state, msg) = if payload.len() >= 9 && payload[3] == b'#' {
                (
                    Some(String::from_utf8_lossy(&payload[4..9]).into_owned()),
                    &payload[9..],
                )
            } else {
                (None, &payload[3..])
            };
            Ok(FirstPacket::Error {
                code,
                sql_state,
                message: String::from_utf8_lossy(msg).into_owned(),
            })
        }
        Some(&v) if v < 0x20 => Err(format!("unsupported protocol version {v}")),
        Some(&b) => Err(format!("not a MySQL greeting (first byte 0x{b:02x})")),
    }
}

/// Dials the SQL port, reads its first packet and hangs up (no login).
pub async fn probe_sql(addr: &str, timeout: Duration) -> (ProbeOutcome, Option<String>) {
    let deadline = tokio::time::Instant::now() + timeout;
    let slow = |phase: &str| ProbeOutcome::Slow {
        reason: format!("SQL port {addr}: no answer within {timeout:?} ({phase})"),
    };
    let down = |what: String| ProbeOutcome::Down {
        reason: format!("SQL port {addr}: {what}"),
    };

    let mut stream = match timeout_at(deadline, TcpStream::connect(addr)).await {
        Err(_) => return (slow("connecting"), None),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return (down("connection refused".into()), None)
        }
        Ok(Err(e)) => return (down(format!("connect: {e}")), None),
        Ok(Ok(s)) => s,
    };
    let payload = match timeout_at(deadline, read_first_packet(&mut stream)).await {
        Err(_) => return (slow("waiting for the greeting"), None),
        Ok(Err(e)) => return (down(e), None),
        Ok(Ok(p)) => p,
    };
    drop(stream);
    match parse_first_packet(&payload) {
        Ok(FirstPacket::Greeting { server_version }) => {
            (ProbeOutcome::Healthy, Some(server_version))
        }
        Ok(FirstPacket::Error {
            code,
            sql_state,
            message,
        }) => {
            let state = sql_state.map(|s| format!(" ({s})")).unwrap_or_default();
            let reason = format!("SQL port {addr}: ERR {code}{state}: {message}");
            if code == ER_CON_COUNT_ERROR {
                // Alive but full: treat like a slow answer, not a dead server (#282).
                (ProbeOutcome::Slow { reason }, None)
            } else {
                (ProbeOutcome::Down { reason }, None)
            }
        }
        Err(e) => (down(e), None),
    }
}

async fn read_first_packet(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    let eof = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            "connection closed before the greeting".to_string()
        } else {
            format!("reading the greeting: {e}")
        }
    };
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await.map_err(eof)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
    if len > MAX_FIRST_PACKET {
        return Err(format!("first packet too large ({len} bytes)"));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.map_err(eof)?;
    Ok(payload)
}

// ---------------------------------------------------------------------------------------------
// GET /config

/// What the balancer needs from TiDB's `/config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigInfo {
    /// `security.session-token-signing-cert` is non-empty.
    pub supports_migration: bool,
    /// `graceful-wait-before-shutdown`, seconds.
    pub graceful_wait: Option<u64>,
}

pub fn parse_config(body: &[u8]) -> Result<ConfigInfo, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON ({e})"))?;
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    let cert = v
        .get("security")
        .and_then(|s| s.get("session-token-signing-cert"))
        .and_then(|c| c.as_str())
        .unwrap_or("");
    Ok(ConfigInfo {
        supports_migration: !cert.is_empty(),
        graceful_wait: v
            .get("graceful-wait-before-shutdown")
            .and_then(|g| g.as_u64()),
    })
}

pub async fn fetch_config(
    client: &StatusClient,
    addr: &str,
    timeout: Duration,
) -> Result<ConfigInfo, String> {
    let r = client
        .get_with_timeout(addr, "/config", timeout)
        .await
        .map_err(|e| format!("status port {addr}: GET /config: {e}"))?;
    if r.status != StatusCode::OK {
        return Err(format!(
            "status port {addr}: GET /config: HTTP {}",
            r.status
        ));
    }
    parse_config(&r.body).map_err(|e| format!("status port {addr}: GET /config: {e}"))
}

// ---------------------------------------------------------------------------------------------
// GET /metrics

/// The few TiDB metric families the balancer uses, from one scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSample {
    /// When the scrape finished (local clock).
    pub at: Instant,
    /// `process_cpu_seconds_total`.
    pub cpu_seconds: Option<f64>,
    /// `tidb_server_maxprocs` (GOMAXPROCS).
    pub maxprocs: Option<f64>,
    /// `process_resident_memory_bytes`.
    pub rss_bytes: Option<f64>,
    /// `tidb_server_memory_quota_bytes`; 0 means no quota.
    pub memory_quota_bytes: Option<f64>,
    /// `process_start_time_seconds`, to notice a restart between two scrapes.
    pub start_time: Option<f64>,
}

impl MetricsSample {
    /// Resident memory / quota; `None` when either is missing or the quota is 0.
    pub fn memory_usage(&self) -> Option<f64> {
        match (self.rss_bytes, self.memory_quota_bytes) {
            (Some(rss), Some(q)) if q > 0.0 => Some(rss / q),
            _ => None,
        }
    }
}

/// Parses the Prometheus text exposition format, keeping only the families in
/// [`MetricsSample`] (the first sample of each). Malformed lines are skipped.
pub fn parse_metrics(text: &str, at: Instant) -> MetricsSample {
    let mut s = MetricsSample {
        at,
        cpu_seconds: None,
        maxprocs: None,
        rss_bytes: None,
        memory_quota_bytes: None,
        start_time: None,
    };
    for line in text.lines() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_ascii_whitespace())
            .unwrap_or(line.len());
        let slot = match &line[..name_end] {
            "process_cpu_seconds_total" => &mut s.cpu_seconds,
            "tidb_server_maxprocs" => &mut s.maxprocs,
            "process_resident_memory_bytes" => &mut s.rss_bytes,
            "tidb_server_memory_quota_bytes" => &mut s.memory_quota_bytes,
            "process_start_time_seconds" => &mut s.start_time,
            _ => continue,
        };
        if slot.is_some() {
            continue;
        }
        let Some(rest) = skip_labels(&line[name_end..]) else {
            continue;
        };
        let value = rest.split_ascii_whitespace().next().unwrap_or("");
        if let Some(v) = parse_value(value) {
            *slot = Some(v);
        }
    }
    s
}

/// Skips an optional `{...}` label block (quoted values may contain `}` and `\"`).
fn skip_labels(s: &str) -> Option<&str> {
    let s = s.trim_start();
    let Some(body) = s.strip_prefix('{') else {
        return Some(s);
    };
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return Some(&body[i + 1..]),
            _ => {}
        }
    }
    None
}

fn parse_value(v: &str) -> Option<f64> {
    let x: f64 = v.parse().ok()?;
    x.is_finite().then_some(x)
}

pub async fn fetch_metrics(
    client: &StatusClient,
    addr: &str,
    timeout: Duration,
) -> Result<MetricsSample, String> {
    let r = client
        .get_with_timeout(addr, "/metrics", timeout)
        .await
        .map_err(|e| format!("status port {addr}: GET /metrics: {e}"))?;
    let at = Instant::now();
    if r.status != StatusCode::OK {
        return Err(format!(
            "status port {addr}: GET /metrics: HTTP {}",
            r.status
        ));
    }
    let text = std::str::from_utf8(&r.body)
        .map_err(|_| format!("status port {addr}: GET /metrics: body is not UTF-8"))?;
    Ok(parse_metrics(text, at))
}

/// Turns successive scrapes of one backend into CPU usage:
/// Δ`process_cpu_seconds_total` / Δt / `tidb_server_maxprocs`.
#[derive(Debug, Clone, Default)]
pub struct CpuTracker {
    base: Option<MetricsSample>,
    last: Option<f64>,
}

impl CpuTracker {
    /// Shortest interval between the two samples a usage is computed from.
    pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one scrape; returns the usage over the interval since the previous one, or the
    /// last usage when the two are less than [`Self::MIN_INTERVAL`] apart. `None` for the
    /// first sample and after a restart (counter went backwards or the start time changed).
    pub fn observe(&mut self, s: &MetricsSample) -> Option<f64> {
        let Some(cpu) = s.cpu_seconds else {
            return self.last;
        };
        let Some(base) = &self.base else {
            self.base = Some(s.clone());
            return None;
        };
        let restarted = match (base.start_time, s.start_time) {
            (Some(a), Some(b)) => a != b,
            _ => false,
        };
        let base_cpu = base.cpu_seconds.unwrap_or(f64::NAN);
        if restarted || cpu < base_cpu || !base_cpu.is_finite() {
            self.base = Some(s.clone());
            self.last = None;
            return None;
        }
        let dt = s.at.saturating_duration_since(base.at);
        if dt < Self::MIN_INTERVAL {
            return self.last;
        }
        let procs = s.maxprocs.or(base.maxprocs).filter(|p| *p > 0.0);
        self.last = procs.map(|p| (cpu - base_cpu) / dt.as_secs_f64() / p);
        self.base = Some(s.clone());
        self.last
    }

    /// Forgets the history (e.g. after the backend went down).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// The last computed usage.
    pub fn last(&self) -> Option<f64> {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_prefers_the_most_severe() {
        let slow = |r: &str| ProbeOutcome::Slow { reason: r.into() };
        let down = |r: &str| ProbeOutcome::Down { reason: r.into() };
        use ProbeOutcome::*;
        assert_eq!(Healthy.combine(Healthy), Healthy);
        assert_eq!(Healthy.combine(slow("a")), slow("a"));
        assert_eq!(slow("a").combine(Draining), Draining);
        assert_eq!(Draining.combine(down("b")), down("b"));
        assert_eq!(down("b").combine(slow("a")), down("b"));
        assert_eq!(slow("a").combine(slow("b")), slow("a; b"));
        assert_eq!(down("a").combine(down("b")), down("a; b"));
        assert!(Draining.reason().contains("shutting down"));
        assert_eq!(down("x").reason(), "x");
    }

    #[test]
    fn status_body_v85_and_v75() {
        let v85 = br#"{"connections":3,"version":"8.0.11-TiDB-v8.5.3","git_hash":"abc","status":{"init_stats_percentage":100}}"#;
        let s = parse_status(v85).unwrap();
        assert_eq!(s.connections, Some(3));
        assert_eq!(s.version.as_deref(), Some("8.0.11-TiDB-v8.5.3"));
        assert_eq!(s.git_hash.as_deref(), Some("abc"));
        let v75 = br#"{"connections":0,"version":"8.0.11-TiDB-v7.5.5","git_hash":"d"}"#;
        assert_eq!(
            parse_status(v75).unwrap().version.as_deref(),
            Some("8.0.11-TiDB-v7.5.5")
        );
        assert!(parse_status(b"").is_err());
        assert!(parse_status(b"<html>").is_err());
        assert!(parse_status(b"[1]").is_err());
    }

    fn greeting(version: &str) -> Vec<u8> {
        let mut p = vec![0x0a];
        p.extend_from_slice(version.as_bytes());
        p.push(0);
        p.extend_from_slice(&[1, 0, 0, 0]); // connection id
        p.extend_from_slice(b"12345678\0");
        p
    }

    pub(crate) fn err_packet(code: u16, state: Option<&str>, msg: &str) -> Vec<u8> {
        let mut p = vec![0xff];
        p.extend_from_slice(&code.to_le_bytes());
        if let Some(s) = state {
            p.push(b'#');
            p.extend_from_slice(s.as_bytes());
        }
        p.extend_from_slice(msg.as_bytes());
        p
    }

    #[test]
    fn first_packet_parsing() {
        assert_eq!(
            parse_first_packet(&greeting("8.0.11-TiDB-v8.5.3")).unwrap(),
            FirstPacket::Greeting {
                server_version: "8.0.11-TiDB-v8.5.3".into()
            }
        );
        assert_eq!(
            parse_first_packet(&err_packet(1045, Some("28000"), "Access denied")).unwrap(),
            FirstPacket::Error {
                code: 1045,
                sql_state: Some("28000".into()),
                message: "Access denied".into()
            }
        );
        assert_eq!(
            parse_first_packet(&err_packet(1130, None, "Host is not allowed")).unwrap(),
            FirstPacket::Error {
                code: 1130,
                sql_state: None,
                message: "Host is not allowed".into()
            }
        );
        assert!(parse_first_packet(&[]).is_err());
        assert!(parse_first_packet(&[0xff, 1]).is_err());
        assert!(parse_first_packet(&[9, b'x', 0])
            .unwrap_err()
            .contains("protocol version 9"));
        assert!(parse_first_packet(b"HTTP/1.1 400")
            .unwrap_err()
            .contains("0x48"));
    }

    #[test]
    fn config_parsing() {
        let c = parse_config(
            br#"{"graceful-wait-before-shutdown":30,"security":{"session-token-signing-cert":"/a/cert.pem","ssl-ca":""}}"#,
        )
        .unwrap();
        assert_eq!(
            c,
            ConfigInfo {
                supports_migration: true,
                graceful_wait: Some(30)
            }
        );
        let c = parse_config(
            br#"{"graceful-wait-before-shutdown":0,"security":{"session-token-signing-cert":""}}"#,
        )
        .unwrap();
        assert!(!c.supports_migration);
        assert_eq!(c.graceful_wait, Some(0));
        // An old TiDB without the key cannot migrate sessions.
        let c = parse_config(br#"{"security":{}}"#).unwrap();
        assert!(!c.supports_migration);
        assert_eq!(c.graceful_wait, None);
        assert!(parse_config(b"not json").is_err());
        assert!(parse_config(b"42").is_err());
    }

    const METRICS: &str = r#"# HELP go_gc_duration_seconds A summary of the GC invocation durations.
# TYPE go_gc_duration_seconds summary
go_gc_duration_seconds{quantile="0"} 2.5e-05
process_cpu_seconds_total_not_this 99
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 24.22
process_resident_memory_bytes 9.37947136e+08
process_start_time_seconds 1.79547073425e+09
tidb_server_maxprocs 2
tidb_server_memory_quota_bytes{note="a \"quoted} brace",x="y"} 2.5276510208e+10 1700000000000
tidb_server_memory_quota_bytes 1
"#;

    #[test]
    fn metrics_parsing_keeps_only_needed_families() {
        let at = Instant::now();
        let s = parse_metrics(METRICS, at);
        assert_eq!(s.at, at);
        assert_eq!(s.cpu_seconds, Some(24.22));
        assert_eq!(s.rss_bytes, Some(937_947_136.0));
        assert_eq!(s.start_time, Some(1_795_470_734.25));
        assert_eq!(s.maxprocs, Some(2.0));
        // First sample wins; labels with quotes/braces and a timestamp are skipped correctly.
        assert_eq!(s.memory_quota_bytes, Some(25_276_510_208.0));
        let m = s.memory_usage().unwrap();
        assert!((m - 937_947_136.0 / 25_276_510_208.0).abs() < 1e-12);
    }

    #[test]
    fn metrics_parsing_tolerates_garbage() {
        let s = parse_metrics(
            "tidb_server_maxprocs\nprocess_cpu_seconds_total NaN\nprocess_resident_memory_bytes {\ntidb_server_memory_quota_bytes 0\n",
            Instant::now(),
        );
        assert_eq!(s.maxprocs, None);
        assert_eq!(s.cpu_seconds, None);
        assert_eq!(s.rss_bytes, None);
        assert_eq!(s.memory_quota_bytes, Some(0.0));
        assert_eq!(s.memory_usage(), None, "quota 0 means unknown");
    }

    fn sample(at: Instant, secs: u64, cpu: f64, procs: f64, start: f64) -> MetricsSample {
        MetricsSample {
            at: at + Duration::from_secs(secs),
            cpu_seconds: Some(cpu),
            maxprocs: Some(procs),
            rss_bytes: None,
            memory_quota_bytes: None,
            start_time: Some(start),
        }
    }

    #[test]
    fn cpu_tracker() {
        let t0 = Instant::now();
        let mut t = CpuTracker::new();
        assert_eq!(t.observe(&sample(t0, 0, 100.0, 4.0, 1.0)), None);
        // 10 s, 20 cpu-seconds, 4 cores => 50 %.
        assert_eq!(t.observe(&sample(t0, 10, 120.0, 4.0, 1.0)), Some(0.5));
        // Too close to the previous sample: the last value is kept, the base is not moved.
        assert_eq!(t.observe(&sample(t0, 10, 121.0, 4.0, 1.0)), Some(0.5));
        assert_eq!(t.observe(&sample(t0, 15, 120.0, 4.0, 1.0)), Some(0.0));
        // Counter reset (restart): no value until the next pair.
        assert_eq!(t.observe(&sample(t0, 20, 1.0, 4.0, 1.0)), None);
        assert_eq!(t.observe(&sample(t0, 22, 5.0, 4.0, 1.0)), Some(0.5));
        // Start time changed although the counter grew: a restart too.
        assert_eq!(t.observe(&sample(t0, 24, 50.0, 4.0, 2.0)), None);
        assert_eq!(t.observe(&sample(t0, 26, 54.0, 1.0, 2.0)), Some(2.0));
        assert_eq!(t.last(), Some(2.0));
        // Missing maxprocs: the previous sample's is used; zero on both => unknown.
        let mut s = sample(t0, 30, 60.0, 0.0, 2.0);
        s.maxprocs = None;
        assert_eq!(t.observe(&s), Some(1.5));
        assert_eq!(t.observe(&sample(t0, 32, 61.0, 0.0, 2.0)), None);
        t.reset();
        assert_eq!(t.last(), None);
    }
}

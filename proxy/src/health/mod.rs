//! Backend health checking.
//!
//! One probe round ([`probe_backend`]) asks a TiDB, all at once and each within
//! [`HealthConfig::timeout`]:
//! * `GET /status` on the status port (if known): 200 = fine, any other code = TiDB is
//!   shutting down (it answers 500 from the start of its graceful wait), refused = down,
//!   timeout = slow;
//! * the SQL port's first packet (no login): greeting = fine, ERR or EOF = down, timeout = slow;
//! * now and then `GET /config` (can sessions migrate? how long is the graceful wait?) and
//!   `GET /metrics` (CPU and memory for balancing).
//!
//! A [`HealthTracker`] per backend turns the outcomes into a [`BackendHealth`] with
//! hysteresis: draining/down act at once, slowness only after several probes in a row, and
//! recovery needs several healthy probes in a row. A [`BackendProber`] per backend keeps what
//! must survive between rounds (CPU history, the last config, when config/metrics are due).

pub mod http;
mod probe;
mod state;

use std::time::{Duration, Instant};

mod observer;

pub use http::{HttpError, HttpResponse, StatusClient, DEFAULT_BODY_LIMIT};
pub use observer::run_health_observer;
pub use probe::{
    fetch_config, fetch_metrics, parse_config, parse_first_packet, parse_metrics, parse_status,
    probe_sql, probe_status, ConfigInfo, CpuTracker, FirstPacket, MetricsSample, ProbeOutcome,
    ProbeReport, StatusInfo, MAX_FIRST_PACKET,
};
pub use state::{BackendHealth, HealthTracker, Transition};

/// Health-check timing and hysteresis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Time between probe rounds.
    pub interval: Duration,
    /// Limit of each request / dial+first-packet read of a probe.
    pub timeout: Duration,
    /// How often `GET /config` is read.
    pub config_interval: Duration,
    /// How often `GET /metrics` is scraped.
    pub metrics_interval: Duration,
    /// Consecutive slow probes before a backend is unhealthy.
    pub slow_probes_to_unhealthy: u32,
    /// Consecutive healthy probes before an unhealthy/draining backend is healthy again.
    pub successes_to_recover: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(3),
            timeout: Duration::from_secs(2),
            config_interval: Duration::from_secs(60),
            metrics_interval: Duration::from_secs(5),
            slow_probes_to_unhealthy: 3,
            successes_to_recover: 2,
        }
    }
}

/// Probes one backend once. `status_addr` is the TiDB status port (`host:port`), if known;
/// without it only the SQL port is checked. `want_config`/`want_metrics` add `GET /config` and
/// `GET /metrics` (the caller decides when they are due; [`BackendProber`] does that).
///
/// All parts run concurrently, so the round takes at most about `cfg.timeout`. `cpu` is always
/// `None` here (it needs two scrapes: feed `metrics` to a [`CpuTracker`], or use
/// [`BackendProber`]).
pub async fn probe_backend(
    client: &StatusClient,
    sql_addr: &str,
    status_addr: Option<&str>,
    cfg: &HealthConfig,
    want_config: bool,
    want_metrics: bool,
) -> ProbeReport {
    let started = Instant::now();
    let t = cfg.timeout;
    let status = async {
        match status_addr {
            Some(a) => Some(probe_status(client, a, t).await),
            None => None,
        }
    };
    let config = async {
        match status_addr {
            Some(a) if want_config => Some(fetch_config(client, a, t).await),
            _ => None,
        }
    };
    let metrics = async {
        match status_addr {
            Some(a) if want_metrics => Some(fetch_metrics(client, a, t).await),
            _ => None,
        }
    };
    let (status, (sql_outcome, greeting_version), config, metrics) =
        tokio::join!(status, probe_sql(sql_addr, t), config, metrics);

    let (outcome, status_version) = match status {
        Some((o, info)) => (o, info.and_then(|i| i.version)),
        None => (ProbeOutcome::Healthy, None),
    };
    let outcome = outcome.combine(sql_outcome);

    let config = config.and_then(|r| {
        r.map_err(|e| tracing::debug!(backend = sql_addr, "health: {e}"))
            .ok()
    });
    let metrics = metrics.and_then(|r| {
        r.map_err(|e| tracing::debug!(backend = sql_addr, "health: {e}"))
            .ok()
    });
    ProbeReport {
        outcome,
        server_version: status_version.or(greeting_version),
        supports_migration: config.map(|c| c.supports_migration),
        graceful_wait: config.and_then(|c| c.graceful_wait),
        cpu: None,
        memory: metrics.as_ref().and_then(MetricsSample::memory_usage),
        took: started.elapsed(),
        metrics,
    }
}

/// Per-backend probing state: decides when `/config` and `/metrics` are due, computes CPU
/// usage from successive scrapes, and keeps the last known config values and server version
/// when a round could not read them (a failed `/config` never flips `supports_migration`).
#[derive(Debug, Clone)]
pub struct BackendProber {
    sql_addr: String,
    status_addr: Option<String>,
    config_read_at: Option<Instant>,
    metrics_tried_at: Option<Instant>,
    cpu: CpuTracker,
    last_metrics: Option<MetricsSample>,
    supports_migration: Option<bool>,
    graceful_wait: Option<u64>,
    server_version: Option<String>,
}

impl BackendProber {
    pub fn new(sql_addr: impl Into<String>, status_addr: Option<String>) -> Self {
        Self {
            sql_addr: sql_addr.into(),
            status_addr,
            config_read_at: None,
            metrics_tried_at: None,
            cpu: CpuTracker::new(),
            last_metrics: None,
            supports_migration: None,
            graceful_wait: None,
            server_version: None,
        }
    }

    pub fn sql_addr(&self) -> &str {
        &self.sql_addr
    }

    pub fn status_addr(&self) -> Option<&str> {
        self.status_addr.as_deref()
    }

    /// One probe round. The report carries the last known `supports_migration`,
    /// `graceful_wait` and `server_version` when this round did not read them, and `cpu` /
    /// `memory` from the latest scrape unless it is older than three metrics (or probe) intervals.
    pub async fn probe(&mut self, client: &StatusClient, cfg: &HealthConfig) -> ProbeReport {
        let now = Instant::now();
        let due = |at: Option<Instant>, every: Duration| at.is_none_or(|t| now - t >= every);
        let want_config = due(self.config_read_at, cfg.config_interval);
        let want_metrics = due(self.metrics_tried_at, cfg.metrics_interval);
        let mut r = probe_backend(
            client,
            &self.sql_addr,
            self.status_addr.as_deref(),
            cfg,
            want_config,
            want_metrics,
        )
        .await;

        if self.status_addr.is_some() && want_metrics {
            self.metrics_tried_at = Some(now);
        }
        if r.supports_migration.is_some() {
            self.config_read_at = Some(now);
            self.supports_migration = r.supports_migration;
            self.graceful_wait = r.graceful_wait;
        }
        if let Some(s) = &r.metrics {
            self.cpu.observe(s);
            self.last_metrics = Some(s.clone());
        }
        if r.server_version.is_some() {
            self.server_version.clone_from(&r.server_version);
        }
        if matches!(r.outcome, ProbeOutcome::Down { .. }) {
            // It may come back as a new process: read its config again as soon as it answers,
            // and do not compute CPU across the restart.
            self.config_read_at = None;
            self.cpu.reset();
            self.last_metrics = None;
        }

        r.supports_migration = self.supports_migration;
        r.graceful_wait = self.graceful_wait;
        r.server_version.clone_from(&self.server_version);
        let fresh = self
            .last_metrics
            .as_ref()
            .filter(|m| m.at.elapsed() <= cfg.metrics_interval.max(cfg.interval) * 3);
        r.memory = fresh.and_then(MetricsSample::memory_usage);
        r.cpu = fresh.and(self.cpu.last());
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    type Route = Arc<dyn Fn(&str) -> Option<(u16, String)> + Send + Sync>;

    /// A fake status port: `route(path)` gives (code, body), or `None` to never answer.
    async fn fake_status(route: Route) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let route = route.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut b = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&b[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).into_owned();
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    match route(&path) {
                        Some((code, body)) => {
                            let resp = format!(
                                "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = s.write_all(resp.as_bytes()).await;
                        }
                        None => {
                            let _ = s.read(&mut b).await;
                        }
                    }
                });
            }
        });
        addr
    }

    /// A fake SQL port that writes `first` (a whole packet, or nothing) to each client, then
    /// waits for the client to hang up (`hang`) or closes.
    async fn fake_sql(first: Vec<u8>, hang: bool) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let first = first.clone();
                tokio::spawn(async move {
                    let _ = s.write_all(&first).await;
                    if hang {
                        let mut b = [0u8; 16];
                        let _ = s.read(&mut b).await;
                    }
                });
            }
        });
        addr
    }

    fn packet(payload: &[u8]) -> Vec<u8> {
        let mut p = (payload.len() as u32).to_le_bytes()[..3].to_vec();
        p.push(0);
        p.extend_from_slice(payload);
        p
    }

    fn greeting(version: &str) -> Vec<u8> {
        let mut p = vec![0x0a];
        p.extend_from_slice(version.as_bytes());
        p.extend_from_slice(b"\0\x05\0\0\0abcdefgh\0");
        packet(&p)
    }

    fn err(code: u16, msg: &str) -> Vec<u8> {
        let mut p = vec![0xff];
        p.extend_from_slice(&code.to_le_bytes());
        p.extend_from_slice(b"#HY000");
        p.extend_from_slice(msg.as_bytes());
        packet(&p)
    }

    async fn refused_addr() -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().to_string()
    }

    fn cfg(timeout_ms: u64) -> HealthConfig {
        HealthConfig {
            timeout: Duration::from_millis(timeout_ms),
            ..HealthConfig::default()
        }
    }

    const STATUS_OK: &str = r#"{"connections":1,"version":"8.0.11-TiDB-v8.5.3","git_hash":"x"}"#;

    /// A fake TiDB status port; `cpu` is the current `process_cpu_seconds_total`.
    async fn fake_tidb_status(status_code: u16, cpu: Arc<AtomicU64>, config_ok: bool) -> String {
        fake_status(Arc::new(move |path: &str| match path {
            "/status" if status_code == 200 => Some((200, STATUS_OK.to_string())),
            "/status" => Some((status_code, String::new())),
            "/config" if config_ok => Some((
                200,
                r#"{"graceful-wait-before-shutdown":30,"security":{"session-token-signing-cert":"/c.pem"}}"#.into(),
            )),
            "/config" => Some((500, String::new())),
            "/metrics" => Some((
                200,
                format!(
                    "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}\n\
                     process_resident_memory_bytes 1e9\ntidb_server_maxprocs 2\n\
                     tidb_server_memory_quota_bytes 4e9\nprocess_start_time_seconds 1\n",
                    cpu.load(Ordering::Relaxed)
                ),
            )),
            _ => Some((404, String::new())),
        }))
        .await
    }

    #[tokio::test]
    async fn healthy_backend_with_everything() {
        let status = fake_tidb_status(200, Arc::new(AtomicU64::new(10)), true).await;
        let sql = fake_sql(greeting("8.0.11-TiDB-greeting"), true).await;
        let c = StatusClient::new(Duration::from_secs(2));
        let r = probe_backend(&c, &sql, Some(&status), &cfg(2000), true, true).await;
        assert_eq!(r.outcome, ProbeOutcome::Healthy);
        assert_eq!(r.server_version.as_deref(), Some("8.0.11-TiDB-v8.5.3"));
        assert_eq!(r.supports_migration, Some(true));
        assert_eq!(r.graceful_wait, Some(30));
        assert_eq!(r.memory, Some(0.25));
        assert_eq!(r.cpu, None);
        assert_eq!(r.metrics.as_ref().unwrap().cpu_seconds, Some(10.0));

        // Config and metrics only when asked.
        let r = probe_backend(&c, &sql, Some(&status), &cfg(2000), false, false).await;
        assert_eq!(r.outcome, ProbeOutcome::Healthy);
        assert_eq!(r.supports_migration, None);
        assert!(r.metrics.is_none());
    }

    #[tokio::test]
    async fn without_status_port_the_version_comes_from_the_greeting() {
        let sql = fake_sql(greeting("8.0.11-TiDB-greeting"), true).await;
        let c = StatusClient::new(Duration::from_secs(2));
        let r = probe_backend(&c, &sql, None, &cfg(2000), true, true).await;
        assert_eq!(r.outcome, ProbeOutcome::Healthy);
        assert_eq!(r.server_version.as_deref(), Some("8.0.11-TiDB-greeting"));
        assert_eq!(r.supports_migration, None);
    }

    #[tokio::test]
    async fn status_500_is_draining() {
        let status = fake_tidb_status(500, Arc::new(AtomicU64::new(0)), true).await;
        let sql = fake_sql(greeting("v"), true).await;
        let c = StatusClient::new(Duration::from_secs(2));
        let r = probe_backend(&c, &sql, Some(&status), &cfg(2000), false, false).await;
        assert_eq!(r.outcome, ProbeOutcome::Draining);
    }

    #[tokio::test]
    async fn hung_status_port_is_slow_not_down() {
        let status = fake_status(Arc::new(|_: &str| None)).await;
        let sql = fake_sql(greeting("v"), true).await;
        let c = StatusClient::new(Duration::from_secs(2));
        let r = probe_backend(&c, &sql, Some(&status), &cfg(300), true, true).await;
        match &r.outcome {
            ProbeOutcome::Slow { reason } => {
                assert!(reason.contains(&status), "{reason}");
                assert!(reason.contains("GET /status"), "{reason}");
                assert!(reason.contains("waiting for the response"), "{reason}");
            }
            o => panic!("{o:?}"),
        }
        // Config and metrics were asked concurrently: the round still takes ~one timeout.
        assert!(r.took < Duration::from_millis(1500), "{:?}", r.took);
        assert_eq!(r.supports_migration, None);
    }

    #[tokio::test]
    async fn sql_port_err_is_down_with_the_message() {
        let sql = fake_sql(err(9005, "Region is unavailable"), false).await;
        let c = StatusClient::new(Duration::from_secs(2));
        let r = probe_backend(&c, &sql, None, &cfg(2000), false, false).await;
        match &r.outcome {
            ProbeOutcome::Down { reason } => {
                assert_eq!(
                    reason,
                    &format!("SQL port {sql}: ERR 9005 (HY000): Region is unavailable")
                );
            }
            o => panic!("{o:?}"),
        }
    }

    #[tokio::test]
    async fn sql_port_too_many_connections_is_slow() {
        let sql = fake_sql(err(1040, "Too many connections"), false).await;
        let (o, _) = probe_sql(&sql, Duration::from_secs(2)).await;
        assert!(
            matches!(&o, ProbeOutcome::Slow { reason } if reason.contains("Too many connections")),
            "{o:?}"
        );
    }

    #[tokio::test]
    async fn sql_port_closing_at_once_is_down() {
        // What TiDB does when it has lost PD: accept and close.
        let sql = fake_sql(Vec::new(), false).await;
        let (o, _) = probe_sql(&sql, Duration::from_secs(2)).await;
        assert_eq!(
            o,
            ProbeOutcome::Down {
                reason: format!("SQL port {sql}: connection closed before the greeting")
            }
        );
    }

    #[tokio::test]
    async fn hung_sql_port_is_slow() {
        let sql = fake_sql(Vec::new(), true).await;
        let (o, v) = probe_sql(&sql, Duration::from_millis(200)).await;
        assert_eq!(v, None);
        assert!(
            matches!(&o, ProbeOutcome::Slow { reason } if reason.contains("waiting for the greeting")),
            "{o:?}"
        );
    }

    #[tokio::test]
    async fn oversized_or_garbage_first_packet_is_down() {
        let sql = fake_sql(vec![0xff, 0xff, 0xff, 0], false).await;
        let (o, _) = probe_sql(&sql, Duration::from_secs(2)).await;
        assert!(
            matches!(&o, ProbeOutcome::Down { reason } if reason.contains("too large")),
            "{o:?}"
        );
        let sql = fake_sql(packet(b"HTTP/1.0 400"), false).await;
        let (o, _) = probe_sql(&sql, Duration::from_secs(2)).await;
        assert!(
            matches!(&o, ProbeOutcome::Down { reason } if reason.contains("not a MySQL greeting")),
            "{o:?}"
        );
    }

    #[tokio::test]
    async fn refused_ports_are_down() {
        let sql = refused_addr().await;
        let status = refused_addr().await;
        let c = StatusClient::new(Duration::from_secs(2));
        let r = probe_backend(&c, &sql, Some(&status), &cfg(2000), true, true).await;
        match &r.outcome {
            ProbeOutcome::Down { reason } => {
                assert_eq!(
                    reason,
                    &format!(
                        "status port {status}: GET /status: connection refused; \
                         SQL port {sql}: connection refused"
                    )
                );
            }
            o => panic!("{o:?}"),
        }
        assert!(r.took < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn refused_sql_port_beats_healthy_status() {
        let status = fake_tidb_status(200, Arc::new(AtomicU64::new(0)), true).await;
        let sql = refused_addr().await;
        let c = StatusClient::new(Duration::from_secs(2));
        let r = probe_backend(&c, &sql, Some(&status), &cfg(2000), false, false).await;
        assert!(matches!(r.outcome, ProbeOutcome::Down { .. }), "{r:?}");
        // The status port still told us the version.
        assert_eq!(r.server_version.as_deref(), Some("8.0.11-TiDB-v8.5.3"));
    }

    #[tokio::test]
    async fn prober_computes_cpu_and_keeps_config_on_errors() {
        let cpu = Arc::new(AtomicU64::new(100));
        let status = fake_tidb_status(200, cpu.clone(), true).await;
        let sql = fake_sql(greeting("v"), true).await;
        let c = StatusClient::new(Duration::from_secs(2));
        let cfg = HealthConfig {
            metrics_interval: Duration::ZERO,
            config_interval: Duration::ZERO,
            ..cfg(2000)
        };
        let mut p = BackendProber::new(sql.clone(), Some(status.clone()));
        let r = p.probe(&c, &cfg).await;
        assert_eq!(r.outcome, ProbeOutcome::Healthy);
        assert_eq!(r.cpu, None, "one scrape is not enough");
        assert_eq!(r.memory, Some(0.25));
        assert_eq!(r.supports_migration, Some(true));

        tokio::time::sleep(Duration::from_millis(1100)).await;
        cpu.store(101, Ordering::Relaxed);
        let r = p.probe(&c, &cfg).await;
        let usage = r.cpu.expect("cpu after two scrapes");
        // 1 cpu-second over at least 1.1 s on 2 procs.
        assert!(usage > 0.0 && usage <= 1.0 / 1.1 / 2.0, "{usage}");

        // /config now fails: the previous values are kept.
        let broken = fake_tidb_status(200, cpu.clone(), false).await;
        let mut p2 = p.clone();
        p2.status_addr = Some(broken);
        let r = p2.probe(&c, &cfg).await;
        assert_eq!(r.supports_migration, Some(true));
        assert_eq!(r.graceful_wait, Some(30));

        // Down: CPU history and metrics are dropped, config is kept but re-read when back.
        p.sql_addr = refused_addr().await;
        let r = p.probe(&c, &cfg).await;
        assert!(matches!(r.outcome, ProbeOutcome::Down { .. }));
        assert_eq!(r.cpu, None);
        assert_eq!(r.memory, None);
        assert_eq!(r.supports_migration, Some(true));
        assert!(p.config_read_at.is_none());
    }

    #[tokio::test]
    async fn prober_respects_intervals() {
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let status = fake_status(Arc::new(move |path: &str| {
            if path == "/config" || path == "/metrics" {
                h.fetch_add(1, Ordering::Relaxed);
            }
            match path {
                "/status" => Some((200, STATUS_OK.into())),
                _ => Some((200, "{}".into())),
            }
        }))
        .await;
        let sql = fake_sql(greeting("v"), true).await;
        let c = StatusClient::new(Duration::from_secs(2));
        let mut p = BackendProber::new(sql, Some(status));
        let cfg = cfg(2000);
        for _ in 0..3 {
            assert_eq!(p.probe(&c, &cfg).await.outcome, ProbeOutcome::Healthy);
        }
        // First round only: /config and /metrics once each (intervals 60 s and 5 s).
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }
}

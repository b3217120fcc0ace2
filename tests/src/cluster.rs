//! Private servers for the session-migration tests, and the proxy's admin API.
//!
//! * [`TidbCluster`]: TiDB instances of its own (`tests/scripts/tidb.sh` in a directory of its
//!   own, so they share one session-token signing cert), stopped when dropped. Instance `i`
//!   listens on `127.0.0.(10+i):4000` (status port 10080), so tests that run side by side must
//!   use different instance numbers (see [`migration_instance`]).
//! * [`Etcd`]: a private etcd (`tests/scripts/etcd.sh`) standing in for PD, with TiDB
//!   registrations as TiDB writes them.
//! * [`Proxy`] admin helpers: push and read `/api/v1/backends`, read `/metrics`.
//!
//! None of this needs the shared test bed (`TIPROXY_TEST_*`).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use mysql_async::Conn;
use serde_json::Value as Json;

use crate::{connect, opts_for, workspace_dir, Proxy, TempDir};

/// `tests/scripts` of the workspace.
pub fn scripts_dir() -> PathBuf {
    workspace_dir().join("tests").join("scripts")
}

/// How many instance numbers the migration tests use: offsets `0..MIGRATION_BLOCK` of
/// [`migration_instance`].
pub const MIGRATION_BLOCK: u32 = 19;

/// TiDB instance number `offset` of this process's block for the migration tests. The block
/// starts at `TIPROXY_MIGRATION_FIRST` when set, else at the first of 51, 68, 85, ... whose
/// instances are all free. The block is claimed for the life of the process by listening on
/// port 4001 (unused by TiDB) of its first address, so test processes running side by side
/// never share instances.
pub fn migration_instance(offset: u32) -> u32 {
    assert!(
        offset < MIGRATION_BLOCK,
        "migration instance offset {offset} >= {MIGRATION_BLOCK}"
    );
    migration_base() + offset
}

fn migration_base() -> u32 {
    static BASE: OnceLock<(u32, TcpListener)> = OnceLock::new();
    BASE.get_or_init(|| {
        let fixed = std::env::var("TIPROXY_MIGRATION_FIRST").ok().map(|v| {
            v.trim().parse::<u32>().unwrap_or_else(|_| {
                panic!("TIPROXY_MIGRATION_FIRST={v:?} is not an instance number")
            })
        });
        let candidates: Vec<u32> = match fixed {
            Some(k) => vec![k],
            None => (0..)
                .map(|m| 51 + m * MIGRATION_BLOCK)
                .take_while(|k| k + MIGRATION_BLOCK - 1 <= 244)
                .collect(),
        };
        for &k in &candidates {
            assert!(
                k >= 1 && k + MIGRATION_BLOCK - 1 <= 244,
                "TIPROXY_MIGRATION_FIRST={k}: instances {k}..{} are outside 1..=244",
                k + MIGRATION_BLOCK - 1
            );
            let Ok(lock) = TcpListener::bind((tidb_ip(k).as_str(), 4001)) else {
                continue;
            };
            if (k..k + MIGRATION_BLOCK).all(instance_free) {
                return (k, lock);
            }
        }
        panic!(
            "no free block of {MIGRATION_BLOCK} TiDB instance numbers among {candidates:?} \
             (another test process, or TiDBs left running?): see `ss -ltn`, or set \
             TIPROXY_MIGRATION_FIRST"
        )
    })
    .0
}

/// Nothing listens on instance `i`'s SQL or status port.
fn instance_free(i: u32) -> bool {
    [tidb_sql_addr(i), tidb_status_addr(i)].iter().all(|a| {
        let addr: SocketAddr = a.parse().expect("address");
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err()
    })
}

/// Loopback address of TiDB instance `i` (the scheme of `tidb.sh`).
pub fn tidb_ip(i: u32) -> String {
    assert!(
        (1..=244).contains(&i),
        "TiDB instance {i} is outside 1..=244"
    );
    format!("127.0.0.{}", 10 + i)
}

pub fn tidb_sql_addr(i: u32) -> String {
    format!("{}:4000", tidb_ip(i))
}

pub fn tidb_status_addr(i: u32) -> String {
    format!("{}:10080", tidb_ip(i))
}

/// Runs a script with `args` in a blocking thread: (exit status, stdout, stderr).
async fn run_script(script: &str, args: Vec<String>) -> (ExitStatus, String, String) {
    let path = scripts_dir().join(script);
    tokio::task::spawn_blocking(move || {
        let out = Command::new("bash")
            .arg(&path)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("script thread")
}

/// Runs a script and panics with its output when it fails; returns its stdout.
async fn run_script_ok(script: &str, args: Vec<String>) -> String {
    let what = format!("{script} {}", args.join(" "));
    let (status, out, err) = run_script(script, args).await;
    assert!(
        status.success(),
        "`{what}` failed ({status}):\n---- stdout ----\n{out}---- stderr ----\n{err}"
    );
    out
}

// ---- TiDB ------------------------------------------------------------------------------------

/// TiDB instances `first..first+n` started by `tidb.sh` in a directory of their own; every
/// instance still running is killed (SIGKILL) when this is dropped.
#[derive(Debug)]
pub struct TidbCluster {
    instances: Vec<u32>,
    graceful_wait: u32,
    persistent: bool,
    tls: bool,
    // Dropped after the servers are stopped (fields drop in order, after Drop::drop).
    dir: TempDir,
}

impl TidbCluster {
    /// Starts `n` instances from `first` with `graceful-wait-before-shutdown = graceful_wait`;
    /// `persistent` keeps their data across restarts (`tidb.sh --persistent`). Waits until
    /// every instance serves SQL.
    pub async fn start(first: u32, n: u32, graceful_wait: u32, persistent: bool) -> TidbCluster {
        Self::launch(first, n, graceful_wait, persistent, false).await
    }

    /// Like [`TidbCluster::start`] (volatile data), but every instance also serves TLS on its
    /// SQL port with a cert for its IP signed by [`TidbCluster::tls_ca`] (`tidb.sh --tls`).
    pub async fn start_tls(first: u32, n: u32, graceful_wait: u32) -> TidbCluster {
        Self::launch(first, n, graceful_wait, false, true).await
    }

    async fn launch(
        first: u32,
        n: u32,
        graceful_wait: u32,
        persistent: bool,
        tls: bool,
    ) -> TidbCluster {
        let instances: Vec<u32> = (first..first + n).collect();
        for &i in &instances {
            assert!(
                instance_free(i),
                "TiDB instance {i} ({}) is already taken by another server",
                tidb_sql_addr(i)
            );
        }
        let cluster = TidbCluster {
            instances,
            graceful_wait,
            persistent,
            tls,
            dir: TempDir::new("tiproxy-tidb"),
        };
        let mut args = cluster.common_args();
        args.splice(0..0, ["start".into(), n.to_string()]);
        args.extend(["--first".into(), first.to_string()]);
        run_script_ok("tidb.sh", args).await;
        cluster
    }

    fn common_args(&self) -> Vec<String> {
        let mut args = vec![
            "--dir".to_string(),
            self.dir.path().display().to_string(),
            "--graceful-wait".to_string(),
            self.graceful_wait.to_string(),
        ];
        if self.persistent {
            args.push("--persistent".into());
        }
        if self.tls {
            args.push("--tls".into());
        }
        args
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA that signed every instance's TLS cert (clusters of [`TidbCluster::start_tls`]).
    pub fn tls_ca(&self) -> PathBuf {
        assert!(self.tls, "this cluster was started without TLS");
        self.dir().join("tls-ca.pem")
    }

    /// The instance numbers, ascending.
    pub fn instances(&self) -> &[u32] {
        &self.instances
    }

    /// SQL address of the `k`-th instance (0-based).
    pub fn addr(&self, k: usize) -> String {
        tidb_sql_addr(self.instances[k])
    }

    /// Status address of the `k`-th instance (0-based).
    pub fn status_addr(&self, k: usize) -> String {
        tidb_status_addr(self.instances[k])
    }

    /// All SQL addresses.
    pub fn addrs(&self) -> Vec<String> {
        self.instances.iter().map(|&i| tidb_sql_addr(i)).collect()
    }

    /// The position of the instance with this SQL address.
    pub fn index_of(&self, addr: &str) -> usize {
        self.addrs()
            .iter()
            .position(|a| a == addr)
            .unwrap_or_else(|| panic!("{addr} is not one of {:?}", self.addrs()))
    }

    /// A direct root connection to the `k`-th instance.
    pub async fn connect(&self, k: usize) -> Conn {
        let addr = self.addr(k);
        connect(opts_for(&addr, "root", None), &format!("direct {addr}")).await
    }

    /// Runs `statements` directly on every instance (e.g. to create the same schema on each:
    /// every standalone TiDB is a separate database).
    pub async fn run_on_all(&self, statements: &[&str]) {
        for k in 0..self.instances.len() {
            let mut conn = self.connect(k).await;
            for sql in statements {
                conn.query_drop(*sql)
                    .await
                    .unwrap_or_else(|e| panic!("{}: {sql}: {e}", self.addr(k)));
            }
            let _ = conn.disconnect().await;
        }
    }

    /// Starts the `k`-th instance again (after a stop), with the same settings.
    pub async fn restart(&self, k: usize) {
        let mut args = self.common_args();
        args.splice(0..0, ["start".into(), "1".into()]);
        args.extend(["--first".into(), self.instances[k].to_string()]);
        run_script_ok("tidb.sh", args).await;
    }

    /// Sends SIGTERM to the `k`-th instance in the background (`tidb.sh stop i --graceful`):
    /// TiDB answers `/status` with 500 at once, serves SQL for the graceful wait, then exits.
    pub fn stop_graceful(&self, k: usize) -> BackgroundStop {
        let child = Command::new("bash")
            .arg(scripts_dir().join("tidb.sh"))
            .args([
                "stop",
                &self.instances[k].to_string(),
                "--graceful",
                "--dir",
            ])
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tidb.sh stop");
        BackgroundStop {
            child: Some(child),
            started: Instant::now(),
            what: format!("tidb.sh stop {} --graceful", self.instances[k]),
        }
    }

    /// Kills the `k`-th instance (SIGKILL) and waits until it is gone.
    pub async fn kill(&self, k: usize) {
        run_script_ok(
            "tidb.sh",
            vec![
                "stop".into(),
                self.instances[k].to_string(),
                "--dir".into(),
                self.dir.path().display().to_string(),
            ],
        )
        .await;
    }
}

impl Drop for TidbCluster {
    fn drop(&mut self) {
        let out = Command::new("bash")
            .arg(scripts_dir().join("tidb.sh"))
            .arg("stop")
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: stopping the TiDBs of {} failed: {}",
                self.dir.path().display(),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("warning: cannot run tidb.sh stop: {e}"),
        }
    }
}

/// A `tidb.sh stop --graceful` running in the background.
#[derive(Debug)]
pub struct BackgroundStop {
    child: Option<Child>,
    started: Instant,
    what: String,
}

impl BackgroundStop {
    /// Waits (at most `timeout`) for the stop to finish and panics if it failed. Returns how
    /// long the stop took since it began.
    pub async fn wait(mut self, timeout: Duration) -> Duration {
        let mut child = self.child.take().expect("child");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait for tidb.sh stop") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`{}` did not finish within {timeout:?}", self.what);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        assert!(status.success(), "`{}` failed ({status}): {err}", self.what);
        self.started.elapsed()
    }
}

impl Drop for BackgroundStop {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---- etcd ------------------------------------------------------------------------------------

/// A private etcd (`etcd.sh`) on a free port of 127.0.0.1, stopped when dropped.
#[derive(Debug)]
pub struct Etcd {
    port: u16,
    dir: TempDir,
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

impl Etcd {
    pub async fn start() -> Etcd {
        let dir = TempDir::new("tiproxy-etcd");
        // Client port P and peer port P+1 must both be free; start from a pid-dependent port
        // so concurrent test processes rarely collide, and retry on a lost race.
        let mut port = 23000 + (std::process::id() % 500) as u16 * 4;
        for _ in 0..50 {
            if port_free(port) && port_free(port + 1) {
                let (status, out, err) = run_script(
                    "etcd.sh",
                    vec![
                        "start".into(),
                        "--dir".into(),
                        dir.path().display().to_string(),
                        "--port".into(),
                        port.to_string(),
                    ],
                )
                .await;
                if status.success() {
                    return Etcd { port, dir };
                }
                eprintln!("etcd.sh start on port {port} failed: {out}{err}; trying another port");
            }
            port += 4;
        }
        panic!("cannot start etcd on any port")
    }

    /// `127.0.0.1:P`, for the proxy's `pd-addrs`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn dir_args(&self) -> [String; 2] {
        ["--dir".into(), self.dir.path().display().to_string()]
    }

    /// Registers a TiDB as TiDB itself does (info + ttl key under a lease).
    pub async fn put_tidb(&self, sql_addr: &str, status_port: u16) {
        let mut args = vec!["put-tidb".into(), sql_addr.into(), status_port.to_string()];
        args.extend(self.dir_args());
        run_script_ok("etcd.sh", args).await;
    }

    /// Removes a TiDB's registration (as when it is gone).
    pub async fn del_tidb(&self, sql_addr: &str) {
        let mut args = vec!["del-tidb".into(), sql_addr.into()];
        args.extend(self.dir_args());
        run_script_ok("etcd.sh", args).await;
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(scripts_dir().join("etcd.sh"))
            .arg("stop")
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .output();
    }
}

// ---- the proxy's admin API --------------------------------------------------------------------

/// One backend of a pushed snapshot.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub addr: String,
    pub status_addr: Option<String>,
    pub draining: bool,
}

impl Pushed {
    /// An active TiDB instance of `cluster` (position `k`), with its status port.
    pub fn tidb(cluster: &TidbCluster, k: usize) -> Pushed {
        Pushed {
            addr: cluster.addr(k),
            status_addr: Some(cluster.status_addr(k)),
            draining: false,
        }
    }

    pub fn draining(mut self) -> Pushed {
        self.draining = true;
        self
    }

    fn to_json(&self) -> Json {
        let mut v = serde_json::json!({
            "addr": self.addr,
            "state": if self.draining { "draining" } else { "active" },
        });
        if let Some(s) = &self.status_addr {
            v["status-addr"] = Json::String(s.clone());
        }
        v
    }
}

/// A plain HTTP/1.1 request with an optional JSON body: (status code, body).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        if let Some(b) = body {
            req.push_str(b);
        }
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        let body = if chunked {
            dechunk(body)
        } else {
            body.to_string()
        };
        Ok((code, body))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| std::io::Error::other("HTTP request timed out"))?
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let Some((size, rest)) = body.split_once("\r\n") else {
            return out;
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return out;
        };
        if n == 0 || rest.len() < n {
            return out;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
}

/// The proxy's view of one backend (`GET /api/v1/backends`).
#[derive(Debug, Clone)]
pub struct BackendState {
    pub addr: String,
    pub state: String,
    /// `healthy`, `unknown`, `draining` or `unhealthy`.
    pub health: String,
    pub sessions: u64,
    /// (session id, reason) of sessions whose migration the backend refused.
    pub blocked: Vec<(u64, String)>,
    pub json: Json,
}

/// `GET /api/v1/backends`, parsed.
#[derive(Debug, Clone)]
pub struct BackendsState {
    pub generation: Option<u64>,
    pub backends: Vec<BackendState>,
    pub json: Json,
}

impl BackendsState {
    pub fn get(&self, addr: &str) -> Option<&BackendState> {
        self.backends.iter().find(|b| b.addr == addr)
    }

    /// Sessions on `addr` (0 when the proxy does not list it).
    pub fn sessions(&self, addr: &str) -> u64 {
        self.get(addr).map_or(0, |b| b.sessions)
    }

    /// Health of `addr`, or `absent`.
    pub fn health(&self, addr: &str) -> &str {
        self.get(addr).map_or("absent", |b| b.health.as_str())
    }
}

impl Proxy {
    /// `PUT /api/v1/backends`: (HTTP status, body).
    pub async fn push_backends(&self, generation: u64, backends: &[Pushed]) -> (u16, String) {
        let body = serde_json::json!({
            "generation": generation,
            "backends": backends.iter().map(Pushed::to_json).collect::<Vec<_>>(),
        })
        .to_string();
        http_request(self.api_addr(), "PUT", "/api/v1/backends", Some(&body))
            .await
            .unwrap_or_else(|e| panic!("PUT /api/v1/backends: {e}"))
    }

    /// Pushes and panics unless the proxy answers 200.
    pub async fn push_ok(&self, generation: u64, backends: &[Pushed]) {
        let (code, body) = self.push_backends(generation, backends).await;
        assert_eq!(
            code, 200,
            "PUT /api/v1/backends generation {generation}: {body}"
        );
    }

    /// `GET /api/v1/backends`, parsed.
    pub async fn backends(&self) -> BackendsState {
        let (code, body) = http_request(self.api_addr(), "GET", "/api/v1/backends", None)
            .await
            .unwrap_or_else(|e| panic!("GET /api/v1/backends: {e}"));
        assert_eq!(code, 200, "GET /api/v1/backends: {body}");
        let json: Json = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET /api/v1/backends is not JSON ({e}): {body}"));
        let backends = json["backends"]
            .as_array()
            .unwrap_or_else(|| panic!("no `backends` array: {body}"))
            .iter()
            .map(|b| BackendState {
                addr: b["addr"].as_str().unwrap_or_default().to_string(),
                state: b["state"].as_str().unwrap_or_default().to_string(),
                health: b["health"]["state"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                sessions: b["sessions"].as_u64().unwrap_or(0),
                blocked: b["blocked-sessions"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|s| {
                                (
                                    s["id"].as_u64().unwrap_or(0),
                                    s["reason"].as_str().unwrap_or_default().to_string(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                json: b.clone(),
            })
            .collect();
        BackendsState {
            generation: json["generation"].as_u64(),
            backends,
            json,
        }
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> String {
        let (code, body) = http_request(self.api_addr(), "GET", "/metrics", None)
            .await
            .unwrap_or_else(|e| panic!("GET /metrics: {e}"));
        assert_eq!(code, 200, "GET /metrics: {body}");
        body
    }

    /// Polls `GET /api/v1/backends` every 50 ms until `cond` holds; panics after `timeout`
    /// with the last state. Returns the state that satisfied `cond` and the time it took.
    pub async fn wait_backends(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&BackendsState) -> bool,
    ) -> (BackendsState, Duration) {
        let start = Instant::now();
        loop {
            let state = self.backends().await;
            if cond(&state) {
                return (state, start.elapsed());
            }
            if start.elapsed() >= timeout {
                panic!(
                    "timed out after {timeout:?} waiting for: {what}\nlast GET /api/v1/backends: {}",
                    serde_json::to_string_pretty(&state.json).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Sum of the samples of a Prometheus counter whose labels contain every `name="value"` pair
/// in `labels` (0 when there is none).
pub fn metric_sum(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, r)) => (m, r),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            if !labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            {
                return None;
            }
            value.parse::<f64>().ok()
        })
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}

/// The TiDB serving this connection: `instance` of its own row in
/// `information_schema.cluster_info` (its SQL address, e.g. `127.0.0.61:4000`).
pub async fn serving_tidb(conn: &mut Conn) -> Result<String, mysql_async::Error> {
    let inst: Option<String> = conn
        .query_first("SELECT instance FROM information_schema.cluster_info WHERE type = 'tidb'")
        .await?;
    Ok(inst.unwrap_or_default())
}

//! Helpers shared by the end-to-end tests: the test bed's addresses, starting the proxy binary,
//! client options for direct and proxied connections, the `mysql` command-line client, and a
//! tiny raw-protocol client for what mysql_async cannot do (cursors, PROXY headers, binding
//! the source address). [`cluster`] starts private TiDBs and etcd (for the migration tests)
//! and talks to the proxy's admin API.
//!
//! The real servers are started by `tests/run-all.sh`, which exports:
//! * `TIPROXY_TEST_TIDB`: comma-separated TiDB SQL addresses (`127.0.0.11:4000,127.0.0.12:4000`)
//! * `TIPROXY_TEST_MARIADB`: the MariaDB SQL address (`127.0.0.1:3307`)
//! * `TIPROXY_TEST_MARIADB_CA`: the CA that signed MariaDB's TLS certificate
//! * `TIPROXY_BIN` (optional): the proxy binary; default `<target>/debug/tiproxy`
//! * `TIPROXY_OPERATOR_BIN` (optional): the operator binary; default
//!   `<target>/debug/tiproxy-operator`

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mysql_async::prelude::*;
use mysql_async::{Conn, Opts, OptsBuilder, Row, SslOpts, Value};

pub mod cluster;
pub mod kube;
pub mod operator;

// ---- test bed -------------------------------------------------------------------------------

/// Addresses of the real servers the tests run against.
#[derive(Debug, Clone)]
pub struct Testbed {
    pub tidb: Vec<String>,
    pub mariadb: String,
    pub mariadb_ca: PathBuf,
}

fn required_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
        _ => panic!(
            "environment variable {name} is not set: these end-to-end tests need real TiDB and \
             MariaDB servers. Run the whole suite with `bash tests/run-all.sh`, which starts them \
             and exports TIPROXY_TEST_TIDB, TIPROXY_TEST_MARIADB and TIPROXY_TEST_MARIADB_CA \
             (or start tests/scripts/{{tidb,mariadb}}.sh yourself and export those variables)"
        ),
    }
}

impl Testbed {
    /// The test bed from the environment; panics (never skips) when it is not described.
    pub fn get() -> &'static Testbed {
        static BED: OnceLock<Testbed> = OnceLock::new();
        BED.get_or_init(|| {
            let tidb: Vec<String> = required_env("TIPROXY_TEST_TIDB")
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            assert!(
                !tidb.is_empty(),
                "TIPROXY_TEST_TIDB has no address; run `bash tests/run-all.sh`"
            );
            let mariadb = required_env("TIPROXY_TEST_MARIADB");
            let mariadb_ca = PathBuf::from(required_env("TIPROXY_TEST_MARIADB_CA"));
            assert!(
                mariadb_ca.is_file(),
                "TIPROXY_TEST_MARIADB_CA={} is not a file; run `bash tests/run-all.sh`",
                mariadb_ca.display()
            );
            Testbed {
                tidb,
                mariadb,
                mariadb_ca,
            }
        })
    }

    /// TiDB instance `i` (0-based), wrapping around when fewer exist.
    pub fn tidb(&self, i: usize) -> &str {
        &self.tidb[i % self.tidb.len()]
    }
}

/// Which kind of real server a test talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    TiDB,
    MariaDB,
}

/// One real backend server.
#[derive(Debug, Clone)]
pub struct Backend {
    pub kind: Kind,
    pub addr: String,
}

impl Backend {
    /// TiDB instance `i` (0-based).
    pub fn tidb(i: usize) -> Backend {
        Backend {
            kind: Kind::TiDB,
            addr: Testbed::get().tidb(i).to_string(),
        }
    }

    pub fn mariadb() -> Backend {
        Backend {
            kind: Kind::MariaDB,
            addr: Testbed::get().mariadb.clone(),
        }
    }

    /// TiDB instance 0 and MariaDB: what most tests run against.
    pub fn both() -> Vec<Backend> {
        vec![Backend::tidb(0), Backend::mariadb()]
    }

    pub fn is_tidb(&self) -> bool {
        self.kind == Kind::TiDB
    }

    /// A database every test may create tables in.
    pub fn database(&self) -> &'static str {
        match self.kind {
            Kind::TiDB => "test",
            Kind::MariaDB => "tp_test",
        }
    }

    /// Options for a direct connection as `user`.
    pub fn opts(&self, user: &str, pass: Option<&str>) -> OptsBuilder {
        opts_for(&self.addr, user, pass)
    }

    /// Options for a direct connection as root into [`Backend::database`].
    pub fn root_opts(&self) -> OptsBuilder {
        self.opts("root", None).db_name(Some(self.database()))
    }

    /// A direct root connection into [`Backend::database`].
    pub async fn connect_root(&self) -> Conn {
        connect(self.root_opts(), &format!("direct {}", self.addr)).await
    }

    /// Starts a proxy in front of this backend only, with `extra` TOML appended to the config.
    /// `extra` must not contain a `[proxy]` table header; use [`Proxy::start`] for that.
    pub fn proxy(&self, extra: &str) -> Proxy {
        Proxy::start(&format!(
            "[proxy]\nbackends = [\"{}\"]\nconnect-timeout = 5\n{extra}",
            self.addr
        ))
    }

    pub fn name(&self) -> String {
        format!("{:?}@{}", self.kind, self.addr)
    }
}

/// Basic options for `addr` ("host:port") as `user`.
pub fn opts_for(addr: &str, user: &str, pass: Option<&str>) -> OptsBuilder {
    let (host, port) = split_addr(addr);
    OptsBuilder::default()
        .ip_or_hostname(host)
        .tcp_port(port)
        .user(Some(user))
        .pass(pass)
        .prefer_socket(false)
        .wait_timeout(None)
}

/// TLS options that accept any certificate (the proxy's auto-certs are self-signed).
pub fn insecure_ssl() -> SslOpts {
    SslOpts::default()
        .with_danger_accept_invalid_certs(true)
        .with_danger_skip_domain_validation(true)
}

pub fn split_addr(addr: &str) -> (String, u16) {
    let (host, port) = addr
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("address {addr:?} is not host:port"));
    let port = port
        .parse()
        .unwrap_or_else(|_| panic!("address {addr:?} has a bad port"));
    (
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
    )
}

/// Connects or panics with `what` and the error.
pub async fn connect(opts: impl Into<Opts>, what: &str) -> Conn {
    match Conn::new(opts.into()).await {
        Ok(c) => c,
        Err(e) => panic!("{what}: cannot connect: {e:?}"),
    }
}

/// The server error code of a mysql_async error, if it is a server error.
pub fn server_code(e: &mysql_async::Error) -> Option<u16> {
    match e {
        mysql_async::Error::Server(s) => Some(s.code),
        _ => None,
    }
}

/// Code and message of a server error; panics with the error for anything else.
pub fn expect_server_error<T: std::fmt::Debug>(
    r: Result<T, mysql_async::Error>,
    what: &str,
) -> mysql_async::ServerError {
    match r {
        Err(mysql_async::Error::Server(s)) => s,
        other => panic!("{what}: expected a server error, got {other:?}"),
    }
}

/// A name unique to this process and call, usable as a table or database name.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}_{}_{n}_{:x}", std::process::id(), nanos & 0xFFFFF)
}

/// FNV-1a 64-bit: a checksum for comparing large values.
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Creates the users the TiDB tests need on every TiDB instance (each is its own database):
/// `tp_sha2`/`sha2_pw` (caching_sha2_password) and `tp_native`/`native_pw`
/// (mysql_native_password). Idempotent; runs once per test process.
pub async fn ensure_tidb_users() {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| async {
        for addr in &Testbed::get().tidb {
            let mut conn = connect(opts_for(addr, "root", None), addr).await;
            for sql in [
                "CREATE USER IF NOT EXISTS 'tp_sha2'@'%' IDENTIFIED WITH caching_sha2_password BY 'sha2_pw'",
                "ALTER USER 'tp_sha2'@'%' IDENTIFIED WITH caching_sha2_password BY 'sha2_pw'",
                "GRANT ALL PRIVILEGES ON test.* TO 'tp_sha2'@'%'",
                "CREATE USER IF NOT EXISTS 'tp_native'@'%' IDENTIFIED WITH mysql_native_password BY 'native_pw'",
                "ALTER USER 'tp_native'@'%' IDENTIFIED WITH mysql_native_password BY 'native_pw'",
                "GRANT ALL PRIVILEGES ON test.* TO 'tp_native'@'%'",
            ] {
                // Concurrent test processes may race on the same statements: retry briefly.
                let mut tries = 0;
                loop {
                    match conn.query_drop(sql).await {
                        Ok(()) => break,
                        Err(e) if tries < 5 => {
                            tries += 1;
                            eprintln!("{addr}: {sql}: {e}; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => panic!("{addr}: {sql}: {e}"),
                    }
                }
            }
            let _ = conn.disconnect().await;
        }
    })
    .await;
}

/// All rows of a text-protocol query as values.
pub async fn query_values(
    conn: &mut Conn,
    sql: &str,
) -> Result<Vec<Vec<Value>>, mysql_async::Error> {
    let rows: Vec<Row> = conn.query(sql).await?;
    Ok(rows.into_iter().map(Row::unwrap).collect())
}

/// All rows of a binary-protocol (prepared) execution as values.
pub async fn exec_values<S: StatementLike>(
    conn: &mut Conn,
    stmt: S,
    params: impl Into<mysql_async::Params> + Send,
) -> Result<Vec<Vec<Value>>, mysql_async::Error> {
    let rows: Vec<Row> = conn.exec(stmt, params).await?;
    Ok(rows.into_iter().map(Row::unwrap).collect())
}

/// Column metadata of a result set that matters to clients: name, type, flags, charset.
pub type ColumnMeta = (String, String, String, u16);

pub fn column_meta(row: &Row) -> Vec<ColumnMeta> {
    row.columns_ref()
        .iter()
        .map(|c| {
            (
                c.name_str().into_owned(),
                format!("{:?}", c.column_type()),
                format!("{:?}", c.flags()),
                c.character_set(),
            )
        })
        .collect()
}

/// The result sets of a (multi-statement) text query, in order, and the error that ended it
/// early, if any. A statement without a result set (e.g. `DO 1`) contributes an empty set.
pub async fn query_sets(
    conn: &mut Conn,
    sql: &str,
) -> (Vec<Vec<Vec<Value>>>, Option<mysql_async::Error>) {
    let mut sets = Vec::new();
    let mut result = match conn.query_iter(sql).await {
        Ok(r) => r,
        Err(e) => return (sets, Some(e)),
    };
    while !result.is_empty() {
        match result.collect::<Row>().await {
            Ok(rows) => sets.push(rows.into_iter().map(Row::unwrap).collect()),
            Err(e) => return (sets, Some(e)),
        }
    }
    // An error after the first result set is kept pending by mysql_async; this surfaces it.
    match result.drop_result().await {
        Ok(()) => (sets, None),
        Err(e) => (sets, Some(e)),
    }
}

// ---- the proxy process ----------------------------------------------------------------------

/// The workspace root (parent of this crate).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The proxy binary: `TIPROXY_BIN`, else `<target>/debug/tiproxy`. Panics when missing.
pub fn proxy_bin() -> PathBuf {
    workspace_bin("TIPROXY_BIN", "tiproxy", "tiproxy")
}

/// The operator binary: `TIPROXY_OPERATOR_BIN`, else `<target>/debug/tiproxy-operator`.
/// Panics when missing.
pub fn operator_bin() -> PathBuf {
    workspace_bin(
        "TIPROXY_OPERATOR_BIN",
        "tiproxy-operator",
        "tiproxy-operator",
    )
}

/// A binary of this workspace: `$env`, else `<target>/debug/<name>`. Panics when missing.
fn workspace_bin(env: &str, name: &str, package: &str) -> PathBuf {
    let path = match std::env::var_os(env) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .map(|p| {
                    if p.is_absolute() {
                        p
                    } else {
                        workspace_dir().join(p)
                    }
                })
                .unwrap_or_else(|| workspace_dir().join("target"));
            target.join("debug").join(name)
        }
    };
    assert!(
        path.is_file(),
        "binary {} not found: build it with `cargo build -p {package}` (or set {env}); \
         `bash tests/run-all.sh` does both",
        path.display()
    );
    path
}

/// A temporary directory, removed on drop. When the test failed, the files at its top level (the
/// logs and configs of what ran in it) are kept and the path is printed; its subdirectories
/// (TiDB stores of up to 256 MiB each, etcd data, temp dirs) are removed even then, so a run
/// with failures does not fill the disk and fail every later test with ENOSPC.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            remove_subdirectories(&self.0);
            eprintln!("logs kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn remove_subdirectories(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[derive(Default)]
struct LogState {
    text: String,
    eof: bool,
}

/// A running `tiproxy` process, killed on drop. When a test panics while a `Proxy` is alive,
/// the proxy's log is printed so the failure shows what the proxy saw.
pub struct Proxy {
    child: Child,
    addr: SocketAddr,
    api_addr: SocketAddr,
    log: Arc<(Mutex<LogState>, Condvar)>,
    config_path: PathBuf,
    exit: Option<ExitStatus>,
    _dir: TempDir,
}

const START_TIMEOUT: Duration = Duration::from_secs(10);

impl Proxy {
    /// Writes `toml_body` to a config file (with `proxy.addr` and `api.addr` set to
    /// `127.0.0.1:0` unless given, and `log.level = "debug"` unless given), starts the proxy and
    /// waits (at most 10 s) for its "tiproxy started" line. Panics with the log on failure.
    pub fn start(toml_body: &str) -> Proxy {
        match Proxy::try_start(toml_body) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`Proxy::start`] but returns the failure (with the proxy's output) instead.
    pub fn try_start(toml_body: &str) -> Result<Proxy, String> {
        let mut table: toml::Table = toml_body.parse().map_err(|e| {
            format!("test bug: invalid TOML for the proxy config: {e}\n{toml_body}")
        })?;
        fn section<'a>(t: &'a mut toml::Table, name: &str) -> &'a mut toml::Table {
            t.entry(name.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .unwrap_or_else(|| panic!("test bug: `{name}` must be a table"))
        }
        for (sec, key, value) in [
            ("proxy", "addr", "127.0.0.1:0"),
            ("api", "addr", "127.0.0.1:0"),
            ("log", "level", "debug"),
        ] {
            section(&mut table, sec)
                .entry(key.to_string())
                .or_insert_with(|| toml::Value::String(value.into()));
        }
        let dir = TempDir::new("tiproxy-test");
        let config_path = dir.path().join("tiproxy.toml");
        let config_text = toml::to_string(&table).expect("serialise TOML");
        std::fs::write(&config_path, &config_text)
            .map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;

        let bin = proxy_bin();
        let mut child = Command::new(&bin)
            .arg("--config")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let log: Arc<(Mutex<LogState>, Condvar)> = Arc::default();
        for (name, pipe) in [
            (
                "stderr",
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
            ),
            (
                "stdout",
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
            ),
        ] {
            let Some(pipe) = pipe else { continue };
            let log = log.clone();
            std::thread::Builder::new()
                .name(format!("tiproxy-{name}"))
                .spawn(move || drain(pipe, name == "stdout", &log))
                .expect("spawn log thread");
        }

        let deadline = Instant::now() + START_TIMEOUT;
        let (lock, cvar) = &*log;
        let mut state = lock.lock().unwrap();
        let found = loop {
            if let Some(line) = state.text.lines().find(|l| l.contains("tiproxy started")) {
                break Some(line.to_string());
            }
            if state.eof {
                break None;
            }
            let now = Instant::now();
            if now >= deadline {
                break None;
            }
            state = cvar.wait_timeout(state, deadline - now).unwrap().0;
        };
        drop(state);
        let fail = |child: &mut Child, why: String| {
            let _ = child.kill();
            let status = child.wait().ok();
            format!(
                "{why}\nexit status: {status:?}\nconfig {}:\n{config_text}\n---- proxy output ----\n{}",
                config_path.display(),
                log.0.lock().unwrap().text
            )
        };
        let Some(line) = found else {
            let why = format!("the proxy did not log \"tiproxy started\" within {START_TIMEOUT:?}");
            return Err(fail(&mut child, why));
        };
        let (addr, api_addr) = match (field(&line, "addr"), field(&line, "api")) {
            (Some(a), Some(b)) => (a, b),
            _ => {
                let why = format!("cannot find addr=/api= in the start line: {line}");
                return Err(fail(&mut child, why));
            }
        };
        Ok(Proxy {
            child,
            addr,
            api_addr,
            log,
            config_path,
            exit: None,
            _dir: dir,
        })
    }

    /// The SQL address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the proxy wrote to stderr (and stdout) so far.
    pub fn stderr_log(&self) -> String {
        self.log.0.lock().unwrap().text.clone()
    }

    /// Client options for a connection through the proxy as `user`.
    pub fn opts(&self, user: &str, pass: Option<&str>) -> OptsBuilder {
        opts_for(&self.addr.to_string(), user, pass)
    }

    /// Options for root through the proxy into `backend`'s test database.
    pub fn root_opts(&self, backend: &Backend) -> OptsBuilder {
        self.opts("root", None).db_name(Some(backend.database()))
    }

    /// A root connection through the proxy into `backend`'s test database.
    pub async fn connect_root(&self, backend: &Backend) -> Conn {
        match Conn::new(self.root_opts(backend)).await {
            Ok(c) => c,
            Err(e) => panic!(
                "proxy {} -> {}: cannot connect: {e:?}\n---- proxy log ----\n{}",
                self.addr,
                backend.name(),
                self.stderr_log()
            ),
        }
    }

    /// Sends SIGTERM.
    pub fn signal_term(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.child.id());
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit.is_some() {
            return self.exit;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
                return self.exit;
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Async-friendly [`Proxy::wait_exit`]: polls without blocking the runtime.
    pub async fn wait_exit_async(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.wait_exit(Duration::ZERO) {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- tiproxy log (pid {}, sql {}, config {}) ----\n{}---- end of tiproxy log ----",
                self.child.id(),
                self.addr,
                self.config_path.display(),
                self.stderr_log()
            );
        }
    }
}

fn drain(pipe: Box<dyn Read + Send>, stdout: bool, log: &(Mutex<LogState>, Condvar)) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = strip_ansi(&String::from_utf8_lossy(&buf));
                let (lock, cvar) = log;
                let mut state = lock.lock().unwrap();
                if stdout {
                    state.text.push_str("[stdout] ");
                }
                state.text.push_str(&line);
                if !line.ends_with('\n') {
                    state.text.push('\n');
                }
                cvar.notify_all();
            }
        }
    }
    if !stdout {
        let (lock, cvar) = log;
        lock.lock().unwrap().eof = true;
        cvar.notify_all();
    }
}

/// Removes ANSI escape sequences (colours) from a log line.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters and intermediates up to a final byte in 0x40..=0x7E.
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Finds `name=VALUE` (text logs) or `"name":"VALUE"` (JSON logs) in a log line.
fn field(line: &str, name: &str) -> Option<SocketAddr> {
    let text_key = format!(" {name}=");
    let json_key = format!("\"{name}\":\"");
    let (start, quoted) = if let Some(i) = line.find(&text_key) {
        (i + text_key.len(), false)
    } else {
        (line.find(&json_key)? + json_key.len(), true)
    };
    let rest = &line[start..];
    let end = rest
        .find(|c: char| c.is_whitespace() || (quoted && c == '"'))
        .unwrap_or(rest.len());
    rest[..end].trim_matches('"').parse().ok()
}

/// Runs the proxy binary with `args` (no config): (exit code, stdout, stderr).
pub fn run_proxy_bin(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(proxy_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run tiproxy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A plain HTTP/1.1 GET (for the proxy's API): (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        Ok((code, body))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| std::io::Error::other("HTTP request timed out"))?
}

// ---- the mysql command-line client -----------------------------------------------------------

/// Runs Debian's `mysql` client (MariaDB's) with `--no-defaults` and `args`, with a 60 s limit:
/// (exit code, stdout, stderr).
pub fn mysql_cli(args: &[&str]) -> (i32, String, String) {
    let mut child = Command::new("mysql")
        .arg("--no-defaults")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the mysql client (apt-get install mariadb-client)");
    let mut out_pipe = child.stdout.take().expect("stdout");
    let mut err_pipe = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out_pipe.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err_pipe.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait mysql") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mysql {args:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = out_t.join().unwrap_or_default();
    let err = err_t.join().unwrap_or_default();
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

/// [`mysql_cli`] from a blocking thread, for use inside async tests.
pub async fn mysql_cli_async(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        mysql_cli(&refs)
    })
    .await
    .expect("mysql client thread")
}

// ---- a raw protocol client -------------------------------------------------------------------

/// A minimal MySQL protocol client for what mysql_async does not expose: server-side cursors
/// (`COM_STMT_FETCH`), sending a PROXY protocol header, binding the source address, and looking
/// at the server greeting. Supports only logins whose password is empty.
pub mod raw {
    use std::net::{IpAddr, SocketAddr};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpSocket, TcpStream};

    pub const CLIENT_LONG_PASSWORD: u32 = 1;
    pub const CLIENT_CONNECT_WITH_DB: u32 = 1 << 3;
    pub const CLIENT_PROTOCOL_41: u32 = 1 << 9;
    pub const CLIENT_SSL: u32 = 1 << 11;
    pub const CLIENT_TRANSACTIONS: u32 = 1 << 13;
    pub const CLIENT_SECURE_CONNECTION: u32 = 1 << 15;
    pub const CLIENT_MULTI_STATEMENTS: u32 = 1 << 16;
    pub const CLIENT_MULTI_RESULTS: u32 = 1 << 17;
    pub const CLIENT_PS_MULTI_RESULTS: u32 = 1 << 18;
    pub const CLIENT_PLUGIN_AUTH: u32 = 1 << 19;
    pub const CLIENT_DEPRECATE_EOF: u32 = 1 << 24;

    pub const SERVER_STATUS_CURSOR_EXISTS: u16 = 0x0040;
    pub const SERVER_STATUS_LAST_ROW_SENT: u16 = 0x0080;

    const IO_TIMEOUT: Duration = Duration::from_secs(30);

    /// A server error packet.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct ServerErr {
        pub code: u16,
        pub state: String,
        pub message: String,
    }

    pub type Res<T> = Result<T, RawError>;

    #[derive(Debug)]
    pub enum RawError {
        Io(std::io::Error),
        Server(ServerErr),
        Protocol(String),
    }

    impl std::fmt::Display for RawError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                RawError::Io(e) => write!(f, "I/O error: {e}"),
                RawError::Server(e) => write!(f, "ERROR {} ({}): {}", e.code, e.state, e.message),
                RawError::Protocol(m) => write!(f, "protocol error: {m}"),
            }
        }
    }

    impl From<std::io::Error> for RawError {
        fn from(e: std::io::Error) -> Self {
            RawError::Io(e)
        }
    }

    fn proto<T>(m: impl Into<String>) -> Res<T> {
        Err(RawError::Protocol(m.into()))
    }

    /// The initial handshake packet.
    #[derive(Debug, Clone)]
    pub struct Greeting {
        pub server_version: String,
        pub connection_id: u32,
        pub capability: u32,
        pub auth_plugin: String,
    }

    /// A PROXY protocol v2 header (TCP over IPv4) claiming the given addresses.
    pub fn proxy_v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
        let (IpAddr::V4(s), IpAddr::V4(d)) = (source.ip(), destination.ip()) else {
            panic!("proxy_v2_header supports IPv4 only");
        };
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.push(0x21); // version 2, PROXY
        h.push(0x11); // AF_INET, STREAM
        h.extend_from_slice(&12u16.to_be_bytes());
        h.extend_from_slice(&s.octets());
        h.extend_from_slice(&d.octets());
        h.extend_from_slice(&source.port().to_be_bytes());
        h.extend_from_slice(&destination.port().to_be_bytes());
        h
    }

    /// How to connect.
    #[derive(Debug, Clone, Default)]
    pub struct ConnectOptions {
        /// Bind the socket to this local address (port 0) before connecting.
        pub bind: Option<IpAddr>,
        /// Bytes written right after the TCP connect (a PROXY header).
        pub preamble: Option<Vec<u8>>,
        pub user: String,
        pub database: Option<String>,
        /// Ask for CLIENT_DEPRECATE_EOF.
        pub deprecate_eof: bool,
        /// Ask for CLIENT_MULTI_STATEMENTS.
        pub multi_statements: bool,
    }

    impl ConnectOptions {
        pub fn root() -> Self {
            ConnectOptions {
                user: "root".into(),
                ..Default::default()
            }
        }
    }

    /// One column of a result set: its name and type.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Column {
        pub name: String,
        pub column_type: u8,
    }

    /// The outcome of one COM_STMT_FETCH: the rows (decoded to strings) and the EOF/OK status.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Fetch {
        pub rows: Vec<Vec<Option<String>>>,
        pub status: u16,
    }

    pub struct RawConn {
        stream: TcpStream,
        seq: u8,
        pub greeting: Greeting,
        pub capability: u32,
    }

    async fn timed<T>(f: impl std::future::Future<Output = std::io::Result<T>>) -> Res<T> {
        match tokio::time::timeout(IO_TIMEOUT, f).await {
            Ok(r) => Ok(r?),
            Err(_) => proto("timed out waiting for the server"),
        }
    }

    impl RawConn {
        /// Connects and reads the greeting, without logging in.
        pub async fn open(addr: SocketAddr, opts: &ConnectOptions) -> Res<RawConn> {
            let stream = match opts.bind {
                Some(ip) => {
                    let socket = if ip.is_ipv4() {
                        TcpSocket::new_v4()?
                    } else {
                        TcpSocket::new_v6()?
                    };
                    socket.bind(SocketAddr::new(ip, 0))?;
                    timed(socket.connect(addr)).await?
                }
                None => timed(TcpStream::connect(addr)).await?,
            };
            stream.set_nodelay(true)?;
            let mut conn = RawConn {
                stream,
                seq: 0,
                greeting: Greeting {
                    server_version: String::new(),
                    connection_id: 0,
                    capability: 0,
                    auth_plugin: String::new(),
                },
                capability: 0,
            };
            if let Some(pre) = &opts.preamble {
                timed(conn.stream.write_all(pre)).await?;
            }
            let greeting = conn.read_packet().await?;
            if greeting.first() == Some(&0xFF) {
                return Err(RawError::Server(parse_err(&greeting)?));
            }
            conn.greeting = parse_greeting(&greeting)?;
            Ok(conn)
        }

        /// Connects and logs in with an empty password.
        pub async fn connect(addr: SocketAddr, opts: &ConnectOptions) -> Res<RawConn> {
            let mut conn = RawConn::open(addr, opts).await?;
            conn.login(opts).await?;
            Ok(conn)
        }

        async fn login(&mut self, opts: &ConnectOptions) -> Res<()> {
            let mut caps = CLIENT_LONG_PASSWORD
                | CLIENT_PROTOCOL_41
                | CLIENT_TRANSACTIONS
                | CLIENT_SECURE_CONNECTION
                | CLIENT_MULTI_RESULTS
                | CLIENT_PS_MULTI_RESULTS
                | CLIENT_PLUGIN_AUTH;
            if opts.deprecate_eof {
                caps |= CLIENT_DEPRECATE_EOF;
            }
            if opts.multi_statements {
                caps |= CLIENT_MULTI_STATEMENTS;
            }
            if opts.database.is_some() {
                caps |= CLIENT_CONNECT_WITH_DB;
            }
            caps &= self.greeting.capability;
            self.capability = caps;
            let mut p = Vec::new();
            p.extend_from_slice(&caps.to_le_bytes());
            p.extend_from_slice(&(16u32 << 20).to_le_bytes());
            p.push(45); // utf8mb4_general_ci
            p.extend_from_slice(&[0u8; 23]);
            p.extend_from_slice(opts.user.as_bytes());
            p.push(0);
            p.push(0); // empty auth response
            if let Some(db) = &opts.database {
                p.extend_from_slice(db.as_bytes());
                p.push(0);
            }
            p.extend_from_slice(self.greeting.auth_plugin.as_bytes());
            p.push(0);
            self.seq = 1;
            self.write_packet(&p).await?;
            loop {
                let reply = self.read_packet().await?;
                match reply.first() {
                    Some(0x00) => return Ok(()),
                    Some(0xFF) => return Err(RawError::Server(parse_err(&reply)?)),
                    // Auth switch: an empty password answers with an empty response.
                    Some(0xFE) => self.write_packet(&[]).await?,
                    // caching_sha2_password "fast auth succeeded"; the OK follows.
                    Some(0x01) if reply.get(1) == Some(&3) => {}
                    _ => return proto(format!("unexpected auth packet {reply:02x?}")),
                }
            }
        }

        fn deprecate_eof(&self) -> bool {
            self.capability & CLIENT_DEPRECATE_EOF != 0
        }

        pub async fn read_packet(&mut self) -> Res<Vec<u8>> {
            let mut payload = Vec::new();
            loop {
                let mut header = [0u8; 4];
                timed(self.stream.read_exact(&mut header)).await?;
                let len = usize::from(header[0])
                    | usize::from(header[1]) << 8
                    | usize::from(header[2]) << 16;
                self.seq = header[3].wrapping_add(1);
                let start = payload.len();
                payload.resize(start + len, 0);
                timed(self.stream.read_exact(&mut payload[start..])).await?;
                if len < 0xFF_FFFF {
                    return Ok(payload);
                }
            }
        }

        pub async fn write_packet(&mut self, payload: &[u8]) -> Res<()> {
            let mut out = Vec::with_capacity(payload.len() + 8);
            let mut rest = payload;
            loop {
                let n = rest.len().min(0xFF_FFFF);
                out.extend_from_slice(&(n as u32).to_le_bytes()[..3]);
                out.push(self.seq);
                self.seq = self.seq.wrapping_add(1);
                out.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                if n < 0xFF_FFFF {
                    break;
                }
            }
            timed(self.stream.write_all(&out)).await?;
            Ok(())
        }

        async fn command(&mut self, payload: &[u8]) -> Res<()> {
            self.seq = 0;
            self.write_packet(payload).await
        }

        /// Reads column definitions (and the EOF after them without DEPRECATE_EOF).
        /// Returns the columns and, without DEPRECATE_EOF, the EOF's status.
        async fn read_columns(&mut self, n: usize) -> Res<(Vec<Column>, Option<u16>)> {
            let mut cols = Vec::with_capacity(n);
            for _ in 0..n {
                let p = self.read_packet().await?;
                cols.push(parse_column(&p)?);
            }
            let mut status = None;
            if !self.deprecate_eof() && n > 0 {
                let p = self.read_packet().await?;
                if p.first() != Some(&0xFE) || p.len() >= 9 {
                    return proto(format!("expected EOF after columns, got {p:02x?}"));
                }
                status = Some(eof_status(&p)?);
            }
            Ok((cols, status))
        }

        /// COM_QUERY for one statement; text rows decoded to strings.
        pub async fn query(&mut self, sql: &str) -> Res<Vec<Vec<Option<String>>>> {
            let mut p = vec![0x03];
            p.extend_from_slice(sql.as_bytes());
            self.command(&p).await?;
            let first = self.read_packet().await?;
            match first.first() {
                Some(0x00) => return Ok(Vec::new()),
                Some(0xFF) => return Err(RawError::Server(parse_err(&first)?)),
                _ => {}
            }
            let mut r = Reader(&first);
            let n = r.lenenc()? as usize;
            let (cols, _) = self.read_columns(n).await?;
            let mut rows = Vec::new();
            loop {
                let p = self.read_packet().await?;
                if p.first() == Some(&0xFF) {
                    return Err(RawError::Server(parse_err(&p)?));
                }
                if p.first() == Some(&0xFE) && p.len() < 0xFF_FFFF {
                    return Ok(rows);
                }
                let mut r = Reader(&p);
                let mut row = Vec::with_capacity(cols.len());
                for _ in 0..cols.len() {
                    if r.0.first() == Some(&0xFB) {
                        r.0 = &r.0[1..];
                        row.push(None);
                    } else {
                        row.push(Some(
                            String::from_utf8_lossy(r.lenenc_bytes()?).into_owned(),
                        ));
                    }
                }
                rows.push(row);
            }
        }

        /// COM_STMT_PREPARE; returns (statement id, number of columns, number of params).
        pub async fn prepare(&mut self, sql: &str) -> Res<(u32, usize, usize)> {
            let mut p = vec![0x16];
            p.extend_from_slice(sql.as_bytes());
            self.command(&p).await?;
            let ok = self.read_packet().await?;
            match ok.first() {
                Some(0x00) => {}
                Some(0xFF) => return Err(RawError::Server(parse_err(&ok)?)),
                _ => return proto(format!("unexpected prepare response {ok:02x?}")),
            }
            if ok.len() < 9 {
                return proto("short prepare OK");
            }
            let id = u32::from_le_bytes([ok[1], ok[2], ok[3], ok[4]]);
            let cols = usize::from(u16::from_le_bytes([ok[5], ok[6]]));
            let params = usize::from(u16::from_le_bytes([ok[7], ok[8]]));
            self.read_columns(params).await?;
            self.read_columns(cols).await?;
            Ok((id, cols, params))
        }

        /// COM_STMT_EXECUTE of a statement without parameters, opening a read-only cursor.
        /// Returns the columns and the status of the packet that ends the metadata.
        pub async fn execute_cursor(&mut self, id: u32) -> Res<(Vec<Column>, u16)> {
            let mut p = vec![0x17];
            p.extend_from_slice(&id.to_le_bytes());
            p.push(0x01); // CURSOR_TYPE_READ_ONLY
            p.extend_from_slice(&1u32.to_le_bytes());
            self.command(&p).await?;
            let first = self.read_packet().await?;
            match first.first() {
                Some(0xFF) => return Err(RawError::Server(parse_err(&first)?)),
                Some(0x00) => return proto("execute returned OK, not a result set"),
                _ => {}
            }
            let n = Reader(&first).lenenc()? as usize;
            let (cols, status) = self.read_columns(n).await?;
            let status = match status {
                Some(s) => s,
                None => {
                    // With DEPRECATE_EOF the metadata ends with an OK packet (0xFE header).
                    let p = self.read_packet().await?;
                    if p.first() != Some(&0xFE) {
                        return proto(format!(
                            "expected the end of the cursor metadata, got {p:02x?}"
                        ));
                    }
                    ok_status(&p)?
                }
            };
            Ok((cols, status))
        }

        /// COM_STMT_FETCH of `n` rows from an open cursor.
        pub async fn fetch(&mut self, id: u32, n: u32, cols: &[Column]) -> Res<Fetch> {
            let mut p = vec![0x1C];
            p.extend_from_slice(&id.to_le_bytes());
            p.extend_from_slice(&n.to_le_bytes());
            self.command(&p).await?;
            let mut rows = Vec::new();
            loop {
                let p = self.read_packet().await?;
                match p.first() {
                    Some(0xFF) => return Err(RawError::Server(parse_err(&p)?)),
                    Some(0xFE) if p.len() < 0xFF_FFFF => {
                        let status = if self.deprecate_eof() {
                            ok_status(&p)?
                        } else {
                            eof_status(&p)?
                        };
                        return Ok(Fetch { rows, status });
                    }
                    Some(0x00) => rows.push(parse_binary_row(&p, cols)?),
                    _ => return proto(format!("unexpected fetch packet {p:02x?}")),
                }
            }
        }

        /// COM_STMT_EXECUTE of a statement without parameters and without a cursor: the rows of
        /// its binary result set (decoded as by [`RawConn::fetch`]); an empty list for a
        /// statement that answers OK.
        pub async fn execute(&mut self, id: u32) -> Res<Vec<Vec<Option<String>>>> {
            let mut p = vec![0x17];
            p.extend_from_slice(&id.to_le_bytes());
            p.push(0x00); // CURSOR_TYPE_NO_CURSOR
            p.extend_from_slice(&1u32.to_le_bytes());
            self.command(&p).await?;
            let first = self.read_packet().await?;
            match first.first() {
                Some(0xFF) => return Err(RawError::Server(parse_err(&first)?)),
                Some(0x00) => return Ok(Vec::new()),
                _ => {}
            }
            let n = Reader(&first).lenenc()? as usize;
            let (cols, _) = self.read_columns(n).await?;
            let mut rows = Vec::new();
            loop {
                let p = self.read_packet().await?;
                match p.first() {
                    Some(0xFF) => return Err(RawError::Server(parse_err(&p)?)),
                    Some(0xFE) if p.len() < 0xFF_FFFF => return Ok(rows),
                    Some(0x00) => rows.push(parse_binary_row(&p, &cols)?),
                    _ => return proto(format!("unexpected execute packet {p:02x?}")),
                }
            }
        }

        /// COM_STMT_CLOSE (no response).
        pub async fn close_stmt(&mut self, id: u32) -> Res<()> {
            let mut p = vec![0x19];
            p.extend_from_slice(&id.to_le_bytes());
            self.command(&p).await
        }

        /// Sends one command packet and returns the single packet that answers it (for
        /// commands such as COM_STATISTICS, COM_SET_OPTION, COM_INIT_DB).
        pub async fn simple_command(&mut self, payload: &[u8]) -> Res<Vec<u8>> {
            self.command(payload).await?;
            self.read_packet().await
        }

        /// COM_FIELD_LIST: the names of the table's columns.
        pub async fn field_list(&mut self, table: &str) -> Res<Vec<String>> {
            let mut p = vec![0x04];
            p.extend_from_slice(table.as_bytes());
            p.push(0);
            self.command(&p).await?;
            let mut names = Vec::new();
            loop {
                let p = self.read_packet().await?;
                match p.first() {
                    Some(0xFF) => return Err(RawError::Server(parse_err(&p)?)),
                    Some(0xFE) if p.len() < 0xFF_FFFF => return Ok(names),
                    _ => names.push(parse_column(&p)?.name),
                }
            }
        }

        /// COM_QUERY that may return several result sets: the number of rows of each, or the
        /// error that ended the response.
        pub async fn query_multi(&mut self, sql: &str) -> Res<Vec<usize>> {
            let mut p = vec![0x03];
            p.extend_from_slice(sql.as_bytes());
            self.command(&p).await?;
            let mut sets = Vec::new();
            loop {
                let first = self.read_packet().await?;
                let status = match first.first() {
                    Some(0x00) => {
                        sets.push(0);
                        ok_status(&first)?
                    }
                    Some(0xFF) => return Err(RawError::Server(parse_err(&first)?)),
                    _ => {
                        let n = Reader(&first).lenenc()? as usize;
                        self.read_columns(n).await?;
                        let mut rows = 0;
                        let status = loop {
                            let p = self.read_packet().await?;
                            if p.first() == Some(&0xFF) {
                                return Err(RawError::Server(parse_err(&p)?));
                            }
                            if p.first() == Some(&0xFE) && p.len() < 0xFF_FFFF {
                                break if self.deprecate_eof() {
                                    ok_status(&p)?
                                } else {
                                    eof_status(&p)?
                                };
                            }
                            rows += 1;
                        };
                        sets.push(rows);
                        status
                    }
                };
                if status & 0x0008 == 0 {
                    return Ok(sets);
                }
            }
        }

        /// COM_PING.
        pub async fn ping(&mut self) -> Res<()> {
            self.command(&[0x0E]).await?;
            let p = self.read_packet().await?;
            match p.first() {
                Some(0x00) => Ok(()),
                Some(0xFF) => Err(RawError::Server(parse_err(&p)?)),
                _ => proto(format!("unexpected ping reply {p:02x?}")),
            }
        }

        /// COM_QUIT.
        pub async fn quit(mut self) {
            let _ = self.command(&[0x01]).await;
            let _ = self.stream.shutdown().await;
        }
    }

    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Res<&'a [u8]> {
            if self.0.len() < n {
                return proto("packet too short");
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Ok(a)
        }
        fn u8(&mut self) -> Res<u8> {
            Ok(self.take(1)?[0])
        }
        fn u16(&mut self) -> Res<u16> {
            let b = self.take(2)?;
            Ok(u16::from_le_bytes([b[0], b[1]]))
        }
        fn u32(&mut self) -> Res<u32> {
            let b = self.take(4)?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        fn lenenc(&mut self) -> Res<u64> {
            Ok(match self.u8()? {
                n @ 0..=0xFA => u64::from(n),
                0xFC => u64::from(self.u16()?),
                0xFD => {
                    let b = self.take(3)?;
                    u64::from(b[0]) | u64::from(b[1]) << 8 | u64::from(b[2]) << 16
                }
                0xFE => {
                    let b = self.take(8)?;
                    u64::from_le_bytes(b.try_into().unwrap())
                }
                n => return proto(format!("bad length-encoded integer {n:#x}")),
            })
        }
        fn lenenc_bytes(&mut self) -> Res<&'a [u8]> {
            let n = self.lenenc()? as usize;
            self.take(n)
        }
        fn nul_str(&mut self) -> Res<String> {
            let Some(i) = self.0.iter().position(|b| *b == 0) else {
                return proto("missing NUL terminator");
            };
            let s = String::from_utf8_lossy(&self.0[..i]).into_owned();
            self.0 = &self.0[i + 1..];
            Ok(s)
        }
    }

    fn parse_greeting(p: &[u8]) -> Res<Greeting> {
        let mut r = Reader(p);
        if r.u8()? != 10 {
            return proto(format!("not a protocol-10 greeting: {p:02x?}"));
        }
        let server_version = r.nul_str()?;
        let connection_id = r.u32()?;
        r.take(8)?; // salt part 1
        r.take(1)?;
        let lower = u32::from(r.u16()?);
        r.u8()?; // charset
        r.u16()?; // status
        let upper = u32::from(r.u16()?);
        let capability = lower | upper << 16;
        let salt_len = usize::from(r.u8()?);
        r.take(10)?;
        let part2 = salt_len.saturating_sub(8).max(13);
        r.take(part2.min(r.0.len()))?;
        let auth_plugin = if capability & CLIENT_PLUGIN_AUTH != 0 && !r.0.is_empty() {
            r.nul_str()
                .unwrap_or_else(|_| String::from_utf8_lossy(r.0).into_owned())
        } else {
            String::new()
        };
        Ok(Greeting {
            server_version,
            connection_id,
            capability,
            auth_plugin,
        })
    }

    pub fn parse_err(p: &[u8]) -> Res<ServerErr> {
        let mut r = Reader(p);
        r.u8()?;
        let code = r.u16()?;
        let mut state = String::new();
        if r.0.first() == Some(&b'#') {
            r.take(1)?;
            state = String::from_utf8_lossy(r.take(5)?).into_owned();
        }
        Ok(ServerErr {
            code,
            state,
            message: String::from_utf8_lossy(r.0).into_owned(),
        })
    }

    fn parse_column(p: &[u8]) -> Res<Column> {
        let mut r = Reader(p);
        for _ in 0..4 {
            r.lenenc_bytes()?; // catalog, schema, table, org_table
        }
        let name = String::from_utf8_lossy(r.lenenc_bytes()?).into_owned();
        r.lenenc_bytes()?; // org_name
        r.lenenc()?; // length of fixed fields
        r.u16()?; // charset
        r.u32()?; // column length
        let column_type = r.u8()?;
        Ok(Column { name, column_type })
    }

    fn eof_status(p: &[u8]) -> Res<u16> {
        if p.len() < 5 {
            return proto(format!("short EOF {p:02x?}"));
        }
        Ok(u16::from_le_bytes([p[3], p[4]]))
    }

    fn ok_status(p: &[u8]) -> Res<u16> {
        let mut r = Reader(p);
        r.u8()?;
        r.lenenc()?; // affected rows
        r.lenenc()?; // last insert id
        r.u16()
    }

    /// Decodes a binary-protocol row; integers become decimal strings, everything with a
    /// length prefix its bytes as (lossy) UTF-8.
    fn parse_binary_row(p: &[u8], cols: &[Column]) -> Res<Vec<Option<String>>> {
        let mut r = Reader(p);
        r.u8()?;
        let bitmap = r.take((cols.len() + 7 + 2) / 8)?.to_vec();
        let mut row = Vec::with_capacity(cols.len());
        for (i, col) in cols.iter().enumerate() {
            let bit = i + 2;
            if bitmap[bit / 8] & (1 << (bit % 8)) != 0 {
                row.push(None);
                continue;
            }
            let v = match col.column_type {
                0x01 => i64::from(r.u8()? as i8).to_string(),
                0x02 | 0x0D => i64::from(r.u16()? as i16).to_string(),
                0x03 | 0x09 => i64::from(r.u32()? as i32).to_string(),
                0x08 => i64::from_le_bytes(r.take(8)?.try_into().unwrap()).to_string(),
                0x04 => f32::from_le_bytes(r.take(4)?.try_into().unwrap()).to_string(),
                0x05 => f64::from_le_bytes(r.take(8)?.try_into().unwrap()).to_string(),
                0x07 | 0x0A | 0x0B | 0x0C => {
                    let n = usize::from(r.u8()?);
                    format!("{:02x?}", r.take(n)?)
                }
                _ => String::from_utf8_lossy(r.lenenc_bytes()?).into_owned(),
            };
            row.push(Some(v));
        }
        Ok(row)
    }
}

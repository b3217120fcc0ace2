//! Session migration end to end, against real TiDB servers of the tests' own (never the shared
//! test bed): (a) scale-out, (b) scale-in through a graceful TiDB shutdown, (c) transactions
//! that hold a session on a draining TiDB (and the "hold BEGIN" move), (d) discovery through a
//! real etcd, (e) a rolling restart under load, (f) sessions TiDB refuses to export (temporary
//! tables), (g) the push API, (h) scale-out while both sessions are inside a transaction,
//! (i) TLS, PROXY header, users and connect attributes of the re-made connection, and a cursor
//! that holds its session until exhausted.
//!
//! Every test asserts that the clients never see an error and that each session keeps its
//! state across the move: session variables, a user variable, the current database, a
//! prepared statement re-executed after the move by the statement id it had before (by
//! mysql_async from its statement cache, and by raw `COM_STMT_EXECUTE` in (g)), and
//! `LAST_INSERT_ID()`. Which TiDB serves a session is read from
//! `information_schema.cluster_info` (every instance listens on port 4000 of its own address).
//!
//! Each standalone TiDB is a separate database, so the schema is created on every instance
//! and every write is checked on the TiDB that committed it (learnt inside the same
//! transaction).
//!
//! Instance numbers: each test has its own offsets in the process's block of
//! [`MIGRATION_BLOCK`] instances (see [`migration_instance`]), so the tests run side by side.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use mysql_async::{Conn, Statement};
use tiproxy_tests::cluster::*;
use tiproxy_tests::raw::{ConnectOptions, RawConn};
use tiproxy_tests::*;

/// At most this many migration tests run at once (each starts 2–3 TiDBs; the rolling restart
/// takes two slots): keeps timings meaningful on a small machine whatever `--test-threads` is.
static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(3);

async fn slot(weight: u32) -> tokio::sync::SemaphorePermit<'static> {
    SLOTS.acquire_many(weight).await.expect("semaphore")
}

/// The database every session switches to (created on every TiDB).
const DB: &str = "mig";

async fn create_schema(tidb: &TidbCluster) {
    tidb.run_on_all(&[
        "CREATE DATABASE IF NOT EXISTS mig",
        "CREATE TABLE IF NOT EXISTS mig.auto_t (id BIGINT AUTO_INCREMENT PRIMARY KEY, tag VARCHAR(64))",
        "CREATE TABLE IF NOT EXISTS mig.w (id BIGINT PRIMARY KEY, client INT, inst VARCHAR(64))",
        "CREATE TABLE IF NOT EXISTS mig.r (id INT PRIMARY KEY, v INT)",
        "REPLACE INTO mig.r VALUES (1, 42)",
    ])
    .await;
}

/// A proxy with fast health checks and `extra` lines in its `[proxy]` table.
fn start_proxy(extra_proxy: &str) -> Proxy {
    Proxy::start(&format!(
        "[proxy]\nconnect-timeout = 5\n{extra_proxy}\n[health]\ninterval = 0.5\n"
    ))
}

/// Pushes `backends` and waits until the proxy has found each one healthy.
async fn push_and_wait_healthy(proxy: &Proxy, generation: u64, backends: &[Pushed]) {
    proxy.push_ok(generation, backends).await;
    let addrs: Vec<String> = backends
        .iter()
        .filter(|b| !b.draining)
        .map(|b| b.addr.clone())
        .collect();
    proxy
        .wait_backends(
            &format!("{addrs:?} healthy"),
            Duration::from_secs(15),
            |s| addrs.iter().all(|a| s.health(a) == "healthy"),
        )
        .await;
}

/// Asserts that at least `n` migrations succeeded (by the proxy's metrics).
async fn assert_migrations_succeeded(proxy: &Proxy, n: f64) {
    let metrics = proxy.metrics().await;
    let ok = metric_sum(
        &metrics,
        "tiproxy_balance_migrate_total",
        &[("migrate_res", "succeed")],
    );
    assert!(
        ok >= n,
        "expected at least {n} tiproxy_balance_migrate_total{{migrate_res=\"succeed\"}}, got \
         {ok}; migration metrics:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("migrate"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Fails if the proxy closed any session abnormally (it logs those at WARN).
fn assert_no_session_errors(proxy: &Proxy) {
    let log = proxy.stderr_log();
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("session closed"))
        .collect();
    assert!(
        bad.is_empty(),
        "the proxy closed sessions abnormally:\n{}",
        bad.join("\n")
    );
}

// ---- a session with state ---------------------------------------------------------------------

/// Two TiDBs of which only the first is pushed to a new proxy, and two sessions on it, each
/// inside a transaction that has written one row (`ids`) to `w`.
async fn sessions_writing_in_transactions(
    instance: u32,
    names: [&str; 2],
    ids: [u64; 2],
) -> (TidbCluster, Proxy, [Client; 2]) {
    let tidb = TidbCluster::start(migration_instance(instance), 2, 5, false).await;
    create_schema(&tidb).await;
    let proxy = start_proxy("");
    push_and_wait_healthy(&proxy, 1, &[Pushed::tidb(&tidb, 0)]).await;
    let mut clients = [
        Client::open(&proxy, names[0]).await,
        Client::open(&proxy, names[1]).await,
    ];
    for (c, id) in clients.iter_mut().zip(ids) {
        c.sql("BEGIN").await;
        c.sql(&format!("INSERT INTO w (id, client) VALUES ({id}, 0)"))
            .await;
        let inst = serving_tidb(&mut c.conn).await.unwrap();
        assert_eq!(inst, tidb.addr(0), "{} writes on TiDB-1", c.name);
    }
    (tidb, proxy, clients)
}

/// A mysql_async session through the proxy that set up state to be checked after every move.
struct Client {
    name: String,
    conn: Conn,
    /// Prepared once; mysql_async re-executes it by its statement id.
    stmt: Statement,
    last_insert_id: u64,
}

impl Client {
    async fn open(proxy: &Proxy, name: &str) -> Client {
        let mut conn = connect(
            proxy.opts("root", None).db_name(Some("test")),
            &format!("client {name} through the proxy"),
        )
        .await;
        for sql in [
            format!("USE {DB}"),
            "SET SESSION div_precision_increment = 7".into(),
            "SET SESSION sql_select_limit = 777".into(),
            format!("SET @uv = '{name}'"),
            format!("INSERT INTO auto_t (tag) VALUES ('{name}')"),
        ] {
            conn.query_drop(&sql)
                .await
                .unwrap_or_else(|e| panic!("{name}: {sql}: {e}"));
        }
        let last_insert_id: u64 = conn
            .query_first("SELECT LAST_INSERT_ID()")
            .await
            .unwrap_or_else(|e| panic!("{name}: LAST_INSERT_ID(): {e}"))
            .expect("a row");
        assert!(last_insert_id > 0, "{name}: LAST_INSERT_ID() is 0");
        let stmt = conn
            .prep("SELECT CONCAT(?, @uv), 1/3, DATABASE()")
            .await
            .unwrap_or_else(|e| panic!("{name}: prepare: {e}"));
        let mut c = Client {
            name: name.to_string(),
            conn,
            stmt,
            last_insert_id,
        };
        c.check().await;
        c
    }

    /// Checks every piece of session state and returns the serving TiDB. Panics (naming the
    /// client) on any error or difference.
    async fn check(&mut self) -> String {
        let name = self.name.clone();
        let inst = serving_tidb(&mut self.conn)
            .await
            .unwrap_or_else(|e| panic!("{name}: SELECT instance: {e}"));
        type Vars = (u64, u64, Option<String>, Option<String>, u64, String);
        let vars: Vars = self
            .conn
            .query_first(
                "SELECT @@div_precision_increment, @@sql_select_limit, @uv, DATABASE(), \
                 LAST_INSERT_ID(), 1/3",
            )
            .await
            .unwrap_or_else(|e| panic!("{name} on {inst}: session variables: {e}"))
            .expect("a row");
        assert_eq!(
            vars,
            (
                7,
                777,
                Some(name.clone()),
                Some(DB.to_string()),
                self.last_insert_id,
                "0.3333333".to_string()
            ),
            "{name} on {inst}: session state (div_precision_increment, sql_select_limit, @uv, \
             DATABASE(), LAST_INSERT_ID(), 1/3)"
        );
        let stmt = self.stmt.clone();
        let row: (String, String, String) = self
            .conn
            .exec_first(&stmt, ("p:",))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{name} on {inst}: prepared statement {} re-executed: {e}",
                    stmt.id()
                )
            })
            .expect("a row");
        assert_eq!(
            row,
            (format!("p:{name}"), "0.3333333".into(), DB.into()),
            "{name} on {inst}: prepared statement {}",
            stmt.id()
        );
        inst
    }

    /// Runs one statement, panicking with the client's name on error.
    async fn sql(&mut self, sql: &str) {
        self.conn
            .query_drop(sql)
            .await
            .unwrap_or_else(|e| panic!("{}: {sql}: {e}", self.name));
    }

    async fn first<T: FromRow + Send + 'static>(&mut self, sql: &str) -> T {
        self.conn
            .query_first(sql)
            .await
            .unwrap_or_else(|e| panic!("{}: {sql}: {e}", self.name))
            .unwrap_or_else(|| panic!("{}: {sql}: no row", self.name))
    }

    /// The ids of the sessions `SHOW PROCESSLIST` shows this session.
    async fn processlist(&mut self) -> BTreeSet<u64> {
        let rows: Vec<mysql_async::Row> = self
            .conn
            .query("SHOW PROCESSLIST")
            .await
            .unwrap_or_else(|e| panic!("{}: SHOW PROCESSLIST: {e}", self.name));
        rows.into_iter()
            .map(|r| r.get::<u64, _>(0).expect("Id"))
            .collect()
    }
}

/// A raw-protocol session through the proxy with a user variable, a session variable, the
/// current database and a prepared statement executed by its id with `COM_STMT_EXECUTE`.
struct RawClient {
    name: String,
    conn: RawConn,
    stmt_id: u32,
}

impl RawClient {
    async fn open(proxy: &Proxy, name: &str) -> RawClient {
        let opts = ConnectOptions {
            database: Some(DB.into()),
            ..ConnectOptions::root()
        };
        let mut conn = RawConn::connect(proxy.addr(), &opts)
            .await
            .unwrap_or_else(|e| panic!("{name}: connect: {e}"));
        for sql in [
            format!("SET @rv = '{name}'"),
            "SET SESSION div_precision_increment = 5".into(),
        ] {
            conn.query(&sql)
                .await
                .unwrap_or_else(|e| panic!("{name}: {sql}: {e}"));
        }
        let (stmt_id, _, _) = conn
            .prepare("SELECT CONCAT('raw:', @rv), 1/3, DATABASE()")
            .await
            .unwrap_or_else(|e| panic!("{name}: prepare: {e}"));
        let mut c = RawClient {
            name: name.into(),
            conn,
            stmt_id,
        };
        c.check().await;
        c
    }

    /// Executes the prepared statement by its id and returns the serving TiDB.
    async fn check(&mut self) -> String {
        let name = &self.name;
        let inst = self
            .conn
            .query("SELECT instance FROM information_schema.cluster_info WHERE type = 'tidb'")
            .await
            .unwrap_or_else(|e| panic!("{name}: SELECT instance: {e}"));
        let inst = inst[0][0].clone().unwrap_or_default();
        let rows = self.conn.execute(self.stmt_id).await.unwrap_or_else(|e| {
            panic!(
                "{name} on {inst}: COM_STMT_EXECUTE of statement {}: {e}",
                self.stmt_id
            )
        });
        assert_eq!(
            rows,
            vec![vec![
                Some(format!("raw:{name}")),
                Some("0.33333".into()),
                Some(DB.into())
            ]],
            "{name} on {inst}: COM_STMT_EXECUTE of statement {}",
            self.stmt_id
        );
        inst
    }
}

/// How many rows of `mig.w` with this id the TiDB at position `k` has (direct connection).
async fn rows_with_id(tidb: &TidbCluster, k: usize, id: u64) -> u64 {
    let mut conn = tidb.connect(k).await;
    let n: u64 = conn
        .query_first(format!("SELECT COUNT(*) FROM mig.w WHERE id = {id}"))
        .await
        .unwrap()
        .unwrap();
    let _ = conn.disconnect().await;
    n
}

// ---- (a) scale out ----------------------------------------------------------------------------

/// Two idle sessions on TiDB-1; TiDB-2 is added: exactly one session moves there by itself,
/// promptly, and both keep working with their state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_out_moves_one_idle_session() {
    let _slot = slot(1).await;
    let tidb = TidbCluster::start(migration_instance(0), 2, 5, false).await;
    create_schema(&tidb).await;
    let (t1, t2) = (tidb.addr(0), tidb.addr(1));
    let proxy = start_proxy("");
    push_and_wait_healthy(&proxy, 1, &[Pushed::tidb(&tidb, 0)]).await;

    let mut c1 = Client::open(&proxy, "out1").await;
    let mut c2 = Client::open(&proxy, "out2").await;
    assert_eq!(c1.check().await, t1);
    assert_eq!(c2.check().await, t1);
    let id1: u64 = c1.first("SELECT CONNECTION_ID()").await;
    let id2: u64 = c2.first("SELECT CONNECTION_ID()").await;
    for c in [&mut c1, &mut c2] {
        let ids = c.processlist().await;
        assert!(
            ids.contains(&id1) && ids.contains(&id2),
            "{}: SHOW PROCESSLIST on TiDB-1 should show both sessions {id1} and {id2}: {ids:?}",
            c.name
        );
    }

    push_and_wait_healthy(&proxy, 2, &[Pushed::tidb(&tidb, 0), Pushed::tidb(&tidb, 1)]).await;
    let (_, took) = proxy
        .wait_backends(
            "one session moved to TiDB-2",
            Duration::from_secs(10),
            |s| s.sessions(&t1) == 1 && s.sessions(&t2) == 1,
        )
        .await;
    eprintln!("scale-out: one session moved {took:?} after TiDB-2 was healthy");
    assert!(took < Duration::from_secs(5), "the move took {took:?}");
    // Exactly one: the balance is not overshot.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let state = proxy.backends().await;
    assert_eq!(
        (state.sessions(&t1), state.sessions(&t2)),
        (1, 1),
        "{:#}",
        state.json
    );

    let i1 = c1.check().await;
    let i2 = c2.check().await;
    let mut got = [i1.clone(), i2.clone()];
    got.sort();
    assert_eq!(got, [t1.clone(), t2.clone()], "one session on each TiDB");
    // Each session now sees only itself in SHOW PROCESSLIST.
    for c in [&mut c1, &mut c2] {
        let own: u64 = c.first("SELECT CONNECTION_ID()").await;
        let ids = c.processlist().await;
        assert_eq!(ids, BTreeSet::from([own]), "{}: SHOW PROCESSLIST", c.name);
    }
    // And both keep working.
    for c in [&mut c1, &mut c2] {
        c.sql("INSERT INTO r VALUES (100, 1) ON DUPLICATE KEY UPDATE v = v + 1")
            .await;
        c.check().await;
    }
    assert_migrations_succeeded(&proxy, 1.0).await;
    assert_no_session_errors(&proxy);
    let metrics = proxy.metrics().await;
    assert!(
        metric_sum(
            &metrics,
            "tiproxy_balance_migrate_total",
            &[("reason", "conn"), ("migrate_res", "succeed"), ("to", &t2)]
        ) >= 1.0,
        "{metrics}"
    );
}

// ---- (b) scale in -----------------------------------------------------------------------------

/// One session on each of two TiDBs; one TiDB gets SIGTERM: during its graceful wait its
/// session moves to the other TiDB, and both sessions keep working, before and after it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_scale_in_moves_sessions_during_graceful_wait() {
    let _slot = slot(1).await;
    const GRACEFUL_WAIT: u64 = 8;
    let tidb = TidbCluster::start(migration_instance(2), 2, GRACEFUL_WAIT as u32, false).await;
    create_schema(&tidb).await;
    let proxy = start_proxy("");
    push_and_wait_healthy(&proxy, 1, &[Pushed::tidb(&tidb, 0), Pushed::tidb(&tidb, 1)]).await;

    let mut c1 = Client::open(&proxy, "in1").await;
    let mut c2 = Client::open(&proxy, "in2").await;
    let i1 = c1.check().await;
    let i2 = c2.check().await;
    assert_ne!(i1, i2, "new sessions are spread over both TiDBs");

    let victim = tidb.index_of(&i1);
    let survivor = tidb.addr(1 - victim);
    let stop = tidb.stop_graceful(victim);
    let (_, took) = proxy
        .wait_backends(
            "the stopping TiDB's session moved",
            Duration::from_secs(GRACEFUL_WAIT),
            |s| s.sessions(&i1) == 0 && s.sessions(&survivor) == 2,
        )
        .await;
    eprintln!("scale-in: session left the stopping TiDB {took:?} after SIGTERM");
    let state = proxy.backends().await;
    assert_eq!(
        state.health(&i1),
        "draining",
        "the stopping TiDB should be seen draining: {:#}",
        state.json
    );
    // The next SQL of both sessions works, on the remaining TiDB, with their state.
    assert_eq!(c1.check().await, survivor);
    assert_eq!(c2.check().await, survivor);

    let stopped_after = stop.wait(Duration::from_secs(60)).await;
    eprintln!("scale-in: TiDB exited {stopped_after:?} after SIGTERM");
    assert_eq!(c1.check().await, survivor);
    assert_eq!(c2.check().await, survivor);
    c1.sql("INSERT INTO auto_t (tag) VALUES ('after')").await;
    assert_migrations_succeeded(&proxy, 1.0).await;
    assert_no_session_errors(&proxy);
}

// ---- (c) transactions -------------------------------------------------------------------------

/// A session inside a transaction stays on a draining TiDB until COMMIT, then moves; a session
/// that never commits but sends BEGIN again moves at that BEGIN (the proxy commits for it).
/// Every written row exists exactly once, on the TiDB that committed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_transaction_holds_session_until_it_ends() {
    let _slot = slot(1).await;
    let (tidb, proxy, [mut a, mut b]) =
        sessions_writing_in_transactions(4, ["txn_commit", "txn_hold"], [1001, 2001]).await;
    let (t1, t2) = (tidb.addr(0), tidb.addr(1));

    proxy
        .push_ok(
            2,
            &[Pushed::tidb(&tidb, 0).draining(), Pushed::tidb(&tidb, 1)],
        )
        .await;
    // For 2 s neither session moves: both are inside a transaction.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let s = proxy.backends().await;
        assert_eq!(
            (s.sessions(&t1), s.sessions(&t2)),
            (2, 0),
            "sessions inside a transaction must stay: {:#}",
            s.json
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = proxy.backends().await;
    assert_eq!(s.get(&t1).map(|b| b.state.as_str()), Some("draining"));
    // Still on TiDB-1 with the transaction open: the session sees its row, nobody else does.
    for (c, id) in [(&mut a, 1001u64), (&mut b, 2001)] {
        assert_eq!(serving_tidb(&mut c.conn).await.unwrap(), t1, "{}", c.name);
        let own: u64 = c
            .first(&format!("SELECT COUNT(*) FROM w WHERE id = {id}"))
            .await;
        assert_eq!(own, 1, "{}: its own uncommitted row", c.name);
        assert_eq!(
            rows_with_id(&tidb, 0, id).await,
            0,
            "{}: row {id} must not be committed yet",
            c.name
        );
    }

    // COMMIT ends the transaction: the session moves right after it.
    a.sql("COMMIT").await;
    assert_eq!(a.check().await, t2, "after COMMIT the session moved");
    assert_eq!(rows_with_id(&tidb, 0, 1001).await, 1, "row 1001 on TiDB-1");
    assert_eq!(
        rows_with_id(&tidb, 1, 1001).await,
        0,
        "row 1001 not on TiDB-2"
    );
    a.sql("INSERT INTO w (id, client) VALUES (1002, 0)").await;
    assert_eq!(rows_with_id(&tidb, 1, 1002).await, 1, "row 1002 on TiDB-2");

    // "Hold BEGIN": BEGIN implicitly commits; the proxy commits, moves, then begins.
    assert_eq!(
        proxy.backends().await.sessions(&t1),
        1,
        "the never-committing session is still on TiDB-1"
    );
    b.sql("BEGIN").await;
    assert_eq!(
        serving_tidb(&mut b.conn).await.unwrap(),
        t2,
        "the session moved at its BEGIN"
    );
    assert_eq!(
        rows_with_id(&tidb, 0, 2001).await,
        1,
        "row 2001 was implicitly committed on TiDB-1"
    );
    assert_eq!(
        rows_with_id(&tidb, 1, 2001).await,
        0,
        "row 2001 not on TiDB-2"
    );
    b.sql("INSERT INTO w (id, client) VALUES (2002, 0)").await;
    let own: u64 = b.first("SELECT COUNT(*) FROM w WHERE id = 2002").await;
    assert_eq!(own, 1);
    assert_eq!(
        rows_with_id(&tidb, 1, 2002).await,
        0,
        "the new transaction on TiDB-2 is open"
    );
    b.sql("COMMIT").await;
    assert_eq!(rows_with_id(&tidb, 1, 2002).await, 1, "row 2002 on TiDB-2");
    assert_eq!(
        rows_with_id(&tidb, 0, 2002).await,
        0,
        "row 2002 not on TiDB-1"
    );
    assert_eq!(b.check().await, t2);
    assert_eq!(a.check().await, t2);
    assert_eq!(proxy.backends().await.sessions(&t1), 0);
    assert_migrations_succeeded(&proxy, 2.0).await;
    assert_no_session_errors(&proxy);
}

// ---- (d) discovery through etcd ---------------------------------------------------------------

/// TiDBs registered in a real etcd: new sessions spread over both; when one is unregistered,
/// its sessions move to the other; registered again, it takes new sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_etcd_discovery_spreads_and_moves_sessions() {
    let _slot = slot(1).await;
    let tidb = TidbCluster::start(migration_instance(6), 2, 5, false).await;
    create_schema(&tidb).await;
    let (t1, t2) = (tidb.addr(0), tidb.addr(1));
    let etcd = Etcd::start().await;
    let proxy = start_proxy(&format!("pd-addrs = \"{}\"", etcd.endpoint()));
    etcd.put_tidb(&t1, 10080).await;
    etcd.put_tidb(&t2, 10080).await;
    proxy
        .wait_backends(
            "both TiDBs discovered and healthy",
            Duration::from_secs(15),
            |s| s.health(&t1) == "healthy" && s.health(&t2) == "healthy",
        )
        .await;
    let state = proxy.backends().await;
    for t in [&t1, &t2] {
        let sources = &state.get(t).unwrap().json["sources"];
        assert_eq!(
            sources,
            &serde_json::json!(["etcd"]),
            "{t}: {:#}",
            state.json
        );
    }

    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(Client::open(&proxy, &format!("etcd{i}")).await);
    }
    let mut per_tidb: BTreeMap<String, usize> = BTreeMap::new();
    for c in &mut clients {
        *per_tidb.entry(c.check().await).or_default() += 1;
    }
    assert_eq!(
        per_tidb,
        BTreeMap::from([(t1.clone(), 2), (t2.clone(), 2)]),
        "new sessions are spread over both TiDBs"
    );

    etcd.del_tidb(&t1).await;
    let (_, took) = proxy
        .wait_backends(
            "the unregistered TiDB's sessions moved",
            Duration::from_secs(10),
            |s| s.sessions(&t1) == 0 && s.sessions(&t2) == 4,
        )
        .await;
    eprintln!("etcd: sessions left the unregistered TiDB within {took:?}");
    for c in &mut clients {
        assert_eq!(c.check().await, t2, "{}", c.name);
    }

    // Registered again: a new session goes to the empty TiDB.
    etcd.put_tidb(&t1, 10080).await;
    proxy
        .wait_backends("TiDB-1 discovered again", Duration::from_secs(15), |s| {
            s.health(&t1) == "healthy" && s.get(&t1).is_some_and(|b| b.state == "active")
        })
        .await;
    let mut late = Client::open(&proxy, "etcd_late").await;
    assert_eq!(late.check().await, t1);
    for c in &mut clients {
        c.check().await;
    }
    assert_migrations_succeeded(&proxy, 2.0).await;
    assert_no_session_errors(&proxy);
}

// ---- (e) rolling restart under load -----------------------------------------------------------

#[derive(Default)]
struct LoadLog {
    /// (id, TiDB that served the transaction) of every committed write.
    committed: Vec<(u64, String)>,
    errors: Vec<String>,
    iterations: Vec<u64>,
}

/// One client of the rolling-restart load: BEGIN; INSERT; SELECT instance; COMMIT; a point
/// SELECT that also checks a user variable. Stops at the first error (recorded).
async fn load_client(
    proxy_opts: mysql_async::OptsBuilder,
    n: u64,
    stop: Arc<AtomicBool>,
) -> LoadLog {
    let mut log = LoadLog::default();
    let started = Instant::now();
    let mut conn = match Conn::new(proxy_opts.db_name(Some(DB))).await {
        Ok(c) => c,
        Err(e) => {
            log.errors.push(format!("client {n}: connect: {e}"));
            return log;
        }
    };
    if let Err(e) = conn.query_drop(format!("SET @cid = {n}")).await {
        log.errors.push(format!("client {n}: SET @cid: {e}"));
        return log;
    }
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let id = n * 1_000_000 + seq;
        let at = started.elapsed();
        let step = async {
            conn.query_drop("BEGIN").await.map_err(|e| ("BEGIN", e))?;
            conn.query_drop(format!("INSERT INTO w (id, client) VALUES ({id}, {n})"))
                .await
                .map_err(|e| ("INSERT", e))?;
            let inst = serving_tidb(&mut conn)
                .await
                .map_err(|e| ("SELECT instance", e))?;
            conn.query_drop("COMMIT").await.map_err(|e| ("COMMIT", e))?;
            Ok::<_, (&str, mysql_async::Error)>(inst)
        };
        match step.await {
            Ok(inst) => log.committed.push((id, inst)),
            Err((what, e)) => {
                log.errors
                    .push(format!("client {n} at {at:?}: write {id}: {what}: {e}"));
                return log;
            }
        }
        // Odd clients read with a prepared statement (mysql_async re-executes its cached
        // statement id after every move), even ones with a text query.
        let read = if n % 2 == 1 {
            conn.exec_first::<(i64, i64), _, _>("SELECT v, @cid FROM r WHERE id = ?", (1,))
                .await
        } else {
            conn.query_first::<(i64, i64), _>("SELECT v, @cid FROM r WHERE id = 1")
                .await
        };
        match read {
            Ok(Some((42, cid))) if cid == n as i64 => {}
            Ok(other) => {
                log.errors.push(format!(
                    "client {n} at {at:?}: point SELECT returned {other:?}, expected (42, {n})"
                ));
                return log;
            }
            Err(e) => {
                log.errors
                    .push(format!("client {n} at {at:?}: point SELECT: {e}"));
                return log;
            }
        }
    }
    log.iterations.push(seq);
    let _ = conn.disconnect().await;
    log
}

/// A client that opens a new connection for every transaction (so new sessions are routed
/// while TiDBs stop and start) and writes as [`load_client`] does.
async fn churn_client(
    proxy_opts: mysql_async::OptsBuilder,
    n: u64,
    stop: Arc<AtomicBool>,
) -> LoadLog {
    let mut log = LoadLog::default();
    let started = Instant::now();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let id = n * 1_000_000 + seq;
        let at = started.elapsed();
        let step = async {
            let mut conn = Conn::new(proxy_opts.clone().db_name(Some(DB)))
                .await
                .map_err(|e| ("connect", e))?;
            conn.query_drop("BEGIN").await.map_err(|e| ("BEGIN", e))?;
            conn.query_drop(format!("INSERT INTO w (id, client) VALUES ({id}, {n})"))
                .await
                .map_err(|e| ("INSERT", e))?;
            let inst = serving_tidb(&mut conn)
                .await
                .map_err(|e| ("SELECT instance", e))?;
            conn.query_drop("COMMIT").await.map_err(|e| ("COMMIT", e))?;
            let _ = conn.disconnect().await;
            Ok::<_, (&str, mysql_async::Error)>(inst)
        };
        match step.await {
            Ok(inst) => log.committed.push((id, inst)),
            Err((what, e)) => {
                log.errors.push(format!(
                    "new-connection client {n} at {at:?}: write {id}: {what}: {e}"
                ));
                return log;
            }
        }
    }
    log.iterations.push(seq);
    log
}

/// Every TiDB is restarted in turn (SIGTERM with a graceful wait, exit, start again) while 32
/// clients run transactions through the proxy: no client sees an error, and every committed
/// write exists exactly once, on the TiDB that committed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_rolling_restart_under_load_loses_nothing() {
    let _slot = slot(2).await;
    const CLIENTS: u64 = 32;
    /// Clients that open a new connection per transaction, besides the 32.
    const CHURN_CLIENTS: u64 = 4;
    const GRACEFUL_WAIT: u64 = 8;
    let tidb = TidbCluster::start(migration_instance(8), 3, GRACEFUL_WAIT as u32, true).await;
    create_schema(&tidb).await;
    let proxy = start_proxy("");
    let all: Vec<Pushed> = (0..3).map(|k| Pushed::tidb(&tidb, k)).collect();
    push_and_wait_healthy(&proxy, 1, &all).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for n in 1..=CLIENTS {
        tasks.push(tokio::spawn(load_client(
            proxy.opts("root", None),
            n,
            stop.clone(),
        )));
    }
    for n in 1..=CHURN_CLIENTS {
        tasks.push(tokio::spawn(churn_client(
            proxy.opts("root", None),
            100 + n,
            stop.clone(),
        )));
    }
    proxy
        .wait_backends("all clients connected", Duration::from_secs(20), |s| {
            (0..3).map(|k| s.sessions(&tidb.addr(k))).sum::<u64>() >= CLIENTS
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let roll_start = Instant::now();
    for k in 0..3 {
        let addr = tidb.addr(k);
        let stopping = tidb.stop_graceful(k);
        let before = proxy.backends().await.sessions(&addr);
        let (_, drained) = proxy
            .wait_backends(
                &format!("sessions left {addr} during its graceful wait"),
                Duration::from_secs(GRACEFUL_WAIT),
                |s| s.sessions(&addr) == 0,
            )
            .await;
        let exited = stopping.wait(Duration::from_secs(60)).await;
        tidb.restart(k).await;
        let (_, back) = proxy
            .wait_backends(
                &format!("{addr} healthy again"),
                Duration::from_secs(20),
                |s| s.health(&addr) == "healthy",
            )
            .await;
        eprintln!(
            "rolling restart: {addr}: {before} sessions drained in {drained:?}, exited after \
             {exited:?}, healthy {back:?} after the restart ({:?} into the roll)",
            roll_start.elapsed()
        );
        // Let the balancer move a session onto the restarted TiDB before the next one stops.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);

    let mut committed: Vec<(u64, String)> = Vec::new();
    let mut errors = Vec::new();
    let mut iterations = Vec::new();
    for t in tasks {
        let log = t.await.expect("client task");
        committed.extend(log.committed);
        errors.extend(log.errors);
        iterations.extend(log.iterations);
    }
    eprintln!(
        "rolling restart: {} transactions committed in {:?}; per client {:?}",
        committed.len(),
        roll_start.elapsed(),
        iterations
    );
    assert!(
        errors.is_empty(),
        "{} client error(s) during the rolling restart:\n{}",
        errors.len(),
        errors.join("\n")
    );
    assert_eq!(
        iterations.len() as u64,
        CLIENTS + CHURN_CLIENTS,
        "every client ran to the end"
    );
    assert!(iterations.iter().all(|&n| n > 0), "every client committed");

    // Every committed write exactly once, on the TiDB that served its transaction.
    let mut stored: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for k in 0..3 {
        let mut conn = tidb.connect(k).await;
        let ids: Vec<u64> = conn.query("SELECT id FROM mig.w").await.unwrap();
        let n = ids.len();
        let set: BTreeSet<u64> = ids.into_iter().collect();
        assert_eq!(set.len(), n, "{}: duplicate ids", tidb.addr(k));
        stored.insert(tidb.addr(k), set);
    }
    let mut missing = Vec::new();
    let mut misplaced = Vec::new();
    for (id, inst) in &committed {
        match stored.get(inst) {
            Some(set) if set.contains(id) => {}
            _ => missing.push(format!("{id}@{inst}")),
        }
        for (addr, set) in &stored {
            if addr != inst && set.contains(id) {
                misplaced.push(format!("{id} committed on {inst} but also on {addr}"));
            }
        }
    }
    assert!(missing.is_empty(), "committed writes missing: {missing:?}");
    assert!(misplaced.is_empty(), "{misplaced:?}");
    let total: usize = stored.values().map(BTreeSet::len).sum();
    assert_eq!(
        total,
        committed.len(),
        "rows stored vs transactions committed (an uncommitted write was stored?)"
    );
    let metrics = proxy.metrics().await;
    for reason in ["status", "conn", "cpu", "memory"] {
        eprintln!(
            "rolling restart: migrations for {reason}: {} succeeded, {} failed",
            metric_sum(
                &metrics,
                "tiproxy_balance_migrate_total",
                &[("reason", reason), ("migrate_res", "succeed")]
            ),
            metric_sum(
                &metrics,
                "tiproxy_balance_migrate_total",
                &[("reason", reason), ("migrate_res", "fail")]
            )
        );
    }
    let served: BTreeSet<&String> = committed.iter().map(|(_, i)| i).collect();
    assert_eq!(served.len(), 3, "every TiDB served writes: {served:?}");
    assert_migrations_succeeded(&proxy, CLIENTS as f64).await;
    assert_no_session_errors(&proxy);
}

// ---- (f) a session TiDB refuses to export -----------------------------------------------------

/// A session with a temporary table cannot be exported: it stays on its draining TiDB and keeps
/// working, the admin API names it as blocked, and the blocked-migration metric counts it.
/// Once the temporary table is dropped the session moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_temporary_table_blocks_migration() {
    let _slot = slot(1).await;
    let tidb = TidbCluster::start(migration_instance(11), 2, 5, false).await;
    create_schema(&tidb).await;
    let (t1, t2) = (tidb.addr(0), tidb.addr(1));
    let proxy = start_proxy("");
    push_and_wait_healthy(&proxy, 1, &[Pushed::tidb(&tidb, 0)]).await;

    let mut temp = Client::open(&proxy, "temp").await;
    temp.sql("CREATE TEMPORARY TABLE tt (a INT)").await;
    temp.sql("INSERT INTO tt VALUES (7)").await;
    let mut plain = Client::open(&proxy, "plain").await;

    push_and_wait_healthy(
        &proxy,
        2,
        &[Pushed::tidb(&tidb, 0).draining(), Pushed::tidb(&tidb, 1)],
    )
    .await;
    let (state, _) = proxy
        .wait_backends(
            "the plain session moved and the temporary-table session is blocked",
            Duration::from_secs(10),
            |s| {
                s.sessions(&t2) == 1
                    && s.sessions(&t1) == 1
                    && s.get(&t1).is_some_and(|b| !b.blocked.is_empty())
            },
        )
        .await;
    let blocked = &state.get(&t1).unwrap().blocked;
    assert_eq!(blocked.len(), 1, "{:#}", state.json);
    eprintln!("temporary table: blocked-sessions reason: {}", blocked[0].1);
    assert!(
        blocked[0].1.to_lowercase().contains("temporary"),
        "the reason should mention temporary tables: {:#}",
        state.json
    );
    assert_eq!(plain.check().await, t2);

    // The session keeps working where it is, temporary table included.
    assert_eq!(temp.check().await, t1);
    let a: i64 = temp.first("SELECT a FROM tt").await;
    assert_eq!(a, 7);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(temp.check().await, t1, "still on the draining TiDB");
    let metrics = proxy.metrics().await;
    assert!(
        metric_sum(&metrics, "tiproxy_balance_migrate_blocked_total", &[]) >= 1.0,
        "tiproxy_balance_migrate_blocked_total missing:\n{metrics}"
    );

    // Without the temporary table the session can move, and does.
    temp.sql("DROP TEMPORARY TABLE tt").await;
    let (_, took) = proxy
        .wait_backends(
            "the session moved once its temporary table was dropped",
            Duration::from_secs(10),
            |s| s.sessions(&t1) == 0 && s.sessions(&t2) == 2,
        )
        .await;
    eprintln!("temporary table: session moved {took:?} after DROP TEMPORARY TABLE");
    assert_eq!(temp.check().await, t2);
    let state = proxy.backends().await;
    assert!(
        state.backends.iter().all(|b| b.blocked.is_empty()),
        "no session is blocked any more: {:#}",
        state.json
    );
    assert_no_session_errors(&proxy);
}

// ---- (g) the push API -------------------------------------------------------------------------

/// The operator's push API: backends with health and session counts; a stale generation is
/// refused with 409; marking a backend draining moves all its sessions away before it is
/// stopped, so stopping it afterwards costs no client anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_push_draining_empties_backend_before_stop() {
    let _slot = slot(1).await;
    const SESSIONS: u64 = 20;
    let tidb = TidbCluster::start(migration_instance(13), 2, 5, false).await;
    create_schema(&tidb).await;
    let (t1, t2) = (tidb.addr(0), tidb.addr(1));
    let proxy = start_proxy("");
    assert_eq!(proxy.backends().await.generation, None);

    push_and_wait_healthy(&proxy, 5, &[Pushed::tidb(&tidb, 0), Pushed::tidb(&tidb, 1)]).await;
    let (code, body) = proxy.push_backends(4, &[Pushed::tidb(&tidb, 1)]).await;
    assert_eq!(code, 409, "a lower generation is refused: {body}");
    let (code, body) = http_request(
        proxy.api_addr(),
        "PUT",
        "/api/v1/backends",
        Some("{\"generation\": 9, \"backends\": [{\"adr\": \"x\"}]}"),
    )
    .await
    .unwrap();
    assert_eq!(code, 400, "a malformed snapshot is refused: {body}");
    let state = proxy.backends().await;
    assert_eq!(state.generation, Some(5), "{:#}", state.json);
    assert_eq!(state.backends.len(), 2, "{:#}", state.json);

    let mut raws = Vec::new();
    for i in 0..2 {
        raws.push(RawClient::open(&proxy, &format!("raw{i}")).await);
    }
    let mut clients = Vec::new();
    for i in 2..SESSIONS {
        clients.push(Client::open(&proxy, &format!("push{i}")).await);
    }
    let state = proxy.backends().await;
    for t in [&t1, &t2] {
        let b = state.get(t).expect("listed");
        assert_eq!(
            (b.health.as_str(), b.state.as_str(), b.sessions),
            ("healthy", "active", SESSIONS / 2),
            "{t}: {:#}",
            state.json
        );
        assert_eq!(b.json["sources"], serde_json::json!(["push"]));
    }
    let mut on_t1 = 0;
    for c in &mut clients {
        on_t1 += usize::from(c.check().await == t1);
    }
    for r in &mut raws {
        on_t1 += usize::from(r.check().await == t1);
    }
    assert_eq!(on_t1 as u64, SESSIONS / 2);

    push_and_wait_healthy(
        &proxy,
        6,
        &[Pushed::tidb(&tidb, 0).draining(), Pushed::tidb(&tidb, 1)],
    )
    .await;
    let (state, took) = proxy
        .wait_backends(
            "every session left the draining TiDB",
            Duration::from_secs(10),
            |s| s.sessions(&t1) == 0 && s.sessions(&t2) == SESSIONS,
        )
        .await;
    eprintln!(
        "push: {} sessions left the draining TiDB in {took:?}",
        SESSIONS / 2
    );
    assert_eq!(state.get(&t1).map(|b| b.state.as_str()), Some("draining"));
    for c in &mut clients {
        assert_eq!(c.check().await, t2, "{}", c.name);
    }
    for r in &mut raws {
        assert_eq!(r.check().await, t2, "{}", r.name);
    }
    // The moves are paced ~100 ms apart, so all but the first logged in to TiDB-2 early, with
    // the token an earlier move exported from TiDB-1; the checks above found their state intact.
    let early = proxy
        .stderr_log()
        .lines()
        .filter(|l| l.contains("migration steps") && l.contains("early_login=true"))
        .count();
    eprintln!("push: {early} of the moves logged in early with a cached session token");
    assert!(
        early >= 1,
        "no migration logged in with a cached session token"
    );

    // Stopping the emptied TiDB costs nobody anything.
    tidb.kill(0).await;
    for c in &mut clients {
        assert_eq!(c.check().await, t2, "{}", c.name);
    }
    for r in &mut raws {
        assert_eq!(r.check().await, t2, "{}", r.name);
    }
    proxy
        .wait_backends(
            "the stopped TiDB is seen unhealthy",
            Duration::from_secs(10),
            |s| s.health(&t1) == "unhealthy" && s.health(&t2) == "healthy",
        )
        .await;
    assert_migrations_succeeded(&proxy, (SESSIONS / 2) as f64).await;
    assert_no_session_errors(&proxy);
}

// ---- (h) scale-out with open transactions -----------------------------------------------------

/// The user's third experiment: both sessions are inside a transaction with a write when a
/// second TiDB is added. Neither moves while its transaction is open; once both COMMIT, exactly
/// one moves, with its state, and each write exists once, on the TiDB that committed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h_scale_out_waits_for_open_transactions() {
    let _slot = slot(1).await;
    let (tidb, proxy, [mut c1, mut c2]) =
        sessions_writing_in_transactions(15, ["open1", "open2"], [3001, 3002]).await;
    let (t1, t2) = (tidb.addr(0), tidb.addr(1));

    push_and_wait_healthy(&proxy, 2, &[Pushed::tidb(&tidb, 0), Pushed::tidb(&tidb, 1)]).await;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let s = proxy.backends().await;
        assert_eq!(
            (s.sessions(&t1), s.sessions(&t2)),
            (2, 0),
            "sessions inside a transaction must stay: {:#}",
            s.json
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (c, id) in [(&mut c1, 3001u64), (&mut c2, 3002)] {
        assert_eq!(serving_tidb(&mut c.conn).await.unwrap(), t1, "{}", c.name);
        assert_eq!(
            rows_with_id(&tidb, 0, id).await,
            0,
            "{}: the transaction is still open",
            c.name
        );
    }

    c1.sql("COMMIT").await;
    c2.sql("COMMIT").await;
    let (_, took) = proxy
        .wait_backends(
            "one session moved after the transactions ended",
            Duration::from_secs(10),
            |s| s.sessions(&t1) == 1 && s.sessions(&t2) == 1,
        )
        .await;
    eprintln!("scale-out after COMMIT: one session moved within {took:?}");
    let mut got = [c1.check().await, c2.check().await];
    got.sort();
    assert_eq!(got, [t1.clone(), t2.clone()], "one session on each TiDB");
    for id in [3001, 3002] {
        assert_eq!(rows_with_id(&tidb, 0, id).await, 1, "row {id} on TiDB-1");
        assert_eq!(
            rows_with_id(&tidb, 1, id).await,
            0,
            "row {id} not on TiDB-2"
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = proxy.backends().await;
    assert_eq!((s.sessions(&t1), s.sessions(&t2)), (1, 1), "{:#}", s.json);
    assert_migrations_succeeded(&proxy, 1.0).await;
    assert_no_session_errors(&proxy);
}

// ---- (i) how the connection is re-made ------------------------------------------------------

/// What TiDB shows about the connection a session runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ConnSeen {
    user: String,
    /// `Ssl_cipher` of the proxy-to-TiDB connection; empty without TLS.
    backend_cipher: String,
    attrs: BTreeMap<String, String>,
}

async fn conn_seen(conn: &mut Conn, what: &str) -> ConnSeen {
    let user: String = conn
        .query_first("SELECT CURRENT_USER()")
        .await
        .unwrap_or_else(|e| panic!("{what}: CURRENT_USER(): {e}"))
        .expect("a row");
    let cipher: Option<(String, String)> = conn
        .query_first("SHOW STATUS LIKE 'Ssl_cipher'")
        .await
        .unwrap_or_else(|e| panic!("{what}: Ssl_cipher: {e}"));
    let attrs: Vec<(String, String)> = conn
        .query(
            "SELECT ATTR_NAME, ATTR_VALUE FROM performance_schema.session_connect_attrs \
             WHERE PROCESSLIST_ID = CONNECTION_ID()",
        )
        .await
        .unwrap_or_else(|e| panic!("{what}: session_connect_attrs: {e}"));
    ConnSeen {
        user,
        backend_cipher: cipher.map(|(_, v)| v).unwrap_or_default(),
        attrs: attrs.into_iter().collect(),
    }
}

/// Asserts that TiDB sees the raw client's own address, 127.0.0.9, through the PROXY header.
async fn assert_seen_from_9(conn: &mut RawConn, when: &str) {
    let host = conn
        .query("SELECT HOST FROM INFORMATION_SCHEMA.PROCESSLIST WHERE ID = CONNECTION_ID()")
        .await
        .unwrap_or_else(|e| panic!("processlist {when}: {e}"));
    assert!(
        host[0][0]
            .as_deref()
            .unwrap_or("")
            .starts_with("127.0.0.9:"),
        "{when}: TiDB should see the client's own address: {host:?}"
    );
}

/// A move re-makes the backend connection by the rules of the client's first one, against
/// TiDBs that serve TLS: a TLS client gets a TLS backend leg verified with the configured CA
/// and a plain client a plain one; the PROXY header carries the client's own address; the
/// password user, the user after COM_CHANGE_USER and the connect attributes stay; compression
/// on the client leg goes on working. A session with an open cursor stays until the cursor is
/// exhausted, then moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i_move_remakes_tls_proxy_header_user_and_attributes() {
    let _slot = slot(1).await;
    let tidb = TidbCluster::start_tls(migration_instance(17), 2, 5).await;
    create_schema(&tidb).await;
    tidb.run_on_all(&[
        "CREATE USER IF NOT EXISTS 'mig_pw'@'%' IDENTIFIED BY 'pw-one'",
        "GRANT ALL ON mig.* TO 'mig_pw'@'%'",
        "CREATE USER IF NOT EXISTS 'mig_other'@'%' IDENTIFIED BY 'pw-two'",
        "GRANT SELECT ON mig.* TO 'mig_other'@'%'",
        "GRANT SELECT ON performance_schema.* TO 'mig_pw'@'%', 'mig_other'@'%'",
        "GRANT PROCESS ON *.* TO 'mig_pw'@'%', 'mig_other'@'%'",
        "CREATE TABLE IF NOT EXISTS mig.five (id INT PRIMARY KEY)",
        "REPLACE INTO mig.five VALUES (1), (2), (3), (4), (5)",
    ])
    .await;
    let (t1, t2) = (tidb.addr(0), tidb.addr(1));
    let proxy = Proxy::start(&format!(
        "[proxy]\nconnect-timeout = 5\nproxy-protocol = \"v2\"\n[health]\ninterval = 0.5\n\
         [security.server-tls]\nauto-certs = true\n[security.sql-tls]\nca = \"{}\"\n",
        tidb.tls_ca().display()
    ));
    push_and_wait_healthy(&proxy, 1, &[Pushed::tidb(&tidb, 0)]).await;

    // TLS and zlib compression on the client leg, a password user, connect attributes.
    let attrs = std::collections::HashMap::from([("mig_test".to_string(), "i".to_string())]);
    let mut tls_client = connect(
        proxy
            .opts("mig_pw", Some("pw-one"))
            .db_name(Some(DB))
            .ssl_opts(insecure_ssl())
            .compression(mysql_async::Compression::fast())
            .connect_attributes(attrs),
        "TLS client",
    )
    .await;
    tls_client
        .query_drop("SET @uv = 'tls'")
        .await
        .expect("SET @uv");
    let tls_before = conn_seen(&mut tls_client, "TLS client").await;
    assert_eq!(tls_before.user, "mig_pw@%");
    assert!(
        !tls_before.backend_cipher.is_empty(),
        "a TLS client gets a TLS backend leg: {tls_before:?}"
    );
    assert_eq!(
        tls_before.attrs.get("mig_test").map(String::as_str),
        Some("i")
    );

    // A plain client that changed its user with COM_CHANGE_USER.
    let mut plain_client = connect(proxy.opts("root", None), "plain client").await;
    plain_client
        .change_user(
            mysql_async::ChangeUserOpts::default()
                .with_user(Some("mig_other".into()))
                .with_pass(Some("pw-two".into()))
                .with_db_name(Some(DB.into())),
        )
        .await
        .expect("COM_CHANGE_USER to mig_other");
    let plain_before = conn_seen(&mut plain_client, "plain client").await;
    assert_eq!(plain_before.user, "mig_other@%");
    assert_eq!(
        plain_before.backend_cipher, "",
        "a plain client gets a plain backend leg"
    );

    // A raw client from its own address, with a cursor open on five rows.
    let from_9 = ConnectOptions {
        bind: Some("127.0.0.9".parse().unwrap()),
        database: Some(DB.into()),
        ..ConnectOptions::root()
    };
    let mut cursor_client = RawConn::connect(proxy.addr(), &from_9)
        .await
        .unwrap_or_else(|e| panic!("cursor client: connect: {e}"));
    assert_seen_from_9(&mut cursor_client, "before the move").await;
    let (stmt, _, _) = cursor_client
        .prepare("SELECT id FROM five ORDER BY id")
        .await
        .expect("prepare");
    let (cols, _) = cursor_client
        .execute_cursor(stmt)
        .await
        .expect("open the cursor");
    let first = cursor_client.fetch(stmt, 2, &cols).await.expect("fetch 2");
    assert_eq!(
        first.rows,
        vec![vec![Some("1".into())], vec![Some("2".into())]]
    );

    push_and_wait_healthy(
        &proxy,
        2,
        &[Pushed::tidb(&tidb, 0).draining(), Pushed::tidb(&tidb, 1)],
    )
    .await;
    proxy
        .wait_backends(
            "both mysql_async sessions moved, the cursor's stayed",
            Duration::from_secs(10),
            |s| s.sessions(&t1) == 1 && s.sessions(&t2) == 2,
        )
        .await;
    for (conn, before, what) in [
        (&mut tls_client, &tls_before, "TLS client"),
        (&mut plain_client, &plain_before, "plain client"),
    ] {
        assert_eq!(
            serving_tidb(conn).await.expect("instance"),
            t2,
            "{what} moved"
        );
        let after = conn_seen(conn, what).await;
        assert_eq!(after.user, before.user, "{what}: user after the move");
        assert_eq!(
            after.backend_cipher.is_empty(),
            before.backend_cipher.is_empty(),
            "{what}: TLS on the backend leg after the move ({after:?})"
        );
        assert_eq!(after.attrs, before.attrs, "{what}: connect attributes");
    }
    let uv: Option<String> = tls_client.query_first("SELECT @uv").await.expect("@uv");
    assert_eq!(uv.as_deref(), Some("tls"));
    // A compressed result of several packets still decodes on the client.
    let long: Vec<String> = tls_client
        .query("SELECT REPEAT(CONCAT('row', id), 20000) FROM five")
        .await
        .expect("a compressed result");
    assert_eq!(long.len(), 5);
    assert!(long[4].starts_with("row5row5") && long[4].len() == 80_000);

    // The cursor's session waits on the draining TiDB while the cursor is open ...
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        proxy.backends().await.sessions(&t1),
        1,
        "an open cursor pins the session"
    );
    let rest = cursor_client
        .fetch(stmt, 10, &cols)
        .await
        .expect("fetch the rest");
    assert_eq!(
        rest.rows,
        vec![
            vec![Some("3".into())],
            vec![Some("4".into())],
            vec![Some("5".into())]
        ]
    );
    // ... and moves once it is exhausted, still with the client's own address.
    proxy
        .wait_backends(
            "the cursor's session moved after its last row",
            Duration::from_secs(10),
            |s| s.sessions(&t1) == 0 && s.sessions(&t2) == 3,
        )
        .await;
    let inst = cursor_client
        .query("SELECT instance FROM information_schema.cluster_info WHERE type = 'tidb'")
        .await
        .expect("instance");
    assert_eq!(inst[0][0].as_deref(), Some(t2.as_str()));
    assert_seen_from_9(&mut cursor_client, "after the move").await;
    let again = cursor_client.execute(stmt).await.expect("re-execute");
    assert_eq!(again.len(), 5, "the statement survived the move: {again:?}");

    assert_migrations_succeeded(&proxy, 3.0).await;
    assert_no_session_errors(&proxy);
}

//! Connection-level behaviour: PROXY protocol, unreachable backends, max-connections and
//! shutdown.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use mysql_async::{Conn, Opts};
use tiproxy_tests::raw::{self, ConnectOptions, RawConn};
use tiproxy_tests::*;

const OWN_HOST_SQL: &str =
    "SELECT HOST FROM INFORMATION_SCHEMA.PROCESSLIST WHERE ID = CONNECTION_ID()";

/// The Host column TiDB shows for a raw connection made with `opts`.
async fn host_seen(addr: SocketAddr, opts: &ConnectOptions) -> String {
    let mut conn = RawConn::connect(addr, opts)
        .await
        .unwrap_or_else(|e| panic!("raw connect to {addr}: {e}"));
    let rows = conn
        .query(OWN_HOST_SQL)
        .await
        .unwrap_or_else(|e| panic!("processlist via {addr}: {e}"));
    conn.quit().await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    rows[0][0].clone().expect("Host is not NULL")
}

fn ip_of(host: &str) -> &str {
    host.rsplit_once(':').map_or(host, |(ip, _)| ip)
}

#[tokio::test]
async fn proxy_protocol_v2_carries_client_address() {
    let backend = Backend::tidb(0);
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9));
    let from_9 = ConnectOptions {
        bind: Some(source),
        ..ConnectOptions::root()
    };
    // Direct from 127.0.0.9: the reference.
    let direct = host_seen(backend.addr.parse().unwrap(), &from_9).await;
    assert_eq!(ip_of(&direct), "127.0.0.9", "direct Host {direct}");

    // Without PROXY protocol TiDB sees the proxy's own address.
    let plain = backend.proxy("");
    let seen = host_seen(plain.addr(), &from_9).await;
    assert_ne!(
        ip_of(&seen),
        "127.0.0.9",
        "no PROXY header, yet TiDB saw the client"
    );

    // With proxy-protocol = "v2" TiDB sees the real client.
    let proxy = backend.proxy("proxy-protocol = \"v2\"\n");
    let seen = host_seen(proxy.addr(), &from_9).await;
    assert_eq!(ip_of(&seen), "127.0.0.9", "Host through the proxy: {seen}");
    // mysql_async clients too (source 127.0.0.1).
    let mut conn = proxy.connect_root(&backend).await;
    let host: Option<String> = conn.query_first(OWN_HOST_SQL).await.unwrap();
    assert_eq!(host.as_deref().map(ip_of), Some("127.0.0.1"));
    let works = exec_works(&mut conn).await;
    assert!(works, "the session works after the PROXY header");

    // A client behind its own load balancer sends a PROXY v2 header to the proxy: the
    // address it claims is what TiDB sees.
    let claimed: SocketAddr = "192.0.2.10:5555".parse().unwrap();
    let header = raw::proxy_v2_header(claimed, proxy.addr());
    let behind_lb = ConnectOptions {
        preamble: Some(header),
        ..ConnectOptions::root()
    };
    let seen = host_seen(proxy.addr(), &behind_lb).await;
    assert_eq!(
        seen, "192.0.2.10:5555",
        "Host for a client behind a load balancer"
    );
}

async fn exec_works(conn: &mut Conn) -> bool {
    let v: Option<i64> = conn.exec_first("SELECT ? + 1", (1,)).await.unwrap();
    v == Some(2)
}

#[tokio::test]
async fn unreachable_backend_gives_mysql_error() {
    // A port with nothing listening: bind, note the port, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let proxy = Proxy::start(&format!(
        "[proxy]\nbackends = [\"{dead_addr}\"]\nconnect-timeout = 2\n"
    ));
    let started = Instant::now();
    let result = Conn::new(Opts::from(proxy.opts("root", None))).await;
    let elapsed = started.elapsed();
    let err = expect_server_error(result, "connect with no backend reachable");
    assert!(
        err.message.contains("No available TiDB") || err.message.contains("reachable"),
        "the error should say no backend is available: {err:?}"
    );
    assert!(
        elapsed < Duration::from_secs(8),
        "connect-timeout = 2 but the error took {elapsed:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(1500),
        "gave up after only {elapsed:?}"
    );

    // The mysql CLI prints the same error instead of "Lost connection".
    let (code, _, stderr) = mysql_cli_async(vec![
        "-h".into(),
        "127.0.0.1".into(),
        "-P".into(),
        proxy.port().to_string(),
        "-u".into(),
        "root".into(),
        "-e".into(),
        "SELECT 1".into(),
    ])
    .await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!("ERROR {}", err.code)) && !stderr.contains("Lost connection"),
        "{stderr}"
    );
}

#[tokio::test]
async fn max_connections_refuses_with_1040() {
    for backend in Backend::both() {
        let proxy = Proxy::start(&format!(
            "[proxy]\nbackends = [\"{}\"]\nmax-connections = 2\n",
            backend.addr
        ));
        let mut first = proxy.connect_root(&backend).await;
        let mut second = proxy.connect_root(&backend).await;
        let err = expect_server_error(
            Conn::new(Opts::from(proxy.root_opts(&backend))).await,
            "third connection",
        );
        assert_eq!(err.code, 1040, "{}: {err:?}", backend.name());
        // The first two are unaffected.
        for c in [&mut first, &mut second] {
            let v: Option<i64> = c.query_first("SELECT 1").await.unwrap();
            assert_eq!(v, Some(1));
        }
        // A slot frees up when a client leaves.
        first.disconnect().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut third = loop {
            match Conn::new(Opts::from(proxy.root_opts(&backend))).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline && server_code(&e) == Some(1040) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{}: connect after a slot freed: {e:?}", backend.name()),
            }
        };
        let v: Option<i64> = third.query_first("SELECT 3").await.unwrap();
        assert_eq!(v, Some(3));
        // Raw clients count too and get the error in place of the greeting.
        match RawConn::open(proxy.addr(), &ConnectOptions::root()).await {
            Err(raw::RawError::Server(e)) => assert_eq!(e.code, 1040),
            Err(e) => panic!("raw connect: expected ERROR 1040, got {e}"),
            Ok(_) => panic!("raw connect: expected ERROR 1040, got a greeting"),
        }
    }
}

#[tokio::test]
async fn sigterm_closes_idle_sessions_and_exits() {
    let backend = Backend::mariadb();
    let mut proxy = backend.proxy("graceful-close-conn-timeout = 5\n");
    let mut conn = proxy.connect_root(&backend).await;
    let v: Option<i64> = conn.query_first("SELECT 1").await.unwrap();
    assert_eq!(v, Some(1));
    proxy.signal_term();
    let status = proxy
        .wait_exit_async(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("the proxy did not exit within 10 s of SIGTERM"));
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        proxy.stderr_log()
    );
    // The idle session was closed.
    let after = conn.query_first::<i64, _>("SELECT 1").await;
    assert!(after.is_err(), "the session outlived the proxy: {after:?}");
    assert!(
        proxy.stderr_log().contains("tiproxy stopped"),
        "{}",
        proxy.stderr_log()
    );
}

#[tokio::test]
async fn sessions_spread_over_two_backends() {
    let bed = Testbed::get();
    assert!(bed.tidb.len() >= 2, "this test needs two TiDB instances");
    // Each TiDB is its own database: a marker table tells which one a session landed on.
    let marker = unique_name("marker");
    let first = Backend::tidb(0);
    let mut direct = first.connect_root().await;
    direct
        .query_drop(format!("CREATE TABLE {marker} (x INT)"))
        .await
        .unwrap();
    let proxy = Proxy::start(&format!(
        "[proxy]\nbackends = [\"{}\", \"{}\"]\n",
        bed.tidb(0),
        bed.tidb(1)
    ));
    let mut conns = Vec::new();
    let mut on_first = 0;
    for _ in 0..6 {
        let mut c = proxy.connect_root(&first).await;
        let n: Option<i64> = c
            .query_first(format!(
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema = 'test' AND table_name = '{marker}'"
            ))
            .await
            .unwrap();
        on_first += n.unwrap_or(0);
        conns.push(c);
    }
    assert!(
        (1..6).contains(&on_first),
        "6 concurrent sessions should use both backends; {on_first} went to the first"
    );
    direct
        .query_drop(format!("DROP TABLE {marker}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn api_health_readiness_and_graceful_wait() {
    let backend = Backend::mariadb();
    let mut proxy = backend.proxy("graceful-wait-before-shutdown = 2\n");
    let api = proxy.api_addr();
    assert_eq!(http_get(api, "/healthz").await.unwrap(), (200, "ok".into()));
    assert_eq!(http_get(api, "/readyz").await.unwrap().0, 200);
    let mut conn = proxy.connect_root(&backend).await;
    let v: Option<i64> = conn.query_first("SELECT 1").await.unwrap();
    assert_eq!(v, Some(1));
    let (code, metrics) = http_get(api, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("# TYPE"),
        "no Prometheus metrics: {metrics:.300}"
    );

    // During graceful-wait-before-shutdown: not ready, but still serving SQL.
    proxy.signal_term();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (code, _) = http_get(api, "/readyz").await.unwrap();
        if code == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {code} after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v: Option<i64> = conn.query_first("SELECT 2").await.unwrap();
    assert_eq!(v, Some(2), "SQL must still work during the graceful wait");
    let mut late = proxy.connect_root(&backend).await;
    let v: Option<i64> = late.query_first("SELECT 3").await.unwrap();
    assert_eq!(
        v,
        Some(3),
        "new clients are still accepted during the graceful wait"
    );
    let status = proxy
        .wait_exit_async(Duration::from_secs(15))
        .await
        .expect("the proxy exits after the graceful wait");
    assert!(status.success(), "{status:?}");
}

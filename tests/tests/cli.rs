//! The `mysql` command-line client through the proxy, and the proxy's own command line.

use tiproxy_tests::*;

fn base_args(addr: &str, db: &str) -> Vec<String> {
    let (host, port) = split_addr(addr);
    vec![
        "-h".into(),
        host,
        "-P".into(),
        port.to_string(),
        "-u".into(),
        "root".into(),
        "-D".into(),
        db.into(),
    ]
}

async fn run(addr: &str, db: &str, extra: &[&str]) -> (i32, String, String) {
    let mut args = base_args(addr, db);
    args.extend(extra.iter().map(|s| s.to_string()));
    mysql_cli_async(args).await
}

const STATEMENTS: &str = "SELECT 1 AS one, 'two' AS two, NULL AS n, 3.50 AS d, \
    CAST('2024-05-06 07:08:09' AS DATETIME) AS dt, _utf8mb4'ünï 😀' AS u; \
    SELECT * FROM (SELECT 1 AS a UNION ALL SELECT 2 UNION ALL SELECT 3) t ORDER BY a DESC; \
    DO 1; SELECT VERSION() AS v, CURRENT_USER() AS cu, DATABASE() AS db; \
    SELECT 1/0 AS div0; SHOW WARNINGS; \
    SELECT REPEAT('x', 100000) AS big";

#[tokio::test]
async fn mysql_cli_output_matches_direct() {
    for backend in Backend::both() {
        let proxy = backend.proxy("");
        let proxy_addr = proxy.addr().to_string();
        let db = backend.database();
        for mode in [
            vec![],
            vec!["-t"],
            vec!["-E"],
            vec!["-X"],
            vec!["--compress"],
            vec!["--compress", "-t"],
        ] {
            let mut extra = mode.clone();
            extra.extend(["-e", STATEMENTS]);
            let direct = run(&backend.addr, db, &extra).await;
            let proxied = run(&proxy_addr, db, &extra).await;
            let what = format!("{} mysql {mode:?}", backend.name());
            assert_eq!(direct.0, 0, "{what}: direct failed: {}", direct.2);
            assert_eq!(proxied, direct, "{what}: output through the proxy differs");
            assert!(direct.1.contains("root@%"), "{what}: {}", direct.1);
            assert!(direct.1.contains(&"x".repeat(100000)), "{what}");
        }
    }
}

#[tokio::test]
async fn mysql_cli_errors_match_direct() {
    for backend in Backend::both() {
        let proxy = backend.proxy("");
        let proxy_addr = proxy.addr().to_string();
        let db = backend.database();
        for sql in [
            "SELECT 1; SELECT * FROM tp_no_such_table_cli; SELECT 2",
            "SELECT 1; SELEC 2",
            "SELECT 'a'; SELECT tp_no_such_func(1)",
        ] {
            let direct = run(&backend.addr, db, &["-e", sql]).await;
            let proxied = run(&proxy_addr, db, &["-e", sql]).await;
            assert_eq!(direct.0, 1, "{}: {sql}: {direct:?}", backend.name());
            assert!(direct.2.contains("ERROR "), "{direct:?}");
            assert_eq!(proxied, direct, "{}: {sql}", backend.name());
        }
        // --force keeps going after the error: the rest of the statements run too.
        let sql = "SELECT 1; SELECT * FROM tp_no_such_table_cli; SELECT 2";
        let direct = run(&backend.addr, db, &["--force", "-e", sql]).await;
        let proxied = run(&proxy_addr, db, &["--force", "-e", sql]).await;
        assert_eq!(proxied, direct, "{}: --force", backend.name());
    }
}

#[tokio::test]
async fn mysql_cli_over_tls() {
    let backend = Backend::mariadb();
    let proxy = backend
        .proxy("[security.server-tls]\nauto-certs = true\n[security.sql-tls]\nskip-ca = true\n");
    let addr = proxy.addr().to_string();
    let (code, out, err) = run(
        &addr,
        "tp_test",
        &[
            "--ssl",
            "--batch",
            "--skip-column-names",
            "-e",
            "SHOW STATUS LIKE 'Ssl_cipher'",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let line = out.trim_end();
    assert!(
        line.starts_with("Ssl_cipher\t") && line.len() > "Ssl_cipher\t".len(),
        "the backend leg must be TLS: {out:?}"
    );
    let (code, out, err) = run(&addr, "tp_test", &["--ssl", "-e", "\\s"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("Cipher in use"),
        "the mysql client must report TLS on its own leg: {out}"
    );
}

#[test]
fn check_config_names_unknown_key() {
    let dir = TempDir::new("check-config");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[proxy]\naddr = \"127.0.0.1:6000\"\nmax-conections = 5\n",
    )
    .unwrap();
    let (code, out, err) = run_proxy_bin(&["check-config", bad.to_str().unwrap()]);
    assert_ne!(code, 0, "an unknown key must be refused: {out}{err}");
    assert!(
        err.contains("max-conections"),
        "the error must name the unknown key: stdout={out:?} stderr={err:?}"
    );

    let bad_section = dir.path().join("bad-section.toml");
    std::fs::write(&bad_section, "[proxyy]\naddr = \"127.0.0.1:6000\"\n").unwrap();
    let (code, _, err) = run_proxy_bin(&["check-config", bad_section.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("proxyy"), "{err}");

    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[proxy]\naddr = \"127.0.0.1:6000\"\nbackends = [\"127.0.0.1:4000\"]\nmax-connections = 5\n",
    )
    .unwrap();
    let (code, out, err) = run_proxy_bin(&["check-config", good.to_str().unwrap()]);
    assert_eq!(code, 0, "a valid config must pass: {out}{err}");

    // The proxy itself refuses to start with the bad file, naming the key.
    let (code, _, err) = run_proxy_bin(&["--config", bad.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("max-conections"), "{err}");
}

#[test]
fn version_flag() {
    let (code, out, err) = run_proxy_bin(&["--version"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("tiproxy") && out.contains(env!("CARGO_PKG_VERSION")),
        "{out:?}"
    );
}

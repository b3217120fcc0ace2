//! TLS on the client leg and on the backend leg, and protocol compression, through the proxy.

use mysql_async::prelude::*;
use mysql_async::{Compression, Conn, Opts, Value};
use tiproxy_tests::raw::{self, ConnectOptions, RawConn};
use tiproxy_tests::*;

const SERVER_TLS: &str = "[security.server-tls]\nauto-certs = true\n";

/// `SHOW STATUS LIKE name` on `conn`.
async fn status(conn: &mut Conn, name: &str) -> String {
    let row: Option<(String, String)> = conn
        .query_first(format!("SHOW STATUS LIKE '{name}'"))
        .await
        .unwrap();
    row.map(|r| r.1).unwrap_or_default()
}

fn mariadb_ca_toml() -> String {
    format!("{:?}", Testbed::get().mariadb_ca.display().to_string())
}

#[tokio::test]
async fn client_tls_offered_only_when_configured() {
    for backend in Backend::both() {
        let plain = backend.proxy("");
        let tls = backend.proxy(SERVER_TLS);

        let g = RawConn::open(plain.addr(), &ConnectOptions::root())
            .await
            .unwrap()
            .greeting;
        assert_eq!(g.capability & raw::CLIENT_SSL, 0, "plain proxy offers TLS");
        let g = RawConn::open(tls.addr(), &ConnectOptions::root())
            .await
            .unwrap()
            .greeting;
        assert_ne!(
            g.capability & raw::CLIENT_SSL,
            0,
            "auto-certs proxy offers no TLS"
        );

        // A client that insists on TLS is refused by the plain proxy (by the client itself,
        // seeing no SSL capability) and served by the TLS proxy.
        let refused = Conn::new(Opts::from(
            plain.root_opts(&backend).ssl_opts(insecure_ssl()),
        ))
        .await;
        assert!(
            refused.is_err(),
            "{}: TLS to a plain proxy worked",
            backend.name()
        );
        let mut conn = connect(
            tls.root_opts(&backend).ssl_opts(insecure_ssl()),
            "TLS client to auto-certs proxy",
        )
        .await;
        let rows = query_values(&mut conn, "SELECT 1, 'tls'").await.unwrap();
        assert_eq!(
            rows,
            vec![vec![
                Value::Bytes(b"1".to_vec()),
                Value::Bytes(b"tls".to_vec())
            ]]
        );
        // Plain clients still work with a TLS-capable proxy.
        let mut conn = tls.connect_root(&backend).await;
        let v: Option<i64> = conn.query_first("SELECT 2").await.unwrap();
        assert_eq!(v, Some(2));
    }
}

/// MariaDB has TLS: every combination of client-leg and backend-leg TLS, checked with the
/// backend's own view of the session (`Ssl_cipher`).
#[tokio::test]
async fn backend_tls_combinations_mariadb() {
    let backend = Backend::mariadb();
    // Direct reference: the server reports a cipher exactly when TLS is used.
    let mut direct = connect(backend.root_opts(), "direct plain").await;
    assert_eq!(status(&mut direct, "Ssl_cipher").await, "");
    let mut direct_tls = connect(
        backend.root_opts().ssl_opts(
            mysql_async::SslOpts::default()
                .with_root_certs(vec![Testbed::get().mariadb_ca.clone().into()]),
        ),
        "direct TLS with the test CA",
    )
    .await;
    assert_ne!(status(&mut direct_tls, "Ssl_cipher").await, "");

    let ca = mariadb_ca_toml();
    let cases: &[(&str, String, bool, bool)] = &[
        // (label, extra config, client uses TLS, backend leg must be TLS)
        ("no TLS anywhere", String::new(), false, false),
        ("client TLS only", SERVER_TLS.into(), true, false),
        (
            "client TLS, sql-tls skip-ca",
            format!("{SERVER_TLS}[security.sql-tls]\nskip-ca = true\n"),
            true,
            true,
        ),
        (
            "plain client, sql-tls skip-ca not required",
            "[security.sql-tls]\nskip-ca = true\n".into(),
            false,
            false,
        ),
        (
            "plain client, require-backend-tls skip-ca",
            "[security]\nrequire-backend-tls = true\n[security.sql-tls]\nskip-ca = true\n".into(),
            false,
            true,
        ),
        (
            "client TLS, require-backend-tls skip-ca",
            format!(
                "[security]\nrequire-backend-tls = true\n{SERVER_TLS}[security.sql-tls]\nskip-ca = true\n"
            ),
            true,
            true,
        ),
        (
            "plain client, require-backend-tls verified with the CA",
            format!("[security]\nrequire-backend-tls = true\n[security.sql-tls]\nca = {ca}\n"),
            false,
            true,
        ),
    ];
    for (label, extra, client_tls, backend_tls) in cases {
        let proxy = backend.proxy(extra);
        let mut opts = proxy.root_opts(&backend);
        if *client_tls {
            opts = opts.ssl_opts(insecure_ssl());
        }
        let mut conn = match Conn::new(Opts::from(opts)).await {
            Ok(c) => c,
            Err(e) => panic!("{label}: cannot connect: {e:?}"),
        };
        let cipher = status(&mut conn, "Ssl_cipher").await;
        assert_eq!(
            !cipher.is_empty(),
            *backend_tls,
            "{label}: backend Ssl_cipher = {cipher:?}"
        );
        // The session works end to end, including a large result over TLS.
        let s: Option<String> = conn
            .query_first("SELECT REPEAT('t', 1000000)")
            .await
            .unwrap();
        assert_eq!(s.map(|s| s.len()), Some(1_000_000), "{label}");
        let (user, x): (String, i64) = conn
            .exec_first("SELECT CURRENT_USER(), ? + 1", (41,))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((user.as_str(), x), ("root@%", 42), "{label}");
        // Another auth plugin over the same path.
        let mut native = connect(
            {
                let o = proxy.opts("tp_native", Some("native_pw"));
                if *client_tls {
                    o.ssl_opts(insecure_ssl())
                } else {
                    o
                }
            },
            label,
        )
        .await;
        assert_eq!(
            !status(&mut native, "Ssl_cipher").await.is_empty(),
            *backend_tls,
            "{label}: tp_native"
        );
    }
}

#[tokio::test]
async fn backend_tls_verification_failure_is_reported() {
    // A CA that did not sign MariaDB's certificate.
    let dir = TempDir::new("wrong-ca");
    let ca = dir.path().join("ca.pem");
    let key = dir.path().join("ca-key.pem");
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=not-the-test-ca", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&ca)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let backend = Backend::mariadb();
    let proxy = backend.proxy(&format!(
        "[security]\nrequire-backend-tls = true\n[security.sql-tls]\nca = {:?}\n",
        ca.display().to_string()
    ));
    let err = expect_server_error(
        Conn::new(Opts::from(proxy.root_opts(&backend))).await,
        "connect with a wrong backend CA",
    );
    let msg = err.message.to_lowercase();
    assert!(
        msg.contains("tls") || msg.contains("certificate"),
        "the error should say the backend TLS failed: {err:?}"
    );
}

/// TiDB in the test bed has no TLS: requiring backend TLS must fail with a clear error, and
/// TLS on the client leg alone must still work.
#[tokio::test]
async fn tidb_without_tls() {
    let backend = Backend::tidb(0);
    let proxy = backend
        .proxy("[security]\nrequire-backend-tls = true\n[security.sql-tls]\nskip-ca = true\n");
    let err = expect_server_error(
        Conn::new(Opts::from(proxy.root_opts(&backend))).await,
        "require-backend-tls against a backend without TLS",
    );
    assert!(
        err.message.contains("TLS"),
        "the error should mention TLS: {err:?}"
    );

    let proxy = backend.proxy(&format!("{SERVER_TLS}[security.sql-tls]\nskip-ca = true\n"));
    let mut conn = connect(
        proxy.root_opts(&backend).ssl_opts(insecure_ssl()),
        "TLS client, TiDB without TLS",
    )
    .await;
    assert_eq!(status(&mut conn, "Ssl_cipher").await, "");
    let v: Option<i64> = conn.exec_first("SELECT ?", (9,)).await.unwrap();
    assert_eq!(v, Some(9));
}

#[tokio::test]
async fn compression_matches_direct() {
    for backend in Backend::both() {
        for client_tls in [false, true] {
            let proxy = backend.proxy(if client_tls { SERVER_TLS } else { "" });
            let what = format!("{} client_tls={client_tls}", backend.name());
            let mut direct = connect(
                backend.root_opts().compression(Compression::default()),
                &format!("{what} direct compressed"),
            )
            .await;
            let mut opts = proxy
                .root_opts(&backend)
                .compression(Compression::default());
            if client_tls {
                opts = opts.ssl_opts(insecure_ssl());
            }
            let mut proxied = connect(opts, &format!("{what} proxied compressed")).await;
            assert_eq!(status(&mut direct, "Compression").await, "ON", "{what}");
            assert_eq!(
                status(&mut proxied, "Compression").await,
                "ON",
                "{what}: the backend leg must be compressed too"
            );
            for sql in [
                "SELECT 1, 'abc', NULL, 2.5, CAST('2024-01-02' AS DATE)",
                "SELECT REPEAT('compress me ', 300000)",
                "SELECT RAND(1) * 0 + 7",
            ] {
                let d = query_values(&mut direct, sql).await.unwrap();
                let p = query_values(&mut proxied, sql).await.unwrap();
                assert_eq!(d, p, "{what}: {sql}");
            }
            // Multi-statements and prepared statements compressed.
            let (d_sets, d_err) = query_sets(&mut direct, "SELECT 1; SELECT 2, 3").await;
            let (p_sets, p_err) = query_sets(&mut proxied, "SELECT 1; SELECT 2, 3").await;
            assert!(d_err.is_none() && p_err.is_none(), "{what}: {p_err:?}");
            assert_eq!(d_sets, p_sets, "{what}");
            let blob: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
            let p: Option<(i64, Vec<u8>)> = proxied
                .exec_first("SELECT LENGTH(?), ?", (&blob, &blob))
                .await
                .unwrap();
            let (len, echo) = p.unwrap();
            assert_eq!(len, 3_000_000, "{what}");
            assert_eq!(fnv1a(&echo), fnv1a(&blob), "{what}: echoed blob");
            // Packets over 16 MiB inside compressed frames, both directions.
            let big: Option<String> = proxied
                .query_first("SELECT REPEAT('z', 17000000)")
                .await
                .unwrap();
            assert_eq!(big.map(|s| s.len()), Some(17_000_000), "{what}: big result");
            let len: Option<i64> = proxied
                .query_first(format!("SELECT LENGTH('{}')", "q".repeat(17_000_000)))
                .await
                .unwrap();
            assert_eq!(len, Some(17_000_000), "{what}: big query");
            // A compressed client next to an uncompressed one on the same proxy.
            let mut plain = proxy.connect_root(&backend).await;
            assert_eq!(status(&mut plain, "Compression").await, "OFF", "{what}");
        }
    }
}

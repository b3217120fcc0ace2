//! The admin API against a real proxy process: the bearer token on `PUT /api/v1/backends`
//! (`[api] token-file`, rotation without restart, start-up errors) and readiness gated on
//! backends (`[api] ready-requires-backend`) with a real MariaDB as the reachable backend.
//!
//! Needs `TIPROXY_TEST_MARIADB` (set by `tests/run-all.sh`; locally:
//! `bash tests/scripts/mariadb.sh start --port P --dir D` and export `127.0.0.1:P`).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tiproxy_tests::{run_proxy_bin, Proxy, TempDir};

/// The real MariaDB of the test bed.
fn mariadb_addr() -> String {
    match std::env::var("TIPROXY_TEST_MARIADB") {
        Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
        _ => panic!(
            "TIPROXY_TEST_MARIADB is not set: run `bash tests/run-all.sh`, or start \
             `bash tests/scripts/mariadb.sh start --port P --dir D` and export \
             TIPROXY_TEST_MARIADB=127.0.0.1:P"
        ),
    }
}

/// One HTTP/1.1 request to the admin API with an optional `Authorization` header and body:
/// (status, body).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        if let Some(a) = authorization {
            req.push_str(&format!("Authorization: {a}\r\n"));
        }
        let body = body.unwrap_or("");
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: timed out"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: not an HTTP response: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code, body.to_string())
}

fn snapshot(generation: u64, addrs: &[&str]) -> String {
    let backends: Vec<Json> = addrs
        .iter()
        .map(|a| serde_json::json!({"addr": a, "state": "active"}))
        .collect();
    serde_json::json!({"generation": generation, "backends": backends}).to_string()
}

async fn put(proxy: &Proxy, authorization: Option<&str>, body: &str) -> (u16, String) {
    http(
        proxy.api_addr(),
        "PUT",
        "/api/v1/backends",
        authorization,
        Some(body),
    )
    .await
}

/// The pushed generation and the backend addresses, read without a token.
async fn backend_set(proxy: &Proxy) -> (Option<u64>, Vec<String>) {
    let state = proxy.backends().await;
    (
        state.generation,
        state.backends.into_iter().map(|b| b.addr).collect(),
    )
}

/// Health state (`healthy`, `unknown`, ...) of `addr` in `GET /api/v1/backends`.
async fn health_of(proxy: &Proxy, addr: &str) -> String {
    let (_, body) = http(proxy.api_addr(), "GET", "/api/v1/backends", None, None).await;
    let json: Json = serde_json::from_str(&body).unwrap_or_default();
    json["backends"]
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["addr"] == addr))
        .and_then(|b| b["health"]["state"].as_str())
        .unwrap_or("absent")
        .to_string()
}

/// Polls `check` every 100 ms until it returns true; panics after `timeout` with `what`.
async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn toml_path(p: &Path) -> String {
    p.display().to_string().replace('\\', "\\\\")
}

/// Writes `token` into `dir` the way the kubelet updates a Secret volume: the data goes into a
/// new directory, and the `..data` symlink is swapped to it atomically; `dir/token` is a
/// symlink to `..data/token` that never changes.
fn kube_secret_write(dir: &Path, version: u32, token: &str) {
    let data = dir.join(format!("..v{version}"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("token"), token).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..v{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join("token");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/token", &link).unwrap();
    }
}

#[tokio::test]
async fn put_needs_the_bearer_token_and_reads_stay_open() {
    let dir = TempDir::new("admin-api-token");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "  correct-horse-battery\n").unwrap();
    let proxy = Proxy::start(&format!(
        "[api]\ntoken-file = \"{}\"\n",
        toml_path(&token_file)
    ));
    let body = snapshot(1, &["127.0.0.1:14001"]);

    let (code, text) = put(&proxy, None, &body).await;
    assert_eq!(code, 401, "PUT without a token: {text}");
    assert!(
        text.contains("Bearer"),
        "the 401 says what is missing: {text}"
    );
    let (code, text) = put(&proxy, Some("Bearer wrong-horse-battery"), &body).await;
    assert_eq!(code, 401, "PUT with a wrong token: {text}");
    let (code, text) = put(&proxy, Some("Basic correct-horse-battery"), &body).await;
    assert_eq!(code, 401, "PUT with another scheme: {text}");
    assert_eq!(
        backend_set(&proxy).await,
        (None, vec![]),
        "refused pushes must not change the backend set"
    );

    // The file's surrounding whitespace is not part of the token.
    let (code, text) = put(&proxy, Some("Bearer correct-horse-battery"), &body).await;
    assert_eq!(code, 200, "PUT with the token: {text}");
    assert_eq!(
        backend_set(&proxy).await,
        (Some(1), vec!["127.0.0.1:14001".to_string()])
    );

    // A refused push after an accepted one leaves the accepted set in place.
    let (code, _) = put(&proxy, None, &snapshot(2, &["127.0.0.1:14002"])).await;
    assert_eq!(code, 401);
    assert_eq!(
        backend_set(&proxy).await,
        (Some(1), vec!["127.0.0.1:14001".to_string()])
    );

    // Read-only endpoints need no token (kubelet probes and Prometheus cannot send one).
    for path in ["/healthz", "/readyz", "/metrics", "/api/v1/backends"] {
        let (code, text) = http(proxy.api_addr(), "GET", path, None, None).await;
        assert_eq!(code, 200, "GET {path} without a token: {text}");
    }
    assert!(
        !proxy.stderr_log().contains("correct-horse-battery"),
        "the token must never be logged"
    );
}

#[tokio::test]
async fn token_rotation_takes_effect_without_restart() {
    let dir = TempDir::new("admin-api-rotate");
    let secret_dir = dir.path().join("secret");
    std::fs::create_dir_all(&secret_dir).unwrap();
    kube_secret_write(&secret_dir, 1, "token-one\n");
    let token_file = secret_dir.join("token");
    let proxy = Proxy::start(&format!(
        "[api]\ntoken-file = \"{}\"\n",
        toml_path(&token_file)
    ));
    let mut generation = 0;
    let mut push_with = |token: &'static str| {
        generation += 1;
        let body = snapshot(generation, &[&format!("127.0.0.1:{}", 15000 + generation)]);
        let proxy = &proxy;
        async move { put(proxy, Some(&format!("Bearer {token}")), &body).await.0 }
    };
    assert_eq!(push_with("token-one").await, 200);

    // A Kubernetes Secret update: the ..data symlink is swapped, the config file is unchanged.
    kube_secret_write(&secret_dir, 2, "token-two\n");
    let took = wait_until(
        "the rotated token to be accepted",
        Duration::from_secs(8),
        || {
            let status = push_with("token-two");
            async move { status.await == 200 }
        },
    )
    .await;
    eprintln!("rotated token accepted after {took:?}");
    assert_eq!(
        push_with("token-one").await,
        401,
        "the old token is refused"
    );

    // A plain rewrite of the file is picked up too.
    std::fs::write(secret_dir.join("..v2").join("token"), "token-three").unwrap();
    wait_until(
        "the rewritten token to be accepted",
        Duration::from_secs(8),
        || {
            let status = push_with("token-three");
            async move { status.await == 200 }
        },
    )
    .await;
    assert_eq!(push_with("token-two").await, 401);

    // An emptied (or vanished) file keeps the token in force, with a warning.
    std::fs::write(secret_dir.join("..v2").join("token"), "").unwrap();
    let log_has_warning = || {
        proxy
            .stderr_log()
            .lines()
            .any(|l| l.contains("cannot load the admin API token") && l.contains("empty"))
    };
    wait_until(
        "a warning about the empty token file",
        Duration::from_secs(8),
        || {
            let seen = log_has_warning();
            async move { seen }
        },
    )
    .await;
    assert_eq!(
        push_with("token-three").await,
        200,
        "the previous token stays"
    );
    assert_eq!(
        push_with("").await,
        401,
        "an empty file never means no token"
    );
    let (_, addrs) = backend_set(&proxy).await;
    assert_eq!(addrs.len(), 1, "{addrs:?}");
}

#[tokio::test]
async fn unusable_token_file_is_a_startup_and_check_config_error() {
    let dir = TempDir::new("admin-api-badfile");
    let missing = dir.path().join("no-such-token");
    let err = match Proxy::try_start(&format!(
        "[api]\ntoken-file = \"{}\"\n",
        toml_path(&missing)
    )) {
        Ok(_) => panic!("the proxy started with a missing token file"),
        Err(e) => e,
    };
    assert!(
        err.contains("api.token-file") && err.contains(&*missing.to_string_lossy()),
        "the start-up error names the key and the path: {err}"
    );

    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, " \n").unwrap();
    let err = match Proxy::try_start(&format!("[api]\ntoken-file = \"{}\"\n", toml_path(&empty))) {
        Ok(_) => panic!("the proxy started with an empty token file"),
        Err(e) => e,
    };
    assert!(
        err.contains(&*empty.to_string_lossy()) && err.contains("empty"),
        "{err}"
    );

    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!("[api]\ntoken-file = \"{}\"\n", toml_path(&missing)),
    )
    .unwrap();
    let config_arg = config.to_string_lossy();
    let (code, _, stderr) = run_proxy_bin(&["check-config", &config_arg]);
    assert_ne!(code, 0, "check-config accepts a missing token file");
    assert!(
        stderr.contains(&*missing.to_string_lossy()),
        "check-config names the path: {stderr}"
    );
    std::fs::write(&missing, "tok\n").unwrap();
    let (code, stdout, stderr) = run_proxy_bin(&["check-config", &config_arg]);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

#[tokio::test]
async fn readiness_waits_for_a_usable_backend() {
    let mariadb = mariadb_addr();
    // A port nothing listens on: bound, then released.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let proxy = Proxy::start(
        "[api]\nready-requires-backend = true\n[health]\ninterval = 0.5\ntimeout = 1.0\n",
    );
    let api = proxy.api_addr();
    let readyz = || http(api, "GET", "/readyz", None, None);

    assert_eq!(
        readyz().await,
        (503, "no backends".to_string()),
        "a fresh proxy without backends is not ready"
    );
    let (code, _) = http(api, "GET", "/healthz", None, None).await;
    assert_eq!(code, 200, "liveness does not depend on backends");

    // The first push with a reachable backend makes it ready.
    let (code, text) = put(&proxy, None, &snapshot(1, &[&mariadb])).await;
    assert_eq!(code, 200, "{text}");
    wait_until(
        "MariaDB to be probed healthy",
        Duration::from_secs(10),
        || async { health_of(&proxy, &mariadb).await == "healthy" },
    )
    .await;
    assert_eq!(readyz().await, (200, "ready".to_string()));

    // A backend that is listed but down does not count.
    let (code, _) = put(&proxy, None, &snapshot(2, &[&closed])).await;
    assert_eq!(code, 200);
    wait_until(
        "readiness to drop with only an unreachable backend",
        Duration::from_secs(10),
        || async { readyz().await == (503, "no backends".to_string()) },
    )
    .await;
    assert_eq!(health_of(&proxy, &closed).await, "unhealthy");

    let (code, _) = put(&proxy, None, &snapshot(3, &[&mariadb])).await;
    assert_eq!(code, 200);
    wait_until(
        "ready again with MariaDB",
        Duration::from_secs(10),
        || async { readyz().await.0 == 200 },
    )
    .await;

    // An empty set: not ready again.
    let (code, _) = put(&proxy, None, &snapshot(4, &[])).await;
    assert_eq!(code, 200);
    assert_eq!(readyz().await, (503, "no backends".to_string()));

    // Hot reload: turning the rule off makes the proxy ready without backends.
    let text = std::fs::read_to_string(proxy.config_path()).unwrap();
    assert!(text.contains("ready-requires-backend = true"), "{text}");
    std::fs::write(
        proxy.config_path(),
        text.replace(
            "ready-requires-backend = true",
            "ready-requires-backend = false",
        ),
    )
    .unwrap();
    wait_until(
        "the reloaded rule to make /readyz 200",
        Duration::from_secs(8),
        || async { readyz().await == (200, "ready".to_string()) },
    )
    .await;
}

#[tokio::test]
async fn shutdown_wins_over_backend_readiness() {
    let mariadb = mariadb_addr();
    let mut proxy = Proxy::start(&format!(
        "[proxy]\nbackends = [\"{mariadb}\"]\ngraceful-wait-before-shutdown = 3\n\
         [api]\nready-requires-backend = true\n"
    ));
    let api = proxy.api_addr();
    let (code, text) = http(api, "GET", "/readyz", None, None).await;
    assert_eq!(
        (code, text.as_str()),
        (200, "ready"),
        "a static backend counts"
    );
    proxy.signal_term();
    wait_until(
        "/readyz to say shutting down",
        Duration::from_secs(3),
        || async {
            http(api, "GET", "/readyz", None, None).await == (503, "shutting down".to_string())
        },
    )
    .await;
    assert!(
        proxy
            .wait_exit_async(Duration::from_secs(20))
            .await
            .is_some(),
        "the proxy exits after its graceful wait"
    );
}

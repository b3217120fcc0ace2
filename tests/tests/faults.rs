//! Faults a real server cannot produce, from hand-written fake peers (in addition to the
//! real-server tests): a backend that sends garbage, one that never greets, a client that sends
//! garbage. Each must end only the affected session, with a MySQL error where a client can still
//! be told, and leave the proxy serving everyone else.

use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use tiproxy_tests::{opts_for, server_code, Backend, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A fake backend that answers every connection with `reply` and then holds the socket open.
async fn fake_backend(reply: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = sock.write_all(reply).await;
                let mut sink = [0u8; 4096];
                while matches!(sock.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

fn proxy_for(backend_addr: &str) -> Proxy {
    Proxy::start(&format!(
        "[proxy]\nbackends = [\"{backend_addr}\"]\nhandshake-timeout = 2\nconnect-timeout = 2\n[health]\ninterval = 60.0\n"
    ))
}

/// A client gets a MySQL error from the proxy (not a dropped socket) naming the problem, which
/// is one of `needles` (the health check may have found the broken backend first, in which case
/// the client hears that no backend is usable).
async fn expect_login_error(proxy: &Proxy, needles: &[&str]) {
    let started = Instant::now();
    let err = mysql_async::Conn::new(opts_for(&proxy.addr().to_string(), "root", None))
        .await
        .expect_err("login through a broken backend must fail");
    assert!(
        server_code(&err).is_some(),
        "a MySQL error, not a dropped socket: {err:?}"
    );
    let text = err.to_string();
    assert!(
        needles.iter().any(|n| text.contains(n)),
        "error should mention one of {needles:?}: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn garbage_greeting_from_backend_is_a_clear_error() {
    // A packet whose payload is not a protocol-10 greeting.
    let addr = fake_backend(b"\x05\x00\x00\x00\x07junk").await;
    let proxy = proxy_for(&addr);
    expect_login_error(&proxy, &["malformed", "no healthy backend"]).await;
    assert!(!proxy.stderr_log().contains("panicked"));
}

#[tokio::test]
async fn silent_backend_times_out_with_an_error() {
    let addr = fake_backend(b"").await;
    let proxy = proxy_for(&addr);
    expect_login_error(&proxy, &["timed out", "no healthy backend"]).await;
}

#[tokio::test]
async fn garbage_from_a_client_ends_only_that_session() {
    let backend = Backend::mariadb();
    let proxy = backend.proxy("");
    let mut good = proxy.connect_root(&backend).await;
    // A client that answers the greeting with a packet too short to be a handshake response,
    // then with nonsense.
    let mut bad = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let mut greeting = vec![0u8; 4096];
    let n = bad.read(&mut greeting).await.unwrap();
    assert!(n > 4, "the proxy greets first");
    bad.write_all(b"\x03\x00\x00\x01abc\xff\xff\xff\x00garbage")
        .await
        .unwrap();
    let mut reply = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), bad.read(&mut reply))
        .await
        .expect("the proxy answers or closes")
        .unwrap_or(0);
    if n > 4 {
        assert_eq!(reply[4], 0xFF, "an ERR packet: {:?}", &reply[..n]);
    }
    // Everyone else is unaffected.
    let v: Option<u32> = good.query_first("SELECT 7").await.unwrap();
    assert_eq!(v, Some(7));
    let mut fresh = proxy.connect_root(&backend).await;
    let v: Option<u32> = fresh.query_first("SELECT 8").await.unwrap();
    assert_eq!(v, Some(8));
    assert!(!proxy.stderr_log().contains("panicked"));
}

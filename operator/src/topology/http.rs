//! Plain-HTTP/1.1 calls to proxy admin APIs and TiDB status ports, over the proxy's own
//! status-port client (`tiproxy::health::http`): a fresh connection per request (pod IPs are
//! reused, and a pooled connection could reach whatever pod holds an IP now) and one deadline
//! for connect, response head and body.

use std::time::Duration;

use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use hyper::{Method, Request};

pub use tiproxy::health::http::{HttpError, HttpResponse as Response};

/// Cap on a response body (a proxy's backend list with sessions, TiDB's `/config`).
pub const BODY_LIMIT: usize = 4 << 20;

const AGENT: &str = concat!("tiproxy-operator/", env!("CARGO_PKG_VERSION"));

/// `method http://{addr}{path}` with an optional bearer token and JSON body, within `timeout`.
pub async fn request(
    addr: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    json_body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(USER_AGENT, AGENT);
    if let Some(t) = token {
        req = req.header(AUTHORIZATION, format!("Bearer {t}"));
    }
    if json_body.is_some() {
        req = req.header(CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Bytes::from(json_body.unwrap_or_default()).into())
        .map_err(|_| HttpError::InvalidRequest(format!("{addr}{path}")))?;
    tiproxy::health::http::send(addr, req, timeout, BODY_LIMIT).await
}

/// The first line of a body, shortened, for error messages.
pub fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line = text.lines().next().unwrap_or("").trim();
    let mut s: String = line.chars().take(200).collect();
    if line.chars().count() > 200 {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::StatusCode;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn sends_method_token_and_body() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut b = [0u8; 4096];
            while !String::from_utf8_lossy(&buf).contains("{\"x\":1}") {
                let n = s.read(&mut b).await.unwrap();
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&b[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
            String::from_utf8(buf).unwrap()
        });
        let r = request(
            &addr,
            Method::PUT,
            "/api/v1/backends",
            Some("s3cret"),
            Some(b"{\"x\":1}".to_vec()),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(&r.body[..], b"ok");
        let head = server.await.unwrap().to_ascii_lowercase();
        assert!(
            head.starts_with("put /api/v1/backends http/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains("authorization: bearer s3cret\r\n"), "{head}");
        assert!(
            head.contains("content-type: application/json\r\n"),
            "{head}"
        );
        assert!(head.contains("connection: close\r\n"), "{head}");
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let _server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(s);
        });
        let err = request(
            &addr,
            Method::GET,
            "/",
            None,
            None,
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, HttpError::Timeout { .. }), "{err:?}");
    }

    #[test]
    fn snippet_takes_the_first_line() {
        assert_eq!(snippet(b"  stale\nmore"), "stale");
        assert_eq!(snippet(&[b'x'; 300]).chars().count(), 201);
    }
}

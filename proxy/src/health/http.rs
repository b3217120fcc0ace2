//! A tiny HTTP/1.1 client for TiDB's status port (and, through [`send`], for the operator's
//! calls to proxy admin APIs).
//!
//! Every request uses a fresh TCP connection that is closed as soon as the response has been
//! read (`Connection: close`, nothing pooled): a TiDB restart may put a different pod behind
//! the same name, and a pooled connection would keep talking to the old one (TiProxy #1177).
//! Each request has one deadline covering connect, response head and body, and the error says
//! which phase ran out of time, so that a health probe can tell "refused" (down) from "slow".

use std::io;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, CONNECTION, HOST, USER_AGENT};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{timeout_at, Instant};

/// Default cap on a response body: TiDB's `/metrics` is about 1 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 4 << 20;

const AGENT: &str = concat!("tiproxy/", env!("CARGO_PKG_VERSION"), " health-check");

/// Why a status-port request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Nothing listens on the address (the TiDB is not running, or has closed its listener).
    #[error("connection refused")]
    Refused,
    /// The deadline ran out; `phase` says where it was spent.
    #[error("no answer within {after:?} ({phase})")]
    Timeout {
        phase: &'static str,
        after: Duration,
    },
    /// Any other failure to connect (unreachable, name not resolved, reset during connect).
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    /// The connection broke or the peer did not speak HTTP/1.
    #[error("http: {0}")]
    Http(#[source] hyper::Error),
    /// The body was larger than the limit.
    #[error("response body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// The address or path cannot form a request.
    #[error("invalid request for {0:?}")]
    InvalidRequest(String),
}

impl HttpError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, HttpError::Timeout { .. })
    }

    pub fn is_refused(&self) -> bool {
        matches!(self, HttpError::Refused)
    }
}

/// A response: status code and (size-limited) body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub body: Bytes,
}

/// A plain-HTTP GET client for TiDB status ports. Cheap to clone; holds no connections.
#[derive(Debug, Clone)]
pub struct StatusClient {
    timeout: Duration,
    body_limit: usize,
}

impl StatusClient {
    /// A client whose requests each finish (or fail) within `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            body_limit: DEFAULT_BODY_LIMIT,
        }
    }

    pub fn with_body_limit(mut self, limit: usize) -> Self {
        self.body_limit = limit;
        self
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `GET http://{addr}{path}` with the client's timeout. `addr` is `host:port`.
    pub async fn get(&self, addr: &str, path: &str) -> Result<HttpResponse, HttpError> {
        self.get_with_timeout(addr, path, self.timeout).await
    }

    /// `GET http://{addr}{path}`, finishing within `timeout`.
    pub async fn get_with_timeout(
        &self,
        addr: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<HttpResponse, HttpError> {
        let req = Request::get(path)
            .header(USER_AGENT, AGENT)
            .body(Full::default())
            .map_err(|_| HttpError::InvalidRequest(format!("{addr}{path}")))?;
        send(addr, req, timeout, self.body_limit).await
    }
}

/// Sends `req` to `http://{addr}` on a fresh connection (`Host` and `Connection: close` are
/// set here) and reads the response, all within `timeout`; bodies over `body_limit` fail.
pub async fn send(
    addr: &str,
    mut req: Request<Full<Bytes>>,
    timeout: Duration,
    body_limit: usize,
) -> Result<HttpResponse, HttpError> {
    let deadline = Instant::now() + timeout;
    let expired = |phase| HttpError::Timeout {
        phase,
        after: timeout,
    };
    let host = HeaderValue::from_str(addr)
        .map_err(|_| HttpError::InvalidRequest(format!("{addr}{}", req.uri())))?;
    req.headers_mut().insert(HOST, host);
    req.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));

    let stream = timeout_at(deadline, TcpStream::connect(addr))
        .await
        .map_err(|_| expired("connecting"))?
        .map_err(connect_error)?;
    let _ = stream.set_nodelay(true);

    let (mut sender, conn) = timeout_at(
        deadline,
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| expired("connecting"))?
    .map_err(HttpError::Http)?;
    // The connection task owns the socket; aborting it on every exit path closes the
    // socket, so a hung server never accumulates our half-finished requests.
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));

    let resp = timeout_at(deadline, sender.send_request(req))
        .await
        .map_err(|_| expired("waiting for the response"))?
        .map_err(HttpError::Http)?;
    let status = resp.status();
    let body = timeout_at(
        deadline,
        Limited::new(resp.into_body(), body_limit).collect(),
    )
    .await
    .map_err(|_| expired("reading the response body"))?
    .map_err(|e| match e.downcast::<hyper::Error>() {
        Ok(e) => HttpError::Http(*e),
        Err(_) => HttpError::BodyTooLarge { limit: body_limit },
    })?
    .to_bytes();
    Ok(HttpResponse { status, body })
}

fn connect_error(e: io::Error) -> HttpError {
    if e.kind() == io::ErrorKind::ConnectionRefused {
        HttpError::Refused
    } else {
        HttpError::Connect(e)
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Serves one connection: reads the request head, then writes `reply` and closes.
    async fn one_shot(reply: Vec<u8>) -> (String, JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let head = read_head(&mut s).await;
            s.write_all(&reply).await.unwrap();
            s.shutdown().await.unwrap();
            head
        });
        (addr, h)
    }

    async fn read_head(s: &mut TcpStream) -> String {
        let mut buf = Vec::new();
        let mut b = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut b).await.unwrap();
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&b[..n]);
        }
        String::from_utf8(buf).unwrap()
    }

    #[tokio::test]
    async fn get_returns_status_and_body_and_asks_to_close() {
        let (addr, h) = one_shot(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: application/json\r\n\r\nhello"
                .to_vec(),
        )
        .await;
        let c = StatusClient::new(Duration::from_secs(2));
        let r = c.get(&addr, "/status").await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(&r.body[..], b"hello");
        let head = h.await.unwrap().to_ascii_lowercase();
        assert!(head.starts_with("get /status http/1.1\r\n"), "{head}");
        assert!(head.contains("connection: close\r\n"), "{head}");
        assert!(head.contains(&format!("host: {addr}\r\n")), "{head}");
    }

    #[tokio::test]
    async fn non_200_is_returned_not_an_error() {
        let (addr, _h) =
            one_shot(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".to_vec())
                .await;
        let r = StatusClient::new(Duration::from_secs(2))
            .get(&addr, "/status")
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(r.body.is_empty());
    }

    #[tokio::test]
    async fn body_without_length_is_read_to_eof() {
        let (addr, _h) = one_shot(b"HTTP/1.1 200 OK\r\n\r\nuntil close".to_vec()).await;
        let r = StatusClient::new(Duration::from_secs(2))
            .get(&addr, "/x")
            .await
            .unwrap();
        assert_eq!(&r.body[..], b"until close");
    }

    #[tokio::test]
    async fn body_limit_is_enforced() {
        let mut reply = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n".to_vec();
        reply.extend_from_slice(&[b'x'; 100]);
        let (addr, _h) = one_shot(reply).await;
        let err = StatusClient::new(Duration::from_secs(2))
            .with_body_limit(10)
            .get(&addr, "/metrics")
            .await
            .unwrap_err();
        assert!(
            matches!(err, HttpError::BodyTooLarge { limit: 10 }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn refused_is_classified() {
        // Bind then drop: nothing listens on this port any more.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let err = StatusClient::new(Duration::from_secs(2))
            .get(&addr, "/status")
            .await
            .unwrap_err();
        assert!(err.is_refused(), "{err:?}");
    }

    #[tokio::test]
    async fn hung_server_times_out_and_the_socket_is_closed() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            read_head(&mut s).await;
            // Never answer; report when the client closes its side.
            let mut b = [0u8; 16];
            tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
                .await
                .map(|r| r.unwrap())
        });
        let started = std::time::Instant::now();
        let err = StatusClient::new(Duration::from_millis(300))
            .get(&addr, "/status")
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                HttpError::Timeout {
                    phase: "waiting for the response",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            server.await.unwrap().expect("client kept the socket open"),
            0
        );
    }

    #[tokio::test]
    async fn garbage_is_an_http_error() {
        let (addr, _h) = one_shot(b"\x0a5.7.25-TiDB\0 not http at all\r\n\r\n".to_vec()).await;
        let err = StatusClient::new(Duration::from_secs(2))
            .get(&addr, "/status")
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::Http(_)), "{err:?}");
    }
}

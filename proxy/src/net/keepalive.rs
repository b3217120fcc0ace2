//! TCP keepalive profiles for client and backend sockets.
//!
//! Backend sockets switch between a relaxed and an aggressive profile as the backend's health
//! changes, so that connections to a dead TiDB are torn down in seconds instead of minutes.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// One keepalive profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe (`TCP_KEEPIDLE`).
    pub idle: Duration,
    /// Time between probes (`TCP_KEEPINTVL`).
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped (`TCP_KEEPCNT`).
    pub count: u32,
    /// How long sent data may stay unacknowledged (`TCP_USER_TIMEOUT`, Linux only); `None`
    /// means the system default. Keepalive alone does not fire while data is in flight, so this
    /// is what bounds a write to a backend that vanished mid-command.
    pub user_timeout: Option<Duration>,
}

impl Keepalive {
    /// Client connections: clients may sit idle for a long time, so only detect dead peers.
    pub const FRONTEND: Keepalive = Keepalive {
        idle: Duration::from_secs(60),
        interval: Duration::from_secs(10),
        count: 5,
        user_timeout: None,
    };

    /// Backends the health check considers up (matches the reference TiProxy).
    pub const BACKEND_HEALTHY: Keepalive = Keepalive {
        idle: Duration::from_secs(60),
        interval: Duration::from_secs(3),
        count: 5,
        user_timeout: Some(Duration::from_secs(15)),
    };

    /// Backends the health check considers down: give up on them quickly so sessions can move.
    pub const BACKEND_UNHEALTHY: Keepalive = Keepalive {
        idle: Duration::from_secs(10),
        interval: Duration::from_secs(1),
        count: 5,
        user_timeout: Some(Duration::from_secs(5)),
    };
}

/// Applies `ka` to `stream` and turns on `TCP_NODELAY`.
///
/// Safe to call repeatedly on the same socket: every option is overwritten, including the user
/// timeout, which `None` resets to the system default.
pub fn apply(stream: &TcpStream, ka: &Keepalive) -> std::io::Result<()> {
    let sock = SockRef::from(stream);
    let params = TcpKeepalive::new().with_time(ka.idle);
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "ios",
        target_os = "freebsd",
        target_os = "netbsd",
        target_os = "windows",
    ))]
    let params = params.with_interval(ka.interval).with_retries(ka.count);
    sock.set_tcp_keepalive(&params)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    sock.set_tcp_user_timeout(ka.user_timeout)?;
    // MySQL traffic is request/response with small packets; Nagle would only add latency.
    sock.set_tcp_nodelay(true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn applies_to_a_real_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let client = client.unwrap();
        let (_server, _) = accepted.unwrap();

        for ka in [
            Keepalive::FRONTEND,
            Keepalive::BACKEND_HEALTHY,
            Keepalive::BACKEND_UNHEALTHY,
        ] {
            apply(&client, &ka).unwrap();
            let sock = SockRef::from(&client);
            assert!(sock.keepalive().unwrap());
            assert!(sock.tcp_nodelay().unwrap());
            #[cfg(target_os = "linux")]
            {
                assert_eq!(sock.tcp_keepalive_time().unwrap(), ka.idle);
                assert_eq!(sock.tcp_keepalive_interval().unwrap(), ka.interval);
                assert_eq!(sock.tcp_keepalive_retries().unwrap(), ka.count);
                assert_eq!(sock.tcp_user_timeout().unwrap(), ka.user_timeout);
            }
        }
    }
}

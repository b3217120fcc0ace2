//! The SQL listener: accepts clients, enforces `max-connections`, runs one task per session on
//! the session threads (`workers`), and carries out the graceful shutdown sequence.

mod workers;

pub use workers::Workers;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::metrics;
use crate::net::keepalive;
use crate::protocol::error_code;
use crate::protocol::response::ErrPacket;
use crate::session::{self, auth::ClientAddr, SessionContext};

/// Counts live client connections against `max-connections` (which a reload may change).
#[derive(Debug, Default)]
pub struct ConnectionCounter {
    live: AtomicUsize,
    max: AtomicU64,
}

impl ConnectionCounter {
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// 0 means unlimited.
    pub fn set_max(&self, max: u64) {
        self.max.store(max, Ordering::Relaxed);
    }
}

struct CounterGuard(Arc<ConnectionCounter>);

impl Drop for CounterGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
        metrics::get().connections.dec();
    }
}

pub struct SqlServer {
    ctx: Arc<SessionContext>,
    listener: TcpListener,
    connections: Arc<ConnectionCounter>,
    workers: Workers,
}

impl SqlServer {
    /// Listens on `proxy.addr`; sessions will run on `workers`.
    pub async fn bind(ctx: Arc<SessionContext>, workers: Workers) -> std::io::Result<Self> {
        let listener = TcpListener::bind(&ctx.config.proxy.addr).await?;
        let connections = Arc::new(ConnectionCounter::default());
        connections.set_max(ctx.config.proxy.max_connections);
        Ok(Self {
            ctx,
            listener,
            connections,
            workers,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    pub fn session_threads(&self) -> usize {
        self.workers.threads()
    }

    pub fn connections(&self) -> Arc<ConnectionCounter> {
        self.connections.clone()
    }

    /// Accepts clients until `stop_accepting` turns true, then gives sessions until
    /// `graceful-close-conn-timeout` to reach a safe point (they end themselves there, see
    /// `SessionContext::closing`), and finally aborts the rest.
    pub async fn run(self, mut stop_accepting: watch::Receiver<bool>) {
        let mut sessions = JoinSet::new();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((tcp, peer)) => self.admit(&mut sessions, tcp, peer),
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
                _ = async { let _ = stop_accepting.wait_for(|s| *s).await; } => break,
            }
        }
        drop(self.listener);
        let timeout = Duration::from_secs(self.ctx.config.proxy.graceful_close_conn_timeout);
        tracing::info!(
            sessions = sessions.len(),
            ?timeout,
            "listener closed; waiting for sessions to finish"
        );
        let drained = tokio::time::timeout(timeout, async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                sessions = sessions.len(),
                "closing sessions still busy after the graceful timeout"
            );
            sessions.shutdown().await;
        }
    }

    fn admit(&self, sessions: &mut JoinSet<()>, tcp: TcpStream, peer: std::net::SocketAddr) {
        let live = self.connections.live.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::get().connections.inc();
        let guard = CounterGuard(self.connections.clone());
        let max = self.connections.max.load(Ordering::Relaxed);
        if max > 0 && live as u64 > max {
            tracing::warn!(client = %peer, max, "rejecting connection: max-connections reached");
            metrics::get()
                .rejected
                .with_label_values(&["max_connections"])
                .inc();
            sessions.spawn(async move {
                let _guard = guard;
                reject_too_many(tcp).await;
            });
            return;
        }
        metrics::get().created.inc();
        if let Err(e) = keepalive::apply(&tcp, &keepalive::Keepalive::FRONTEND) {
            tracing::debug!(error = %e, "cannot set client keepalive");
        }
        let local = tcp.local_addr().unwrap_or(peer);
        let addr = ClientAddr {
            peer,
            local,
            proxy_header: None,
        };
        // The socket moves to the session thread's own reactor.
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::warn!(client = %peer, error = %e, "cannot hand the connection to a session thread");
                return;
            }
        };
        let ctx = self.ctx.clone();
        self.workers.spawn(sessions, move || async move {
            let _guard = guard;
            match TcpStream::from_std(tcp) {
                Ok(tcp) => session::serve(ctx, tcp, addr).await,
                Err(e) => {
                    tracing::warn!(client = %peer, error = %e, "cannot register the connection on its session thread")
                }
            }
        });
    }
}

/// Sends ERROR 1040 in place of a greeting, as a MySQL server at its connection limit does.
async fn reject_too_many(mut tcp: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let err = ErrPacket::new(error_code::CON_COUNT_ERROR, "08004", "Too many connections").encode();
    let mut packet = Vec::with_capacity(4 + err.len());
    packet.extend_from_slice(&(err.len() as u32).to_le_bytes()[..3]);
    packet.push(0);
    packet.extend_from_slice(&err);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = tcp.write_all(&packet).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

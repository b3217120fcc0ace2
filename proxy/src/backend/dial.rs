//! Connecting to a backend: try the best one, and on failure the others, with exponential
//! backoff, until a deadline.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use super::{route, Backend, BalanceConfig, Registry};

#[derive(Debug, Clone, Copy)]
pub struct DialPolicy {
    /// Time allowed for one TCP connect.
    pub attempt_timeout: Duration,
    /// Time allowed for all attempts together.
    pub total_timeout: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl DialPolicy {
    pub fn new(total_timeout: Duration) -> Self {
        Self {
            attempt_timeout: Duration::from_secs(1),
            total_timeout,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(4),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("no healthy backend is available")]
    NoBackends,
    #[error("no backend is reachable (last error from {addr}: {reason})")]
    Unreachable { addr: String, reason: String },
}

/// Connects to the best reachable backend. A backend that fails is skipped until every
/// backend has failed once; then all are tried again after a backoff, until the deadline.
pub async fn dial_any(
    registry: &Registry,
    balance: &BalanceConfig,
    policy: DialPolicy,
) -> Result<(Arc<Backend>, TcpStream), DialError> {
    let deadline = Instant::now() + policy.total_timeout;
    let mut backoff = policy.initial_backoff;
    let mut failed: Vec<Arc<Backend>> = Vec::new();
    let mut last_error: Option<(String, String)> = None;
    loop {
        let backend = match route(registry, balance, &failed) {
            Some(backend) => backend,
            // Nothing healthy left to try now: a backend may come back (or be pushed) within
            // the connect timeout, so wait and look again rather than fail the client at once.
            None => {
                let now = Instant::now();
                if now + backoff >= deadline {
                    break;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(policy.max_backoff);
                failed.clear();
                continue;
            }
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break;
        }
        let attempt = policy.attempt_timeout.min(remaining);
        let addr = backend.addr.clone();
        match timeout(attempt, TcpStream::connect(&addr)).await {
            Ok(Ok(stream)) => return Ok((backend, stream)),
            Ok(Err(e)) => last_error = Some((addr, e.to_string())),
            Err(_) => last_error = Some((addr, format!("connect timed out after {attempt:?}"))),
        }
        tracing::debug!(backend = %backend.addr, "backend dial failed");
        failed.push(backend);
    }
    match last_error {
        Some((addr, reason)) => Err(DialError::Unreachable { addr, reason }),
        None => Err(DialError::NoBackends),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendSpec, Source};

    fn registry(addrs: &[String]) -> Arc<Registry> {
        let r = Registry::new();
        let specs: Vec<_> = addrs.iter().map(|a| BackendSpec::new(a.clone())).collect();
        r.apply(Source::Static, &specs);
        r
    }

    #[tokio::test]
    async fn skips_dead_backend() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let r = registry(&[
            dead_addr.to_string(),
            live.local_addr().unwrap().to_string(),
        ]);
        let cfg = BalanceConfig::default();
        let (backend, _s) = dial_any(&r, &cfg, DialPolicy::new(Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(backend.addr, live.local_addr().unwrap().to_string());
    }

    #[tokio::test]
    async fn gives_up_with_a_reason() {
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = dead.local_addr().unwrap().to_string();
        drop(dead);
        let r = registry(std::slice::from_ref(&addr));
        let cfg = BalanceConfig::default();
        let err = dial_any(&r, &cfg, DialPolicy::new(Duration::from_millis(500)))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&addr), "{err}");
        let empty = registry(&[]);
        assert!(matches!(
            dial_any(&empty, &cfg, DialPolicy::new(Duration::from_secs(1))).await,
            Err(DialError::NoBackends)
        ));
    }
}

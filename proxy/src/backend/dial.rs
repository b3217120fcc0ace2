//! Connecting to a backend: try the best one, and on failure the others, with exponential
//! backoff, until a deadline.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use super::{Backend, BackendLease, BackendSet};

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
    #[error("no backend is configured")]
    NoBackends,
    #[error("no backend is reachable (last error from {addr}: {reason})")]
    Unreachable { addr: String, reason: String },
}

/// Connects to the least-loaded reachable backend. A backend that fails is skipped until every
/// backend has failed once; then all are tried again after a backoff.
pub async fn dial_any(
    set: &BackendSet,
    policy: DialPolicy,
) -> Result<(BackendLease, TcpStream), DialError> {
    let deadline = Instant::now() + policy.total_timeout;
    let mut backoff = policy.initial_backoff;
    let mut failed: Vec<Arc<Backend>> = Vec::new();
    let mut last_error: Option<(String, String)> = None;
    loop {
        let lease = match set.pick(&failed) {
            Some(lease) => lease,
            None if failed.is_empty() => return Err(DialError::NoBackends),
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
        let addr = lease.backend().addr.clone();
        match timeout(attempt, TcpStream::connect(&addr)).await {
            Ok(Ok(stream)) => return Ok((lease, stream)),
            Ok(Err(e)) => last_error = Some((addr, e.to_string())),
            Err(_) => last_error = Some((addr, format!("connect timed out after {attempt:?}"))),
        }
        tracing::debug!(backend = %lease.backend().addr, "backend dial failed");
        failed.push(lease.backend().clone());
    }
    let (addr, reason) = last_error.unwrap_or_else(|| ("-".into(), "deadline passed".into()));
    Err(DialError::Unreachable { addr, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendAddr;

    #[tokio::test]
    async fn skips_dead_backend() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let set = BackendSet::new(&[
            BackendAddr::new(dead_addr.to_string()),
            BackendAddr::new(live.local_addr().unwrap().to_string()),
        ]);
        let (lease, _s) = dial_any(&set, DialPolicy::new(Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(lease.backend().addr, live.local_addr().unwrap().to_string());
    }

    #[tokio::test]
    async fn gives_up_with_a_reason() {
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = dead.local_addr().unwrap().to_string();
        drop(dead);
        let set = BackendSet::new(&[BackendAddr::new(addr.clone())]);
        let err = dial_any(&set, DialPolicy::new(Duration::from_millis(500)))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&addr), "{err}");
        let empty = BackendSet::new(&[]);
        assert!(matches!(
            dial_any(&empty, DialPolicy::new(Duration::from_secs(1))).await,
            Err(DialError::NoBackends)
        ));
    }
}

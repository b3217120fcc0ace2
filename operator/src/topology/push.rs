//! Pushing backend sets to proxy pods: `PUT /api/v1/backends` (see `proxy/src/api/backends.rs`)
//! and reading back a proxy's generation with `GET /api/v1/backends`.
//!
//! Usable without Kubernetes: [`push_snapshot`] and [`push_with_retry`] take a `host:port`.

use std::time::Duration;

use hyper::{Method, StatusCode};
use tokio::time::Instant;

use super::http::{self, HttpError};
use super::state::{unix_ms, Generation};
pub use super::state::{BackendSpec, PushState, Snapshot};
use crate::metrics;

/// Default per-request timeout of a push.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

const BACKENDS_PATH: &str = "/api/v1/backends";

/// What a proxy answered to a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// The proxy holds this generation now (equal generations are accepted idempotently).
    Accepted(u64),
    /// The proxy holds a newer generation (`current`, read back after the 409) and refused ours.
    Conflict { offered: u64, current: Option<u64> },
}

/// Why a push (or a read-back) failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{0}")]
    Http(#[from] HttpError),
    #[error("unauthorized ({status}): {body}")]
    Unauthorized { status: StatusCode, body: String },
    #[error("HTTP {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("unexpected response: {0}")]
    BadResponse(String),
}

impl PushError {
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, PushError::Unauthorized { .. })
    }
}

/// `PUT http://{addr}/api/v1/backends` with `snapshot` (and `Authorization: Bearer {token}`).
/// On 409 it reads the proxy's generation back. Counted in `tiproxy_operator_push_total`.
pub async fn push_snapshot(
    addr: &str,
    token: Option<&str>,
    snapshot: &Snapshot,
    timeout: Duration,
) -> Result<PushOutcome, PushError> {
    let result = put(addr, token, snapshot, timeout).await;
    let label = match &result {
        Ok(PushOutcome::Accepted(_)) => "ok",
        Ok(PushOutcome::Conflict { .. }) => "conflict",
        Err(_) => "error",
    };
    metrics::get().pushes.with_label_values(&[label]).inc();
    result
}

async fn put(
    addr: &str,
    token: Option<&str>,
    snapshot: &Snapshot,
    timeout: Duration,
) -> Result<PushOutcome, PushError> {
    let body = serde_json::to_vec(snapshot)
        .map_err(|e| PushError::BadResponse(format!("cannot encode the snapshot: {e}")))?;
    let resp = http::request(addr, Method::PUT, BACKENDS_PATH, token, Some(body), timeout).await?;
    match resp.status {
        StatusCode::OK => Ok(PushOutcome::Accepted(snapshot.generation)),
        StatusCode::CONFLICT => {
            // The proxy's answer is text; its generation comes from a GET.
            let current = get_generation(addr, token, timeout).await.ok().flatten();
            Ok(PushOutcome::Conflict {
                offered: snapshot.generation,
                current,
            })
        }
        status => Err(status_error(status, &resp.body)),
    }
}

fn status_error(status: StatusCode, body: &[u8]) -> PushError {
    let body = http::snippet(body);
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        PushError::Unauthorized { status, body }
    } else {
        PushError::Status { status, body }
    }
}

/// The generation of the last snapshot `addr` accepted (`None`: never pushed to).
pub async fn get_generation(
    addr: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<Option<u64>, PushError> {
    let resp = http::request(addr, Method::GET, BACKENDS_PATH, token, None, timeout).await?;
    if resp.status != StatusCode::OK {
        return Err(status_error(resp.status, &resp.body));
    }
    parse_generation(&resp.body)
}

/// `generation` of a `GET /api/v1/backends` body.
pub fn parse_generation(body: &[u8]) -> Result<Option<u64>, PushError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| PushError::BadResponse(format!("GET {BACKENDS_PATH} is not JSON: {e}")))?;
    match v.get("generation") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(g) => g.as_u64().map(Some).ok_or_else(|| {
            PushError::BadResponse(format!("GET {BACKENDS_PATH}: generation {g} is not a u64"))
        }),
    }
}

/// Capped exponential backoff: `initial · 2^(failures-1)`, at most `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// Delay before the next attempt after `failures` consecutive failures (≥ 1).
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(20);
        self.initial.saturating_mul(1u32 << exp).min(self.max)
    }
}

/// Pushes `snapshot` to one proxy until it is accepted or `deadline` passes: a conflict moves
/// `snapshot.generation` above the proxy's (and pushes again at once), failures are retried
/// with `backoff`. Returns the accepted generation, or the last error.
pub async fn push_with_retry(
    addr: &str,
    token: Option<&str>,
    snapshot: &mut Snapshot,
    timeout: Duration,
    backoff: Backoff,
    deadline: Instant,
) -> Result<u64, PushError> {
    let mut failures = 0u32;
    loop {
        match push_snapshot(addr, token, snapshot, timeout).await {
            Ok(PushOutcome::Accepted(g)) => return Ok(g),
            Ok(PushOutcome::Conflict { offered, current }) => {
                let theirs = current.unwrap_or(offered);
                snapshot.generation =
                    Generation::starting_after(Some(offered)).bump_above(theirs, unix_ms());
                tracing::info!(
                    proxy = addr,
                    offered,
                    current = ?current,
                    next = snapshot.generation,
                    "proxy holds a newer backend generation; pushing above it"
                );
            }
            Err(e) => {
                failures += 1;
                let delay = backoff.delay(failures);
                if Instant::now() + delay > deadline {
                    return Err(e);
                }
                tracing::debug!(proxy = addr, error = %e, ?delay, "push failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let d: Vec<u64> = (1..=6).map(|f| b.delay(f).as_millis() as u64).collect();
        assert_eq!(d, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(0), Duration::from_millis(100));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn generation_is_read_from_the_backend_list() {
        assert_eq!(
            parse_generation(br#"{"generation": 42, "backends": []}"#).unwrap(),
            Some(42)
        );
        assert_eq!(
            parse_generation(br#"{"generation": null, "backends": []}"#).unwrap(),
            None
        );
        assert!(parse_generation(b"not json").is_err());
        assert!(parse_generation(br#"{"generation": -1}"#).is_err());
    }
}

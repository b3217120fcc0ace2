//! `GET/PUT /api/v1/backends`: the pushed backend snapshot (used by the operator) and what the
//! proxy knows of every backend.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::ApiState;
use crate::backend::{AdminState, BackendSpec, Health, Source};

/// The body of `PUT /api/v1/backends`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub generation: u64,
    pub backends: Vec<BackendSpec>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BackendView {
    pub addr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_addr: Option<String>,
    pub state: AdminState,
    pub labels: BTreeMap<String, String>,
    pub sources: Vec<Source>,
    pub health: Health,
    pub sessions: usize,
    pub supports_migration: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<f64>,
    /// Sessions whose last migration the backend refused, with its reason.
    pub blocked_sessions: Vec<BlockedSession>,
}

#[derive(Debug, Serialize)]
pub struct BlockedSession {
    pub id: u64,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct BackendsView {
    pub generation: Option<u64>,
    pub backends: Vec<BackendView>,
}

pub async fn get_backends(State(state): State<ApiState>) -> Json<BackendsView> {
    let backends = state
        .registry
        .backends()
        .into_iter()
        .map(|b| {
            let info = b.info();
            let blocked_sessions = b
                .session_entries()
                .into_iter()
                .filter_map(|e| {
                    e.blocked_reason()
                        .map(|reason| BlockedSession { id: e.id, reason })
                })
                .collect();
            BackendView {
                addr: b.addr.clone(),
                status_addr: info.status_addr.clone(),
                state: info.admin_state(),
                labels: info.labels.clone(),
                sources: info.sources.keys().copied().collect(),
                health: info.health.clone(),
                sessions: b.sessions(),
                supports_migration: info.supports_migration,
                server_version: info.server_version.clone(),
                cpu: info.cpu,
                memory: info.memory,
                blocked_sessions,
            }
        })
        .collect();
    Json(BackendsView {
        generation: state.registry.push_generation(),
        backends,
    })
}

pub async fn put_backends(State(state): State<ApiState>, body: axum::body::Bytes) -> Response {
    // Parsed by hand so that a client that omits the JSON content type is still understood.
    let snapshot: Snapshot = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("invalid snapshot: {e}")).into_response()
        }
    };
    if let Some(bad) = snapshot
        .backends
        .iter()
        .find(|b| !b.addr.contains(':') || b.addr.starts_with(':'))
    {
        return (
            StatusCode::BAD_REQUEST,
            format!("backend address {:?} is not host:port", bad.addr),
        )
            .into_response();
    }
    match state
        .registry
        .apply_push(snapshot.generation, &snapshot.backends)
    {
        Ok(()) => {
            tracing::info!(
                generation = snapshot.generation,
                backends = snapshot.backends.len(),
                "backend snapshot pushed"
            );
            (
                StatusCode::OK,
                Json(serde_json::json!({"generation": snapshot.generation})),
            )
                .into_response()
        }
        Err(stale) => (StatusCode::CONFLICT, stale.to_string()).into_response(),
    }
}

//! The operator's own HTTP endpoint: `/healthz` (liveness), `/readyz` (the TiProxy CRD is
//! served and the controller runs) and `/metrics` (Prometheus).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::metrics;

pub fn router(ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(ready)
}

async fn readyz(State(ready): State<Arc<AtomicBool>>) -> impl IntoResponse {
    if ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

async fn metrics_text() -> Response {
    tiproxy::api::prometheus_text(metrics::registry())
}

pub async fn serve(listener: TcpListener, ready: Arc<AtomicBool>) -> std::io::Result<()> {
    axum::serve(listener, router(ready)).await
}

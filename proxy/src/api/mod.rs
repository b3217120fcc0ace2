//! The HTTP admin API (axum): liveness, readiness, Prometheus metrics and the backend list.
//! It works on shared state handles only; the data path never calls into it.
//!
//! Routes are split in two: read-only ones, always open (kubelet probes and Prometheus cannot
//! send a token), and mutating ones, all behind [`auth::require_token`]. A new mutating
//! endpoint goes into [`mutating_routes`] and is protected without further thought.

pub mod auth;
mod backends;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{ApiConfig, ConfigError};
use crate::metrics;

/// What the API reports on.
#[derive(Clone)]
pub struct ApiState {
    /// False once shutdown has begun: load balancers should stop sending new clients.
    pub ready: Arc<AtomicBool>,
    pub registry: Arc<crate::backend::Registry>,
    /// The `[api]` settings that apply while the proxy runs.
    pub settings: Arc<ApiSettings>,
}

/// The hot-reloadable part of `[api]`: the token and the readiness rule.
#[derive(Debug)]
pub struct ApiSettings {
    pub auth: auth::AdminAuth,
    /// `[api] ready-requires-backend`.
    ready_requires_backend: AtomicBool,
}

impl ApiSettings {
    /// At start-up; fails when a configured token file gives no token.
    pub fn from_config(api: &ApiConfig) -> Result<Arc<Self>, ConfigError> {
        Ok(Arc::new(Self {
            auth: auth::AdminAuth::from_config(api)?,
            ready_requires_backend: AtomicBool::new(api.ready_requires_backend),
        }))
    }

    /// Open endpoints, readiness without the backend rule (tests and embedders).
    pub fn open() -> Arc<Self> {
        Arc::new(Self {
            auth: auth::AdminAuth::open(),
            ready_requires_backend: AtomicBool::new(false),
        })
    }

    /// Applies the config in force; called on every config poll, so it also re-reads the
    /// token file (a rotated Kubernetes Secret changes the file, not the config).
    pub fn reload(&self, api: &ApiConfig) {
        let before = self
            .ready_requires_backend
            .swap(api.ready_requires_backend, Ordering::Relaxed);
        if before != api.ready_requires_backend {
            tracing::info!(
                ready_requires_backend = api.ready_requires_backend,
                "readiness rule changed"
            );
        }
        self.auth.refresh(api);
    }

    pub fn ready_requires_backend(&self) -> bool {
        self.ready_requires_backend.load(Ordering::Relaxed)
    }
}

pub fn router(state: ApiState) -> Router {
    let mutating = mutating_routes().route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        auth::require_token,
    ));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/backends", get(backends::get_backends))
        .merge(mutating)
        .with_state(state)
}

/// Every endpoint that changes the proxy's state; [`router`] puts the token check in front of
/// all of them. (Paths may repeat read-only ones: axum merges the methods of one path.)
fn mutating_routes() -> Router<ApiState> {
    Router::new().route("/api/v1/backends", put(backends::put_backends))
}

async fn readyz(State(state): State<ApiState>) -> impl IntoResponse {
    if !state.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    if state.settings.ready_requires_backend() && !has_usable_backend(&state.registry) {
        return (StatusCode::SERVICE_UNAVAILABLE, "no backends");
    }
    (StatusCode::OK, "ready")
}

/// Whether some backend, from any source, would take a new session now: active (no source
/// drains it) and with usable health (healthy, or not probed yet).
fn has_usable_backend(registry: &crate::backend::Registry) -> bool {
    registry.backends().iter().any(|b| b.info().routable())
}

async fn metrics_text() -> Response {
    prometheus_text(metrics::registry())
}

/// `registry` in the Prometheus text format (also the operator's `/metrics`).
pub fn prometheus_text(registry: &prometheus::Registry) -> Response {
    let mut out = Vec::new();
    match TextEncoder::new().encode(&registry.gather(), &mut out) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            out,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Serves the API until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{AdminState, BackendSpec, Health, Registry, Source};
    use crate::config::ApiToken;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves `router(state)` on a loopback port; the server stops with the test's runtime.
    async fn serve_on_loopback(state: ApiState) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(state)).await });
        addr
    }

    /// One HTTP/1.1 request: (status, body).
    async fn request(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: &str,
    ) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(a) = auth {
            req.push_str(&format!("Authorization: {a}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        (code, body.to_string())
    }

    fn state(settings: Arc<ApiSettings>) -> (ApiState, Arc<Registry>) {
        let registry = Registry::new();
        let state = ApiState {
            ready: Arc::new(AtomicBool::new(true)),
            registry: registry.clone(),
            settings,
        };
        (state, registry)
    }

    const SNAPSHOT: &str = r#"{"generation": 1, "backends": [{"addr": "127.0.0.1:4000"}]}"#;

    #[tokio::test]
    async fn mutating_routes_need_the_token_read_only_ones_do_not() {
        let settings = Arc::new(ApiSettings {
            auth: auth::AdminAuth::with_token(ApiToken::from_bytes(b"s3cret").unwrap()),
            ready_requires_backend: AtomicBool::new(false),
        });
        let (state, registry) = state(settings);
        let addr = serve_on_loopback(state).await;

        let (code, body) = request(addr, "PUT", "/api/v1/backends", None, SNAPSHOT).await;
        assert_eq!(code, 401, "{body}");
        assert!(body.contains("Authorization: Bearer"), "{body}");
        let (code, _) = request(
            addr,
            "PUT",
            "/api/v1/backends",
            Some("Bearer nope"),
            SNAPSHOT,
        )
        .await;
        assert_eq!(code, 401);
        let (code, _) = request(
            addr,
            "PUT",
            "/api/v1/backends",
            Some("Basic s3cret"),
            SNAPSHOT,
        )
        .await;
        assert_eq!(code, 401);
        assert!(
            registry.backends().is_empty(),
            "refused pushes change nothing"
        );

        let (code, body) = request(
            addr,
            "PUT",
            "/api/v1/backends",
            Some("Bearer s3cret"),
            SNAPSHOT,
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(registry.backends().len(), 1);

        for path in ["/healthz", "/readyz", "/metrics", "/api/v1/backends"] {
            let (code, body) = request(addr, "GET", path, None, "").await;
            assert_eq!(code, 200, "GET {path}: {body}");
        }
        // An unsupported method on a protected path never succeeds; with the token it is 405.
        let (code, _) = request(addr, "DELETE", "/api/v1/backends", None, "").await;
        assert!(code == 401 || code == 405, "{code}");
        let (code, _) = request(
            addr,
            "DELETE",
            "/api/v1/backends",
            Some("Bearer s3cret"),
            "",
        )
        .await;
        assert_eq!(code, 405);
    }

    #[tokio::test]
    async fn open_when_no_token_is_configured() {
        let (state, registry) = state(ApiSettings::open());
        let addr = serve_on_loopback(state).await;
        let (code, body) = request(addr, "PUT", "/api/v1/backends", None, SNAPSHOT).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(registry.backends().len(), 1);
    }

    #[tokio::test]
    async fn readiness_can_require_a_usable_backend() {
        let settings = ApiSettings::open();
        let (state, registry) = state(settings.clone());
        let ready = state.ready.clone();
        let addr = serve_on_loopback(state).await;
        let readyz = || request(addr, "GET", "/readyz", None, "");

        // Off (the default): ready without backends.
        assert_eq!(readyz().await, (200, "ready".into()));

        let mut api = ApiConfig {
            ready_requires_backend: true,
            ..ApiConfig::default()
        };
        settings.reload(&api);
        assert_eq!(readyz().await, (503, "no backends".into()));

        // Not probed yet counts as usable.
        registry.apply(Source::Push, &[BackendSpec::new("127.0.0.1:4000")]);
        assert_eq!(readyz().await, (200, "ready".into()));

        // Unhealthy or drained backends do not.
        let b = registry.find("127.0.0.1:4000").unwrap();
        b.update_info(|i| i.health = Health::Unhealthy("refused".into()));
        assert_eq!(readyz().await.0, 503);
        b.update_info(|i| i.health = Health::Healthy);
        assert_eq!(readyz().await.0, 200);
        registry.apply(
            Source::Push,
            &[BackendSpec {
                state: AdminState::Draining,
                ..BackendSpec::new("127.0.0.1:4000")
            }],
        );
        assert_eq!(readyz().await, (503, "no backends".into()));

        // Any source counts.
        registry.apply(Source::Static, &[BackendSpec::new("127.0.0.1:4001")]);
        assert_eq!(readyz().await.0, 200);

        // All gone: not ready again.
        registry.apply(Source::Static, &[]);
        registry.apply(Source::Push, &[]);
        assert_eq!(readyz().await, (503, "no backends".into()));

        // Shutdown wins over everything.
        registry.apply(Source::Static, &[BackendSpec::new("127.0.0.1:4001")]);
        ready.store(false, Ordering::Relaxed);
        assert_eq!(readyz().await, (503, "shutting down".into()));

        // Hot reload back to off.
        ready.store(true, Ordering::Relaxed);
        registry.apply(Source::Static, &[]);
        api.ready_requires_backend = false;
        settings.reload(&api);
        assert_eq!(readyz().await, (200, "ready".into()));
    }
}

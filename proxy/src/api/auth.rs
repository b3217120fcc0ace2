//! Bearer-token protection of the mutating admin endpoints (`[api] token-file`).
//!
//! The token lives in a file (a mounted Kubernetes Secret) that is re-read every config poll,
//! so a rotated Secret takes effect without a restart. Read-only endpoints stay open: kubelet
//! probes and Prometheus scrapes cannot send a token.

use std::path::PathBuf;
use std::sync::RwLock;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiState;
use crate::config::{ApiConfig, ApiToken, ConfigError};

/// What the mutating endpoints currently require.
#[derive(Debug)]
enum Guard {
    /// No `token-file` configured.
    Open,
    /// The token read from `path`.
    Token { path: PathBuf, token: ApiToken },
    /// A `token-file` was configured at reload but has never been readable: refuse everything
    /// rather than fall back to open (the config asks for protection).
    Unavailable { path: PathBuf },
}

#[derive(Debug)]
struct AuthState {
    guard: Guard,
    /// The last read failure logged, so that a file missing for a while is reported once,
    /// not every poll.
    last_error: Option<String>,
}

/// The admin API's token, shared by the request path and the config watcher.
#[derive(Debug)]
pub struct AdminAuth {
    state: RwLock<AuthState>,
}

/// Why a request to a mutating endpoint was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Missing,
    Malformed,
    Wrong,
    Unavailable,
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            Rejection::Missing => (
                StatusCode::UNAUTHORIZED,
                "missing bearer token: this endpoint requires `Authorization: Bearer <token>` \
                 with the token from the proxy's api.token-file",
            ),
            Rejection::Malformed => (
                StatusCode::UNAUTHORIZED,
                "malformed Authorization header: expected `Bearer <token>`",
            ),
            Rejection::Wrong => (StatusCode::UNAUTHORIZED, "invalid bearer token"),
            Rejection::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "api.token-file is configured but could not be read (see the proxy log); \
                 mutating requests are refused until it can",
            ),
        };
        let mut response = (status, body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"tiproxy\""),
            );
        }
        response
    }
}

impl AdminAuth {
    /// Mutating endpoints need no token.
    pub fn open() -> Self {
        Self::with(Guard::Open)
    }

    /// A fixed token (tests and embedders).
    pub fn with_token(token: ApiToken) -> Self {
        Self::with(Guard::Token {
            path: PathBuf::new(),
            token,
        })
    }

    fn with(guard: Guard) -> Self {
        Self {
            state: RwLock::new(AuthState {
                guard,
                last_error: None,
            }),
        }
    }

    /// At start-up: a configured token file must give a token.
    pub fn from_config(api: &ApiConfig) -> Result<Self, ConfigError> {
        Ok(match (api.token_path(), api.load_token()?) {
            (Some(path), Some(token)) => Self::with(Guard::Token {
                path: path.to_path_buf(),
                token,
            }),
            _ => Self::open(),
        })
    }

    /// Whether a token is required (configured, whether or not it could be read).
    pub fn required(&self) -> bool {
        !matches!(self.read().guard, Guard::Open)
    }

    /// Re-reads the token file named by `api` (every config poll, and so on every reload). A
    /// file that cannot be read keeps the token in force and is logged once per new error.
    pub fn refresh(&self, api: &ApiConfig) {
        let Some(path) = api.token_path() else {
            let mut state = self.write();
            if !matches!(state.guard, Guard::Open) {
                tracing::warn!(
                    "api.token-file removed from the config: mutating admin endpoints no longer \
                     require a token"
                );
                state.guard = Guard::Open;
                state.last_error = None;
            }
            return;
        };
        // Read outside the lock: requests keep being checked against the current token.
        let loaded = ApiToken::read(path);
        let mut state = self.write();
        match loaded {
            Ok(token) => {
                let changed = match &state.guard {
                    Guard::Token { path: p, token: t } => p != path || *t != token,
                    Guard::Open | Guard::Unavailable { .. } => true,
                };
                if changed {
                    let first = matches!(state.guard, Guard::Open | Guard::Unavailable { .. });
                    tracing::info!(
                        path = %path.display(),
                        "{}",
                        if first {
                            "admin API token loaded: mutating endpoints require it"
                        } else {
                            "admin API token changed; the previous one is no longer accepted"
                        }
                    );
                    state.guard = Guard::Token {
                        path: path.to_path_buf(),
                        token,
                    };
                }
                state.last_error = None;
            }
            Err(e) => {
                let message = e.to_string();
                let keeps = match &state.guard {
                    Guard::Token { .. } => "keeping the previous token",
                    Guard::Open | Guard::Unavailable { .. } => {
                        state.guard = Guard::Unavailable {
                            path: path.to_path_buf(),
                        };
                        "refusing mutating requests until it can be read"
                    }
                };
                if state.last_error.as_deref() != Some(message.as_str()) {
                    tracing::warn!(error = %message, "cannot load the admin API token; {keeps}");
                    state.last_error = Some(message);
                }
            }
        }
    }

    /// Checks a request's `Authorization` header against the token in force.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Rejection> {
        let state = self.read();
        let token = match &state.guard {
            Guard::Open => return Ok(()),
            Guard::Unavailable { .. } => return Err(Rejection::Unavailable),
            Guard::Token { token, .. } => token,
        };
        let presented = bearer(headers)?;
        if token.matches(presented) {
            Ok(())
        } else {
            Err(Rejection::Wrong)
        }
    }

    /// The path the token in force came from, if any (for logs).
    pub fn token_path(&self) -> Option<PathBuf> {
        match &self.read().guard {
            Guard::Open => None,
            Guard::Token { path, .. } | Guard::Unavailable { path } => Some(path.clone()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, AuthState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, AuthState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// The credentials of an `Authorization: Bearer <token>` header (scheme case-insensitive, as
/// HTTP auth schemes are).
fn bearer(headers: &HeaderMap) -> Result<&[u8], Rejection> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(Rejection::Missing)?;
    if values.next().is_some() {
        return Err(Rejection::Malformed);
    }
    let value = value.as_bytes();
    let split = value
        .iter()
        .position(|&b| b == b' ')
        .ok_or(Rejection::Malformed)?;
    let (scheme, rest) = value.split_at(split);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(Rejection::Malformed);
    }
    let credentials = rest.trim_ascii();
    if credentials.is_empty() {
        return Err(Rejection::Missing);
    }
    Ok(credentials)
}

/// Middleware on every mutating route: refuses the request unless it carries the token.
pub async fn require_token(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Response {
    match state.settings.auth.check(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(rejection) => {
            tracing::warn!(
                method = %request.method(),
                path = %request.uri().path(),
                reason = ?rejection,
                "admin API request refused"
            );
            rejection.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use std::path::Path;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    fn api(path: &Path) -> ApiConfig {
        ApiConfig {
            token_file: path.to_path_buf(),
            ..ApiConfig::default()
        }
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer(&headers(None)), Err(Rejection::Missing));
        assert_eq!(bearer(&headers(Some("Bearer abc"))), Ok(&b"abc"[..]));
        assert_eq!(bearer(&headers(Some("bearer  abc "))), Ok(&b"abc"[..]));
        assert_eq!(bearer(&headers(Some("Bearer "))), Err(Rejection::Missing));
        assert_eq!(
            bearer(&headers(Some("Basic abc"))),
            Err(Rejection::Malformed)
        );
        assert_eq!(bearer(&headers(Some("abc"))), Err(Rejection::Malformed));
    }

    #[test]
    fn open_and_token_checks() {
        assert!(AdminAuth::open().check(&headers(None)).is_ok());
        let auth = AdminAuth::with_token(ApiToken::from_bytes(b"t0k").unwrap());
        assert!(auth.required());
        assert_eq!(auth.check(&headers(None)), Err(Rejection::Missing));
        assert_eq!(
            auth.check(&headers(Some("Bearer nope"))),
            Err(Rejection::Wrong)
        );
        assert_eq!(auth.check(&headers(Some("Bearer t0k"))), Ok(()));
    }

    #[test]
    fn refresh_rotates_keeps_and_fails_closed() {
        let dir = std::env::temp_dir().join(format!("tiproxy-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "first\n").unwrap();

        // Start-up: an unreadable file is an error naming the path.
        let err = AdminAuth::from_config(&api(&dir.join("absent"))).unwrap_err();
        assert!(err.to_string().contains("absent"), "{err}");

        let auth = AdminAuth::from_config(&api(&file)).unwrap();
        assert!(auth.check(&headers(Some("Bearer first"))).is_ok());

        // Rotation.
        std::fs::write(&file, "second").unwrap();
        auth.refresh(&api(&file));
        assert_eq!(
            auth.check(&headers(Some("Bearer first"))),
            Err(Rejection::Wrong)
        );
        assert!(auth.check(&headers(Some("Bearer second"))).is_ok());

        // Unreadable or empty later: the token in force stays.
        std::fs::write(&file, "").unwrap();
        auth.refresh(&api(&file));
        assert!(auth.check(&headers(Some("Bearer second"))).is_ok());
        std::fs::remove_file(&file).unwrap();
        auth.refresh(&api(&file));
        assert!(auth.check(&headers(Some("Bearer second"))).is_ok());

        // Removed from the config: open.
        auth.refresh(&ApiConfig::default());
        assert!(!auth.required());
        assert!(auth.check(&headers(None)).is_ok());

        // Configured at reload but unreadable: closed, not open.
        auth.refresh(&api(&file));
        assert!(auth.required());
        assert_eq!(
            auth.check(&headers(Some("Bearer second"))),
            Err(Rejection::Unavailable)
        );
        std::fs::write(&file, "third").unwrap();
        auth.refresh(&api(&file));
        assert!(auth.check(&headers(Some("Bearer third"))).is_ok());
        assert_eq!(auth.token_path().as_deref(), Some(file.as_path()));
        let _ = std::fs::remove_dir_all(dir);
    }
}

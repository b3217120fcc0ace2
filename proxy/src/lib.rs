//! tiproxy: a MySQL-protocol proxy for TiDB.
//!
//! The data path (`server` → `session` → `protocol`/`net`, with `backend` choosing where to
//! connect) knows nothing of the admin side (`api`); the two meet only through shared state
//! handles and metrics.

pub mod api;
pub mod backend;
pub mod config;
pub mod discovery;
pub mod health;
pub mod metrics;
pub mod net;
pub mod protocol;
pub mod server;
pub mod session;

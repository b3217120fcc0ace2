//! Where sessions connect: the registry of known backends (merged from every discovery
//! source, with health and sessions), the balancing policy, and dialling with retries.

pub mod balance;
mod dial;
pub mod registry;

pub use balance::{route, run_balancer, BalanceConfig};
pub use dial::{dial_any, DialError, DialPolicy};
pub use registry::{
    AdminState, Backend, BackendInfo, BackendSpec, Control, Health, Registry, SessionLease, Source,
};

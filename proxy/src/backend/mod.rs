//! Where sessions connect: the set of known backends, the choice of one for a new session, and
//! dialling it with retries.

mod dial;
mod set;

pub use dial::{dial_any, DialError, DialPolicy};
pub use set::{Backend, BackendLease, BackendSet};

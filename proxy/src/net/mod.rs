//! Transport concerns below the MySQL protocol: TLS, the PROXY protocol, TCP keepalive and the
//! stream type that hides whether a socket is encrypted.

pub mod keepalive;
pub mod proxy_protocol;
pub mod rewind;
pub mod stream;
pub mod tls;

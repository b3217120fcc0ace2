//! Prometheus metrics, named as the reference TiProxy names them.

use std::sync::OnceLock;

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    /// `tiproxy_server_connections`: live client connections.
    pub connections: IntGauge,
    /// `tiproxy_server_create_connection_total`.
    pub created: prometheus::IntCounter,
    /// `tiproxy_server_reject_connection_total{type}`.
    pub rejected: IntCounterVec,
}

fn build() -> Metrics {
    let registry = Registry::new();
    let connections = IntGauge::with_opts(
        Opts::new("connections", "Live client connections.")
            .namespace("tiproxy")
            .subsystem("server"),
    )
    .expect("static metric definition");
    let created = prometheus::IntCounter::with_opts(
        Opts::new("create_connection_total", "Client connections accepted.")
            .namespace("tiproxy")
            .subsystem("server"),
    )
    .expect("static metric definition");
    let rejected = IntCounterVec::new(
        Opts::new(
            "reject_connection_total",
            "Client connections rejected, by reason.",
        )
        .namespace("tiproxy")
        .subsystem("server"),
        &["type"],
    )
    .expect("static metric definition");
    for m in [
        Box::new(connections.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(created.clone()),
        Box::new(rejected.clone()),
    ] {
        registry.register(m).expect("metric names are unique");
    }
    Metrics {
        registry,
        connections,
        created,
        rejected,
    }
}

pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(build)
}

pub fn registry() -> &'static Registry {
    &get().registry
}

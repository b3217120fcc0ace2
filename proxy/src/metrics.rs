//! Prometheus metrics, named as the reference TiProxy names them.

use std::sync::OnceLock;

use prometheus::{
    exponential_buckets, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    /// `tiproxy_server_connections`: live client connections.
    pub connections: IntGauge,
    /// `tiproxy_server_create_connection_total`.
    pub created: IntCounter,
    /// `tiproxy_server_reject_connection_total{type}`.
    pub rejected: IntCounterVec,
    /// `tiproxy_session_query_total{backend,cmd_type}`.
    pub queries: IntCounterVec,
    /// `tiproxy_session_query_duration_seconds{backend,cmd_type}`.
    pub query_duration: HistogramVec,
    /// `tiproxy_backend_b_status{backend}`: 1 usable, 0 not.
    pub backend_status: IntGaugeVec,
    /// `tiproxy_balance_b_conn{backend}`: sessions per backend.
    pub backend_sessions: IntGaugeVec,
    /// `tiproxy_balance_migrate_total{from,to,reason,migrate_res}`.
    pub migrations: IntCounterVec,
    /// `tiproxy_balance_migrate_duration_seconds{from,to,migrate_res}`: request to result.
    pub migration_duration: HistogramVec,
    /// `tiproxy_balance_migrate_requested_total{from,to,reason}`.
    pub migrate_requested: IntCounterVec,
    /// `tiproxy_balance_migrate_blocked_total{reason}`: attempts the backend refused, by cause
    /// (temporary tables, locks, ...).
    pub migrate_blocked: IntCounterVec,
}

fn opts(subsystem: &str, name: &str, help: &str) -> Opts {
    Opts::new(name, help)
        .namespace("tiproxy")
        .subsystem(subsystem)
}

fn histogram(subsystem: &str, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let buckets = exponential_buckets(0.0005, 2.0, 24).expect("static buckets");
    HistogramVec::new(
        HistogramOpts::new(name, help)
            .namespace("tiproxy")
            .subsystem(subsystem)
            .buckets(buckets),
        labels,
    )
    .expect("static metric definition")
}

fn build() -> Metrics {
    let m = Metrics {
        registry: Registry::new(),
        connections: IntGauge::with_opts(opts("server", "connections", "Live client connections."))
            .expect("static metric definition"),
        created: IntCounter::with_opts(opts(
            "server",
            "create_connection_total",
            "Client connections accepted.",
        ))
        .expect("static metric definition"),
        rejected: IntCounterVec::new(
            opts(
                "server",
                "reject_connection_total",
                "Client connections rejected, by reason.",
            ),
            &["type"],
        )
        .expect("static metric definition"),
        queries: IntCounterVec::new(
            opts("session", "query_total", "Commands forwarded."),
            &["backend", "cmd_type"],
        )
        .expect("static metric definition"),
        query_duration: histogram(
            "session",
            "query_duration_seconds",
            "Time from a command's arrival to the end of its response.",
            &["backend", "cmd_type"],
        ),
        backend_status: IntGaugeVec::new(
            opts(
                "backend",
                "b_status",
                "1 when the backend takes sessions, 0 otherwise.",
            ),
            &["backend"],
        )
        .expect("static metric definition"),
        backend_sessions: IntGaugeVec::new(
            opts("balance", "b_conn", "Sessions per backend."),
            &["backend"],
        )
        .expect("static metric definition"),
        migrations: IntCounterVec::new(
            opts("balance", "migrate_total", "Session migrations, by result."),
            &["from", "to", "reason", "migrate_res"],
        )
        .expect("static metric definition"),
        migration_duration: histogram(
            "balance",
            "migrate_duration_seconds",
            "Time from a migration request to its result.",
            &["from", "to", "migrate_res"],
        ),
        migrate_requested: IntCounterVec::new(
            opts(
                "balance",
                "migrate_requested_total",
                "Migrations requested by the balancer.",
            ),
            &["from", "to", "reason"],
        )
        .expect("static metric definition"),
        migrate_blocked: IntCounterVec::new(
            opts(
                "balance",
                "migrate_blocked_total",
                "Migrations the backend refused, by cause (e.g. temporary tables, locks).",
            ),
            &["reason"],
        )
        .expect("static metric definition"),
    };
    let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
        Box::new(m.connections.clone()),
        Box::new(m.created.clone()),
        Box::new(m.rejected.clone()),
        Box::new(m.queries.clone()),
        Box::new(m.query_duration.clone()),
        Box::new(m.backend_status.clone()),
        Box::new(m.backend_sessions.clone()),
        Box::new(m.migrations.clone()),
        Box::new(m.migration_duration.clone()),
        Box::new(m.migrate_requested.clone()),
        Box::new(m.migrate_blocked.clone()),
    ];
    for c in collectors {
        m.registry.register(c).expect("metric names are unique");
    }
    m
}

pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(build)
}

pub fn registry() -> &'static Registry {
    &get().registry
}

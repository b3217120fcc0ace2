//! The operator's Prometheus metrics, served on `/metrics` of its HTTP port.

use std::sync::OnceLock;

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry,
};

pub struct Metrics {
    /// Reconcile runs by result (`ok` / `error`).
    pub reconciles: IntCounterVec,
    pub reconcile_duration: Histogram,
    /// Backend-set pushes to proxy pods by result (`ok` / `conflict` / `error`).
    pub pushes: IntCounterVec,
    /// Backends per TiProxy (`namespace`, `tiproxy`) and state (`active` / `draining`).
    pub backends: IntGaugeVec,
    /// Generation of the backend set last computed per TiProxy.
    pub backend_generation: IntGaugeVec,
}

fn build() -> (Metrics, Registry) {
    let reconciles = IntCounterVec::new(
        Opts::new(
            "tiproxy_operator_reconcile_total",
            "Reconcile runs by result",
        ),
        &["result"],
    )
    .expect("static metric definition");
    let reconcile_duration = Histogram::with_opts(
        HistogramOpts::new(
            "tiproxy_operator_reconcile_duration_seconds",
            "Duration of reconcile runs",
        )
        .buckets(exponential_buckets(0.001, 2.0, 16).expect("static buckets")),
    )
    .expect("static metric definition");
    let pushes = IntCounterVec::new(
        Opts::new(
            "tiproxy_operator_push_total",
            "Backend-set pushes to proxy pods by result",
        ),
        &["result"],
    )
    .expect("static metric definition");
    let backends = IntGaugeVec::new(
        Opts::new(
            "tiproxy_operator_backends",
            "TiDB backends per TiProxy and state",
        ),
        &["namespace", "tiproxy", "state"],
    )
    .expect("static metric definition");
    let backend_generation = IntGaugeVec::new(
        Opts::new(
            "tiproxy_operator_backend_generation",
            "Generation of the backend set last computed per TiProxy",
        ),
        &["namespace", "tiproxy"],
    )
    .expect("static metric definition");

    let registry = Registry::new();
    let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
        Box::new(reconciles.clone()),
        Box::new(reconcile_duration.clone()),
        Box::new(pushes.clone()),
        Box::new(backends.clone()),
        Box::new(backend_generation.clone()),
    ];
    for c in collectors {
        registry.register(c).expect("unique metric names");
    }
    (
        Metrics {
            reconciles,
            reconcile_duration,
            pushes,
            backends,
            backend_generation,
        },
        registry,
    )
}

fn both() -> &'static (Metrics, Registry) {
    static METRICS: OnceLock<(Metrics, Registry)> = OnceLock::new();
    METRICS.get_or_init(build)
}

pub fn get() -> &'static Metrics {
    &both().0
}

pub fn registry() -> &'static Registry {
    &both().1
}

//! Where backends come from besides the static config and the push API.

pub mod etcd;

use std::sync::Arc;

use tokio::sync::watch;

use crate::backend::{AdminState, BackendSpec, Registry, Source};

/// Keeps the registry's etcd-sourced backends equal to PD's TiDB topology until `stop`.
pub async fn run_etcd_discovery(
    endpoints: Vec<String>,
    registry: Arc<Registry>,
    stop: watch::Receiver<bool>,
) {
    let (tx, mut rx) = watch::channel(Vec::new());
    let watcher = tokio::spawn(etcd::run_topology_watch(endpoints, tx, stop));
    while rx.changed().await.is_ok() {
        let specs: Vec<BackendSpec> = rx
            .borrow_and_update()
            .iter()
            .map(|d| BackendSpec {
                addr: d.addr.clone(),
                status_addr: d.status_addr.clone(),
                state: AdminState::Active,
                labels: d.labels.clone(),
            })
            .collect();
        tracing::info!(backends = specs.len(), "TiDB topology from PD changed");
        registry.apply(Source::Etcd, &specs);
    }
    let _ = watcher.await;
}

//! The health loop: probe every known backend each interval and publish the verdicts (after
//! hysteresis) to the registry, where routing and balancing read them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{BackendHealth, BackendProber, HealthConfig, HealthTracker, ProbeReport, StatusClient};
use crate::backend::{Health, Registry};

struct Watched {
    prober: BackendProber,
    tracker: HealthTracker,
}

/// Probes backends until `stop` turns true.
pub async fn run_health_observer(
    registry: Arc<Registry>,
    cfg: HealthConfig,
    mut stop: watch::Receiver<bool>,
) {
    let client = StatusClient::new(cfg.timeout);
    let mut watched: HashMap<String, Watched> = HashMap::new();
    let mut ticker = tokio::time::interval(cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => if *stop.borrow() { return } else { continue },
        }
        let backends = registry.backends();
        watched.retain(|addr, _| backends.iter().any(|b| &b.addr == addr));
        let mut round = JoinSet::new();
        for backend in &backends {
            let status_addr = backend.info().status_addr;
            let entry = watched
                .entry(backend.addr.clone())
                .or_insert_with(|| Watched {
                    prober: BackendProber::new(backend.addr.clone(), status_addr.clone()),
                    tracker: HealthTracker::new(&cfg, Instant::now()),
                });
            if entry.prober.status_addr() != status_addr.as_deref() {
                entry.prober = BackendProber::new(backend.addr.clone(), status_addr);
            }
            let mut prober = entry.prober.clone();
            let (client, cfg) = (client.clone(), cfg.clone());
            round.spawn(async move {
                let report = prober.probe(&client, &cfg).await;
                (prober, report)
            });
        }
        while let Some(Ok((prober, report))) = round.join_next().await {
            let addr = prober.sql_addr().to_owned();
            let Some(entry) = watched.get_mut(&addr) else {
                continue;
            };
            entry.prober = prober;
            let transition = entry.tracker.observe(&report.outcome, Instant::now());
            if let Some(t) = transition {
                let health = entry.tracker.describe();
                if t.to.is_healthy() {
                    tracing::info!(backend = %addr, %health, "backend health changed");
                } else {
                    tracing::warn!(backend = %addr, %health, "backend health changed");
                }
            }
            if let Some(backend) = registry.find(&addr) {
                let health = to_registry_health(entry.tracker.health());
                backend.update_info(|info| apply_report(info, health, &report));
            }
        }
    }
}

fn to_registry_health(h: &BackendHealth) -> Health {
    match h {
        BackendHealth::Healthy => Health::Healthy,
        BackendHealth::Draining { .. } => Health::Draining(h.reason().into_owned()),
        BackendHealth::Unhealthy { .. } => Health::Unhealthy(h.reason().into_owned()),
    }
}

fn apply_report(info: &mut crate::backend::BackendInfo, health: Health, report: &ProbeReport) {
    info.health = health;
    if let Some(s) = report.supports_migration {
        info.supports_migration = s;
    }
    if report.server_version.is_some() {
        info.server_version.clone_from(&report.server_version);
    }
    info.cpu = report.cpu;
    info.memory = report.memory;
}

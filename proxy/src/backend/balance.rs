//! Choosing backends: where a new session goes, and which live sessions should move where.
//!
//! Backends are ranked by factors in priority order (the reference TiProxy's order): label,
//! status, memory, CPU, location, connection count. A session moves only when its backend is
//! worse than the best one on some factor and no higher-priority factor says otherwise. Each
//! factor has its own migration rate, so a TiDB that is shutting down is emptied within
//! seconds while a mere connection-count imbalance is corrected slowly.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::registry::{Backend, BackendInfo, Health, Registry};

#[derive(Debug, Clone)]
pub struct BalanceConfig {
    /// When set, sessions stay on backends whose value of this label equals the proxy's own.
    pub label_name: Option<String>,
    /// The proxy's own labels (`zone` decides locality).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Seconds within which all sessions leave a draining or unhealthy backend.
    pub status_drain_seconds: f64,
    /// Connection-count imbalance tolerated before moving sessions (> 1).
    pub conn_ratio: f64,
    /// Overrides of the per-factor rates, in sessions per second (0 = built-in formula).
    pub conn_migrations_per_second: f64,
    /// How long a session whose migration failed is left alone.
    pub retry_after: Duration,
    pub tick: Duration,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            label_name: None,
            labels: Default::default(),
            status_drain_seconds: 5.0,
            conn_ratio: 1.2,
            conn_migrations_per_second: 0.0,
            retry_after: Duration::from_secs(3),
            tick: Duration::from_millis(20),
        }
    }
}

/// One backend's standing, compared lexicographically (lower is better).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    label: u8,
    status: u8,
    memory: u8,
    cpu: u8,
    location: u8,
    sessions: usize,
}

fn memory_level(usage: Option<f64>) -> u8 {
    match usage {
        Some(u) if u > 0.75 => 2,
        Some(u) if u > 0.6 => 1,
        _ => 0,
    }
}

fn cpu_level(usage: Option<f64>) -> u8 {
    // 5 % steps, as the reference does; 0..=20.
    usage.map_or(0, |u| ((u.clamp(0.0, 1.0) * 100.0) as u8) / 5)
}

fn rank(cfg: &BalanceConfig, info: &BackendInfo, sessions: usize) -> Rank {
    let label = match &cfg.label_name {
        Some(name) => u8::from(info.labels.get(name) != cfg.labels.get(name)),
        None => 0,
    };
    let location = match cfg.labels.get("zone") {
        Some(zone) => u8::from(info.labels.get("zone") != Some(zone)),
        None => 0,
    };
    Rank {
        label,
        status: u8::from(!info.routable()),
        memory: memory_level(info.memory),
        cpu: cpu_level(info.cpu),
        location,
        sessions,
    }
}

/// The backend a new session should use: the best-ranked routable one not in `excluded`.
pub fn route(
    registry: &Registry,
    cfg: &BalanceConfig,
    excluded: &[Arc<Backend>],
) -> Option<Arc<Backend>> {
    registry
        .backends()
        .into_iter()
        .filter(|b| !excluded.iter().any(|x| Arc::ptr_eq(x, b)))
        .map(|b| {
            let info = b.info();
            let r = rank(cfg, &info, b.sessions());
            (info.routable() && r.label == 0, r, b)
        })
        .filter(|(routable, _, _)| *routable)
        .min_by_key(|(_, r, _)| *r)
        .map(|(_, _, b)| b)
}

/// Why a session is asked to move (the `reason` label of the migration metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Status,
    Label,
    Memory,
    Cpu,
    Location,
    Conn,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Status => "status",
            Reason::Label => "label",
            Reason::Memory => "memory",
            Reason::Cpu => "cpu",
            Reason::Location => "location",
            Reason::Conn => "conn",
        }
    }
}

/// Decides whether sessions should move from `from` to `to`, why and how fast (per second).
fn decide(
    cfg: &BalanceConfig,
    from: &Rank,
    from_info: &BackendInfo,
    to: &Rank,
) -> Option<(Reason, f64)> {
    if from.sessions == 0 {
        return None;
    }
    if from.label > to.label {
        return Some((Reason::Label, 1.0));
    }
    if from.label < to.label {
        return None;
    }
    if from.status > to.status {
        let _ = from_info;
        return Some((Reason::Status, 0.0)); // rate set by the caller from the drain window
    }
    if from.status < to.status {
        return None;
    }
    if from.memory > to.memory + 1 {
        return Some((Reason::Memory, from.sessions as f64 / 60.0));
    }
    if from.memory < to.memory {
        return None;
    }
    // Move for CPU only on a clear gap (20 points) with the source busy, so load noise does not
    // shuffle sessions back and forth.
    if from.cpu >= to.cpu + 4 && from.cpu >= 10 {
        return Some((Reason::Cpu, (from.sessions as f64 / 120.0).max(0.5)));
    }
    if from.cpu + 4 <= to.cpu {
        return None;
    }
    if from.location > to.location {
        return Some((Reason::Location, 1.0));
    }
    if from.location < to.location {
        return None;
    }
    let (f, t) = (from.sessions as f64, to.sessions as f64);
    if f > (t + 1.0) * cfg.conn_ratio {
        let rate = if cfg.conn_migrations_per_second > 0.0 {
            cfg.conn_migrations_per_second
        } else {
            // The reference's formula: close the gap over about two minutes.
            (((f + t + 1.0) / (1.0 + cfg.conn_ratio)) - (t + 1.0)) / 120.0
        };
        return Some((Reason::Conn, rate.max(0.001)));
    }
    None
}

/// Migration budget per source backend: the first migration of an episode goes at once, then
/// the factor's rate applies.
#[derive(Debug)]
struct Budget {
    credit: f64,
    last: Instant,
    reason: Reason,
    /// Sessions on the backend when a status episode began (sets the drain rate).
    initial_sessions: usize,
}

/// Runs the rebalancing loop until `stop` turns true.
pub async fn run_balancer(
    registry: Arc<Registry>,
    cfg: BalanceConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut budgets: HashMap<String, Budget> = HashMap::new();
    let mut ticker = tokio::time::interval(cfg.tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => rebalance_once(&registry, &cfg, &mut budgets, Instant::now()),
            _ = stop.changed() => if *stop.borrow() { return },
        }
    }
}

fn rebalance_once(
    registry: &Registry,
    cfg: &BalanceConfig,
    budgets: &mut HashMap<String, Budget>,
    now: Instant,
) {
    registry.prune();
    let m = crate::metrics::get();
    let backends: Vec<(Arc<Backend>, BackendInfo, Rank)> = registry
        .backends()
        .into_iter()
        .map(|b| {
            let info = b.info();
            let r = rank(cfg, &info, b.sessions());
            m.backend_status
                .with_label_values(&[b.addr.as_str()])
                .set(i64::from(info.routable()));
            m.backend_sessions
                .with_label_values(&[b.addr.as_str()])
                .set(r.sessions as i64);
            (b, info, r)
        })
        .collect();
    let targets: Vec<usize> = (0..backends.len())
        .filter(|&i| {
            let (_, info, r) = &backends[i];
            // Only a backend a probe has seen healthy receives moved sessions.
            info.routable()
                && info.health == Health::Healthy
                && info.supports_migration
                && r.label == 0
        })
        .collect();
    let Some(&best) = targets.iter().min_by_key(|&&i| backends[i].2) else {
        budgets.clear();
        return;
    };
    // Sessions assigned in this tick count against their target right away.
    let mut incoming = vec![0usize; backends.len()];
    for (i, (from, from_info, from_rank)) in backends.iter().enumerate() {
        if i == best || !from_info.supports_migration {
            budgets.remove(&from.addr);
            continue;
        }
        let Some((reason, rate)) = decide(cfg, from_rank, from_info, &backends[best].2) else {
            budgets.remove(&from.addr);
            continue;
        };
        let budget = budgets.entry(from.addr.clone()).or_insert(Budget {
            credit: 1.0,
            last: now,
            reason,
            initial_sessions: from_rank.sessions,
        });
        if budget.reason != reason {
            *budget = Budget {
                credit: 1.0,
                last: now,
                reason,
                initial_sessions: from_rank.sessions,
            };
        }
        let rate = if reason == Reason::Status {
            // A small backend empties well within the window; a big one at an even pace.
            (budget.initial_sessions as f64 / cfg.status_drain_seconds).max(100.0)
        } else {
            rate
        };
        let dt = now.saturating_duration_since(budget.last).as_secs_f64();
        budget.last = now;
        budget.credit = (budget.credit + rate * dt).min(rate.max(1.0));
        if budget.credit < 1.0 {
            continue;
        }
        let mut moved = 0usize;
        for entry in from.session_entries() {
            if budget.credit < 1.0 {
                break;
            }
            if entry.is_pending() {
                continue;
            }
            // Status evictions spread over every good target; other factors move sessions to
            // the best backend only.
            let target_idx = if reason == Reason::Status {
                *targets
                    .iter()
                    .filter(|&&t| t != i)
                    .min_by_key(|&&t| {
                        let r = backends[t].2;
                        Rank {
                            sessions: r.sessions + incoming[t],
                            ..r
                        }
                    })
                    .unwrap_or(&best)
            } else {
                best
            };
            if target_idx == i {
                break;
            }
            let target = &backends[target_idx].0;
            if registry.request_migration(
                &entry,
                target,
                reason.as_str(),
                cfg.retry_after.as_millis() as u64,
            ) {
                budget.credit -= 1.0;
                incoming[target_idx] += 1;
                moved += 1;
                crate::metrics::get()
                    .migrate_requested
                    .with_label_values(&[from.addr.as_str(), target.addr.as_str(), reason.as_str()])
                    .inc();
            }
        }
        if moved > 0 {
            tracing::debug!(from = %from.addr, sessions = moved, reason = reason.as_str(), "requested migrations");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::registry::{BackendSpec, Control, Source};

    fn registry(addrs: &[&str]) -> Arc<Registry> {
        let r = Registry::new();
        let specs: Vec<_> = addrs.iter().map(|a| BackendSpec::new(*a)).collect();
        r.apply(Source::Static, &specs);
        for b in r.backends() {
            b.update_info(|i| i.health = Health::Healthy);
        }
        r
    }

    #[test]
    fn routes_to_least_loaded_healthy() {
        let r = registry(&["a:1", "b:1"]);
        let cfg = BalanceConfig::default();
        let a = r.find("a:1").unwrap();
        let _l = r.register(a.clone());
        assert_eq!(route(&r, &cfg, &[]).unwrap().addr, "b:1");
        r.find("b:1")
            .unwrap()
            .update_info(|i| i.health = Health::Draining("shutdown".into()));
        assert_eq!(route(&r, &cfg, &[]).unwrap().addr, "a:1");
        assert!(route(&r, &cfg, &[a]).is_none());
    }

    #[test]
    fn scale_out_moves_one_session_at_once() {
        let r = registry(&["a:1"]);
        let cfg = BalanceConfig::default();
        let a = r.find("a:1").unwrap();
        let (_l1, mut rx1) = r.register(a.clone());
        let (_l2, mut rx2) = r.register(a.clone());
        r.apply(
            Source::Static,
            &[BackendSpec::new("a:1"), BackendSpec::new("b:1")],
        );
        r.find("b:1")
            .unwrap()
            .update_info(|i| i.health = Health::Healthy);
        let mut budgets = HashMap::new();
        let now = Instant::now();
        rebalance_once(&r, &cfg, &mut budgets, now);
        rebalance_once(&r, &cfg, &mut budgets, now + Duration::from_millis(20));
        let moved = [rx1.try_recv().is_ok(), rx2.try_recv().is_ok()];
        assert_eq!(moved.iter().filter(|m| **m).count(), 1, "{moved:?}");
    }

    #[test]
    fn draining_backend_empties_within_the_window() {
        let r = registry(&["a:1", "b:1", "c:1"]);
        let cfg = BalanceConfig::default();
        let a = r.find("a:1").unwrap();
        let mut sessions: Vec<_> = (0..1000).map(|_| r.register(a.clone())).collect();
        a.update_info(|i| i.health = Health::Draining("shutdown".into()));
        let mut budgets = HashMap::new();
        let start = Instant::now();
        let mut per_target: HashMap<String, usize> = HashMap::new();
        for tick in 0..=250 {
            rebalance_once(
                &r,
                &cfg,
                &mut budgets,
                start + Duration::from_millis(20 * tick),
            );
            for (lease, rx) in sessions.iter_mut() {
                if let Ok(Control::Migrate { target, .. }) = rx.try_recv() {
                    *per_target.entry(target.addr.clone()).or_default() += 1;
                    lease.move_to(target);
                }
            }
        }
        assert_eq!(a.sessions(), 0, "all sessions asked to leave within 5 s");
        let b = per_target["b:1"];
        let c = per_target["c:1"];
        assert!(b.abs_diff(c) <= 1, "spread evenly: {b} vs {c}");
    }

    #[test]
    fn balanced_backends_stay_put() {
        let r = registry(&["a:1", "b:1"]);
        let cfg = BalanceConfig::default();
        let (a, b) = (r.find("a:1").unwrap(), r.find("b:1").unwrap());
        let mut rxs = Vec::new();
        for _ in 0..5 {
            rxs.push(r.register(a.clone()));
            rxs.push(r.register(b.clone()));
        }
        let mut budgets = HashMap::new();
        rebalance_once(&r, &cfg, &mut budgets, Instant::now());
        assert!(rxs.iter_mut().all(|(_, rx)| rx.try_recv().is_err()));
    }

    #[test]
    fn factor_priority() {
        let cfg = BalanceConfig::default();
        let base = Rank {
            label: 0,
            status: 0,
            memory: 0,
            cpu: 0,
            location: 0,
            sessions: 10,
        };
        let info = BackendInfo {
            status_addr: None,
            labels: Default::default(),
            sources: Default::default(),
            health: Health::Healthy,
            supports_migration: true,
            server_version: None,
            cpu: None,
            memory: None,
        };
        // A high-memory backend loses sessions even to a busier one...
        let hot = Rank { memory: 2, ..base };
        let busier = Rank {
            sessions: 20,
            ..base
        };
        assert_eq!(
            decide(&cfg, &hot, &info, &busier).map(|d| d.0),
            Some(Reason::Memory)
        );
        // ...but a memory gap of one level is tolerated.
        let warm = Rank { memory: 1, ..base };
        assert_eq!(decide(&cfg, &warm, &info, &busier), None);
        // CPU needs a clear gap on a busy source.
        let busy_cpu = Rank { cpu: 16, ..base };
        let idle = Rank { cpu: 2, ..base };
        assert_eq!(
            decide(&cfg, &busy_cpu, &info, &idle).map(|d| d.0),
            Some(Reason::Cpu)
        );
        assert_eq!(
            decide(
                &cfg,
                &Rank { cpu: 5, ..base },
                &info,
                &Rank { cpu: 3, ..base }
            ),
            None
        );
        // A worse higher-priority factor on the target vetoes lower ones.
        assert_eq!(
            decide(
                &cfg,
                &Rank {
                    sessions: 100,
                    ..base
                },
                &info,
                &Rank {
                    memory: 2,
                    sessions: 0,
                    ..base
                }
            ),
            None
        );
    }
}

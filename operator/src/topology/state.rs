//! The backend set of one TiProxy, computed from its TiDB pods (pure; no I/O).
//!
//! | TiDB pod                                              | backend  |
//! |-------------------------------------------------------|----------|
//! | podIP, Ready=True, no deletionTimestamp               | Active   |
//! | podIP, deletionTimestamp set                          | Draining |
//! | podIP, not Ready, seen Active by this tracker before  | Draining |
//! | not Ready and never seen Active (starting)            | omitted  |
//! | no podIP, or phase Succeeded/Failed (not running)     | omitted  |
//! | deleted                                               | omitted  |
//!
//! An omitted backend disappears from the pushed set; the proxy keeps a backend that leaves the
//! set draining until its last session has gone, so "omitted" after "Active" never cuts a
//! session off.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;

use crate::api::{BackendState, BackendStatus};

/// The pod label pushed as the backend's `zone` label.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// One backend of the pushed set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// TiDB pod name.
    pub pod: String,
    /// `podIP:sqlPort`.
    pub addr: String,
    /// `podIP:statusPort`.
    pub status_addr: String,
    pub state: BackendState,
    pub labels: BTreeMap<String, String>,
}

/// What the proxy receives for one backend (`proxy/src/backend/registry.rs` `BackendSpec`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BackendSpec {
    pub addr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_addr: Option<String>,
    pub state: PushState,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Routing state as the proxy spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PushState {
    Active,
    Draining,
}

/// The body of `PUT /api/v1/backends`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub generation: u64,
    pub backends: Vec<BackendSpec>,
}

impl Backend {
    pub fn spec(&self) -> BackendSpec {
        BackendSpec {
            addr: self.addr.clone(),
            status_addr: Some(self.status_addr.clone()),
            state: match self.state {
                BackendState::Active => PushState::Active,
                BackendState::Draining => PushState::Draining,
            },
            labels: self.labels.clone(),
        }
    }

    pub fn status(&self) -> BackendStatus {
        BackendStatus {
            pod: self.pod.clone(),
            address: self.addr.clone(),
            state: self.state,
        }
    }
}

/// The backend set pushed at `generation`.
pub fn snapshot(generation: u64, backends: &[Backend]) -> Snapshot {
    Snapshot {
        generation,
        backends: backends.iter().map(Backend::spec).collect(),
    }
}

/// Ports of the TiDB pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ports {
    pub sql: u16,
    pub status: u16,
}

/// Computes backend sets, remembering which pods (by UID) it has seen Active.
#[derive(Debug, Default, Clone)]
pub struct Tracker {
    seen_active: HashSet<String>,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The backend set of `pods` (every TiDB pod currently known), sorted by pod name. Forgets
    /// the pods that are no longer listed.
    pub fn compute<'a>(
        &mut self,
        pods: impl IntoIterator<Item = &'a Pod>,
        ports: Ports,
    ) -> Vec<Backend> {
        let mut present = HashSet::new();
        let mut out: Vec<Backend> = Vec::new();
        for pod in pods {
            let uid = pod_uid(pod);
            present.insert(uid.clone());
            let Some(ip) = pod_ip(pod) else { continue };
            if is_terminal(pod) {
                continue;
            }
            let deleting = pod.metadata.deletion_timestamp.is_some();
            let ready = is_ready(pod);
            let state = if deleting {
                BackendState::Draining
            } else if ready {
                self.seen_active.insert(uid);
                BackendState::Active
            } else if self.seen_active.contains(&uid) {
                BackendState::Draining
            } else {
                continue;
            };
            let labels = pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(ZONE_LABEL))
                .map(|z| BTreeMap::from([("zone".to_string(), z.clone())]))
                .unwrap_or_default();
            out.push(Backend {
                pod: pod.metadata.name.clone().unwrap_or_default(),
                addr: join_host_port(ip, ports.sql),
                status_addr: join_host_port(ip, ports.status),
                state,
                labels,
            });
        }
        self.seen_active.retain(|uid| present.contains(uid));
        out.sort_by(|a, b| a.pod.cmp(&b.pod));
        // Two pod objects can briefly share an IP (a terminated pod's IP reused): keep one
        // entry per address, the Active one if any.
        let mut by_addr: BTreeMap<String, usize> = BTreeMap::new();
        let mut keep = vec![true; out.len()];
        for (i, b) in out.iter().enumerate() {
            match by_addr.get(&b.addr) {
                None => {
                    by_addr.insert(b.addr.clone(), i);
                }
                Some(&j) => {
                    if out[j].state == BackendState::Draining && b.state == BackendState::Active {
                        keep[j] = false;
                        by_addr.insert(b.addr.clone(), i);
                    } else {
                        keep[i] = false;
                    }
                }
            }
        }
        let mut keep = keep.into_iter();
        out.retain(|_| keep.next().unwrap_or(true));
        out
    }
}

/// `host:port`, bracketing IPv6 hosts.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

pub(crate) fn pod_uid(pod: &Pod) -> String {
    pod.metadata
        .uid
        .clone()
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default()
}

pub(crate) fn pod_ip(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|ip| !ip.is_empty())
}

pub(crate) fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The pod's `Ready` condition is `True`.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Generations of pushed sets: strictly rising, and above wall-clock milliseconds so that a
/// restarted operator (which has forgotten its last generation) still goes above it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Generation(Option<u64>);

impl Generation {
    /// Continues after `previous` (e.g. the generation of a task this one replaces).
    pub fn starting_after(previous: Option<u64>) -> Self {
        Self(previous)
    }

    pub fn current(&self) -> Option<u64> {
        self.0
    }

    /// A new generation: `max(previous + 1, now_ms)`.
    pub fn bump(&mut self, now_ms: u64) -> u64 {
        let next = match self.0 {
            Some(p) => p.saturating_add(1).max(now_ms),
            None => now_ms,
        };
        self.0 = Some(next);
        next
    }

    /// A proxy holds `theirs`, newer than ours: continue above it. Returns the new generation.
    pub fn bump_above(&mut self, theirs: u64, now_ms: u64) -> u64 {
        let floor = theirs.saturating_add(1);
        let next = self.bump(now_ms).max(floor);
        self.0 = Some(next);
        next
    }
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    pub(crate) fn pod(name: &str, uid: &str, ip: Option<&str>, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: Some(uid.into()),
                ..Default::default()
            },
            spec: None,
            status: Some(PodStatus {
                pod_ip: ip.map(Into::into),
                phase: Some("Running".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    pub(crate) fn deleting(mut p: Pod) -> Pod {
        p.metadata.deletion_timestamp = Some(Time(Default::default()));
        p
    }

    const PORTS: Ports = Ports {
        sql: 4000,
        status: 10080,
    };

    fn states(bs: &[Backend]) -> Vec<(&str, &str, BackendState)> {
        bs.iter()
            .map(|b| (b.pod.as_str(), b.addr.as_str(), b.state))
            .collect()
    }

    use BackendState::{Active, Draining};

    #[test]
    fn ready_pod_is_active_with_ports_and_zone() {
        let mut p = pod("tidb-0", "u0", Some("10.0.0.1"), true);
        p.metadata.labels = Some(BTreeMap::from([(
            ZONE_LABEL.to_string(),
            "az1".to_string(),
        )]));
        let mut t = Tracker::new();
        let bs = t.compute([&p], PORTS);
        assert_eq!(
            bs,
            vec![Backend {
                pod: "tidb-0".into(),
                addr: "10.0.0.1:4000".into(),
                status_addr: "10.0.0.1:10080".into(),
                state: Active,
                labels: BTreeMap::from([("zone".into(), "az1".into())]),
            }]
        );
        let json = serde_json::to_value(snapshot(7, &bs)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"generation": 7, "backends": [{
                "addr": "10.0.0.1:4000", "status-addr": "10.0.0.1:10080",
                "state": "active", "labels": {"zone": "az1"}}]})
        );
    }

    #[test]
    fn never_ready_pod_is_pending_then_active() {
        let mut t = Tracker::new();
        let starting = pod("tidb-1", "u1", Some("10.0.0.2"), false);
        assert!(t.compute([&starting], PORTS).is_empty());
        let no_ip = pod("tidb-1", "u1", None, true);
        assert!(t.compute([&no_ip], PORTS).is_empty());
        let ready = pod("tidb-1", "u1", Some("10.0.0.2"), true);
        assert_eq!(
            states(&t.compute([&ready], PORTS)),
            [("tidb-1", "10.0.0.2:4000", Active)]
        );
    }

    #[test]
    fn not_ready_after_active_is_draining_and_recovers() {
        let mut t = Tracker::new();
        t.compute([&pod("tidb-0", "u0", Some("10.0.0.1"), true)], PORTS);
        let unready = pod("tidb-0", "u0", Some("10.0.0.1"), false);
        assert_eq!(
            states(&t.compute([&unready], PORTS)),
            [("tidb-0", "10.0.0.1:4000", Draining)]
        );
        let ready = pod("tidb-0", "u0", Some("10.0.0.1"), true);
        assert_eq!(
            states(&t.compute([&ready], PORTS)),
            [("tidb-0", "10.0.0.1:4000", Active)]
        );
    }

    #[test]
    fn deleting_pod_is_draining_even_when_ready_or_never_active() {
        let mut t = Tracker::new();
        let a = deleting(pod("tidb-0", "u0", Some("10.0.0.1"), true));
        let b = deleting(pod("tidb-1", "u1", Some("10.0.0.2"), false));
        let c = deleting(pod("tidb-2", "u2", None, false));
        assert_eq!(
            states(&t.compute([&c, &b, &a], PORTS)),
            [
                ("tidb-0", "10.0.0.1:4000", Draining),
                ("tidb-1", "10.0.0.2:4000", Draining)
            ]
        );
    }

    #[test]
    fn deleted_pod_is_removed_and_forgotten() {
        let mut t = Tracker::new();
        let p = pod("tidb-0", "u0", Some("10.0.0.1"), true);
        t.compute([&p], PORTS);
        assert!(t.compute([], PORTS).is_empty());
        // Forgotten: the same UID coming back not Ready is pending, not Draining.
        let unready = pod("tidb-0", "u0", Some("10.0.0.1"), false);
        assert!(t.compute([&unready], PORTS).is_empty());
    }

    #[test]
    fn recreated_pod_with_new_ip_starts_pending() {
        // A StatefulSet pod replaced: same name, new UID and IP.
        let mut t = Tracker::new();
        t.compute([&pod("tidb-0", "old", Some("10.0.0.1"), true)], PORTS);
        let going = deleting(pod("tidb-0", "old", Some("10.0.0.1"), false));
        assert_eq!(
            states(&t.compute([&going], PORTS)),
            [("tidb-0", "10.0.0.1:4000", Draining)]
        );
        let new = pod("tidb-0", "new", Some("10.0.0.9"), false);
        assert!(t.compute([&new], PORTS).is_empty());
        let new = pod("tidb-0", "new", Some("10.0.0.9"), true);
        assert_eq!(
            states(&t.compute([&new], PORTS)),
            [("tidb-0", "10.0.0.9:4000", Active)]
        );
    }

    #[test]
    fn terminal_pods_are_omitted_and_shared_ips_keep_the_active_one() {
        let mut t = Tracker::new();
        let mut failed = pod("tidb-a", "ua", Some("10.0.0.1"), false);
        failed.status.as_mut().unwrap().phase = Some("Failed".into());
        let old = deleting(pod("tidb-b", "ub", Some("10.0.0.2"), false));
        let new = pod("tidb-c", "uc", Some("10.0.0.2"), true);
        assert_eq!(
            states(&t.compute([&failed, &old, &new], PORTS)),
            [("tidb-c", "10.0.0.2:4000", Active)]
        );
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        let mut t = Tracker::new();
        let bs = t.compute([&pod("tidb-0", "u0", Some("fd00::1"), true)], PORTS);
        assert_eq!(bs[0].addr, "[fd00::1]:4000");
        assert_eq!(bs[0].status_addr, "[fd00::1]:10080");
    }

    #[test]
    fn generations_rise_and_follow_the_clock() {
        let mut g = Generation::default();
        assert_eq!(g.current(), None);
        assert_eq!(g.bump(1000), 1000);
        // A clock that stands still or goes back still gives a higher generation.
        assert_eq!(g.bump(1000), 1001);
        assert_eq!(g.bump(10), 1002);
        assert_eq!(g.bump(5000), 5000);
        // A restarted operator continues from the clock; a replaced task from its predecessor.
        assert_eq!(Generation::starting_after(Some(9000)).bump(5000), 9001);
        // A proxy with a newer generation (another replica's clock): jump above it.
        let mut g = Generation::starting_after(Some(5000));
        assert_eq!(g.bump_above(7000, 5001), 7001);
        assert_eq!(g.bump_above(10, 5002), 7002);
        assert_eq!(g.bump_above(u64::MAX, 0), u64::MAX);
        assert!(unix_ms() > 1_600_000_000_000);
    }
}

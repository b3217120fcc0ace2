//! The TiProxy status, computed from what the reconciler observed: the Deployment's status and
//! the topology report. Pure, so every condition rule is unit-tested.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::api::{BackendState, TiProxy, TiProxyStatus};
use crate::names;
use crate::topology::TopologyReport;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const BACKENDS_SYNCED: &str = "BackendsSynced";
pub const DEGRADED: &str = "Degraded";

/// Most entries `status.backends` and `status.proxies` may hold (the CRD's `maxItems`).
const MAX_LISTED: usize = 256;

/// What the reconciler saw this round.
#[derive(Debug, Default)]
pub struct Observed<'a> {
    pub deployment: Option<&'a Deployment>,
    /// The topology report (selector mode only; `None` until its watches have synced).
    pub report: Option<&'a TopologyReport>,
    /// Why the objects could not be rendered (e.g. a bad `spec.config`); nothing was applied.
    pub render_error: Option<String>,
}

/// One condition as computed this round.
struct Verdict {
    type_: &'static str,
    status: bool,
    reason: String,
    message: String,
}

/// The status to write for `tp`.
pub fn compute(tp: &TiProxy, observed: &Observed<'_>, now: Time) -> TiProxyStatus {
    let old = tp.status.clone().unwrap_or_default();
    let generation = tp.metadata.generation;
    let desired = tp.spec.replicas;
    let dep_status = observed
        .deployment
        .and_then(|d| d.status.clone())
        .unwrap_or_default();
    let dep_current = observed.deployment.is_some_and(|d| {
        d.status
            .as_ref()
            .and_then(|s| s.observed_generation)
            .is_some_and(|g| Some(g) >= d.metadata.generation)
    });
    let replicas = dep_status.replicas.unwrap_or(0);
    let ready = dep_status.ready_replicas.unwrap_or(0);
    let updated = dep_status.updated_replicas.unwrap_or(0);
    let available = dep_status.available_replicas.unwrap_or(0);
    let pd_mode = tp.spec.backends.pd_addrs.is_some();

    let mut status = TiProxyStatus {
        observed_generation: generation,
        replicas,
        ready_replicas: ready,
        updated_replicas: updated,
        selector: Some(names::selector_string(&tp.name_any())),
        conditions: Vec::new(),
        active_backends: None,
        backend_generation: old.backend_generation,
        backends: old.backends.clone(),
        proxies: old.proxies.clone(),
    };
    if let Some(report) = observed.report {
        status.backend_generation = report.generation;
        status.backends = report.backends.clone();
        status.proxies = report.proxies.clone();
        // The CRD bounds both lists; the counts and conditions still cover every entry.
        status.backends.truncate(MAX_LISTED);
        status.proxies.truncate(MAX_LISTED);
    }
    if pd_mode {
        status.backend_generation = None;
        status.backends.clear();
        status.proxies.clear();
    } else {
        let known = observed
            .report
            .map_or(old.backends.as_slice(), |r| r.backends.as_slice());
        status.active_backends = Some(
            known
                .iter()
                .filter(|b| b.state == BackendState::Active)
                .count() as i32,
        );
    }
    let active = status.active_backends.unwrap_or(0);

    let rolled_out =
        dep_current && updated >= desired && replicas == updated && available >= desired;
    let progressing = match &observed.render_error {
        Some(_) => Verdict {
            type_: PROGRESSING,
            status: false,
            reason: "InvalidSpec".into(),
            message: "the spec cannot be rendered; nothing was changed".into(),
        },
        None if rolled_out => Verdict {
            type_: PROGRESSING,
            status: false,
            reason: "RolloutComplete".into(),
            message: format!("{updated} of {desired} proxies run the current template"),
        },
        None => Verdict {
            type_: PROGRESSING,
            status: true,
            reason: "RollingOut".into(),
            message: format!(
                "{updated} of {desired} proxies updated, {available} available, {replicas} in total"
            ),
        },
    };

    let synced = if pd_mode {
        Verdict {
            type_: BACKENDS_SYNCED,
            status: true,
            reason: "DiscoveredFromPD".into(),
            message: "proxies discover TiDB servers through PD".into(),
        }
    } else {
        backends_synced(observed.report)
    };

    let ready_verdict = if ready < desired.max(1) || desired == 0 {
        Verdict {
            type_: READY,
            status: false,
            reason: "ProxiesNotReady".into(),
            message: format!("{ready} of {desired} proxies ready"),
        }
    } else if !pd_mode && active == 0 {
        Verdict {
            type_: READY,
            status: false,
            reason: "NoActiveBackends".into(),
            message: "no TiDB pod matching the selector is ready".into(),
        }
    } else {
        Verdict {
            type_: READY,
            status: true,
            reason: "Available".into(),
            message: if pd_mode {
                format!("{ready} proxies ready")
            } else {
                format!("{ready} proxies ready, {active} active TiDB backends")
            },
        }
    };

    let degraded = degraded(observed);

    for verdict in [ready_verdict, progressing, synced, degraded] {
        status
            .conditions
            .push(condition(&old.conditions, verdict, generation, &now));
    }
    status
}

fn backends_synced(report: Option<&TopologyReport>) -> Verdict {
    let Some(report) = report else {
        return Verdict {
            type_: BACKENDS_SYNCED,
            status: false,
            reason: "Watching".into(),
            message: "waiting for the first view of the TiDB and proxy pods".into(),
        };
    };
    let Some(generation) = report.generation else {
        return Verdict {
            type_: BACKENDS_SYNCED,
            status: false,
            reason: "Watching".into(),
            message: "no backend set computed yet".into(),
        };
    };
    let behind: Vec<String> = report
        .proxies
        .iter()
        .filter(|p| p.acked_generation != Some(generation))
        .map(|p| match &p.error {
            Some(e) => format!("{} ({e})", p.pod),
            None => p.pod.clone(),
        })
        .collect();
    if behind.is_empty() {
        Verdict {
            type_: BACKENDS_SYNCED,
            status: true,
            reason: "Pushed".into(),
            message: format!(
                "{} proxies have backend generation {generation}",
                report.proxies.len()
            ),
        }
    } else {
        Verdict {
            type_: BACKENDS_SYNCED,
            status: false,
            reason: "PushPending".into(),
            message: format!(
                "not yet at generation {generation}: {}",
                truncate(&behind.join(", "))
            ),
        }
    }
}

fn degraded(observed: &Observed<'_>) -> Verdict {
    if let Some(error) = &observed.render_error {
        return Verdict {
            type_: DEGRADED,
            status: true,
            reason: "InvalidConfig".into(),
            message: truncate(error),
        };
    }
    let problems = observed
        .report
        .map(|r| r.problems.as_slice())
        .unwrap_or(&[]);
    match problems.first() {
        None => Verdict {
            type_: DEGRADED,
            status: false,
            reason: "RequirementsMet".into(),
            message: "no problem found with the TiDB pods".into(),
        },
        Some(first) => Verdict {
            type_: DEGRADED,
            status: true,
            reason: first.reason.clone(),
            message: truncate(
                &problems
                    .iter()
                    .map(|p| p.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        },
    }
}

/// Condition messages are limited to 32 KiB by the API; keep them readable well below that.
fn truncate(message: &str) -> String {
    const MAX: usize = 1024;
    if message.len() <= MAX {
        return message.to_string();
    }
    let mut end = MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

/// The condition for `verdict`, keeping the old transition time when the status is unchanged.
fn condition(
    old: &[Condition],
    verdict: Verdict,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if verdict.status { "True" } else { "False" };
    let last_transition_time = old
        .iter()
        .find(|c| c.type_ == verdict.type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: verdict.type_.to_string(),
        status: status.to_string(),
        reason: verdict.reason,
        message: verdict.message,
        observed_generation: generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::api::{BackendStatus, BackendsSpec, ProxyStatus, TiProxySpec};
    use crate::topology::Problem;

    fn tiproxy(pd: bool) -> TiProxy {
        let backends = if pd {
            BackendsSpec {
                pd_addrs: Some(vec!["pd:2379".into()]),
                ..Default::default()
            }
        } else {
            BackendsSpec {
                tidb_selector: Some(Default::default()),
                ..Default::default()
            }
        };
        let spec: TiProxySpec =
            serde_json::from_value(serde_json::json!({ "backends": backends })).expect("spec");
        let mut tp = TiProxy::new("main", spec);
        tp.metadata.namespace = Some("db".into());
        tp.metadata.generation = Some(3);
        tp
    }

    fn deployment(replicas: i32, ready: i32, updated: i32, current: bool) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                generation: Some(5),
                ..Default::default()
            },
            status: Some(DeploymentStatus {
                observed_generation: Some(if current { 5 } else { 4 }),
                replicas: Some(replicas),
                ready_replicas: Some(ready),
                available_replicas: Some(ready),
                updated_replicas: Some(updated),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn report(acked: [Option<u64>; 2], problems: Vec<Problem>) -> TopologyReport {
        TopologyReport {
            generation: Some(7),
            backends: vec![
                BackendStatus {
                    pod: "tidb-0".into(),
                    address: "10.0.0.1:4000".into(),
                    state: BackendState::Active,
                },
                BackendStatus {
                    pod: "tidb-1".into(),
                    address: "10.0.0.2:4000".into(),
                    state: BackendState::Draining,
                },
            ],
            proxies: acked
                .iter()
                .enumerate()
                .map(|(i, a)| ProxyStatus {
                    pod: format!("main-{i}"),
                    acked_generation: *a,
                    error: a.is_none().then(|| "connection refused".to_string()),
                })
                .collect(),
            problems,
        }
    }

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).expect("time"))
    }

    /// What the reconciler observed: the Deployment and, in selector mode, a topology report.
    fn observed<'a>(d: &'a Deployment, r: Option<&'a TopologyReport>) -> Observed<'a> {
        Observed {
            deployment: Some(d),
            report: r,
            render_error: None,
        }
    }

    fn cond<'a>(s: &'a TiProxyStatus, t: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .unwrap_or_else(|| panic!("no {t} condition"))
    }

    #[test]
    fn healthy_selector_mode() {
        let tp = tiproxy(false);
        let d = deployment(2, 2, 2, true);
        let r = report([Some(7), Some(7)], vec![]);
        let s = compute(&tp, &observed(&d, Some(&r)), now());
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(
            (s.replicas, s.ready_replicas, s.updated_replicas),
            (2, 2, 2)
        );
        assert_eq!(
            s.selector.as_deref(),
            Some("app.kubernetes.io/instance=main,app.kubernetes.io/name=tiproxy")
        );
        assert_eq!(s.active_backends, Some(1));
        assert_eq!(s.backend_generation, Some(7));
        assert_eq!(s.backends.len(), 2);
        for (t, status, reason) in [
            (READY, "True", "Available"),
            (PROGRESSING, "False", "RolloutComplete"),
            (BACKENDS_SYNCED, "True", "Pushed"),
            (DEGRADED, "False", "RequirementsMet"),
        ] {
            let c = cond(&s, t);
            assert_eq!(
                (c.status.as_str(), c.reason.as_str()),
                (status, reason),
                "{t}"
            );
            assert_eq!(c.observed_generation, Some(3));
        }
    }

    #[test]
    fn rollout_push_pending_and_problems() {
        let tp = tiproxy(false);
        let d = deployment(3, 1, 1, true);
        let r = report(
            [Some(7), None],
            vec![
                Problem {
                    reason: "NoSessionTokenCert".into(),
                    message: "tidb-0 has no signing cert".into(),
                },
                Problem {
                    reason: "MigrationWindowTooShort".into(),
                    message: "tidb-1 window 0s".into(),
                },
            ],
        );
        let s = compute(&tp, &observed(&d, Some(&r)), now());
        assert_eq!(cond(&s, READY).reason, "ProxiesNotReady");
        assert_eq!(cond(&s, PROGRESSING).status, "True");
        let synced = cond(&s, BACKENDS_SYNCED);
        assert_eq!(
            (synced.status.as_str(), synced.reason.as_str()),
            ("False", "PushPending")
        );
        assert!(
            synced.message.contains("main-1 (connection refused)"),
            "{}",
            synced.message
        );
        assert!(!synced.message.contains("main-0"));
        let degraded = cond(&s, DEGRADED);
        assert_eq!(degraded.status, "True");
        assert_eq!(degraded.reason, "NoSessionTokenCert");
        assert!(degraded.message.contains("tidb-0") && degraded.message.contains("tidb-1"));
    }

    #[test]
    fn stale_deployment_status_is_progressing() {
        let tp = tiproxy(false);
        let d = deployment(2, 2, 2, false);
        let s = compute(&tp, &observed(&d, None), now());
        assert_eq!(cond(&s, PROGRESSING).reason, "RollingOut");
        assert_eq!(cond(&s, BACKENDS_SYNCED).reason, "Watching");
        assert_eq!(cond(&s, READY).reason, "NoActiveBackends");
    }

    #[test]
    fn pd_mode_needs_no_pushes() {
        let tp = tiproxy(true);
        let d = deployment(2, 2, 2, true);
        let s = compute(&tp, &observed(&d, None), now());
        assert_eq!(cond(&s, READY).status, "True");
        assert_eq!(cond(&s, BACKENDS_SYNCED).reason, "DiscoveredFromPD");
        assert!(s.active_backends.is_none() && s.backends.is_empty());
    }

    #[test]
    fn render_error_is_degraded_and_not_progressing() {
        let tp = tiproxy(false);
        let s = compute(
            &tp,
            &Observed {
                render_error: Some("spec.config sets `api`".into()),
                ..Default::default()
            },
            now(),
        );
        let d = cond(&s, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "InvalidConfig")
        );
        assert!(d.message.contains("spec.config"));
        assert_eq!(cond(&s, PROGRESSING).reason, "InvalidSpec");
    }

    #[test]
    fn transition_time_kept_while_status_unchanged() {
        let mut tp = tiproxy(false);
        let first = compute(&tp, &Observed::default(), now());
        tp.status = Some(first.clone());
        let later = Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_100).expect("time"));
        let second = compute(&tp, &Observed::default(), later.clone());
        assert_eq!(first, second, "nothing changed: identical status, no write");
        let d = deployment(2, 2, 2, true);
        let r = report([Some(7), Some(7)], vec![]);
        let third = compute(&tp, &observed(&d, Some(&r)), later.clone());
        assert_eq!(cond(&third, READY).last_transition_time, later);
        assert_eq!(
            cond(&third, DEGRADED).last_transition_time,
            now(),
            "Degraded stayed False"
        );
    }
}

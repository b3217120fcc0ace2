//! Topology + push: keeps every selector-mode `TiProxy`'s proxies told which TiDB pods to
//! route to, beside (not inside) the reconcile loop.
//!
//! * [`Topology::run`] watches `TiProxy` objects and keeps one task per TiProxy whose
//!   `spec.backends.tidbSelector` is set, restarted when what it watches changes (TiDB
//!   namespace, selector, ports, session-token Secret) and stopped when the TiProxy is deleted
//!   or switches to `pdAddrs`.
//! * Each task ([`task`]) watches the TiDB pods and the TiProxy's proxy pods, computes the
//!   backend set ([`state`]: Ready → active, terminating / no longer Ready → draining), and
//!   pushes the whole set with a rising generation to every proxy pod ([`push`]), retrying with
//!   backoff and re-checking every `resync`. It also reads each TiDB's `/config` and reports
//!   what would stop sessions from moving ([`requirements`]).
//! * The reconciler reads [`Topology::report`] for the TiProxy's status, and
//!   [`Topology::take_changes`] tells it when a report changed.

pub mod http;
pub mod push;
pub mod requirements;
pub mod selector;
pub mod state;
pub mod task;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, ResourceExt};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::api::{BackendStatus, ProxyStatus, TiProxy, DEFAULT_SQL_PORT, DEFAULT_STATUS_PORT};
use crate::{metrics, names};
use state::Ports;
use task::{TaskParams, TaskTiming};

/// Default period of the per-proxy generation check.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(30);

/// Settings of [`Topology`].
#[derive(Debug, Clone)]
pub struct TopologyConfig {
    /// Watch TiProxies of this namespace only (all namespaces when `None`).
    pub namespace: Option<String>,
    /// How often each proxy's generation is read back (and re-pushed on a mismatch).
    pub resync: Duration,
    /// Timeout of each HTTP request to a proxy or a TiDB status port.
    pub push_timeout: Duration,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            resync: DEFAULT_RESYNC,
            push_timeout: push::DEFAULT_TIMEOUT,
        }
    }
}

/// What a TiProxy's status should say about its backends and proxies.
#[derive(Clone, Debug, PartialEq)]
pub struct TopologyReport {
    /// Generation of the current backend set (`None` before the first).
    pub generation: Option<u64>,
    /// Backends, sorted by pod name.
    pub backends: Vec<BackendStatus>,
    /// Proxy pods, sorted by pod name; `acked_generation` = what that proxy acknowledged.
    pub proxies: Vec<ProxyStatus>,
    /// What keeps sessions from moving (for a `Degraded` condition).
    pub problems: Vec<Problem>,
}

/// A requirement the TiDB side does not meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// CamelCase reason, e.g. `NoSessionTokenCert`.
    pub reason: String,
    /// What is wrong, naming the pods.
    pub message: String,
}

/// State shared by the TiProxy loop, its tasks and the reconciler.
#[derive(Default)]
pub struct Shared {
    reports: Mutex<HashMap<ObjectRef<TiProxy>, TopologyReport>>,
    pending: Mutex<HashSet<ObjectRef<TiProxy>>>,
    notify: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Sets (or removes) a TiProxy's report, queueing a change notice when it differs.
    pub fn publish(&self, tiproxy: &ObjectRef<TiProxy>, report: Option<TopologyReport>) {
        let changed = {
            let mut reports = lock(&self.reports);
            match report {
                Some(r) => {
                    if reports.get(tiproxy) == Some(&r) {
                        false
                    } else {
                        reports.insert(tiproxy.clone(), r);
                        true
                    }
                }
                None => reports.remove(tiproxy).is_some(),
            }
        };
        if changed {
            lock(&self.pending).insert(tiproxy.clone());
            self.notify.notify_one();
        }
    }

    fn report(&self, tiproxy: &ObjectRef<TiProxy>) -> Option<TopologyReport> {
        lock(&self.reports).get(tiproxy).cloned()
    }

    /// Forwards change notices to `tx`, coalescing them while the receiver is slow.
    async fn forward(&self, tx: mpsc::Sender<ObjectRef<TiProxy>>) {
        loop {
            self.notify.notified().await;
            let pending: Vec<_> = lock(&self.pending).drain().collect();
            for r in pending {
                if tx.send(r).await.is_err() {
                    return; // nobody listens any more
                }
            }
        }
    }
}

/// The topology watcher and pusher of all selector-mode TiProxies.
pub struct Topology {
    client: Client,
    config: TopologyConfig,
    shared: Arc<Shared>,
    tx: mpsc::Sender<ObjectRef<TiProxy>>,
    rx: Mutex<Option<mpsc::Receiver<ObjectRef<TiProxy>>>>,
}

struct Running {
    params: TaskParams,
    handle: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Aborts the spawned task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Topology {
    pub fn new(client: Client, config: TopologyConfig) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(256);
        Arc::new(Self {
            client,
            config,
            shared: Arc::new(Shared::default()),
            tx,
            rx: Mutex::new(Some(rx)),
        })
    }

    /// What the TiProxy's status should say; `None` until its task has listed its pods once
    /// (and for TiProxies without `tidbSelector`).
    pub fn report(&self, tiproxy: &ObjectRef<TiProxy>) -> Option<TopologyReport> {
        self.shared.report(&clean_ref(tiproxy))
    }

    /// TiProxies whose report changed (generation, backend states, acks, problems), for
    /// `Controller::reconcile_on`. Returns the receiver once.
    pub fn take_changes(&self) -> Option<mpsc::Receiver<ObjectRef<TiProxy>>> {
        lock(&self.rx).take()
    }

    /// Runs until dropped/aborted: watches TiProxies and runs their tasks.
    pub async fn run(self: Arc<Self>) {
        let _forwarder = AbortOnDrop(tokio::spawn({
            let shared = self.shared.clone();
            let tx = self.tx.clone();
            async move { shared.forward(tx).await }
        }));
        let api: Api<TiProxy> = crate::scoped_api(&self.client, self.config.namespace.as_deref());
        let mut events = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut tasks: HashMap<ObjectRef<TiProxy>, Running> = HashMap::new();
        let mut relisted: Option<HashSet<ObjectRef<TiProxy>>> = None;
        tracing::info!(namespace = ?self.config.namespace, "topology watcher started");
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Apply(tp)) => self.upsert(&mut tasks, &tp),
                Ok(Event::Delete(tp)) => self.stop(&mut tasks, &object_ref(&tp), "deleted"),
                Ok(Event::Init) => relisted = Some(HashSet::new()),
                Ok(Event::InitApply(tp)) => {
                    relisted
                        .get_or_insert_with(HashSet::new)
                        .insert(object_ref(&tp));
                    self.upsert(&mut tasks, &tp);
                }
                Ok(Event::InitDone) => {
                    let listed = relisted.take().unwrap_or_default();
                    let gone: Vec<_> = tasks
                        .keys()
                        .filter(|r| !listed.contains(*r))
                        .cloned()
                        .collect();
                    for r in gone {
                        self.stop(&mut tasks, &r, "deleted");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "watching TiProxies failed"),
            }
        }
    }

    fn upsert(&self, tasks: &mut HashMap<ObjectRef<TiProxy>, Running>, tp: &TiProxy) {
        let oref = object_ref(tp);
        let params = match task_params(tp) {
            Ok(Some(p)) => p,
            Ok(None) => {
                self.stop(tasks, &oref, "no tidbSelector");
                return;
            }
            Err(e) => {
                if tasks.contains_key(&oref) || self.shared.report(&oref).is_none() {
                    tracing::warn!(tiproxy = %oref, error = %e, "invalid tidbSelector");
                }
                self.stop(tasks, &oref, "invalid tidbSelector");
                self.shared.publish(
                    &oref,
                    Some(TopologyReport {
                        generation: None,
                        backends: Vec::new(),
                        proxies: Vec::new(),
                        problems: vec![Problem {
                            reason: "InvalidTidbSelector".into(),
                            message: format!("spec.backends.tidbSelector: {e}"),
                        }],
                    }),
                );
                return;
            }
        };
        if let Some(running) = tasks.get(&oref) {
            if running.params == params && !running.handle.is_finished() {
                return;
            }
            tracing::info!(tiproxy = %oref, "TiDB selection changed; restarting its topology task");
        }
        // The replacement continues above the generation its predecessor reached.
        let previous = self.shared.report(&oref).and_then(|r| r.generation);
        let timing = TaskTiming {
            resync: self.config.resync,
            push_timeout: self.config.push_timeout,
            backoff: push::Backoff::default(),
        };
        let handle = tokio::spawn(task::run(
            self.client.clone(),
            params.clone(),
            timing,
            self.shared.clone(),
            previous,
        ));
        // Inserting drops (aborts) the old task.
        tasks.insert(oref, Running { params, handle });
    }

    fn stop(
        &self,
        tasks: &mut HashMap<ObjectRef<TiProxy>, Running>,
        oref: &ObjectRef<TiProxy>,
        why: &str,
    ) {
        if let Some(running) = tasks.remove(oref) {
            tracing::info!(tiproxy = %oref, why, "topology task stopped");
            let m = metrics::get();
            let ns = oref.namespace.as_deref().unwrap_or_default();
            for state in ["active", "draining"] {
                let _ = m.backends.remove_label_values(&[ns, &oref.name, state]);
            }
            let _ = m.backend_generation.remove_label_values(&[ns, &oref.name]);
            drop(running);
        }
        self.shared.publish(oref, None);
    }
}

/// A namespaced reference without extras.
fn clean_ref(r: &ObjectRef<TiProxy>) -> ObjectRef<TiProxy> {
    let mut c = ObjectRef::new(&r.name);
    c.namespace = r.namespace.clone();
    c
}

fn object_ref(tp: &TiProxy) -> ObjectRef<TiProxy> {
    let r = ObjectRef::new(&tp.name_any());
    match tp.namespace() {
        Some(ns) => r.within(&ns),
        None => r,
    }
}

/// The task a TiProxy needs: `None` without `tidbSelector`.
pub fn task_params(tp: &TiProxy) -> Result<Option<TaskParams>, selector::SelectorError> {
    let b = &tp.spec.backends;
    let Some(sel) = &b.tidb_selector else {
        return Ok(None);
    };
    let tidb_selector = selector::selector_string(sel)?;
    let name = tp.name_any();
    let namespace = tp.namespace().unwrap_or_else(|| "default".into());
    let port = |p: i32, default: i32| {
        u16::try_from(p)
            .ok()
            .filter(|p| *p > 0)
            .unwrap_or(default as u16)
    };
    let expected_secret = tp.spec.session_token.as_ref().and_then(|st| {
        st.secret_name
            .clone()
            .or_else(|| st.generate.then(|| names::session_token_secret(&name)))
    });
    Ok(Some(TaskParams {
        tiproxy: object_ref(tp),
        uid: tp.uid(),
        tidb_namespace: b
            .tidb_namespace
            .clone()
            .unwrap_or_else(|| namespace.clone()),
        tidb_selector,
        ports: Ports {
            sql: port(b.sql_port, DEFAULT_SQL_PORT),
            status: port(b.status_port, DEFAULT_STATUS_PORT),
        },
        expected_secret,
        name,
        namespace,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BackendsSpec, SessionTokenSpec, TiProxySpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use std::collections::BTreeMap;

    fn tiproxy(backends: BackendsSpec, session_token: Option<SessionTokenSpec>) -> TiProxy {
        let mut spec: TiProxySpec = serde_json::from_value(serde_json::json!({
            "backends": {"pdAddrs": ["pd:2379"]}
        }))
        .unwrap();
        spec.backends = backends;
        spec.session_token = session_token;
        let mut tp = TiProxy::new("tp", spec);
        tp.metadata.namespace = Some("ns".into());
        tp.metadata.uid = Some("u1".into());
        tp
    }

    #[test]
    fn task_params_from_the_spec() {
        let pd = BackendsSpec {
            pd_addrs: Some(vec!["pd:2379".into()]),
            ..Default::default()
        };
        assert_eq!(task_params(&tiproxy(pd, None)).unwrap(), None);

        let sel = BackendsSpec {
            tidb_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([("app".into(), "tidb".into())])),
                match_expressions: None,
            }),
            sql_port: 4001,
            ..Default::default()
        };
        let p = task_params(&tiproxy(
            sel.clone(),
            Some(SessionTokenSpec {
                secret_name: None,
                generate: true,
            }),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(p.tiproxy, ObjectRef::new("tp").within("ns"));
        assert_eq!(p.tidb_namespace, "ns");
        assert_eq!(p.tidb_selector, "app=tidb");
        assert_eq!(
            p.ports,
            Ports {
                sql: 4001,
                status: 10080
            }
        );
        assert_eq!(p.expected_secret.as_deref(), Some("tp-session-token"));

        let mut other = sel;
        other.tidb_namespace = Some("tidb".into());
        let q = task_params(&tiproxy(
            other,
            Some(SessionTokenSpec {
                secret_name: Some("mine".into()),
                generate: false,
            }),
        ))
        .unwrap()
        .unwrap();
        assert_eq!(q.tidb_namespace, "tidb");
        assert_eq!(q.expected_secret.as_deref(), Some("mine"));
        assert_ne!(p, q, "a change restarts the task");
    }

    #[tokio::test]
    async fn changes_are_coalesced_and_forwarded() {
        let shared = Arc::new(Shared::default());
        let (tx, mut rx) = mpsc::channel(1);
        let fwd = tokio::spawn({
            let s = shared.clone();
            async move { s.forward(tx).await }
        });
        let a = ObjectRef::<TiProxy>::new("a").within("ns");
        let report = TopologyReport {
            generation: Some(1),
            backends: vec![],
            proxies: vec![],
            problems: vec![],
        };
        shared.publish(&a, Some(report.clone()));
        shared.publish(&a, Some(report.clone())); // unchanged: no notice
        let got = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, a);
        assert_eq!(shared.report(&a), Some(report));
        assert!(rx.try_recv().is_err());
        shared.publish(&a, None);
        let got = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, a);
        assert_eq!(shared.report(&a), None);
        fwd.abort();
    }
}

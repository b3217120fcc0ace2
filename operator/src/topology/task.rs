//! One TiProxy's topology task: its TiDB pods, its proxy pods and its API token in, backend
//! sets pushed to every proxy pod and a [`TopologyReport`] out.
//!
//! [`TaskState`] is the whole logic without I/O (driven by watcher events, job results and the
//! clock; unit-tested); [`run`] is the async driver that feeds it from watchers and runs the
//! HTTP jobs it asks for.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::push::{self, Backoff, PushError, PushOutcome, Snapshot};
use super::requirements::{self, TidbConfig, TidbPod};
use super::state::{self, Backend, Generation, Ports, Tracker};
use super::{Problem, Shared, TopologyReport};
use crate::api::{BackendState, ProxyStatus, TiProxy};
use crate::{metrics, names};

/// Backoff of `/config` fetches from a TiDB pod.
const CONFIG_BACKOFF: Backoff = Backoff {
    initial: Duration::from_secs(1),
    max: Duration::from_secs(60),
};

/// What a task watches; a change of any of it restarts the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskParams {
    pub tiproxy: ObjectRef<TiProxy>,
    /// UID of the TiProxy (a re-created TiProxy gets a new task).
    pub uid: Option<String>,
    pub name: String,
    pub namespace: String,
    pub tidb_namespace: String,
    /// Label selector string of the TiDB pods.
    pub tidb_selector: String,
    pub ports: Ports,
    /// The Secret TiDB pods should get the signing cert from (`spec.sessionToken`).
    pub expected_secret: Option<String>,
}

/// Timing of a task.
#[derive(Debug, Clone, Copy)]
pub struct TaskTiming {
    pub resync: Duration,
    pub push_timeout: Duration,
    pub backoff: Backoff,
}

/// Pods of one watch, correct across re-lists: between `Init` and `InitDone` the previous
/// list stays visible, and `InitDone` replaces it atomically.
#[derive(Debug, Default)]
pub struct PodSet {
    pods: BTreeMap<String, Pod>,
    relist: Option<BTreeMap<String, Pod>>,
    synced: bool,
}

impl PodSet {
    /// Applies a watcher event; true when the visible set changed.
    pub fn apply(&mut self, event: Event<Pod>) -> bool {
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(p) => {
                let relist = self.relist.get_or_insert_with(BTreeMap::new);
                if let Some(name) = p.metadata.name.clone() {
                    relist.insert(name, p);
                }
                false
            }
            Event::InitDone => {
                self.pods = self.relist.take().unwrap_or_default();
                self.synced = true;
                true
            }
            Event::Apply(p) => {
                let Some(name) = p.metadata.name.clone() else {
                    return false;
                };
                if self.pods.get(&name) == Some(&p) {
                    return false;
                }
                self.pods.insert(name, p);
                true
            }
            Event::Delete(p) => {
                let Some(name) = p.metadata.name.as_deref() else {
                    return false;
                };
                self.pods.remove(name).is_some()
            }
        }
    }

    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.values()
    }
}

/// The API port of a proxy pod: its container port named [`names::API_PORT_NAME`], else
/// [`names::API_PORT`].
pub fn proxy_api_port(pod: &Pod) -> u16 {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(names::API_PORT_NAME))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(names::API_PORT as u16)
}

/// The proxy's admin address, when the pod has an IP and is not finished.
fn proxy_addr(pod: &Pod) -> Option<String> {
    if state::is_terminal(pod) {
        return None;
    }
    let ip = state::pod_ip(pod)?;
    Some(state::join_host_port(ip, proxy_api_port(pod)))
}

#[derive(Debug)]
struct ProxySync {
    addr: Option<String>,
    acked: Option<u64>,
    error: Option<String>,
    failures: u32,
    next_attempt: Instant,
    next_resync: Instant,
    in_flight: bool,
}

#[derive(Debug)]
enum ConfigFetch {
    Fetched(TidbConfig),
    Pending {
        failures: u32,
        next_attempt: Instant,
        in_flight: bool,
    },
}

/// HTTP work the state asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// Push `snapshot` to a proxy pod; with `check_first`, read its generation first and push
    /// only on a mismatch (the periodic resync).
    Push {
        pod: String,
        addr: String,
        snapshot: Snapshot,
        check_first: bool,
    },
    /// Read a TiDB pod's `/config`.
    FetchConfig {
        uid: String,
        pod: String,
        status_addr: String,
    },
}

/// What a job found.
#[derive(Debug)]
pub enum JobResult {
    Push {
        pod: String,
        addr: String,
        offered: u64,
        result: Result<PushOutcome, PushError>,
    },
    Config {
        uid: String,
        pod: String,
        result: Result<TidbConfig, requirements::ConfigError>,
    },
}

/// The logic of one task.
#[derive(Debug)]
pub struct TaskState {
    params: TaskParams,
    timing: TaskTiming,
    tidb: PodSet,
    proxies: PodSet,
    tracker: Tracker,
    generation: Generation,
    backends: Vec<Backend>,
    computed: bool,
    sync: BTreeMap<String, ProxySync>,
    configs: HashMap<String, ConfigFetch>,
    problems: Vec<Problem>,
    token: Option<String>,
    token_known: bool,
    token_relist: Option<Option<String>>,
}

impl TaskState {
    /// `previous_generation`: the last generation of a task this one replaces.
    pub fn new(params: TaskParams, timing: TaskTiming, previous_generation: Option<u64>) -> Self {
        Self {
            params,
            timing,
            tidb: PodSet::default(),
            proxies: PodSet::default(),
            tracker: Tracker::new(),
            generation: Generation::starting_after(previous_generation),
            backends: Vec::new(),
            computed: false,
            sync: BTreeMap::new(),
            configs: HashMap::new(),
            problems: Vec::new(),
            token: None,
            token_known: false,
            token_relist: None,
        }
    }

    pub fn params(&self) -> &TaskParams {
        &self.params
    }

    pub fn generation(&self) -> Option<u64> {
        self.generation.current()
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// A TiDB pod event.
    pub fn on_tidb_event(&mut self, event: Event<Pod>, now: Instant, now_ms: u64) {
        if self.tidb.apply(event) && self.tidb.synced() {
            self.recompute(now_ms);
            self.sync_configs(now);
            self.recheck();
        }
    }

    /// A proxy pod event.
    pub fn on_proxy_event(&mut self, event: Event<Pod>, now: Instant) {
        if !self.proxies.apply(event) {
            return;
        }
        let mut seen = HashSet::new();
        for pod in self.proxies.pods() {
            let Some(name) = pod.metadata.name.clone() else {
                continue;
            };
            let addr = proxy_addr(pod);
            seen.insert(name.clone());
            let entry = self.sync.entry(name.clone()).or_insert_with(|| ProxySync {
                addr: None,
                acked: None,
                error: None,
                failures: 0,
                next_attempt: now,
                next_resync: now,
                in_flight: false,
            });
            if entry.addr != addr {
                // A new IP (or a first one): a different process; push to it at once.
                if addr.is_some() {
                    tracing::debug!(
                        tiproxy = %self.params.tiproxy, proxy = %name, addr = ?addr,
                        "proxy pod address"
                    );
                }
                entry.addr = addr;
                entry.acked = None;
                entry.error = None;
                entry.failures = 0;
                entry.next_attempt = now;
                entry.next_resync = now + self.timing.resync;
            }
        }
        self.sync.retain(|name, _| seen.contains(name));
    }

    /// A Secret event of the API-token watch.
    pub fn on_token_event(&mut self, event: Event<Secret>, now: Instant) {
        let token = match event {
            Event::Init => {
                self.token_relist = Some(None);
                return;
            }
            Event::InitApply(s) => {
                self.token_relist = Some(secret_token(&s));
                return;
            }
            Event::InitDone => self.token_relist.take().flatten(),
            Event::Apply(s) => secret_token(&s),
            Event::Delete(_) => None,
        };
        self.set_token(token, now);
    }

    /// The token watch failed (e.g. no RBAC on Secrets): push without waiting for it.
    pub fn on_token_watch_error(&mut self) {
        self.token_known = true;
    }

    fn set_token(&mut self, token: Option<String>, now: Instant) {
        self.token_known = true;
        if token == self.token {
            return;
        }
        tracing::info!(
            tiproxy = %self.params.tiproxy,
            present = token.is_some(),
            "admin API token changed"
        );
        self.token = token;
        // Failed pushes (maybe 401s) are retried at once with the new token.
        for s in self.sync.values_mut() {
            if s.error.is_some() {
                s.failures = 0;
                s.next_attempt = now;
            }
        }
    }

    fn recompute(&mut self, now_ms: u64) {
        let backends = self.tracker.compute(self.tidb.pods(), self.params.ports);
        if self.computed && backends == self.backends {
            return;
        }
        let g = self.generation.bump(now_ms);
        let active = backends
            .iter()
            .filter(|b| b.state == BackendState::Active)
            .count();
        tracing::info!(
            tiproxy = %self.params.tiproxy,
            generation = g,
            active,
            draining = backends.len() - active,
            backends = ?backends.iter().map(|b| format!("{}={}:{:?}", b.pod, b.addr, b.state)).collect::<Vec<_>>(),
            "backend set changed"
        );
        self.backends = backends;
        self.computed = true;
        let m = metrics::get();
        let (ns, name) = (self.params.namespace.as_str(), self.params.name.as_str());
        m.backends
            .with_label_values(&[ns, name, "active"])
            .set(active as i64);
        m.backends
            .with_label_values(&[ns, name, "draining"])
            .set((self.backends.len() - active) as i64);
        m.backend_generation
            .with_label_values(&[ns, name])
            .set(i64::try_from(g).unwrap_or(i64::MAX));
    }

    /// Starts tracking `/config` of new TiDB pods; forgets pods that are gone.
    fn sync_configs(&mut self, now: Instant) {
        let uids: HashSet<String> = self.tidb.pods().map(state::pod_uid).collect();
        self.configs.retain(|uid, _| uids.contains(uid));
        for uid in uids {
            self.configs
                .entry(uid)
                .or_insert_with(|| ConfigFetch::Pending {
                    failures: 0,
                    next_attempt: now,
                    in_flight: false,
                });
        }
    }

    fn recheck(&mut self) {
        let pods: Vec<TidbPod<'_>> = self
            .tidb
            .pods()
            .map(|pod| TidbPod {
                pod,
                config: match self.configs.get(&state::pod_uid(pod)) {
                    Some(ConfigFetch::Fetched(c)) => Some(c),
                    _ => None,
                },
            })
            .collect();
        let problems = requirements::check(
            &pods,
            self.params.expected_secret.as_deref(),
            self.params.ports.sql,
        );
        if problems != self.problems {
            for p in problems.iter().filter(|p| !self.problems.contains(p)) {
                tracing::warn!(
                    tiproxy = %self.params.tiproxy, reason = %p.reason, "{}", p.message
                );
            }
            self.problems = problems;
        }
    }

    /// Jobs due at `now` (marked in flight).
    pub fn due(&mut self, now: Instant) -> Vec<Job> {
        let mut jobs = Vec::new();
        if let (Some(g), true, true) = (self.generation.current(), self.computed, self.token_known)
        {
            let snapshot = state::snapshot(g, &self.backends);
            for (pod, s) in &mut self.sync {
                let Some(addr) = &s.addr else { continue };
                if s.in_flight {
                    continue;
                }
                let check_first = if s.acked != Some(g) {
                    if now < s.next_attempt {
                        continue;
                    }
                    false
                } else if now >= s.next_resync {
                    true
                } else {
                    continue;
                };
                s.in_flight = true;
                jobs.push(Job::Push {
                    pod: pod.clone(),
                    addr: addr.clone(),
                    snapshot: snapshot.clone(),
                    check_first,
                });
            }
        }
        for pod in self.tidb.pods() {
            let uid = state::pod_uid(pod);
            let Some(ConfigFetch::Pending {
                next_attempt,
                in_flight,
                ..
            }) = self.configs.get_mut(&uid)
            else {
                continue;
            };
            let Some(ip) = state::pod_ip(pod) else {
                continue;
            };
            if *in_flight || now < *next_attempt || state::is_terminal(pod) {
                continue;
            }
            *in_flight = true;
            jobs.push(Job::FetchConfig {
                uid,
                pod: pod.metadata.name.clone().unwrap_or_default(),
                status_addr: state::join_host_port(ip, self.params.ports.status),
            });
        }
        jobs
    }

    /// When [`TaskState::due`] may next have work (besides new events and job results).
    pub fn next_wakeup(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let (Some(g), true, true) = (self.generation.current(), self.computed, self.token_known)
        {
            for s in self.sync.values() {
                if s.addr.is_none() || s.in_flight {
                    continue;
                }
                consider(if s.acked != Some(g) {
                    s.next_attempt
                } else {
                    s.next_resync
                });
            }
        }
        for pod in self.tidb.pods() {
            if state::pod_ip(pod).is_none() || state::is_terminal(pod) {
                continue; // nothing to fetch until it has an address
            }
            if let Some(ConfigFetch::Pending {
                next_attempt,
                in_flight: false,
                ..
            }) = self.configs.get(&state::pod_uid(pod))
            {
                consider(*next_attempt);
            }
        }
        next
    }

    /// The result of a job.
    pub fn on_job_result(&mut self, result: JobResult, now: Instant, now_ms: u64) {
        match result {
            JobResult::Push {
                pod,
                addr,
                offered,
                result,
            } => self.on_push_result(&pod, &addr, offered, result, now, now_ms),
            JobResult::Config { uid, pod, result } => {
                let Some(entry) = self.configs.get_mut(&uid) else {
                    return;
                };
                match result {
                    Ok(config) => {
                        tracing::debug!(
                            tiproxy = %self.params.tiproxy, tidb = %pod, ?config, "TiDB /config"
                        );
                        *entry = ConfigFetch::Fetched(config);
                        self.recheck();
                    }
                    Err(e) => {
                        if let ConfigFetch::Pending {
                            failures,
                            next_attempt,
                            in_flight,
                        } = entry
                        {
                            *failures += 1;
                            *in_flight = false;
                            let delay = CONFIG_BACKOFF.delay(*failures);
                            *next_attempt = now + delay;
                            tracing::debug!(
                                tiproxy = %self.params.tiproxy, tidb = %pod, error = %e, ?delay,
                                "cannot read TiDB /config; will retry"
                            );
                        }
                    }
                }
            }
        }
    }

    fn on_push_result(
        &mut self,
        pod: &str,
        addr: &str,
        offered: u64,
        result: Result<PushOutcome, PushError>,
        now: Instant,
        now_ms: u64,
    ) {
        let Some(s) = self.sync.get_mut(pod) else {
            return;
        };
        s.in_flight = false;
        if s.addr.as_deref() != Some(addr) {
            return; // the pod has a new address; that one is pushed afresh
        }
        match result {
            Ok(PushOutcome::Accepted(g)) => {
                if s.acked != Some(g) || s.error.is_some() {
                    tracing::debug!(
                        tiproxy = %self.params.tiproxy, proxy = %pod, generation = g,
                        "proxy acknowledged the backend set"
                    );
                }
                s.acked = Some(g);
                s.error = None;
                s.failures = 0;
                s.next_resync = now + self.timing.resync;
            }
            Ok(PushOutcome::Conflict { offered, current }) => {
                // With the proxy's generation known, push above it at once; without it (the
                // read-back failed) back off rather than spin.
                if current.is_some() {
                    s.failures = 0;
                    s.next_attempt = now;
                } else {
                    s.failures += 1;
                    s.next_attempt = now + self.timing.backoff.delay(s.failures);
                }
                let theirs = current.unwrap_or(offered);
                let ours = self.generation.current().unwrap_or(0);
                if theirs >= ours {
                    let g = self.generation.bump_above(theirs, now_ms);
                    tracing::info!(
                        tiproxy = %self.params.tiproxy, proxy = %pod, offered, current = ?current,
                        generation = g,
                        "a proxy holds a newer backend generation; continuing above it"
                    );
                    metrics::get()
                        .backend_generation
                        .with_label_values(&[&self.params.namespace, &self.params.name])
                        .set(i64::try_from(g).unwrap_or(i64::MAX));
                }
            }
            Err(e) => {
                s.failures += 1;
                let delay = self.timing.backoff.delay(s.failures);
                s.next_attempt = now + delay;
                s.next_resync = now + delay;
                let msg = e.to_string();
                if s.error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(
                        tiproxy = %self.params.tiproxy, proxy = %pod, %addr, generation = offered,
                        error = %msg, ?delay, "push to proxy failed; will retry"
                    );
                }
                s.error = Some(msg);
            }
        }
    }

    /// The report, once both pod watches have listed their pods.
    pub fn report(&self) -> Option<TopologyReport> {
        if !self.tidb.synced() || !self.proxies.synced() {
            return None;
        }
        let mut proxies: Vec<ProxyStatus> = self
            .proxies
            .pods()
            .filter_map(|p| p.metadata.name.clone())
            .map(|pod| {
                let s = self.sync.get(&pod);
                ProxyStatus {
                    acked_generation: s.and_then(|s| s.acked),
                    error: s.and_then(|s| s.error.clone()),
                    pod,
                }
            })
            .collect();
        proxies.sort_by(|a, b| a.pod.cmp(&b.pod));
        Some(TopologyReport {
            generation: self.generation.current(),
            backends: self.backends.iter().map(Backend::status).collect(),
            proxies,
            problems: self.problems.clone(),
        })
    }
}

/// The token in an API-token Secret (`data[token]`, trimmed; empty is none).
fn secret_token(s: &Secret) -> Option<String> {
    let raw = s
        .data
        .as_ref()
        .and_then(|d| d.get(names::API_TOKEN_KEY))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .or_else(|| {
            s.string_data
                .as_ref()
                .and_then(|d| d.get(names::API_TOKEN_KEY).cloned())
        })?;
    let t = raw.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Runs one job.
pub async fn run_job(job: Job, token: Option<String>, timeout: Duration) -> JobResult {
    match job {
        Job::Push {
            pod,
            addr,
            snapshot,
            check_first,
        } => {
            let offered = snapshot.generation;
            let token = token.as_deref();
            let result = async {
                if check_first {
                    let theirs = push::get_generation(&addr, token, timeout).await?;
                    if theirs == Some(offered) {
                        return Ok(PushOutcome::Accepted(offered));
                    }
                    if let Some(t) = theirs.filter(|&t| t > offered) {
                        return Ok(PushOutcome::Conflict {
                            offered,
                            current: Some(t),
                        });
                    }
                }
                push::push_snapshot(&addr, token, &snapshot, timeout).await
            }
            .await;
            JobResult::Push {
                pod,
                addr,
                offered,
                result,
            }
        }
        Job::FetchConfig {
            uid,
            pod,
            status_addr,
        } => JobResult::Config {
            uid,
            pod,
            result: requirements::fetch_config(&status_addr, timeout).await,
        },
    }
}

/// Drives one task until aborted.
pub async fn run(
    client: Client,
    params: TaskParams,
    timing: TaskTiming,
    shared: Arc<Shared>,
    previous_generation: Option<u64>,
) {
    let tiproxy = params.tiproxy.clone();
    tracing::info!(
        %tiproxy,
        tidb_namespace = %params.tidb_namespace,
        tidb_selector = %params.tidb_selector,
        "topology task started"
    );
    let tidb_api: Api<Pod> = Api::namespaced(client.clone(), &params.tidb_namespace);
    let proxy_api: Api<Pod> = Api::namespaced(client.clone(), &params.namespace);
    let secret_api: Api<Secret> = Api::namespaced(client, &params.namespace);
    let mut tidb_events = watcher::watcher(
        tidb_api,
        watcher::Config::default().labels(&params.tidb_selector),
    )
    .default_backoff()
    .boxed();
    let mut proxy_events = watcher::watcher(
        proxy_api,
        watcher::Config::default().labels(&names::selector_string(&params.name)),
    )
    .default_backoff()
    .boxed();
    let mut token_events = watcher::watcher(
        secret_api,
        watcher::Config::default().fields(&format!(
            "metadata.name={}",
            names::api_token_secret(&params.name)
        )),
    )
    .default_backoff()
    .boxed();

    let mut state = TaskState::new(params, timing, previous_generation);
    let mut jobs: JoinSet<JobResult> = JoinSet::new();
    loop {
        for job in state.due(Instant::now()) {
            jobs.spawn(run_job(
                job,
                state.token().map(str::to_string),
                timing.push_timeout,
            ));
        }
        if let Some(report) = state.report() {
            shared.publish(&tiproxy, Some(report));
        }
        let wake = state.next_wakeup();
        tokio::select! {
            Some(ev) = tidb_events.next() => match ev {
                Ok(ev) => state.on_tidb_event(ev, Instant::now(), state::unix_ms()),
                Err(e) => tracing::warn!(%tiproxy, error = %e, "watching TiDB pods failed"),
            },
            Some(ev) = proxy_events.next() => match ev {
                Ok(ev) => state.on_proxy_event(ev, Instant::now()),
                Err(e) => tracing::warn!(%tiproxy, error = %e, "watching proxy pods failed"),
            },
            Some(ev) = token_events.next() => match ev {
                Ok(ev) => state.on_token_event(ev, Instant::now()),
                Err(e) => {
                    tracing::warn!(%tiproxy, error = %e, "watching the admin API token Secret failed");
                    state.on_token_watch_error();
                }
            },
            Some(done) = jobs.join_next(), if !jobs.is_empty() => match done {
                Ok(r) => state.on_job_result(r, Instant::now(), state::unix_ms()),
                Err(e) => tracing::error!(%tiproxy, error = %e, "topology job panicked"),
            },
            _ = sleep_until(wake) => {}
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::state::tests::{deleting, pod};
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec};
    use k8s_openapi::ByteString;

    const T0: u64 = 1_000_000;

    fn params() -> TaskParams {
        TaskParams {
            tiproxy: ObjectRef::new("tp").within("ns"),
            uid: Some("uid".into()),
            name: "tp".into(),
            namespace: "ns".into(),
            tidb_namespace: "ns".into(),
            tidb_selector: "app=tidb".into(),
            ports: Ports {
                sql: 4000,
                status: 10080,
            },
            expected_secret: None,
        }
    }

    fn timing() -> TaskTiming {
        TaskTiming {
            resync: Duration::from_secs(30),
            push_timeout: Duration::from_secs(2),
            backoff: Backoff::default(),
        }
    }

    fn proxy(name: &str, ip: Option<&str>, api_port: Option<i32>) -> Pod {
        let mut p = pod(name, &format!("uid-{name}"), ip, true);
        p.spec = Some(PodSpec {
            containers: vec![Container {
                name: "tiproxy".into(),
                ports: api_port.map(|port| {
                    vec![ContainerPort {
                        name: Some("api".into()),
                        container_port: port,
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }],
            ..Default::default()
        });
        p
    }

    fn list(set: &mut TaskState, tidb: Vec<Pod>, proxies: Vec<Pod>, now: Instant) {
        set.on_tidb_event(Event::Init, now, T0);
        for p in tidb {
            set.on_tidb_event(Event::InitApply(p), now, T0);
        }
        set.on_tidb_event(Event::InitDone, now, T0);
        set.on_proxy_event(Event::Init, now);
        for p in proxies {
            set.on_proxy_event(Event::InitApply(p), now);
        }
        set.on_proxy_event(Event::InitDone, now);
    }

    fn pushes(jobs: &[Job]) -> Vec<(String, String, u64, usize, bool)> {
        jobs.iter()
            .filter_map(|j| match j {
                Job::Push {
                    pod,
                    addr,
                    snapshot,
                    check_first,
                } => Some((
                    pod.clone(),
                    addr.clone(),
                    snapshot.generation,
                    snapshot.backends.len(),
                    *check_first,
                )),
                _ => None,
            })
            .collect()
    }

    fn accept(s: &mut TaskState, job: &Job, now: Instant) {
        if let Job::Push {
            pod,
            addr,
            snapshot,
            ..
        } = job
        {
            s.on_job_result(
                JobResult::Push {
                    pod: pod.clone(),
                    addr: addr.clone(),
                    offered: snapshot.generation,
                    result: Ok(PushOutcome::Accepted(snapshot.generation)),
                },
                now,
                T0,
            );
        }
    }

    #[test]
    fn nothing_is_pushed_or_reported_before_the_lists_and_the_token() {
        let now = Instant::now();
        let mut s = TaskState::new(params(), timing(), None);
        assert_eq!(s.report(), None);
        s.on_proxy_event(Event::Init, now);
        s.on_proxy_event(Event::InitApply(proxy("tp-a", Some("10.1.0.1"), None)), now);
        s.on_proxy_event(Event::InitDone, now);
        // TiDB list still running: no empty set may be pushed.
        s.on_tidb_event(Event::Init, now, T0);
        s.on_tidb_event(
            Event::InitApply(pod("tidb-0", "u0", Some("10.0.0.1"), true)),
            now,
            T0,
        );
        s.on_token_watch_error();
        assert!(pushes(&s.due(now)).is_empty());
        assert_eq!(s.report(), None);
        s.on_tidb_event(Event::InitDone, now, T0);
        let report = s.report().unwrap();
        assert_eq!(report.generation, Some(T0));
        assert_eq!(report.backends.len(), 1);
        assert_eq!(
            pushes(&s.due(now)),
            [("tp-a".into(), "10.1.0.1:3080".into(), T0, 1, false)]
        );
    }

    #[test]
    fn pushes_wait_for_the_token_list() {
        let now = Instant::now();
        let mut s = TaskState::new(params(), timing(), None);
        list(
            &mut s,
            vec![],
            vec![proxy("tp-a", Some("10.1.0.1"), Some(4080))],
            now,
        );
        assert!(s.report().is_some());
        assert!(pushes(&s.due(now)).is_empty());
        s.on_token_event(Event::Init, now);
        let secret = Secret {
            data: Some(BTreeMap::from([(
                names::API_TOKEN_KEY.to_string(),
                ByteString(b"tok\n".to_vec()),
            )])),
            ..Default::default()
        };
        s.on_token_event(Event::InitApply(secret), now);
        assert!(pushes(&s.due(now)).is_empty());
        s.on_token_event(Event::InitDone, now);
        assert_eq!(s.token(), Some("tok"));
        // An empty set is pushed (no TiDB selected), to the named API port.
        assert_eq!(
            pushes(&s.due(now)),
            [("tp-a".into(), "10.1.0.1:4080".into(), T0, 0, false)]
        );
    }

    #[test]
    fn changes_bump_the_generation_and_every_proxy_is_pushed() {
        let now = Instant::now();
        let mut s = TaskState::new(params(), timing(), None);
        s.on_token_watch_error();
        list(
            &mut s,
            vec![pod("tidb-0", "u0", Some("10.0.0.1"), true)],
            vec![
                proxy("tp-a", Some("10.1.0.1"), None),
                proxy("tp-b", None, None),
                deleting(proxy("tp-c", Some("10.1.0.3"), None)),
            ],
            now,
        );
        let jobs = s.due(now);
        assert_eq!(
            pushes(&jobs),
            [
                ("tp-a".into(), "10.1.0.1:3080".into(), T0, 1, false),
                ("tp-c".into(), "10.1.0.3:3080".into(), T0, 1, false)
            ]
        );
        for j in &jobs {
            accept(&mut s, j, now);
        }
        let r = s.report().unwrap();
        assert_eq!(
            r.proxies
                .iter()
                .map(|p| (p.pod.as_str(), p.acked_generation))
                .collect::<Vec<_>>(),
            [("tp-a", Some(T0)), ("tp-b", None), ("tp-c", Some(T0))]
        );
        assert!(s
            .due(now)
            .iter()
            .all(|j| matches!(j, Job::FetchConfig { .. })));
        // An unchanged pod update does not bump; a deletionTimestamp does.
        s.on_tidb_event(
            Event::Apply(pod("tidb-0", "u0", Some("10.0.0.1"), true)),
            now,
            T0 + 5,
        );
        assert_eq!(s.generation(), Some(T0));
        s.on_tidb_event(
            Event::Apply(deleting(pod("tidb-0", "u0", Some("10.0.0.1"), true))),
            now,
            T0 + 5,
        );
        assert_eq!(s.generation(), Some(T0 + 5));
        let jobs = s.due(now);
        assert_eq!(pushes(&jobs).len(), 2);
        match &jobs[0] {
            Job::Push { snapshot, .. } => {
                assert_eq!(snapshot.backends[0].state, state::PushState::Draining)
            }
            other => panic!("{other:?}"),
        }
        // tp-b gets its IP: pushed at once.
        s.on_proxy_event(Event::Apply(proxy("tp-b", Some("10.1.0.2"), None)), now);
        assert_eq!(
            pushes(&s.due(now)),
            [("tp-b".into(), "10.1.0.2:3080".into(), T0 + 5, 1, false)]
        );
        // The pod is deleted: the set is empty, generation bumps again.
        s.on_tidb_event(
            Event::Delete(pod("tidb-0", "u0", Some("10.0.0.1"), true)),
            now,
            T0 + 6,
        );
        assert_eq!(s.generation(), Some(T0 + 6));
        assert!(s.report().unwrap().backends.is_empty());
    }

    #[test]
    fn a_relist_replaces_the_pods_only_when_done() {
        let now = Instant::now();
        let mut s = TaskState::new(params(), timing(), None);
        s.on_token_watch_error();
        list(
            &mut s,
            vec![
                pod("tidb-0", "u0", Some("10.0.0.1"), true),
                pod("tidb-1", "u1", Some("10.0.0.2"), true),
            ],
            vec![],
            now,
        );
        assert_eq!(s.report().unwrap().backends.len(), 2);
        s.on_tidb_event(Event::Init, now, T0 + 1);
        s.on_tidb_event(
            Event::InitApply(pod("tidb-1", "u1", Some("10.0.0.2"), true)),
            now,
            T0 + 1,
        );
        assert_eq!(s.report().unwrap().backends.len(), 2);
        assert_eq!(s.generation(), Some(T0));
        s.on_tidb_event(Event::InitDone, now, T0 + 1);
        let r = s.report().unwrap();
        assert_eq!(r.backends.len(), 1);
        assert_eq!(r.backends[0].pod, "tidb-1");
        assert_eq!(r.generation, Some(T0 + 1));
    }

    #[test]
    fn conflicts_jump_above_and_failures_back_off() {
        let now = Instant::now();
        let mut s = TaskState::new(params(), timing(), Some(T0 - 10));
        s.on_token_watch_error();
        list(
            &mut s,
            vec![],
            vec![
                proxy("tp-a", Some("10.1.0.1"), None),
                proxy("tp-b", Some("10.1.0.2"), None),
            ],
            now,
        );
        let jobs = s.due(now);
        assert_eq!(pushes(&jobs).len(), 2);
        accept(&mut s, &jobs[0], now);
        s.on_job_result(
            JobResult::Push {
                pod: "tp-b".into(),
                addr: "10.1.0.2:3080".into(),
                offered: T0,
                result: Ok(PushOutcome::Conflict {
                    offered: T0,
                    current: Some(T0 + 500),
                }),
            },
            now,
            T0 + 1,
        );
        assert_eq!(s.generation(), Some(T0 + 501));
        // Both proxies are pushed the new generation.
        let jobs = s.due(now);
        assert_eq!(
            pushes(&jobs)
                .iter()
                .map(|p| (p.0.as_str(), p.2))
                .collect::<Vec<_>>(),
            [("tp-a", T0 + 501), ("tp-b", T0 + 501)]
        );
        accept(&mut s, &jobs[0], now);
        s.on_job_result(
            JobResult::Push {
                pod: "tp-b".into(),
                addr: "10.1.0.2:3080".into(),
                offered: T0 + 501,
                result: Err(PushError::Status {
                    status: hyper::StatusCode::INTERNAL_SERVER_ERROR,
                    body: "boom".into(),
                }),
            },
            now,
            T0 + 2,
        );
        assert!(s.due(now).is_empty());
        let retry = s.next_wakeup().unwrap();
        assert_eq!(retry, now + Duration::from_millis(250));
        let r = s.report().unwrap();
        assert_eq!(
            r.proxies[1].error.as_deref(),
            Some("HTTP 500 Internal Server Error: boom")
        );
        assert_eq!(r.proxies[1].acked_generation, None);
        assert_eq!(pushes(&s.due(retry)).len(), 1);
    }

    #[test]
    fn resync_checks_first() {
        let now = Instant::now();
        let mut s = TaskState::new(params(), timing(), None);
        s.on_token_watch_error();
        list(
            &mut s,
            vec![],
            vec![proxy("tp-a", Some("10.1.0.1"), None)],
            now,
        );
        let jobs = s.due(now);
        accept(&mut s, &jobs[0], now);
        assert!(s.due(now + Duration::from_secs(29)).is_empty());
        assert_eq!(s.next_wakeup(), Some(now + Duration::from_secs(30)));
        assert_eq!(
            pushes(&s.due(now + Duration::from_secs(30))),
            [("tp-a".into(), "10.1.0.1:3080".into(), T0, 0, true)]
        );
    }

    #[test]
    fn configs_are_fetched_once_per_pod_and_retried() {
        let now = Instant::now();
        let mut s = TaskState::new(params(), timing(), None);
        list(
            &mut s,
            vec![
                pod("tidb-0", "u0", Some("10.0.0.1"), true),
                pod("tidb-1", "u1", None, false),
            ],
            vec![],
            now,
        );
        let jobs = s.due(now);
        assert_eq!(
            jobs,
            [Job::FetchConfig {
                uid: "u0".into(),
                pod: "tidb-0".into(),
                status_addr: "10.0.0.1:10080".into()
            }]
        );
        s.on_job_result(
            JobResult::Config {
                uid: "u0".into(),
                pod: "tidb-0".into(),
                result: Err(requirements::ConfigError::Parse("x".into())),
            },
            now,
            T0,
        );
        assert!(s.due(now).is_empty());
        assert_eq!(s.next_wakeup(), Some(now + Duration::from_secs(1)));
        assert_eq!(s.due(now + Duration::from_secs(1)).len(), 1);
        s.on_job_result(
            JobResult::Config {
                uid: "u0".into(),
                pod: "tidb-0".into(),
                result: Ok(TidbConfig {
                    session_token_signing_cert: String::new(),
                    graceful_wait_before_shutdown: 30,
                }),
            },
            now,
            T0,
        );
        let r = s.report().unwrap();
        assert_eq!(
            r.problems
                .iter()
                .map(|p| p.reason.as_str())
                .collect::<Vec<_>>(),
            ["NoSessionTokenCert", "TerminationGracePeriodTooShort"]
        );
        assert!(s.due(now + Duration::from_secs(3600)).is_empty());
        // The pod is gone: so are its problems.
        s.on_tidb_event(
            Event::Delete(pod("tidb-0", "u0", Some("10.0.0.1"), true)),
            now,
            T0 + 1,
        );
        assert!(s.report().unwrap().problems.is_empty());
    }
}

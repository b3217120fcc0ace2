//! The backends the proxy knows, merged from every discovery source, with each backend's
//! health and the sessions connected to it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc;

/// Where a backend was learned from. A backend stays while any source lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    Static,
    Etcd,
    Push,
}

/// What a source says about a backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BackendSpec {
    pub addr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_addr: Option<String>,
    #[serde(default)]
    pub state: AdminState,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl BackendSpec {
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            status_addr: None,
            state: AdminState::Active,
            labels: BTreeMap::new(),
        }
    }
}

/// The operator's (or discovery's) intent for a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdminState {
    #[default]
    Active,
    /// Take no new sessions; move the existing ones away now.
    Draining,
}

/// What the health checker last concluded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state", content = "reason")]
pub enum Health {
    /// Not probed yet (static backends without a status port are trusted until probed).
    Unknown,
    Healthy,
    /// The backend said it is shutting down.
    Draining(String),
    Unhealthy(String),
}

impl Health {
    pub fn is_usable(&self) -> bool {
        matches!(self, Health::Healthy | Health::Unknown)
    }
}

/// Everything about one backend that changes over time.
#[derive(Debug, Clone)]
pub struct BackendInfo {
    pub status_addr: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Per source, the state it asks for.
    pub sources: BTreeMap<Source, AdminState>,
    pub health: Health,
    /// Whether the backend can accept migrated sessions (it has a session-token signing cert).
    pub supports_migration: bool,
    pub server_version: Option<String>,
    /// CPU usage (0..1 of its cores) and memory usage (0..1 of its quota), when known.
    pub cpu: Option<f64>,
    pub memory: Option<f64>,
}

impl BackendInfo {
    /// Draining if any source asks for it, or if no source lists it any more.
    pub fn admin_state(&self) -> AdminState {
        if self.sources.is_empty() || self.sources.values().any(|s| *s == AdminState::Draining) {
            AdminState::Draining
        } else {
            AdminState::Active
        }
    }

    /// May new sessions go here?
    pub fn routable(&self) -> bool {
        self.admin_state() == AdminState::Active && self.health.is_usable()
    }

    /// Why sessions should leave, if they should.
    pub fn evict_reason(&self) -> Option<String> {
        if self.sources.is_empty() {
            return Some("removed from discovery".into());
        }
        if self.admin_state() == AdminState::Draining {
            return Some("marked draining".into());
        }
        match &self.health {
            Health::Draining(r) => Some(format!("backend shutting down: {r}")),
            Health::Unhealthy(r) => Some(format!("unhealthy: {r}")),
            _ => None,
        }
    }
}

/// A message to a session.
#[derive(Debug)]
pub enum Control {
    /// Move to `target` at the next safe point.
    Migrate {
        target: Arc<Backend>,
        reason: &'static str,
    },
}

/// The router's handle on one session.
#[derive(Debug)]
pub struct SessionEntry {
    pub id: u64,
    control: mpsc::Sender<Control>,
    /// A migration was requested and has not finished.
    pending: AtomicBool,
    /// When the last migration failed (1 + ms since the registry's epoch; 0 = never).
    last_failure_ms: AtomicU64,
    /// Why the session cannot move (the backend's refusal), for the admin API and metrics.
    blocked: Mutex<Option<String>>,
}

impl SessionEntry {
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn blocked_reason(&self) -> Option<String> {
        self.blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[derive(Debug)]
pub struct Backend {
    pub addr: String,
    info: RwLock<BackendInfo>,
    sessions: Mutex<HashMap<u64, Arc<SessionEntry>>>,
    count: AtomicUsize,
}

impl Backend {
    fn new(spec: &BackendSpec) -> Self {
        Self {
            addr: spec.addr.clone(),
            info: RwLock::new(BackendInfo {
                status_addr: spec.status_addr.clone(),
                labels: spec.labels.clone(),
                sources: BTreeMap::new(),
                health: Health::Unknown,
                supports_migration: true,
                server_version: None,
                cpu: None,
                memory: None,
            }),
            sessions: Mutex::new(HashMap::new()),
            count: AtomicUsize::new(0),
        }
    }

    pub fn info(&self) -> BackendInfo {
        self.info.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn update_info(&self, f: impl FnOnce(&mut BackendInfo)) {
        f(&mut self.info.write().unwrap_or_else(|e| e.into_inner()));
    }

    /// Sessions connected (or connecting) to this backend.
    pub fn sessions(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn session_entries(&self) -> Vec<Arc<SessionEntry>> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// A session's place on a backend: counted while held, moved on migration.
#[derive(Debug)]
pub struct SessionLease {
    registry: Arc<Registry>,
    backend: Arc<Backend>,
    entry: Arc<SessionEntry>,
}

impl SessionLease {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    pub fn entry(&self) -> &Arc<SessionEntry> {
        &self.entry
    }

    /// After a successful migration: the session now counts against `target`.
    pub fn move_to(&mut self, target: Arc<Backend>) {
        detach(&self.backend, self.entry.id);
        attach(&target, &self.entry);
        self.backend = target;
        self.entry.pending.store(false, Ordering::Relaxed);
        *self.entry.blocked.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// After a failed migration: retry no sooner than the back-off allows.
    pub fn migration_failed(&self, blocked: Option<String>) {
        self.entry
            .last_failure_ms
            .store(self.registry.now_ms() + 1, Ordering::Relaxed);
        self.entry.pending.store(false, Ordering::Relaxed);
        *self.entry.blocked.lock().unwrap_or_else(|e| e.into_inner()) = blocked;
    }

    /// The migration request was dropped (e.g. the target went away before a safe point).
    pub fn migration_abandoned(&self) {
        self.entry.pending.store(false, Ordering::Relaxed);
    }
}

impl Drop for SessionLease {
    fn drop(&mut self) {
        detach(&self.backend, self.entry.id);
    }
}

fn attach(backend: &Backend, entry: &Arc<SessionEntry>) {
    backend
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(entry.id, entry.clone());
    backend.count.fetch_add(1, Ordering::Relaxed);
}

fn detach(backend: &Backend, id: u64) {
    if backend
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id)
        .is_some()
    {
        backend.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A pushed snapshot was older than the current one.
#[derive(Debug, thiserror::Error)]
#[error("generation {offered} is older than the current generation {current}")]
pub struct StaleGeneration {
    pub offered: u64,
    pub current: u64,
}

/// All known backends.
#[derive(Debug)]
pub struct Registry {
    backends: RwLock<Vec<Arc<Backend>>>,
    push_generation: Mutex<Option<u64>>,
    next_session: AtomicU64,
    epoch: Instant,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            backends: RwLock::default(),
            push_generation: Mutex::default(),
            next_session: AtomicU64::new(1),
            epoch: Instant::now(),
        }
    }
}

impl Registry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.backends
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn find(&self, addr: &str) -> Option<Arc<Backend>> {
        self.backends
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|b| b.addr == addr)
            .cloned()
    }

    /// Replaces everything `source` says. Backends no source lists any more stay (draining)
    /// until their last session has left.
    pub fn apply(&self, source: Source, specs: &[BackendSpec]) {
        let mut backends = self.backends.write().unwrap_or_else(|e| e.into_inner());
        for spec in specs {
            let backend = match backends.iter().find(|b| b.addr == spec.addr) {
                Some(b) => b.clone(),
                None => {
                    let b = Arc::new(Backend::new(spec));
                    tracing::info!(backend = %spec.addr, ?source, "backend added");
                    backends.push(b.clone());
                    b
                }
            };
            backend.update_info(|info| {
                if spec.status_addr.is_some() {
                    info.status_addr = spec.status_addr.clone();
                }
                if !spec.labels.is_empty() || source == Source::Push {
                    info.labels = spec.labels.clone();
                }
                let before = info.sources.insert(source, spec.state);
                if before != Some(spec.state) && spec.state == AdminState::Draining {
                    tracing::info!(backend = %spec.addr, ?source, "backend marked draining");
                }
            });
        }
        for backend in backends.iter() {
            if !specs.iter().any(|s| s.addr == backend.addr) {
                backend.update_info(|info| {
                    if info.sources.remove(&source).is_some() && info.sources.is_empty() {
                        tracing::info!(backend = %backend.addr, ?source, "backend removed from discovery");
                    }
                });
            }
        }
        backends.retain(|b| !b.info().sources.is_empty() || b.sessions() > 0);
    }

    /// Drops backends that no source lists and that no session uses any more.
    pub fn prune(&self) {
        let mut backends = self.backends.write().unwrap_or_else(|e| e.into_inner());
        backends.retain(|b| !b.info().sources.is_empty() || b.sessions() > 0);
    }

    /// Applies a pushed snapshot unless its generation is older than the current one.
    pub fn apply_push(
        &self,
        generation: u64,
        specs: &[BackendSpec],
    ) -> Result<(), StaleGeneration> {
        let mut current = self
            .push_generation
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(c) = *current {
            if generation < c {
                return Err(StaleGeneration {
                    offered: generation,
                    current: c,
                });
            }
        }
        *current = Some(generation);
        self.apply(Source::Push, specs);
        Ok(())
    }

    pub fn push_generation(&self) -> Option<u64> {
        *self
            .push_generation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a new session against `backend` and returns its lease and control channel.
    pub fn register(
        self: &Arc<Self>,
        backend: Arc<Backend>,
    ) -> (SessionLease, mpsc::Receiver<Control>) {
        let (tx, rx) = mpsc::channel(1);
        let entry = Arc::new(SessionEntry {
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
            control: tx,
            pending: AtomicBool::new(false),
            last_failure_ms: AtomicU64::new(0),
            blocked: Mutex::new(None),
        });
        attach(&backend, &entry);
        (
            SessionLease {
                registry: self.clone(),
                backend,
                entry,
            },
            rx,
        )
    }

    /// Asks a session to move. Returns false if it already has a request pending, failed too
    /// recently, or cannot take the message.
    pub fn request_migration(
        &self,
        entry: &SessionEntry,
        target: &Arc<Backend>,
        reason: &'static str,
        retry_after_ms: u64,
    ) -> bool {
        let failed = entry.last_failure_ms.load(Ordering::Relaxed);
        if failed != 0 && self.now_ms() + 1 < failed + retry_after_ms {
            return false;
        }
        if entry.pending.swap(true, Ordering::Relaxed) {
            return false;
        }
        let sent = entry
            .control
            .try_send(Control::Migrate {
                target: target.clone(),
                reason,
            })
            .is_ok();
        if !sent {
            entry.pending.store(false, Ordering::Relaxed);
        }
        sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(addr: &str) -> BackendSpec {
        BackendSpec::new(addr)
    }

    #[test]
    fn sources_merge_and_removal_drains() {
        let r = Registry::new();
        r.apply(Source::Static, &[spec("a:1"), spec("b:1")]);
        r.apply(Source::Push, &[spec("b:1"), spec("c:1")]);
        assert_eq!(r.backends().len(), 3);
        let b = r.find("b:1").unwrap();
        let (lease, _rx) = r.register(b.clone());
        r.apply(Source::Static, &[spec("a:1")]);
        r.apply(Source::Push, &[spec("c:1")]);
        // b has no source left but still a session: kept, and sessions should leave.
        assert!(r.find("b:1").is_some());
        assert_eq!(
            b.info().evict_reason().as_deref(),
            Some("removed from discovery")
        );
        assert!(!b.info().routable());
        drop(lease);
        r.prune();
        assert!(r.find("b:1").is_none());
    }

    #[test]
    fn push_generation_must_not_go_back() {
        let r = Registry::new();
        r.apply_push(5, &[spec("a:1")]).unwrap();
        r.apply_push(5, &[spec("a:1")]).unwrap();
        let err = r.apply_push(4, &[]).unwrap_err();
        assert_eq!((err.offered, err.current), (4, 5));
        let mut draining = spec("a:1");
        draining.state = AdminState::Draining;
        r.apply_push(6, &[draining]).unwrap();
        assert_eq!(
            r.find("a:1").unwrap().info().admin_state(),
            AdminState::Draining
        );
    }

    #[test]
    fn leases_count_and_move() {
        let r = Registry::new();
        r.apply(Source::Static, &[spec("a:1"), spec("b:1")]);
        let (a, b) = (r.find("a:1").unwrap(), r.find("b:1").unwrap());
        let (mut lease, mut rx) = r.register(a.clone());
        assert_eq!((a.sessions(), b.sessions()), (1, 0));
        assert!(r.request_migration(lease.entry(), &b, "test", 3000));
        assert!(
            !r.request_migration(lease.entry(), &b, "test", 3000),
            "already pending"
        );
        assert!(matches!(rx.try_recv(), Ok(Control::Migrate { .. })));
        lease.move_to(b.clone());
        assert_eq!((a.sessions(), b.sessions()), (0, 1));
        lease.migration_failed(Some("8146".into()));
        assert!(
            !r.request_migration(lease.entry(), &a, "test", 3000),
            "backing off"
        );
        assert!(r.request_migration(lease.entry(), &a, "test", 0));
        drop(lease);
        assert_eq!(b.sessions(), 0);
    }
}

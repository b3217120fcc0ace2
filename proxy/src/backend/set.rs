//! The backends a proxy may route to, with the live session count of each.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::config::BackendAddr;

/// One backend TiDB (or any MySQL-protocol server).
#[derive(Debug)]
pub struct Backend {
    pub addr: String,
    pub status_addr: Option<String>,
    sessions: AtomicUsize,
}

impl Backend {
    pub fn new(addr: &BackendAddr) -> Self {
        Self {
            addr: addr.addr.clone(),
            status_addr: addr.status_addr.clone(),
            sessions: AtomicUsize::new(0),
        }
    }

    /// Sessions currently connected to this backend.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }
}

/// Counts a session against its backend for as long as it is held.
#[derive(Debug)]
pub struct BackendLease {
    backend: Arc<Backend>,
}

impl BackendLease {
    fn new(backend: Arc<Backend>) -> Self {
        backend.sessions.fetch_add(1, Ordering::Relaxed);
        Self { backend }
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for BackendLease {
    fn drop(&mut self) {
        self.backend.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
pub struct BackendSet {
    backends: RwLock<Vec<Arc<Backend>>>,
}

impl BackendSet {
    pub fn new(addrs: &[BackendAddr]) -> Self {
        Self {
            backends: RwLock::new(addrs.iter().map(|a| Arc::new(Backend::new(a))).collect()),
        }
    }

    pub fn all(&self) -> Vec<Arc<Backend>> {
        self.backends
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The backend with the fewest sessions, skipping `excluded` (backends that just failed
    /// to answer). Ties go to the earliest configured backend.
    pub fn pick(&self, excluded: &[Arc<Backend>]) -> Option<BackendLease> {
        let backends = self.backends.read().unwrap_or_else(|e| e.into_inner());
        backends
            .iter()
            .filter(|b| !excluded.iter().any(|x| Arc::ptr_eq(x, b)))
            .min_by_key(|b| b.sessions())
            .map(|b| BackendLease::new(b.clone()))
    }

    pub fn is_empty(&self) -> bool {
        self.backends
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize) -> BackendSet {
        let addrs: Vec<_> = (0..n)
            .map(|i| BackendAddr::new(format!("127.0.0.1:{}", 4000 + i)))
            .collect();
        BackendSet::new(&addrs)
    }

    #[test]
    fn picks_least_loaded_and_releases_on_drop() {
        let s = set(3);
        let a = s.pick(&[]).unwrap();
        let b = s.pick(&[]).unwrap();
        let c = s.pick(&[]).unwrap();
        let mut addrs: Vec<_> = [&a, &b, &c]
            .iter()
            .map(|l| l.backend().addr.clone())
            .collect();
        addrs.sort();
        assert_eq!(
            addrs,
            ["127.0.0.1:4000", "127.0.0.1:4001", "127.0.0.1:4002"]
        );
        let freed = b.backend().addr.clone();
        drop(b);
        assert_eq!(s.pick(&[]).unwrap().backend().addr, freed);
    }

    #[test]
    fn excluded_backends_are_skipped() {
        let s = set(2);
        let all = s.all();
        let l = s.pick(&all[..1]).unwrap();
        assert_eq!(l.backend().addr, "127.0.0.1:4001");
        assert!(s.pick(&all).is_none());
        assert!(set(0).pick(&[]).is_none());
    }
}

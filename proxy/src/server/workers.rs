//! Session threads: the data path runs on one single-threaded runtime per core, and a session
//! stays on the thread that accepted it for its whole life.
//!
//! Both sockets of a session are then polled by that thread's own epoll, a readable socket wakes
//! only that thread, and no other thread ever steals the session between two packets of a
//! command. On a 2-core machine shared with the database and the clients, the work-stealing
//! scheduler's futex wake-ups and hand-offs cost the proxy point-select throughput against
//! HAProxy, whose threads work the same way as these (docs/benchmarks.md).

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

struct Worker {
    handle: Handle,
    /// Sessions currently running on this thread.
    live: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The session threads. Dropping it stops them; sessions still running on them are dropped.
pub struct Workers {
    workers: Vec<Worker>,
}

impl Workers {
    /// Starts `threads` session threads (at least one).
    pub fn start(threads: usize) -> io::Result<Workers> {
        let threads = threads.max(1);
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("tiproxy-session-{i}"))
                .spawn(move || {
                    runtime.block_on(async {
                        let _ = stopped.await;
                    })
                })?;
            workers.push(Worker {
                handle,
                live: Arc::new(AtomicUsize::new(0)),
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Workers { workers })
    }

    /// One thread per CPU the process may use (cgroup quotas included).
    pub fn per_core() -> io::Result<Workers> {
        Workers::start(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Runs the future `session()` builds on the thread with the fewest live sessions, tracked
    /// in `set`. Taking a builder, not a future, matters for memory: a future moved into an
    /// `async` block and awaited there is stored twice in the task (once captured, once being
    /// awaited), which cost every idle session 2.6 KiB.
    pub fn spawn<F, S>(&self, set: &mut JoinSet<()>, session: F)
    where
        F: FnOnce() -> S + Send + 'static,
        S: Future<Output = ()> + Send,
    {
        let worker = self
            .workers
            .iter()
            .min_by_key(|w| w.live.load(Ordering::Relaxed))
            .expect("at least one session thread");
        let live = LiveGuard::new(worker.live.clone());
        set.spawn_on(
            async move {
                let _live = live;
                session().await;
            },
            &worker.handle,
        );
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.workers {
            drop(w.stop.take());
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

struct LiveGuard(Arc<AtomicUsize>);

impl LiveGuard {
    fn new(live: Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::Relaxed);
        LiveGuard(live)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_spread_over_threads_and_run_there() {
        let workers = Workers::start(2).unwrap();
        let mut set = JoinSet::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        for _ in 0..4 {
            let tx = tx.clone();
            let mut release = release_rx.clone();
            workers.spawn(&mut set, move || async move {
                let name = std::thread::current().name().map(str::to_owned);
                tx.send(name).unwrap();
                let _ = release.wait_for(|r| *r).await;
            });
        }
        let mut names = Vec::new();
        for _ in 0..4 {
            names.push(rx.recv().await.unwrap().unwrap());
        }
        names.sort();
        assert_eq!(
            names,
            [
                "tiproxy-session-0",
                "tiproxy-session-0",
                "tiproxy-session-1",
                "tiproxy-session-1"
            ]
        );
        release_tx.send(true).unwrap();
        while set.join_next().await.is_some() {}
        assert!(workers
            .workers
            .iter()
            .all(|w| w.live.load(Ordering::Relaxed) == 0));
    }
}

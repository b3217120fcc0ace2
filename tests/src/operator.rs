//! The operator binary as a process, for tests against the real kube-apiserver
//! ([`crate::kube::KubeApiServer`]).

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{operator_bin, TempDir};

/// A running `tiproxy-operator run`, scoped to one namespace, killed on drop. Its log is
/// printed when a test panics while it runs.
pub struct OperatorProcess {
    child: Child,
    log: PathBuf,
    metrics_addr: SocketAddr,
    _dir: TempDir,
}

impl OperatorProcess {
    /// Starts the operator with `kubeconfig`, watching only `namespace`, with a short resync
    /// so tests see periodic re-pushes quickly. Waits until its `/readyz` answers 200.
    pub async fn start(kubeconfig: &Path, namespace: &str) -> OperatorProcess {
        let dir = TempDir::new("tiproxy-operator");
        let log = dir.path().join("operator.log");
        let metrics_addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let log_file = std::fs::File::create(&log).expect("create operator log");
        let child = Command::new(operator_bin())
            .args([
                "run",
                "--metrics-addr",
                &metrics_addr.to_string(),
                "--namespace",
                namespace,
                "--resync-seconds",
                "2",
                "--proxy-image",
                "tiproxy:test",
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,tiproxy_operator=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn tiproxy-operator");
        let mut op = OperatorProcess {
            child,
            log,
            metrics_addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = op.child.try_wait() {
                panic!("tiproxy-operator exited with {status}:\n{}", op.log_text());
            }
            if let Ok((200, _)) =
                crate::cluster::http_request(op.metrics_addr, "GET", "/readyz", None).await
            {
                return op;
            }
            assert!(
                Instant::now() < deadline,
                "tiproxy-operator not ready after 30 s:\n{}",
                op.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The operator's `/metrics` text.
    pub async fn metrics(&self) -> String {
        match crate::cluster::http_request(self.metrics_addr, "GET", "/metrics", None).await {
            Ok((200, body)) => body,
            other => panic!("operator /metrics: {other:?}"),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- tiproxy-operator log ----\n{}", self.log_text());
        }
    }
}

/// Polls `check` every 100 ms until it returns `Some`, panicking with `what` and the last
/// observation after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not reached after {timeout:?}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

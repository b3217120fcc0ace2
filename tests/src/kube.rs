//! A real Kubernetes API server for the operator and Helm chart tests.
//!
//! [`KubeApiServer::shared`] starts one etcd 3.6 + kube-apiserver per test process with
//! `tests/scripts/kube-apiserver.sh` (free 127.0.0.1 ports, TLS, a static admin token, RBAC) and
//! keeps it for every test of that process. The script's watchdog stops both servers and removes
//! their directory when the test process exits, however it exits. There is no controller-manager,
//! scheduler or kubelet: objects are validated, stored and watched, but Deployments never get
//! Pods, nothing is garbage-collected and namespaces are never finalized. Tests create Pods
//! themselves and use a fresh namespace each ([`KubeApiServer::namespace`]).
//!
//! Binaries: `TIPROXY_KUBE_APISERVER`, `TIPROXY_ETCD3` (and `TIPROXY_HELM` for [`helm_bin`]);
//! when unset, `tests/scripts/build-go-tool.sh` builds them once and caches them under
//! `~/.cache/tiproxy-rs`. `TIPROXY_KEEP_KUBE_DIR=1` keeps the server's directory (logs, certs,
//! kubeconfig) after the test process exits.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};

use crate::workspace_dir;

/// Field manager of everything the test harness applies.
pub const FIELD_MANAGER: &str = "tiproxy-tests";

/// How long to wait for the CRD to become Established.
const CRD_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(60);

/// A Go tool the tests need: the path in env var `env` when set, else the binary
/// `tests/scripts/build-go-tool.sh <name>` builds (or finds in its cache) and prints.
pub fn go_tool(env: &str, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{env}={} is not a file", p.display());
        }
        return Ok(p);
    }
    let script = workspace_dir().join("tests/scripts/build-go-tool.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(name)
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} {name} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(path) = stdout.lines().map(str::trim).rfind(|l| !l.is_empty()) else {
        bail!("{} {name} printed no path", script.display());
    };
    let path = PathBuf::from(path);
    if !path.is_file() {
        bail!(
            "{} {name} printed {}, which is not a file",
            script.display(),
            path.display()
        );
    }
    Ok(path)
}

/// The helm binary (`TIPROXY_HELM`, else built by build-go-tool.sh). Panics when unavailable.
pub fn helm_bin() -> PathBuf {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        go_tool("TIPROXY_HELM", "helm").unwrap_or_else(|e| {
            panic!("no helm binary: {e:#}; set TIPROXY_HELM or run tests/run-all.sh")
        })
    })
    .clone()
}

/// A kube-apiserver (with its etcd) owned by this test process.
#[derive(Debug)]
pub struct KubeApiServer {
    dir: PathBuf,
    kubeconfig: PathBuf,
}

impl KubeApiServer {
    /// The API server of this test process, started on first use (a few seconds). Panics with
    /// the script's output when it cannot start.
    pub fn shared() -> &'static KubeApiServer {
        static SERVER: OnceLock<KubeApiServer> = OnceLock::new();
        SERVER.get_or_init(|| {
            KubeApiServer::start().unwrap_or_else(|e| panic!("cannot start kube-apiserver: {e:#}"))
        })
    }

    fn start() -> anyhow::Result<KubeApiServer> {
        let apiserver = go_tool("TIPROXY_KUBE_APISERVER", "kube-apiserver")?;
        let etcd = go_tool("TIPROXY_ETCD3", "etcd")?;
        let dir = std::env::temp_dir().join(crate::unique_name("tiproxy-kube"));
        let script = workspace_dir().join("tests/scripts/kube-apiserver.sh");
        let keep = std::env::var_os("TIPROXY_KEEP_KUBE_DIR").is_some_and(|v| !v.is_empty());
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .arg("start")
            .arg("--dir")
            .arg(&dir)
            .arg("--watch-pid")
            .arg(std::process::id().to_string())
            .env("TIPROXY_KUBE_APISERVER", &apiserver)
            .env("TIPROXY_ETCD3", &etcd);
        if !keep {
            cmd.arg("--rm-on-exit");
        }
        let started = Instant::now();
        let out = cmd
            .output()
            .with_context(|| format!("cannot run {}", script.display()))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!(
                "{} start failed ({}):\n{stderr}",
                script.display(),
                out.status
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let kubeconfig = stdout
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .map(PathBuf::from)
            .with_context(|| format!("{} start printed no kubeconfig path", script.display()))?;
        if !kubeconfig.is_file() {
            bail!(
                "kubeconfig {} does not exist:\n{stderr}",
                kubeconfig.display()
            );
        }
        eprintln!(
            "kube-apiserver started in {:.1}s (kubeconfig {}{})",
            started.elapsed().as_secs_f64(),
            kubeconfig.display(),
            if keep { ", kept after exit" } else { "" }
        );
        Ok(KubeApiServer { dir, kubeconfig })
    }

    /// The admin kubeconfig (server URL, CA, bearer token in group system:masters); usable with
    /// `helm --kubeconfig` and `kubectl --kubeconfig`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The server's directory: logs (`kube-apiserver.log`, `etcd.log`), certs, kubeconfig.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    async fn config(&self) -> anyhow::Result<kube::Config> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)
            .with_context(|| format!("reading {}", self.kubeconfig.display()))?;
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("loading {}", self.kubeconfig.display()))
    }

    /// A client with full (system:masters) rights. Make one per test: a client's connection
    /// pool lives on the runtime that created it, and each `#[tokio::test]` has its own.
    pub async fn client(&self) -> kube::Client {
        let config = self
            .config()
            .await
            .unwrap_or_else(|e| panic!("kube client config: {e:#}"));
        kube::Client::try_from(config).unwrap_or_else(|e| panic!("kube client: {e:#}"))
    }

    /// A client that acts as ServiceAccount `namespace/name` (impersonation by the admin), so a
    /// test sees exactly what that account's RBAC allows.
    pub async fn client_as_service_account(&self, namespace: &str, name: &str) -> kube::Client {
        let mut config = self
            .config()
            .await
            .unwrap_or_else(|e| panic!("kube client config: {e:#}"));
        config.auth_info.impersonate = Some(format!("system:serviceaccount:{namespace}:{name}"));
        config.auth_info.impersonate_groups = Some(vec![
            "system:serviceaccounts".to_string(),
            format!("system:serviceaccounts:{namespace}"),
            "system:authenticated".to_string(),
        ]);
        kube::Client::try_from(config).unwrap_or_else(|e| panic!("kube client: {e:#}"))
    }

    /// Applies the committed `crds/tiproxy.yaml` (server-side apply) and waits until the
    /// apiserver serves it (condition Established). Idempotent; cheap after the first call.
    pub async fn install_crd(&self) {
        self.try_install_crd()
            .await
            .unwrap_or_else(|e| panic!("installing the TiProxy CRD: {e:#}"))
    }

    async fn try_install_crd(&self) -> anyhow::Result<()> {
        let path = workspace_dir().join(tiproxy_operator::CRD_PATH);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let crd: CustomResourceDefinition =
            serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let name = crd
            .metadata
            .name
            .clone()
            .with_context(|| format!("{} has no metadata.name", path.display()))?;
        let api: Api<CustomResourceDefinition> = Api::all(self.client().await);
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("applying CRD {name}"))?;
        let established = await_condition(api, &name, conditions::is_crd_established());
        tokio::time::timeout(CRD_ESTABLISHED_TIMEOUT, established)
            .await
            .with_context(|| {
                format!(
                    "CRD {name} not Established after {}s (log {})",
                    CRD_ESTABLISHED_TIMEOUT.as_secs(),
                    self.dir.join("kube-apiserver.log").display()
                )
            })?
            .with_context(|| format!("watching CRD {name}"))?;
        Ok(())
    }

    /// Creates a new namespace `<prefix>-<pid>-<n>` (a valid DNS label) and returns its name.
    /// Namespaces are never deleted: without a namespace controller they would stay
    /// Terminating, and the whole server goes away with the test process anyway.
    pub async fn namespace(&self, prefix: &str) -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut clean: String = prefix
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        clean.truncate(40);
        let clean = clean.trim_matches('-');
        let clean = if clean.is_empty() { "test" } else { clean };
        let name = format!("{clean}-{}-{n}", std::process::id());
        let api: Api<Namespace> = Api::all(self.client().await);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        api.create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        name
    }
}

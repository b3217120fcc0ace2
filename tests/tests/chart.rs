//! The Helm chart `charts/tiproxy-operator` with a real helm v3 binary: `helm lint --strict`
//! (defaults and variants), the values schema, what `helm template` renders (operator arguments,
//! RBAC, labels), the CRD copy, and `helm install` / `helm uninstall` against a real
//! kube-apiserver, including what the installed RBAC lets the operator's ServiceAccount do.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{json, Value};
use tiproxy_operator::api::TiProxy;
use tiproxy_tests::kube::{helm_bin, KubeApiServer};
use tiproxy_tests::{workspace_dir, TempDir};

const CRD_NAME: &str = "tiproxies.proxy.tidb.io";

fn chart_dir() -> PathBuf {
    workspace_dir().join("charts/tiproxy-operator")
}

/// Runs helm with its config, cache and data under `home` (never the user's ~/.config/helm).
fn helm_in(home: &Path, args: &[&str]) -> Output {
    let out = Command::new(helm_bin())
        .args(args)
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("KUBECONFIG")
        .output()
        .expect("running helm");
    eprintln!(
        "helm {}: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn helm(args: &[&str]) -> Output {
    let home = TempDir::new("helm-home");
    helm_in(home.path(), args)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `helm template rel <chart> --namespace ops <extra>`, parsed into its YAML documents.
fn template(extra: &[&str]) -> Vec<Value> {
    let chart = chart_dir();
    let chart = chart.to_str().expect("chart path is UTF-8");
    let mut args = vec!["template", "rel", chart, "--namespace", "ops"];
    args.extend_from_slice(extra);
    let out = helm(&args);
    assert!(out.status.success(), "helm template failed: {}", text(&out));
    let yaml = String::from_utf8(out.stdout).expect("helm template output is UTF-8");
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&yaml).expect("helm template output is valid YAML");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn kinds(docs: &[Value]) -> BTreeSet<String> {
    docs.iter()
        .map(|d| {
            d["kind"]
                .as_str()
                .expect("every object has a kind")
                .to_string()
        })
        .collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}, got {found:?}");
    found[0]
}

fn string_list(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("not a string: {s}"))
                .to_string()
        })
        .collect()
}

fn container_args(docs: &[Value]) -> Vec<String> {
    let dep = one(docs, "Deployment");
    string_list(&dep["spec"]["template"]["spec"]["containers"][0]["args"])
}

/// RBAC rules as (apiGroup, resource) → verbs, so the order of rules does not matter.
fn rules(role: &Value) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for rule in role["rules"].as_array().expect("rules") {
        for group in string_list(&rule["apiGroups"]) {
            for resource in string_list(&rule["resources"]) {
                let verbs: &mut BTreeSet<String> =
                    out.entry((group.clone(), resource)).or_default();
                verbs.extend(string_list(&rule["verbs"]));
            }
        }
    }
    out
}

/// Exactly what the operator needs (and nothing else).
fn expected_rules() -> BTreeMap<(String, String), BTreeSet<String>> {
    let crud = [
        "get", "list", "watch", "create", "patch", "update", "delete",
    ];
    let table: &[(&str, &str, &[&str])] = &[
        (
            "proxy.tidb.io",
            "tiproxies",
            &["get", "list", "watch", "patch", "update"],
        ),
        (
            "proxy.tidb.io",
            "tiproxies/status",
            &["get", "patch", "update"],
        ),
        ("apps", "deployments", &crud),
        ("", "services", &crud),
        ("", "configmaps", &crud),
        ("", "secrets", &crud),
        ("policy", "poddisruptionbudgets", &crud),
        ("", "pods", &["get", "list", "watch"]),
        ("events.k8s.io", "events", &["create", "patch"]),
        ("", "events", &["create", "patch"]),
    ];
    table
        .iter()
        .map(|(g, r, verbs)| {
            (
                (g.to_string(), r.to_string()),
                verbs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect()
}

// ---- lint and schema --------------------------------------------------------------------------

#[test]
fn lint_strict_passes_for_defaults_and_variants() {
    let chart = chart_dir();
    let chart = chart.to_str().expect("chart path is UTF-8");
    let variants: &[&[&str]] = &[
        &[],
        &["--set", "watchNamespace=db"],
        &[
            "--set",
            "rbac.create=false",
            "--set",
            "serviceAccount.create=false",
        ],
        &[
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "serviceMonitor.labels.release=prom",
        ],
        &[
            "--set",
            "logFormat=json",
            "--set",
            "logLevel=debug\\,kube=warn",
            "--set-string",
            "image.tag=v9.9.9",
            "--set",
            "priorityClassName=system-cluster-critical",
        ],
    ];
    for extra in variants {
        let mut args = vec!["lint", "--strict", chart];
        args.extend_from_slice(extra);
        let out = helm(&args);
        let t = text(&out);
        assert!(
            out.status.success(),
            "helm lint --strict {extra:?} failed:\n{t}"
        );
        assert!(t.contains("0 chart(s) failed"), "helm lint {extra:?}:\n{t}");
        assert!(
            !t.contains("[WARNING]") && !t.contains("[ERROR]"),
            "helm lint {extra:?}:\n{t}"
        );
    }
}

#[test]
fn values_schema_rejects_bad_values() {
    let chart = chart_dir();
    let chart = chart.to_str().expect("chart path is UTF-8");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--set", "replicaCount=x"],
            "additional properties 'replicaCount' not allowed",
        ),
        (
            &["--set", "image.registry=r"],
            "additional properties 'registry' not allowed",
        ),
        (&["--set", "logFormat=xml"], "/logFormat"),
        (
            &["--set", "image.pullPolicy=Sometimes"],
            "/image/pullPolicy",
        ),
        (&["--set", "metrics.port=0"], "/metrics/port"),
        (&["--set", "metrics.port=http"], "/metrics/port"),
        (
            &["--set", "watchNamespace=Not_A_Namespace"],
            "/watchNamespace",
        ),
        (&["--set", "rbac.create=maybe"], "/rbac/create"),
        (
            &["--set", "serviceMonitor.interval=often"],
            "/serviceMonitor/interval",
        ),
        (&["--set", "podLabels.team=1"], "/podLabels/team"),
    ];
    for (extra, want) in cases {
        // Both `helm template` (what install/upgrade run) and `helm lint` must refuse.
        for cmd in ["template", "lint"] {
            let mut args = vec![cmd, chart];
            args.extend_from_slice(extra);
            let out = helm(&args);
            let t = text(&out);
            assert!(
                !out.status.success(),
                "helm {cmd} {extra:?} succeeded:\n{t}"
            );
            assert!(
                t.contains("values don't meet the specifications of the schema"),
                "helm {cmd} {extra:?}: not a schema error:\n{t}"
            );
            assert!(
                t.contains(want),
                "helm {cmd} {extra:?}: error lacks {want:?}:\n{t}"
            );
        }
    }
}

// ---- rendering --------------------------------------------------------------------------------

#[test]
fn default_render_is_a_cluster_wide_operator() {
    let docs = template(&[]);
    assert_eq!(
        kinds(&docs),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Service",
            "ServiceAccount"
        ]
        .into_iter()
        .map(String::from)
        .collect(),
        "{docs:#?}"
    );

    // Deployment: one operator, never two at once, exact CLI.
    let dep = one(&docs, "Deployment");
    assert_eq!(dep["metadata"]["name"], "rel-tiproxy-operator");
    assert_eq!(dep["metadata"]["namespace"], "ops");
    assert_eq!(dep["spec"]["replicas"], 1);
    assert_eq!(dep["spec"]["strategy"]["type"], "Recreate");
    assert_eq!(
        container_args(&docs),
        [
            "run",
            "--metrics-addr",
            "0.0.0.0:8080",
            "--proxy-image",
            "ghcr.io/tidb-tiproxy/tiproxy:0.1.0",
            "--log-level",
            "info",
            "--log-format",
            "text"
        ]
    );
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "ghcr.io/tidb-tiproxy/tiproxy-operator:0.1.0");
    assert_eq!(
        c["ports"],
        json!([{ "name": "http", "containerPort": 8080, "protocol": "TCP" }])
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({ "path": "/healthz", "port": "http" })
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({ "path": "/readyz", "port": "http" })
    );
    assert_eq!(c["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(c["resources"]["requests"]["cpu"].is_string(), "{c}");
    assert_eq!(pod["serviceAccountName"], "rel-tiproxy-operator");

    // Labels: the selector is exactly name + instance, the pods and the Service match it.
    let selector = json!({
        "app.kubernetes.io/name": "tiproxy-operator",
        "app.kubernetes.io/instance": "rel",
    });
    assert_eq!(dep["spec"]["selector"]["matchLabels"], selector);
    let pod_labels = &dep["spec"]["template"]["metadata"]["labels"];
    for (k, v) in selector.as_object().expect("object") {
        assert_eq!(&pod_labels[k], v, "pod labels {pod_labels}");
    }
    for doc in &docs {
        let labels = &doc["metadata"]["labels"];
        assert_eq!(labels["helm.sh/chart"], "tiproxy-operator-0.1.0", "{doc}");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm", "{doc}");
        assert_eq!(labels["app.kubernetes.io/version"], "0.1.0", "{doc}");
        assert_eq!(labels["app.kubernetes.io/instance"], "rel", "{doc}");
    }
    let svc = one(&docs, "Service");
    assert_eq!(svc["spec"]["selector"], selector);
    assert_eq!(
        svc["spec"]["ports"],
        json!([{ "name": "metrics", "port": 8080, "targetPort": "http", "protocol": "TCP" }])
    );

    // RBAC: exactly the operator's rules, bound to its ServiceAccount in the release namespace.
    let role = one(&docs, "ClusterRole");
    assert_eq!(rules(role), expected_rules());
    let binding = one(&docs, "ClusterRoleBinding");
    assert_eq!(
        binding["roleRef"],
        json!({ "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "rel-tiproxy-operator" })
    );
    assert_eq!(
        binding["subjects"],
        json!([{ "kind": "ServiceAccount", "name": "rel-tiproxy-operator", "namespace": "ops" }])
    );
    assert_eq!(one(&docs, "ServiceAccount")["metadata"]["namespace"], "ops");
}

#[test]
fn watch_namespace_renders_a_role_and_the_namespace_flag() {
    let docs = template(&["--set", "watchNamespace=db"]);
    let k = kinds(&docs);
    assert!(
        !k.contains("ClusterRole") && !k.contains("ClusterRoleBinding"),
        "{k:?}"
    );
    let role = one(&docs, "Role");
    assert_eq!(role["metadata"]["namespace"], "db");
    assert_eq!(rules(role), expected_rules());
    let binding = one(&docs, "RoleBinding");
    assert_eq!(binding["metadata"]["namespace"], "db");
    assert_eq!(binding["roleRef"]["kind"], "Role");
    assert_eq!(
        binding["subjects"],
        json!([{ "kind": "ServiceAccount", "name": "rel-tiproxy-operator", "namespace": "ops" }])
    );
    let args = container_args(&docs);
    let i = args
        .iter()
        .position(|a| a == "--namespace")
        .unwrap_or_else(|| panic!("no --namespace in {args:?}"));
    assert_eq!(args[i + 1], "db");
    // ...and without watchNamespace there is no such flag at all.
    assert!(!container_args(&template(&[])).contains(&"--namespace".to_string()));
}

#[test]
fn rbac_and_service_account_can_be_left_to_the_user() {
    let docs = template(&[
        "--set",
        "rbac.create=false",
        "--set",
        "serviceAccount.create=false",
    ]);
    assert_eq!(
        kinds(&docs),
        ["Deployment", "Service"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    assert_eq!(
        one(&docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"],
        "default"
    );
    let docs = template(&[
        "--set",
        "serviceAccount.create=false",
        "--set",
        "serviceAccount.name=ops-sa",
    ]);
    assert_eq!(
        one(&docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"],
        "ops-sa"
    );
    // The RBAC binds the named account.
    assert_eq!(
        one(&docs, "ClusterRoleBinding")["subjects"][0]["name"],
        "ops-sa"
    );
}

#[test]
fn values_reach_the_operator() {
    let docs = template(&[
        "--set-string",
        "image.tag=v2.0.0",
        "--set",
        "image.repository=registry.example/op",
        "--set",
        "proxy.image=registry.example/tiproxy:v2.0.0",
        "--set",
        "logLevel=debug",
        "--set",
        "logFormat=json",
        "--set",
        "metrics.port=9090",
        "--set",
        "fullnameOverride=tpo",
        "--set",
        "podLabels.team=db",
        "--set",
        "imagePullSecrets[0].name=regcred",
    ]);
    let dep = one(&docs, "Deployment");
    assert_eq!(dep["metadata"]["name"], "tpo");
    let pod = &dep["spec"]["template"];
    assert_eq!(pod["metadata"]["labels"]["team"], "db");
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        json!([{ "name": "regcred" }])
    );
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.example/op:v2.0.0");
    assert_eq!(c["ports"][0]["containerPort"], 9090);
    assert_eq!(
        container_args(&docs),
        [
            "run",
            "--metrics-addr",
            "0.0.0.0:9090",
            "--proxy-image",
            "registry.example/tiproxy:v2.0.0",
            "--log-level",
            "debug",
            "--log-format",
            "json"
        ]
    );
    assert_eq!(one(&docs, "Service")["spec"]["ports"][0]["port"], 9090);
    assert_eq!(one(&docs, "ClusterRole")["metadata"]["name"], "tpo");
}

#[test]
fn service_monitor_only_when_enabled_and_served() {
    let api = ["--api-versions", "monitoring.coreos.com/v1/ServiceMonitor"];
    assert!(
        !kinds(&template(&api)).contains("ServiceMonitor"),
        "disabled by default"
    );
    // Enabled, but the cluster has no Prometheus Operator: nothing that would fail the install.
    assert!(!kinds(&template(&["--set", "serviceMonitor.enabled=true"])).contains("ServiceMonitor"));
    let docs = template(&[
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "serviceMonitor.labels.release=prom",
        "--set",
        "serviceMonitor.interval=15s",
        api[0],
        api[1],
    ]);
    let sm = one(&docs, "ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"],
        one(&docs, "Service")["spec"]["selector"]
    );
    assert_eq!(
        sm["spec"]["endpoints"],
        json!([{ "port": "metrics", "path": "/metrics", "interval": "15s" }])
    );
}

#[test]
fn chart_crd_is_the_committed_crd() {
    let committed = workspace_dir().join(tiproxy_operator::CRD_PATH);
    let copy = chart_dir().join("crds/tiproxy.yaml");
    let a = std::fs::read_to_string(&committed).expect("reading crds/tiproxy.yaml");
    let b = std::fs::read_to_string(&copy).expect("reading the chart's crds/tiproxy.yaml");
    assert!(
        a == b,
        "{} differs from {}; the chart must ship the current CRD. Fix: \
         cp crds/tiproxy.yaml charts/tiproxy-operator/crds/tiproxy.yaml",
        copy.display(),
        committed.display()
    );
    // And it is the CRD the operator's types generate.
    assert_eq!(
        b,
        tiproxy_operator::crd_yaml().expect("rendering the CRD"),
        "the CRD is stale: cargo run -p tiproxy-operator -- crd > crds/tiproxy.yaml && \
         cp crds/tiproxy.yaml charts/tiproxy-operator/crds/tiproxy.yaml"
    );
}

// ---- against a real kube-apiserver ------------------------------------------------------------

fn forbidden<T: std::fmt::Debug>(r: Result<T, kube::Error>, what: &str) {
    match r {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

fn labelled(meta: &ObjectMeta, release: &str) {
    let labels = meta.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("app.kubernetes.io/instance").map(String::as_str),
        Some(release),
        "{meta:?}"
    );
    assert_eq!(
        labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("Helm"),
        "{meta:?}"
    );
}

async fn crd_established(api: &Api<CustomResourceDefinition>) -> bool {
    let Some(crd) = api.get_opt(CRD_NAME).await.expect("get CRD") else {
        return false;
    };
    crd.status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Established" && c.status == "True")
}

/// A running operator process, killed on drop.
struct OperatorProcess {
    child: std::process::Child,
    log: PathBuf,
}

impl OperatorProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HTTP status of `GET path` on `addr`, if it answers.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test]
async fn helm_install_and_uninstall_against_kube_apiserver() {
    let server = KubeApiServer::shared();
    let client = server.client().await;
    let kubeconfig = server
        .kubeconfig_path()
        .to_str()
        .expect("kubeconfig path is UTF-8")
        .to_string();
    let chart = chart_dir();
    let chart = chart.to_str().expect("chart path is UTF-8").to_string();
    let home = TempDir::new("helm-home");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    // Only this test touches CRDs in this process: helm must be what creates it.
    assert!(
        crds.get_opt(CRD_NAME).await.expect("get CRD").is_none(),
        "CRD exists before helm install"
    );

    // ---- cluster-wide install ----
    let ns = server.namespace("chart").await;
    let out = helm_in(
        home.path(),
        &[
            "install",
            "op",
            &chart,
            "--kubeconfig",
            &kubeconfig,
            "--namespace",
            &ns,
        ],
    );
    assert!(out.status.success(), "helm install failed: {}", text(&out));
    // NOTES.txt is shown and says how to check status and upgrade CRDs.
    let notes = text(&out);
    assert!(notes.contains("kubectl get tip"), "{notes}");
    assert!(
        notes.contains("kubectl apply --server-side --force-conflicts"),
        "{notes}"
    );

    // The CRD from crds/ is installed and served.
    let mut established = false;
    for _ in 0..100 {
        if crd_established(&crds).await {
            established = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        established,
        "CRD {CRD_NAME} not Established after helm install"
    );
    let tiproxies: Api<TiProxy> = Api::namespaced(client.clone(), &ns);
    assert!(tiproxies
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .is_empty());

    // The CRD upgrade path NOTES.txt and README give: `kubectl apply --server-side
    // --force-conflicts` (field manager "kubectl"). Helm created the CRD with a plain create, so
    // its manager "helm" owns every field: without --force-conflicts the apply is refused.
    let crd_path = chart_dir().join("crds/tiproxy.yaml");
    let mut newer: CustomResourceDefinition = serde_saphyr::from_str(
        &std::fs::read_to_string(&crd_path).expect("reading the chart's CRD"),
    )
    .expect("parsing the chart's CRD");
    newer
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("tiproxy.test/upgraded".into(), "true".into());
    let schema = newer.spec.versions[0]
        .schema
        .as_mut()
        .and_then(|s| s.open_api_v3_schema.as_mut())
        .expect("CRD schema");
    schema.description = Some("upgraded description".into());
    match crds
        .patch(
            CRD_NAME,
            &PatchParams::apply("kubectl"),
            &Patch::Apply(&newer),
        )
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 409 && s.message.contains("helm") => {}
        other => {
            panic!("apply without --force-conflicts: expected a conflict with helm, got {other:?}")
        }
    }
    let applied = crds
        .patch(
            CRD_NAME,
            &PatchParams::apply("kubectl").force(),
            &Patch::Apply(&newer),
        )
        .await
        .expect("kubectl apply --server-side --force-conflicts of a newer CRD over Helm's");
    assert_eq!(
        applied.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| s.description.as_deref()),
        Some("upgraded description")
    );

    let name = "op-tiproxy-operator";
    let dep = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get(name)
        .await
        .expect("operator Deployment");
    labelled(&dep.metadata, "op");
    let spec = dep.spec.expect("deployment spec");
    assert_eq!(spec.replicas, Some(1));
    let pod_spec = spec.template.spec.expect("pod spec");
    assert_eq!(pod_spec.service_account_name.as_deref(), Some(name));
    let args = pod_spec.containers[0].args.clone().unwrap_or_default();
    assert_eq!(args[0], "run", "{args:?}");
    labelled(
        &Api::<ServiceAccount>::namespaced(client.clone(), &ns)
            .get(name)
            .await
            .expect("operator ServiceAccount")
            .metadata,
        "op",
    );
    let svc = Api::<Service>::namespaced(client.clone(), &ns)
        .get(name)
        .await
        .expect("operator Service");
    labelled(&svc.metadata, "op");
    let port = &svc.spec.expect("service spec").ports.expect("ports")[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("metrics"), 8080));
    let cr = Api::<ClusterRole>::all(client.clone())
        .get(name)
        .await
        .expect("operator ClusterRole");
    labelled(&cr.metadata, "op");
    let crb = Api::<ClusterRoleBinding>::all(client.clone())
        .get(name)
        .await
        .expect("operator ClusterRoleBinding");
    let subject = &crb.subjects.expect("subjects")[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", name, Some(ns.as_str()))
    );

    // What the ServiceAccount may do, as the apiserver's RBAC decides it.
    let other = server.namespace("chart-other").await;
    let sa = server.client_as_service_account(&ns, name).await;
    Api::<TiProxy>::all(sa.clone())
        .list(&ListParams::default())
        .await
        .expect("the operator lists TiProxies in all namespaces");
    Api::<Pod>::all(sa.clone())
        .list(&ListParams::default())
        .await
        .expect("the operator lists pods in all namespaces");
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("proxy-config".into()),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    };
    Api::<ConfigMap>::namespaced(sa.clone(), &other)
        .patch(
            "proxy-config",
            &PatchParams::apply("tiproxy-operator"),
            &Patch::Apply(&cm),
        )
        .await
        .expect("the operator server-side applies a ConfigMap in another namespace");
    forbidden(
        Api::<Pod>::namespaced(sa.clone(), &other)
            .delete("any", &DeleteParams::default())
            .await,
        "delete a pod",
    );
    forbidden(
        Api::<k8s_openapi::api::core::v1::Node>::all(sa.clone())
            .list(&ListParams::default())
            .await,
        "list nodes",
    );
    forbidden(
        Api::<CustomResourceDefinition>::all(sa.clone())
            .delete(CRD_NAME, &DeleteParams::default())
            .await,
        "delete the CRD",
    );
    let tp: TiProxy = serde_json::from_value(json!({
        "apiVersion": "proxy.tidb.io/v1alpha1",
        "kind": "TiProxy",
        "metadata": { "name": "demo" },
        "spec": { "backends": { "pdAddrs": ["pd:2379"] } },
    }))
    .expect("TiProxy");
    forbidden(
        Api::<TiProxy>::namespaced(sa.clone(), &ns)
            .create(&PostParams::default(), &tp)
            .await,
        "create a TiProxy (users do that, not the operator)",
    );

    // A user's TiProxy, to check that uninstalling keeps custom resources.
    tiproxies
        .create(&PostParams::default(), &tp)
        .await
        .expect("admin creates a TiProxy");

    // The real operator, with exactly the chart's permissions (the admin kubeconfig
    // impersonating the release's ServiceAccount) and the chart's arguments (but a local
    // metrics port), gets ready and reconciles that TiProxy into a proxy Deployment.
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    let mut op_args = args.clone();
    let i = op_args
        .iter()
        .position(|a| a == "--metrics-addr")
        .expect("--metrics-addr in the chart's args");
    op_args[i + 1] = metrics.clone();
    let op_log = home.path().join("operator.log");
    let log_file = std::fs::File::create(&op_log).expect("operator log file");
    let operator = OperatorProcess {
        child: Command::new(tiproxy_tests::operator_bin())
            .args(&op_args)
            .env("KUBECONFIG", &kubeconfig)
            .env(
                "KUBE_RS_DEBUG_IMPERSONATE_USER",
                format!("system:serviceaccount:{ns}:{name}"),
            )
            .env(
                "KUBE_RS_DEBUG_IMPERSONATE_GROUP",
                format!("system:serviceaccounts,system:serviceaccounts:{ns},system:authenticated"),
            )
            .env_remove("RUST_LOG")
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .expect("starting tiproxy-operator"),
        log: op_log,
    };
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let mut ready = false;
    let mut reconciled = false;
    for _ in 0..300 {
        ready = ready || http_status(&metrics, "/readyz") == Some(200);
        if ready && deployments.get_opt("demo").await.expect("get").is_some() {
            reconciled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = operator.log();
    assert!(
        ready,
        "the operator never became ready with the chart's RBAC; its log:\n{log}"
    );
    assert!(
        reconciled,
        "the operator did not create the proxy Deployment of TiProxy demo; its log:\n{log}"
    );
    let lower = log.to_lowercase();
    assert!(
        !lower.contains("forbidden"),
        "the chart's RBAC refused the operator something; its log:\n{log}"
    );
    drop(operator);

    // ---- namespaced install (watchNamespace): a Role, effective in that namespace only ----
    let watched = server.namespace("chart-watched").await;
    let ns2 = server.namespace("chart-ns").await;
    let out = helm_in(
        home.path(),
        &[
            "install",
            "scoped",
            &chart,
            "--kubeconfig",
            &kubeconfig,
            "--namespace",
            &ns2,
            "--set",
            &format!("watchNamespace={watched}"),
        ],
    );
    assert!(
        out.status.success(),
        "helm install (watchNamespace) failed: {}",
        text(&out)
    );
    let scoped = "scoped-tiproxy-operator";
    assert!(
        Api::<ClusterRole>::all(client.clone())
            .get_opt(scoped)
            .await
            .expect("get")
            .is_none(),
        "a namespaced install created a ClusterRole"
    );
    Api::<Role>::namespaced(client.clone(), &watched)
        .get(scoped)
        .await
        .expect("Role in the watched namespace");
    Api::<RoleBinding>::namespaced(client.clone(), &watched)
        .get(scoped)
        .await
        .expect("RoleBinding in the watched namespace");
    let dep2 = Api::<Deployment>::namespaced(client.clone(), &ns2)
        .get(scoped)
        .await
        .expect("scoped operator Deployment");
    let args2 = dep2
        .spec
        .and_then(|s| s.template.spec)
        .expect("pod spec")
        .containers[0]
        .args
        .clone()
        .unwrap_or_default();
    assert!(
        args2
            .windows(2)
            .any(|w| w[0] == "--namespace" && w[1] == watched),
        "{args2:?}"
    );
    let sa2 = server.client_as_service_account(&ns2, scoped).await;
    Api::<TiProxy>::namespaced(sa2.clone(), &watched)
        .list(&ListParams::default())
        .await
        .expect("the scoped operator lists TiProxies in its namespace");
    forbidden(
        Api::<TiProxy>::namespaced(sa2.clone(), &ns)
            .list(&ListParams::default())
            .await,
        "the scoped operator lists TiProxies elsewhere",
    );
    forbidden(
        Api::<TiProxy>::all(sa2.clone())
            .list(&ListParams::default())
            .await,
        "the scoped operator lists TiProxies cluster-wide",
    );

    // ---- uninstall: the release's objects go, the CRD and TiProxies stay ----
    for (release, namespace) in [("op", &ns), ("scoped", &ns2)] {
        let out = helm_in(
            home.path(),
            &[
                "uninstall",
                release,
                "--kubeconfig",
                &kubeconfig,
                "--namespace",
                namespace,
            ],
        );
        assert!(
            out.status.success(),
            "helm uninstall {release} failed: {}",
            text(&out)
        );
    }
    assert!(Api::<Deployment>::namespaced(client.clone(), &ns)
        .get_opt(name)
        .await
        .expect("get")
        .is_none());
    assert!(Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .get_opt(name)
        .await
        .expect("get")
        .is_none());
    assert!(Api::<Service>::namespaced(client.clone(), &ns)
        .get_opt(name)
        .await
        .expect("get")
        .is_none());
    assert!(Api::<ClusterRole>::all(client.clone())
        .get_opt(name)
        .await
        .expect("get")
        .is_none());
    assert!(Api::<ClusterRoleBinding>::all(client.clone())
        .get_opt(name)
        .await
        .expect("get")
        .is_none());
    assert!(Api::<Role>::namespaced(client.clone(), &watched)
        .get_opt(scoped)
        .await
        .expect("get")
        .is_none());
    assert!(
        crd_established(&crds).await,
        "helm uninstall removed the CRD (crds/ must be kept)"
    );
    tiproxies
        .get("demo")
        .await
        .expect("the user's TiProxy survives helm uninstall");
}

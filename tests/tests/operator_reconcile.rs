//! The operator process against a real kube-apiserver: a TiProxy is rendered into a
//! ConfigMap, Deployment, Service, PodDisruptionBudget and Secrets with server-side apply;
//! spec changes, drift and deletions of owned objects are reconciled; the status and events
//! follow. The test plays kube-controller-manager where it needs Deployment status.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;
use tiproxy_operator::api::{TiProxy, TiProxySpec};
use tiproxy_tests::kube::KubeApiServer;
use tiproxy_tests::operator::{eventually, OperatorProcess};

const WAIT: Duration = Duration::from_secs(30);
const HASH: &str = "proxy.tidb.io/config-hash";

fn spec(value: serde_json::Value) -> TiProxySpec {
    serde_json::from_value(value).expect("TiProxy spec")
}

async fn get<K>(api: &Api<K>, name: &str) -> Result<K, String>
where
    K: kube::Resource + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get_opt(name).await {
        Ok(Some(o)) => Ok(o),
        Ok(None) => Err(format!("{name} not found")),
        Err(e) => Err(e.to_string()),
    }
}

/// Merge-patches the spec of TiProxy `main`, as `kubectl patch --type merge` would.
async fn patch_spec(tps: &Api<TiProxy>, spec: serde_json::Value) {
    tps.patch(
        "main",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": spec })),
    )
    .await
    .unwrap_or_else(|e| panic!("patch spec {spec}: {e}"));
}

/// Waits until Deployment `main` asks for `replicas` pods.
async fn wait_replicas(deployments: &Api<Deployment>, replicas: i32, what: &str) {
    eventually(WAIT, what, || async {
        let r = get(deployments, "main")
            .await?
            .spec
            .and_then(|s| s.replicas);
        (r == Some(replicas)).then_some(()).ok_or(format!("{r:?}"))
    })
    .await;
}

fn condition(tp: &TiProxy, type_: &str) -> Option<(String, String)> {
    tp.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

fn config_text(cm: &ConfigMap) -> String {
    cm.data
        .as_ref()
        .and_then(|d| d.get("proxy.toml"))
        .cloned()
        .unwrap_or_default()
}

fn restart_hash(d: &Deployment) -> String {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(HASH))
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn tiproxy_is_rendered_reconciled_and_reported() {
    let server = KubeApiServer::shared();
    server.install_crd().await;
    let ns = server.namespace("reconcile").await;
    let client = server.client().await;
    let _op = OperatorProcess::start(server.kubeconfig_path(), &ns).await;

    let tps: Api<TiProxy> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    let tp = TiProxy::new(
        "main",
        spec(json!({
            "replicas": 2,
            "backends": { "tidbSelector": { "matchLabels": { "app": "tidb" } } },
            "config": "[proxy]\nmax-connections = 100\n",
            "sessionToken": { "generate": true },
            "service": { "type": "NodePort", "nodePort": 30601 },
        })),
    );
    let tp = tps
        .create(&PostParams::default(), &tp)
        .await
        .expect("create TiProxy");
    let uid = tp.uid().expect("uid");

    // Every object exists, owned by the TiProxy.
    let d = eventually(WAIT, "Deployment", || get(&deployments, "main")).await;
    let owner = &d.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("TiProxy", uid.as_str())
    );
    assert_eq!(owner.controller, Some(true));
    let dspec = d.spec.as_ref().expect("deployment spec");
    assert_eq!(dspec.replicas, Some(2));
    let pod = dspec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.containers[0].image.as_deref(), Some("tiproxy:test"));
    assert_eq!(pod.termination_grace_period_seconds, Some(35));
    let pre_stop = pod.containers[0]
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| h.sleep.as_ref())
        .map(|s| s.seconds);
    assert_eq!(pre_stop, Some(10), "the native preStop sleep is stored");
    let first_hash = restart_hash(&d);
    assert_eq!(first_hash.len(), 64);

    let cm = eventually(WAIT, "ConfigMap", || get(&config_maps, "main")).await;
    let config = config_text(&cm);
    assert!(config.contains("max-connections = 100"), "{config}");
    assert!(
        config.contains("token-file = \"/etc/tiproxy-api-token/token\""),
        "{config}"
    );

    let svc = eventually(WAIT, "Service", || get(&services, "main")).await;
    let sspec = svc.spec.as_ref().expect("service spec");
    assert_eq!(sspec.type_.as_deref(), Some("NodePort"));
    assert_eq!(
        sspec.ports.as_ref().expect("ports")[0].node_port,
        Some(30601)
    );

    let pdb = eventually(WAIT, "PodDisruptionBudget", || get(&pdbs, "main")).await;
    assert_eq!(pdb.owner_references()[0].uid, uid);

    let token = eventually(WAIT, "API token Secret", || get(&secrets, "main-api-token")).await;
    let token_bytes = &token.data.as_ref().expect("data")["token"].0;
    assert_eq!(token_bytes.len(), 64);
    assert_eq!(token.owner_references()[0].uid, uid);
    let signing = eventually(WAIT, "session-token Secret", || {
        get(&secrets, "main-session-token")
    })
    .await;
    assert_eq!(signing.type_.as_deref(), Some("kubernetes.io/tls"));
    assert!(
        signing.owner_references().is_empty(),
        "TiDB mounts it; it outlives the TiProxy"
    );

    // Status: no proxy pod is ready yet (there is no kubelet).
    let tp = eventually(WAIT, "first status", || async {
        let tp = get(&tps, "main").await?;
        match condition(&tp, "Ready") {
            Some(c) if c == ("False".into(), "ProxiesNotReady".into()) => Ok(tp),
            other => Err(format!("Ready = {other:?}")),
        }
    })
    .await;
    let status = tp.status.as_ref().expect("status");
    assert_eq!(status.observed_generation, tp.metadata.generation);
    assert_eq!(
        status.selector.as_deref(),
        Some("app.kubernetes.io/instance=main,app.kubernetes.io/name=tiproxy")
    );
    assert_eq!(
        condition(&tp, "Degraded"),
        Some(("False".into(), "RequirementsMet".into()))
    );

    // A hot-reloadable change reaches the ConfigMap without rolling the pods.
    patch_spec(&tps, json!({"config": "[proxy]\nmax-connections = 200\n"})).await;
    eventually(WAIT, "ConfigMap with max-connections 200", || async {
        let text = config_text(&get(&config_maps, "main").await?);
        text.contains("max-connections = 200")
            .then_some(())
            .ok_or(text)
    })
    .await;
    assert_eq!(
        restart_hash(&get(&deployments, "main").await.expect("get")),
        first_hash
    );

    // A setting read only at start-up rolls them.
    patch_spec(
        &tps,
        json!({"config": "[proxy]\nmax-connections = 200\nproxy-protocol = \"v2\"\n"}),
    )
    .await;
    eventually(WAIT, "new restart hash", || async {
        let h = restart_hash(&get(&deployments, "main").await?);
        (h != first_hash).then_some(()).ok_or(h)
    })
    .await;

    // A key the operator manages is refused: Degraded, a Warning event, nothing applied.
    patch_spec(&tps, json!({"config": "[api]\naddr = \"0.0.0.0:1\"\n"})).await;
    let tp = eventually(WAIT, "Degraded InvalidConfig", || async {
        let tp = get(&tps, "main").await?;
        match condition(&tp, "Degraded") {
            Some(c) if c == ("True".into(), "InvalidConfig".into()) => Ok(tp),
            other => Err(format!("Degraded = {other:?}")),
        }
    })
    .await;
    let message = &tp
        .status
        .as_ref()
        .expect("status")
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("Degraded")
        .message;
    assert!(message.contains("`api`"), "{message}");
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    eventually(WAIT, "InvalidConfig event", || async {
        let list = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .iter()
            .find(|e| {
                e.reason.as_deref() == Some("InvalidConfig")
                    && e.type_.as_deref() == Some("Warning")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("main")
            })
            .map(|_| ())
            .ok_or_else(|| format!("{} events, none InvalidConfig", list.items.len()))
    })
    .await;
    assert!(config_text(&get(&config_maps, "main").await.expect("get")).contains("proxy-protocol"));

    // Fixed: Degraded clears. One replica: no PDB (it would block node drains).
    patch_spec(&tps, json!({"config": null, "replicas": 1})).await;
    eventually(WAIT, "Degraded cleared", || async {
        let tp = get(&tps, "main").await?;
        match condition(&tp, "Degraded") {
            Some(c) if c.0 == "False" => Ok(()),
            other => Err(format!("Degraded = {other:?}")),
        }
    })
    .await;
    eventually(WAIT, "PDB removed", || async {
        match pdbs.get_opt("main").await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Playing kube-controller-manager: the Deployment reports one ready, updated replica.
    let d = get(&deployments, "main").await.expect("get");
    deployments
        .patch_status(
            "main",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "observedGeneration": d.metadata.generation,
                "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "availableReplicas": 1,
            }})),
        )
        .await
        .expect("patch deployment status");
    let tp = eventually(WAIT, "ready replica in status", || async {
        let tp = get(&tps, "main").await?;
        let ready = tp.status.as_ref().map(|s| s.ready_replicas).unwrap_or(0);
        if ready == 1 {
            Ok(tp)
        } else {
            Err(format!("readyReplicas = {ready}"))
        }
    })
    .await;
    assert_eq!(
        condition(&tp, "Ready"),
        Some(("False".into(), "NoActiveBackends".into())),
        "ready proxies but no TiDB pod"
    );
    assert_eq!(
        condition(&tp, "Progressing").map(|c| c.1),
        Some("RolloutComplete".into())
    );

    // The scale subresource drives spec.replicas (kubectl scale, HPA).
    tps.patch_scale(
        "main",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 3}})),
    )
    .await
    .expect("scale");
    wait_replicas(&deployments, 3, "Deployment scaled to 3").await;

    // Drift is undone and a deleted owned object comes back.
    deployments
        .patch(
            "main",
            &PatchParams::apply("someone-else").force(),
            &Patch::Apply(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "spec": {"replicas": 7},
            })),
        )
        .await
        .expect("drift");
    wait_replicas(&deployments, 3, "drift undone").await;
    services
        .delete("main", &DeleteParams::default())
        .await
        .expect("delete service");
    eventually(WAIT, "Service recreated", || async {
        let svc = get(&services, "main").await?;
        let node_port = svc
            .spec
            .and_then(|s| s.ports)
            .and_then(|p| p.first().and_then(|p| p.node_port));
        (node_port == Some(30601))
            .then_some(())
            .ok_or(format!("{node_port:?}"))
    })
    .await;

    // The generated Secrets are never regenerated.
    let again = get(&secrets, "main-api-token").await.expect("get");
    assert_eq!(&again.data.as_ref().expect("data")["token"].0, token_bytes);
}

#[tokio::test]
async fn pd_mode_renders_pd_addresses() {
    let server = KubeApiServer::shared();
    server.install_crd().await;
    let ns = server.namespace("reconcile-pd").await;
    let client = server.client().await;
    let _op = OperatorProcess::start(server.kubeconfig_path(), &ns).await;
    let tps: Api<TiProxy> = Api::namespaced(client.clone(), &ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);

    let tp = TiProxy::new(
        "pd",
        spec(json!({
            "backends": { "pdAddrs": ["pd-0.pd:2379", "pd-1.pd:2379"] },
            "podDisruptionBudget": { "enabled": false },
        })),
    );
    tps.create(&PostParams::default(), &tp)
        .await
        .expect("create TiProxy");
    let cm = eventually(WAIT, "ConfigMap", || get(&config_maps, "pd")).await;
    let config = config_text(&cm);
    assert!(
        config.contains("pd-addrs = \"pd-0.pd:2379,pd-1.pd:2379\""),
        "{config}"
    );
    let tp = eventually(WAIT, "status", || async {
        let tp = get(&tps, "pd").await?;
        condition(&tp, "BackendsSynced")
            .map(|_| tp.clone())
            .ok_or_else(|| "no BackendsSynced".to_string())
    })
    .await;
    assert_eq!(
        condition(&tp, "BackendsSynced"),
        Some(("True".into(), "DiscoveredFromPD".into()))
    );
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client, &ns);
    assert!(
        pdbs.get_opt("pd").await.expect("get").is_none(),
        "PDB disabled"
    );
}

#[tokio::test]
async fn example_tiproxy_is_accepted_and_reconciled() {
    let server = KubeApiServer::shared();
    server.install_crd().await;
    let ns = server.namespace("reconcile-example").await;
    let client = server.client().await;
    let _op = OperatorProcess::start(server.kubeconfig_path(), &ns).await;
    let path = tiproxy_tests::workspace_dir().join("examples/kubernetes/tiproxy.yaml");
    let text = std::fs::read_to_string(&path).expect("read example");
    let tp: TiProxy = serde_saphyr::from_str(&text).expect("parse example");
    let tps: Api<TiProxy> = Api::namespaced(client.clone(), &ns);
    tps.create(&PostParams::default(), &tp)
        .await
        .expect("the apiserver accepts the example");
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let svc = eventually(WAIT, "Service", || get(&services, "basic-tiproxy")).await;
    assert_eq!(
        svc.spec.and_then(|s| s.type_).as_deref(),
        Some("LoadBalancer")
    );
    let tp = eventually(WAIT, "status", || async {
        let tp = get(&tps, "basic-tiproxy").await?;
        condition(&tp, "Degraded")
            .map(|_| tp.clone())
            .ok_or_else(|| "no Degraded condition".to_string())
    })
    .await;
    assert_eq!(
        condition(&tp, "Degraded").map(|c| c.0),
        Some("False".into())
    );
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    eventually(WAIT, "generated signing Secret for TiDB", || {
        get(&secrets, "basic-tiproxy-session-token")
    })
    .await;
}

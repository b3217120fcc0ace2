//! The TiProxy CRD against a real kube-apiserver: the committed `crds/tiproxy.yaml` installs and
//! becomes Established; a valid TiProxy is stored with the schema's defaults filled in by the
//! apiserver; invalid TiProxies are rejected by the apiserver itself (CEL rules and OpenAPI
//! bounds), with the rule's message.

use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::Resource;
use serde_json::{json, Value};
use tiproxy_operator::api::TiProxy;
use tiproxy_tests::kube::KubeApiServer;

/// An untyped API for TiProxy, so requests carry exactly the JSON a user would write (a typed
/// `TiProxy` would serialize its serde defaults and hide the apiserver's defaulting).
fn raw_api(client: kube::Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client, ns, &ApiResource::erase::<TiProxy>(&()))
}

fn tiproxy(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": TiProxy::api_version(&()),
        "kind": TiProxy::kind(&()),
        "metadata": { "name": name },
        "spec": spec,
    }))
    .expect("a TiProxy object")
}

fn selector_backends() -> Value {
    json!({ "tidbSelector": { "matchLabels": { "app.kubernetes.io/component": "tidb" } } })
}

/// Creates `obj` and expects the apiserver to refuse it as Invalid (422) with a message that
/// contains `want`.
async fn expect_rejected(api: &Api<DynamicObject>, obj: DynamicObject, want: &str) {
    let name = obj.metadata.name.clone().unwrap_or_default();
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => panic!("TiProxy {name} was accepted; expected rejection with {want:?}"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(
                status.code, 422,
                "TiProxy {name}: expected 422 Invalid, got {status:?}"
            );
            assert!(
                status.message.contains(want),
                "TiProxy {name}: rejection message {:?} lacks {want:?}",
                status.message
            );
        }
        Err(e) => panic!("TiProxy {name}: expected an API rejection, got {e}"),
    }
    // Nothing was stored.
    assert!(
        api.get_opt(&name).await.expect("get").is_none(),
        "rejected TiProxy {name} exists"
    );
}

#[tokio::test]
async fn valid_tiproxy_is_stored_with_defaults() {
    let server = KubeApiServer::shared();
    server.install_crd().await;
    let ns = server.namespace("valid").await;
    let client = server.client().await;
    let api = raw_api(client.clone(), &ns);

    let created = api
        .create(
            &PostParams::default(),
            &tiproxy("demo", json!({ "backends": selector_backends() })),
        )
        .await
        .expect("creating a minimal valid TiProxy");
    assert!(created.metadata.uid.is_some(), "no uid: {created:?}");

    // Read back untyped: the defaults must be in the stored object itself.
    let got = api.get("demo").await.expect("reading the TiProxy back");
    let spec = &got.data["spec"];
    assert_eq!(spec["replicas"], json!(2), "spec: {spec}");
    assert_eq!(spec["minReadySeconds"], json!(5), "spec: {spec}");
    assert_eq!(
        spec["gracefulWaitBeforeShutdownSeconds"],
        json!(10),
        "spec: {spec}"
    );
    assert_eq!(
        spec["gracefulCloseConnTimeoutSeconds"],
        json!(15),
        "spec: {spec}"
    );
    assert_eq!(spec["backends"]["sqlPort"], json!(4000), "spec: {spec}");
    assert_eq!(spec["backends"]["statusPort"], json!(10080), "spec: {spec}");
    assert_eq!(spec["service"]["type"], json!("ClusterIP"), "spec: {spec}");
    assert_eq!(spec["service"]["port"], json!(6000), "spec: {spec}");
    assert_eq!(
        spec["podDisruptionBudget"]["enabled"],
        json!(true),
        "spec: {spec}"
    );
    assert_eq!(
        spec["podDisruptionBudget"]["maxUnavailable"],
        json!(1),
        "spec: {spec}"
    );
    assert_eq!(
        spec["backends"]["tidbSelector"]["matchLabels"]["app.kubernetes.io/component"],
        json!("tidb"),
        "spec: {spec}"
    );

    // The typed API the operator uses reads the same object, and the short name's resource
    // serves it through the status subresource as well.
    let typed: Api<TiProxy> = Api::namespaced(client, &ns);
    let tp = typed.get("demo").await.expect("typed read");
    assert_eq!(tp.spec.replicas, 2);
    assert_eq!(tp.spec.service.port, 6000);
    let st = typed.get_status("demo").await.expect("status subresource");
    assert_eq!(st.metadata.name.as_deref(), Some("demo"));

    // PD addresses instead of a selector are the other valid form; a 48-character name is the
    // longest allowed.
    let long = "a".repeat(48);
    api.create(
        &PostParams::default(),
        &tiproxy(
            &long,
            json!({ "backends": { "pdAddrs": ["pd-0.pd:2379"] } }),
        ),
    )
    .await
    .expect("a 48-character name with pdAddrs is valid");

    // nodePort is fine with a NodePort Service.
    api.create(
        &PostParams::default(),
        &tiproxy(
            "nodeport",
            json!({ "backends": selector_backends(), "service": { "type": "NodePort", "nodePort": 30600 } }),
        ),
    )
    .await
    .expect("nodePort with type NodePort is valid");
}

#[tokio::test]
async fn invalid_tiproxies_are_rejected_by_the_apiserver() {
    let server = KubeApiServer::shared();
    server.install_crd().await;
    let ns = server.namespace("invalid").await;
    let api = raw_api(server.client().await, &ns);

    expect_rejected(
        &api,
        tiproxy(
            "both",
            json!({ "backends": {
                "tidbSelector": { "matchLabels": { "app": "tidb" } },
                "pdAddrs": ["pd:2379"],
            } }),
        ),
        "exactly one of tidbSelector or pdAddrs must be set",
    )
    .await;
    expect_rejected(
        &api,
        tiproxy("neither", json!({ "backends": {} })),
        "exactly one of tidbSelector or pdAddrs must be set",
    )
    .await;
    expect_rejected(
        &api,
        tiproxy(
            "nodeport",
            json!({ "backends": selector_backends(), "service": { "type": "ClusterIP", "nodePort": 30600 } }),
        ),
        "nodePort requires type NodePort or LoadBalancer",
    )
    .await;
    // type defaults to ClusterIP, so a bare nodePort is rejected too.
    expect_rejected(
        &api,
        tiproxy(
            "nodeport-default",
            json!({ "backends": selector_backends(), "service": { "nodePort": 30600 } }),
        ),
        "nodePort requires type NodePort or LoadBalancer",
    )
    .await;
    expect_rejected(
        &api,
        tiproxy(&"n".repeat(49), json!({ "backends": selector_backends() })),
        "metadata.name must be at most 48 characters",
    )
    .await;
    expect_rejected(
        &api,
        tiproxy(
            "ns-without-selector",
            json!({ "backends": { "pdAddrs": ["pd:2379"], "tidbNamespace": "db" } }),
        ),
        "tidbNamespace requires tidbSelector",
    )
    .await;
    expect_rejected(
        &api,
        tiproxy(
            "token",
            json!({ "backends": selector_backends(), "sessionToken": { "secretName": "s", "generate": true } }),
        ),
        "set exactly one of secretName or generate: true",
    )
    .await;
    // OpenAPI bounds and enums are enforced as well.
    expect_rejected(
        &api,
        tiproxy(
            "negative",
            json!({ "backends": selector_backends(), "replicas": -1 }),
        ),
        "spec.replicas",
    )
    .await;
    expect_rejected(
        &api,
        tiproxy(
            "badtype",
            json!({ "backends": selector_backends(), "service": { "type": "External" } }),
        ),
        "spec.service.type",
    )
    .await;
}

//! CRD tests: the committed `crds/tiproxy.yaml` matches the code, defaults, and CEL rules
//! (evaluated locally with kube's `cel` feature).

use std::path::PathBuf;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::cel::ValidationErrors;
use kube::CustomResourceExt;
use serde_json::json;
use tiproxy_operator::api::*;

fn committed_crd_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(tiproxy_operator::CRD_PATH)
}

#[test]
fn committed_crd_matches_code() {
    let generated = tiproxy_operator::crd_yaml().expect("render CRD");
    let path = committed_crd_path();
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is out of date with operator/src/api.rs.\n\
         Regenerate it from the workspace root with:\n\n    \
         cargo run -p tiproxy-operator -- crd > {}\n",
        path.display(),
        tiproxy_operator::CRD_PATH,
    );
}

#[test]
fn crd_shape() {
    let crd = TiProxy::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("tiproxies.proxy.tidb.io")
    );
    assert_eq!(crd.spec.group, GROUP);
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.kind, "TiProxy");
    assert_eq!(crd.spec.names.short_names, Some(vec!["tip".to_string()]));
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, VERSION);
    let sub = v.subresources.as_ref().expect("subresources");
    assert!(sub.status.is_some());
    let scale = sub.scale.as_ref().expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let cols: Vec<_> = v
        .additional_printer_columns
        .as_ref()
        .expect("printer columns")
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(cols, ["Ready", "Replicas", "Backends", "Generation", "Age"]);

    // Rules are present in the schema the apiserver gets.
    let schema = serde_json::to_string(&crd).unwrap();
    for rule in [
        "has(self.tidbSelector) != has(self.pdAddrs)",
        "!has(self.nodePort) || self.type != 'ClusterIP'",
        "has(self.secretName) != self.generate",
        "size(self.metadata.name) <= 48",
    ] {
        assert!(
            schema.contains(&serde_json::to_string(rule).unwrap()),
            "missing rule {rule}"
        );
    }
    assert!(schema.contains(r#""x-kubernetes-list-type":"map""#));
}

fn selector_backends() -> BackendsSpec {
    BackendsSpec {
        tidb_selector: Some(LabelSelector {
            match_labels: Some(
                [(
                    "app.kubernetes.io/component".to_string(),
                    "tidb".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn minimal_yaml_gets_defaults() {
    let tp: TiProxy = serde_saphyr::from_str(
        r#"
apiVersion: proxy.tidb.io/v1alpha1
kind: TiProxy
metadata:
  name: basic
  namespace: db
spec:
  backends:
    tidbSelector:
      matchLabels:
        app.kubernetes.io/component: tidb
"#,
    )
    .expect("parse minimal TiProxy");
    let s = &tp.spec;
    assert_eq!(s.replicas, DEFAULT_REPLICAS);
    assert_eq!(s.backends.sql_port, 4000);
    assert_eq!(s.backends.status_port, 10080);
    assert_eq!(s.backends, selector_backends());
    assert_eq!(s.service, ServiceSpec::default());
    assert_eq!(s.service.service_type, ServiceType::ClusterIP);
    assert_eq!(s.service.port, 6000);
    assert!(s.pod_disruption_budget.enabled);
    assert_eq!(s.pod_disruption_budget.max_unavailable, 1);
    assert_eq!(s.graceful_wait_before_shutdown_seconds, 10);
    assert_eq!(s.graceful_close_conn_timeout_seconds, 15);
    assert!(s.tls.is_none() && s.session_token.is_none() && s.config.is_none());
}

fn sample() -> TiProxy {
    let mut tp = TiProxy::new(
        "main",
        TiProxySpec {
            replicas: 3,
            image: Some("tiproxy:dev".into()),
            image_pull_policy: Some(PullPolicy::IfNotPresent),
            image_pull_secrets: vec![],
            config: Some("[proxy]\nmax-connections = 1000\n".into()),
            backends: selector_backends(),
            tls: Some(TlsSpec {
                server: Some(SecretRef {
                    secret_name: "tiproxy-server-tls".into(),
                }),
                backend_ca: Some(SecretRef {
                    secret_name: "tidb-ca".into(),
                }),
            }),
            session_token: Some(SessionTokenSpec {
                secret_name: None,
                generate: true,
            }),
            service: ServiceSpec {
                service_type: ServiceType::LoadBalancer,
                node_port: Some(30600),
                load_balancer_source_ranges: vec!["10.0.0.0/8".into()],
                external_traffic_policy: Some(ExternalTrafficPolicy::Local),
                ..Default::default()
            },
            resources: None,
            node_selector: Default::default(),
            tolerations: vec![],
            affinity: None,
            topology_spread_constraints: vec![],
            pod_labels: Default::default(),
            pod_annotations: Default::default(),
            priority_class_name: None,
            min_ready_seconds: 5,
            pod_disruption_budget: Default::default(),
            graceful_wait_before_shutdown_seconds: 10,
            graceful_close_conn_timeout_seconds: 15,
        },
    );
    tp.metadata.namespace = Some("db".into());
    tp
}

#[test]
fn sample_serializes_camel_case() {
    let v = serde_json::to_value(sample()).unwrap();
    assert_eq!(v["apiVersion"], "proxy.tidb.io/v1alpha1");
    assert_eq!(v["kind"], "TiProxy");
    let spec = &v["spec"];
    assert_eq!(spec["imagePullPolicy"], "IfNotPresent");
    assert_eq!(spec["backends"]["sqlPort"], 4000);
    assert_eq!(
        spec["backends"]["tidbSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "tidb"
    );
    assert!(spec["backends"].get("pdAddrs").is_none());
    assert_eq!(spec["tls"]["backendCA"]["secretName"], "tidb-ca");
    assert_eq!(spec["tls"]["server"]["secretName"], "tiproxy-server-tls");
    assert_eq!(spec["sessionToken"], json!({"generate": true}));
    assert_eq!(spec["service"]["type"], "LoadBalancer");
    assert_eq!(
        spec["service"]["loadBalancerSourceRanges"],
        json!(["10.0.0.0/8"])
    );
    assert_eq!(spec["service"]["externalTrafficPolicy"], "Local");
    assert_eq!(
        spec["podDisruptionBudget"],
        json!({"enabled": true, "maxUnavailable": 1})
    );
    assert_eq!(spec["gracefulWaitBeforeShutdownSeconds"], 10);
    assert_eq!(spec["gracefulCloseConnTimeoutSeconds"], 15);
    // Round trip.
    let back: TiProxy = serde_json::from_value(v).unwrap();
    assert_eq!(back, sample());
}

/// Asserts that validation failed because of rule(s) with the given message, and not because a
/// rule failed to compile or evaluate.
fn assert_rejected(res: Result<(), ValidationErrors>, message: &str) {
    let errs = res.expect_err("expected the CEL rules to reject the object");
    assert!(
        errs.iter().any(|e| e.message == message),
        "expected a failure with message {message:?}, got: {errs}"
    );
    assert!(
        errs.iter().all(|e| e.message == message),
        "unexpected extra failures: {errs}"
    );
}

#[test]
fn cel_accepts_valid_objects() {
    kube::core::cel::validate_cel(&sample()).expect("sample is valid");

    let mut pd = sample();
    pd.spec.backends = BackendsSpec {
        pd_addrs: Some(vec!["pd-0.pd:2379".into(), "pd-1.pd:2379".into()]),
        ..Default::default()
    };
    pd.spec.session_token = Some(SessionTokenSpec {
        secret_name: Some("session-token".into()),
        generate: false,
    });
    pd.spec.service = ServiceSpec::default();
    kube::core::cel::validate_cel(&pd).expect("PD backends + ClusterIP service are valid");

    let mut np = sample();
    np.spec.service = ServiceSpec {
        service_type: ServiceType::NodePort,
        node_port: Some(30600),
        ..Default::default()
    };
    kube::core::cel::validate_cel(&np).expect("NodePort with nodePort is valid");
}

#[test]
fn cel_rejects_both_selector_and_pd() {
    let mut tp = sample();
    tp.spec.backends.pd_addrs = Some(vec!["pd:2379".into()]);
    assert_rejected(
        kube::core::cel::validate_cel(&tp),
        "exactly one of tidbSelector or pdAddrs must be set",
    );
}

#[test]
fn cel_rejects_no_backends() {
    let mut tp = sample();
    tp.spec.backends = BackendsSpec::default();
    assert_rejected(
        kube::core::cel::validate_cel(&tp),
        "exactly one of tidbSelector or pdAddrs must be set",
    );
}

#[test]
fn cel_rejects_namespace_without_selector() {
    let mut tp = sample();
    tp.spec.backends = BackendsSpec {
        pd_addrs: Some(vec!["pd:2379".into()]),
        tidb_namespace: Some("tidb".into()),
        ..Default::default()
    };
    assert_rejected(
        kube::core::cel::validate_cel(&tp),
        "tidbNamespace requires tidbSelector",
    );
}

#[test]
fn cel_rejects_node_port_with_cluster_ip() {
    let mut tp = sample();
    tp.spec.service = ServiceSpec {
        node_port: Some(30600),
        ..Default::default()
    };
    assert_rejected(
        kube::core::cel::validate_cel(&tp),
        "nodePort requires type NodePort or LoadBalancer",
    );
}

#[test]
fn cel_rejects_source_ranges_without_load_balancer() {
    let mut tp = sample();
    tp.spec.service = ServiceSpec {
        service_type: ServiceType::NodePort,
        load_balancer_source_ranges: vec!["10.0.0.0/8".into()],
        ..Default::default()
    };
    assert_rejected(
        kube::core::cel::validate_cel(&tp),
        "loadBalancerSourceRanges requires type LoadBalancer",
    );
}

#[test]
fn cel_rejects_traffic_policy_with_cluster_ip() {
    let mut tp = sample();
    tp.spec.service = ServiceSpec {
        external_traffic_policy: Some(ExternalTrafficPolicy::Local),
        ..Default::default()
    };
    assert_rejected(
        kube::core::cel::validate_cel(&tp),
        "externalTrafficPolicy requires type NodePort or LoadBalancer",
    );
}

#[test]
fn cel_session_token_needs_exactly_one_source() {
    let mut tp = sample();
    tp.spec.session_token = Some(SessionTokenSpec {
        secret_name: Some("session-token".into()),
        generate: true,
    });
    assert_rejected(
        kube::core::cel::validate_cel(&tp),
        "set exactly one of secretName or generate: true",
    );
    tp.spec.session_token = Some(SessionTokenSpec::default());
    assert_rejected(
        kube::core::cel::validate_cel(&tp),
        "set exactly one of secretName or generate: true",
    );
}

#[test]
fn cel_rejects_long_names() {
    let mut tp = sample();
    tp.metadata.name = Some("x".repeat(MAX_NAME_LENGTH + 1));
    assert_rejected(
        kube::core::cel::validate_cel(&tp),
        "metadata.name must be at most 48 characters",
    );
    tp.metadata.name = Some("x".repeat(MAX_NAME_LENGTH));
    kube::core::cel::validate_cel(&tp).expect("48-character name is valid");
}

//! The Kubernetes examples stay valid: the TiProxy passes the CRD's rules and renders, and the
//! TiDB settings satisfy the operator's own timing and signing-cert checks.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde_json::{json, Value};
use tiproxy_operator::api::TiProxy;
use tiproxy_operator::resources::{self, Defaults};
use tiproxy_operator::topology::requirements::{check, TidbConfig, TidbPod};

fn example(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/kubernetes")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn example_tiproxy_is_valid_and_renders() {
    let tp: TiProxy = serde_saphyr::from_str(&example("tiproxy.yaml")).expect("parse TiProxy");
    kube::core::cel::validate_cel(&tp).expect("CEL rules");
    let res = resources::build(
        &tp,
        &Defaults {
            proxy_image: "unused".into(),
        },
    )
    .expect("renders");
    let svc = res.service.spec.expect("service spec");
    assert_eq!(svc.type_.as_deref(), Some("LoadBalancer"));
    assert!(res.pod_disruption_budget.is_some());
    let config = &res.config_map.data.expect("data")["proxy.toml"];
    assert!(config.contains("max-connections = 10000"), "{config}");
}

/// The TiDB pod TiDB Operator would create from the example's `spec.tidb`, and TiDB's config.
fn tidb_from_example(mutate: impl FnOnce(&mut Value)) -> (Pod, TidbConfig) {
    let mut tc: Value =
        serde_saphyr::from_str(&example("tidb-settings.yaml")).expect("parse TidbCluster");
    mutate(&mut tc);
    let tidb = &tc["spec"]["tidb"];
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "basic-tidb-0" },
        "spec": {
            "terminationGracePeriodSeconds": tidb["terminationGracePeriodSeconds"],
            "containers": [{
                "name": "tidb",
                "lifecycle": tidb["lifecycle"],
                "volumeMounts": tidb["additionalVolumeMounts"],
            }],
            "volumes": tidb["additionalVolumes"],
        },
    }))
    .expect("pod");
    let config: toml::Table = tidb["config"]
        .as_str()
        .expect("config string")
        .parse()
        .expect("TiDB config is TOML");
    let config = TidbConfig {
        session_token_signing_cert: config["security"]["session-token-signing-cert"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        graceful_wait_before_shutdown: config["graceful-wait-before-shutdown"]
            .as_integer()
            .unwrap_or(0),
    };
    (pod, config)
}

fn problems(pod: &Pod, config: &TidbConfig) -> Vec<String> {
    let tp: TiProxy = serde_saphyr::from_str(&example("tiproxy.yaml")).expect("parse TiProxy");
    let expected = tiproxy_operator::names::session_token_secret(&tp.name_any());
    check(
        &[TidbPod {
            pod,
            config: Some(config),
        }],
        Some(&expected),
        4000,
    )
    .into_iter()
    .map(|p| p.reason)
    .collect()
}

#[test]
fn example_tidb_settings_meet_the_requirements() {
    let (pod, config) = tidb_from_example(|_| {});
    assert_eq!(problems(&pod, &config), Vec::<String>::new());

    // The checks do bite on the example: a grace period below preStop + graceful wait + 20 s.
    let (pod, config) = tidb_from_example(|tc| {
        tc["spec"]["tidb"]["terminationGracePeriodSeconds"] = json!(50);
    });
    assert_eq!(problems(&pod, &config), ["TerminationGracePeriodTooShort"]);
    // And a Secret other than the one the TiProxy generated.
    let (pod, config) = tidb_from_example(|tc| {
        tc["spec"]["tidb"]["additionalVolumes"][0]["secret"]["secretName"] = json!("other");
    });
    assert_eq!(problems(&pod, &config), ["SigningCertNotShared"]);
}

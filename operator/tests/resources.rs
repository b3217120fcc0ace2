//! Builder tests: what the operator renders for a TiProxy, without an API server.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tiproxy_operator::api::TiProxy;
use tiproxy_operator::resources::{self, config, ConfigError, Defaults, RESTART_HASH_ANNOTATION};

fn defaults() -> Defaults {
    Defaults {
        proxy_image: "example.com/tiproxy:1.0".into(),
    }
}

fn tiproxy(spec_yaml: &str) -> TiProxy {
    let indented: String = spec_yaml.lines().map(|l| format!("  {l}\n")).collect();
    let yaml = format!(
        "apiVersion: proxy.tidb.io/v1alpha1\nkind: TiProxy\nmetadata:\n  name: main\n  namespace: db\n  uid: 0b7c6a1e-1111-4222-8333-944445555666\nspec:\n{indented}"
    );
    serde_saphyr::from_str(&yaml).expect("parse TiProxy")
}

const SELECTOR: &str = "backends:\n  tidbSelector:\n    matchLabels:\n      app: tidb\n";

fn pod_spec(d: &Deployment) -> &PodSpec {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec")
}

fn parse_config(text: &str) -> toml::Table {
    text.parse().expect("rendered config is TOML")
}

#[test]
fn config_has_managed_keys_and_overrides() {
    let tp = tiproxy(&format!(
        "{SELECTOR}gracefulWaitBeforeShutdownSeconds: 7\nconfig: |\n  [proxy]\n  max-connections = 500\n  [log]\n  format = \"json\"\n"
    ));
    let rendered = config::render(&tp).expect("render");
    let t = parse_config(&rendered.text);
    assert_eq!(t["proxy"]["addr"].as_str(), Some("0.0.0.0:6000"));
    assert_eq!(t["proxy"]["max-connections"].as_integer(), Some(500));
    assert_eq!(
        t["proxy"]["graceful-wait-before-shutdown"].as_integer(),
        Some(0),
        "the pod's preStop sleep does the waiting"
    );
    assert_eq!(
        t["proxy"]["graceful-close-conn-timeout"].as_integer(),
        Some(15)
    );
    assert!(t["proxy"].get("pd-addrs").is_none());
    assert_eq!(t["api"]["addr"].as_str(), Some("0.0.0.0:3080"));
    assert_eq!(
        t["api"]["token-file"].as_str(),
        Some("/etc/tiproxy-api-token/token")
    );
    assert_eq!(t["api"]["ready-requires-backend"].as_bool(), Some(true));
    assert_eq!(t["log"]["format"].as_str(), Some("json"));
    assert!(t.get("security").is_none());
}

#[test]
fn config_pd_and_tls() {
    let tp = tiproxy(
        "backends:\n  pdAddrs: [\"pd-0.pd:2379\", \"pd-1.pd:2379\"]\ntls:\n  server:\n    secretName: srv\n  backendCA:\n    secretName: ca\n",
    );
    let t = parse_config(&config::render(&tp).expect("render").text);
    assert_eq!(
        t["proxy"]["pd-addrs"].as_str(),
        Some("pd-0.pd:2379,pd-1.pd:2379")
    );
    let sec = &t["security"];
    assert_eq!(
        sec["server-tls"]["cert"].as_str(),
        Some("/var/lib/tiproxy-server-tls/tls.crt")
    );
    assert_eq!(
        sec["server-tls"]["key"].as_str(),
        Some("/var/lib/tiproxy-server-tls/tls.key")
    );
    assert_eq!(
        sec["sql-tls"]["ca"].as_str(),
        Some("/var/lib/tiproxy-backend-ca/ca.crt")
    );
    assert_eq!(sec["require-backend-tls"].as_bool(), Some(true));
}

#[test]
fn config_rejects_managed_keys_syntax_and_unknown_keys() {
    for (config, key) in [
        ("[proxy]\naddr = \"0.0.0.0:1\"", "proxy.addr"),
        ("[proxy]\nbackends = [\"a:1\"]", "proxy.backends"),
        ("[api]\naddr = \"0.0.0.0:1\"", "api"),
        (
            "[security.server-tls]\nauto-certs = true",
            "security.server-tls",
        ),
    ] {
        let tp = tiproxy(&format!(
            "{SELECTOR}config: '{}'\n",
            config.replace('\n', "\n\n")
        ));
        match config::render(&tp) {
            Err(ConfigError::Managed { key: k, .. }) => assert_eq!(k, key),
            other => panic!("{config:?}: expected Managed({key}), got {other:?}"),
        }
    }
    let tp = tiproxy(&format!("{SELECTOR}config: '[proxy'\n"));
    assert!(matches!(config::render(&tp), Err(ConfigError::Syntax(_))));
    // The proxy's own parser catches typos and bad values.
    let tp = tiproxy(&format!(
        "{SELECTOR}config: |\n  [proxy]\n  max-conections = 1\n"
    ));
    let err = config::render(&tp).expect_err("typo must be refused");
    assert!(
        matches!(&err, ConfigError::Invalid(m) if m.contains("max-conections")),
        "{err}"
    );
    let tp = tiproxy(&format!(
        "{SELECTOR}config: |\n  [proxy]\n  proxy-protocol = \"v3\"\n"
    ));
    assert!(matches!(config::render(&tp), Err(ConfigError::Invalid(_))));
}

#[test]
fn restart_hash_ignores_hot_reloaded_keys() {
    let hash = |config: &str| {
        let tp = tiproxy(&format!("{SELECTOR}config: |\n{}", indent(config)));
        config::render(&tp).expect("render").restart_hash
    };
    let base = hash("[proxy]\nmax-connections = 10\n[log]\nlevel = \"info\"\n");
    assert_eq!(
        base,
        hash("[proxy]\nmax-connections = 20\n[log]\nlevel = \"debug\"\n"),
        "max-connections and log.level are hot-reloaded"
    );
    assert_ne!(
        base,
        hash("[proxy]\nmax-connections = 10\nproxy-protocol = \"v2\"\n[log]\nlevel = \"info\"\n"),
        "proxy-protocol needs a restart"
    );
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

#[test]
fn deployment_rolls_surge_first_with_probes_and_grace() {
    let tp = tiproxy(&format!(
        "{SELECTOR}replicas: 3\ngracefulWaitBeforeShutdownSeconds: 20\ngracefulCloseConnTimeoutSeconds: 30\nminReadySeconds: 8\npodLabels:\n  team: db\n  app.kubernetes.io/name: hijack\npodAnnotations:\n  a: b\n"
    ));
    let res = resources::build(&tp, &defaults()).expect("build");
    let d = &res.deployment;
    assert_eq!(d.metadata.name.as_deref(), Some("main"));
    assert_eq!(d.metadata.namespace.as_deref(), Some("db"));
    let owner = &d.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(owner.kind, "TiProxy");
    assert_eq!(owner.controller, Some(true));
    let spec = d.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.min_ready_seconds, Some(8));
    let ru = spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref())
        .expect("rolling update");
    assert_eq!(ru.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(ru.max_unavailable, Some(IntOrString::Int(0)));

    let meta = spec.template.metadata.as_ref().expect("template metadata");
    let labels = meta.labels.as_ref().expect("labels");
    assert_eq!(labels["team"], "db");
    assert_eq!(
        labels["app.kubernetes.io/name"], "tiproxy",
        "operator labels win"
    );
    assert_eq!(
        spec.selector.match_labels.as_ref().expect("selector")["app.kubernetes.io/instance"],
        "main"
    );
    let annotations = meta.annotations.as_ref().expect("annotations");
    assert_eq!(annotations["a"], "b");
    assert_eq!(annotations["prometheus.io/port"], "3080");
    assert_eq!(annotations[RESTART_HASH_ANNOTATION].len(), 64);

    let pod = pod_spec(d);
    assert_eq!(pod.termination_grace_period_seconds, Some(60));
    let pre_stop_sleep = pod.containers[0]
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| h.sleep.as_ref())
        .map(|s| s.seconds);
    assert_eq!(pre_stop_sleep, Some(20), "preStop sleeps the graceful wait");
    assert_eq!(pod.automount_service_account_token, Some(false));
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("example.com/tiproxy:1.0"));
    assert_eq!(
        c.args.as_deref(),
        Some(
            &[
                "--config".to_string(),
                "/etc/tiproxy/proxy.toml".to_string()
            ][..]
        )
    );
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(path(&c.readiness_probe).as_deref(), Some("/readyz"));
    assert_eq!(path(&c.liveness_probe).as_deref(), Some("/healthz"));
    let ports: Vec<_> = c
        .ports
        .as_ref()
        .expect("ports")
        .iter()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        [("mysql".to_string(), 6000), ("api".to_string(), 3080)]
    );
    let volumes: Vec<_> = pod
        .volumes
        .as_ref()
        .expect("volumes")
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(volumes, ["config", "api-token"]);
    // Default spreading over zones and nodes.
    let spread = pod.topology_spread_constraints.as_ref().expect("spread");
    assert_eq!(spread.len(), 2);
    assert!(spread
        .iter()
        .all(|s| s.when_unsatisfiable == "ScheduleAnyway"));
}

#[test]
fn deployment_mounts_tls_secrets_and_user_placement() {
    let tp = tiproxy(&format!(
        "{SELECTOR}image: my/tiproxy:2\nimagePullPolicy: Always\ntls:\n  server:\n    secretName: srv\n  backendCA:\n    secretName: ca\nnodeSelector:\n  pool: proxy\ntopologySpreadConstraints:\n- maxSkew: 2\n  topologyKey: kubernetes.io/hostname\n  whenUnsatisfiable: DoNotSchedule\npriorityClassName: high\n"
    ));
    let res = resources::build(&tp, &defaults()).expect("build");
    let pod = pod_spec(&res.deployment);
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("my/tiproxy:2"));
    assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
    let secret_of = |name: &str| {
        pod.volumes
            .as_ref()
            .and_then(|v| v.iter().find(|v| v.name == name))
            .and_then(|v| v.secret.as_ref())
            .and_then(|s| s.secret_name.clone())
    };
    assert_eq!(secret_of("server-tls").as_deref(), Some("srv"));
    assert_eq!(secret_of("backend-ca").as_deref(), Some("ca"));
    assert_eq!(secret_of("api-token").as_deref(), Some("main-api-token"));
    let mounts: Vec<_> = c
        .volume_mounts
        .as_ref()
        .expect("mounts")
        .iter()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(mounts.contains(&"/var/lib/tiproxy-server-tls"));
    assert!(mounts.contains(&"/var/lib/tiproxy-backend-ca"));
    assert_eq!(
        pod.node_selector.as_ref().expect("nodeSelector")["pool"],
        "proxy"
    );
    let spread = pod.topology_spread_constraints.as_ref().expect("spread");
    assert_eq!(spread.len(), 1, "user constraints replace the default");
    assert_eq!(spread[0].max_skew, 2);
    assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
}

#[test]
fn service_options() {
    let tp = tiproxy(&format!(
        "{SELECTOR}service:\n  type: LoadBalancer\n  port: 4000\n  nodePort: 30400\n  annotations:\n    service.beta.kubernetes.io/aws-load-balancer-type: nlb\n  labels:\n    expose: public\n  loadBalancerSourceRanges: [\"10.0.0.0/8\"]\n  externalTrafficPolicy: Local\n  loadBalancerClass: service.k8s.aws/nlb\n"
    ));
    let svc = resources::service(&tp);
    let spec = svc.spec.as_ref().expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    let port = &spec.ports.as_ref().expect("ports")[0];
    assert_eq!(port.port, 4000);
    assert_eq!(port.node_port, Some(30400));
    assert_eq!(port.target_port, Some(IntOrString::String("mysql".into())));
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
    assert_eq!(
        spec.load_balancer_source_ranges.as_deref(),
        Some(&["10.0.0.0/8".to_string()][..])
    );
    assert_eq!(
        spec.load_balancer_class.as_deref(),
        Some("service.k8s.aws/nlb")
    );
    assert_eq!(
        spec.selector.as_ref().expect("selector")["app.kubernetes.io/instance"],
        "main"
    );
    let labels = svc.metadata.labels.as_ref().expect("labels");
    assert_eq!(labels["expose"], "public");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "tiproxy-operator");
    assert!(svc
        .metadata
        .annotations
        .as_ref()
        .expect("annotations")
        .contains_key("service.beta.kubernetes.io/aws-load-balancer-type"));

    let plain = resources::service(&tiproxy(SELECTOR));
    let spec = plain.spec.as_ref().expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.ports.as_ref().expect("ports")[0].port, 6000);
    assert!(spec.external_traffic_policy.is_none() && spec.load_balancer_source_ranges.is_none());
}

#[test]
fn pdb_only_with_two_or_more_replicas() {
    let pdb = resources::pod_disruption_budget(&tiproxy(SELECTOR)).expect("2 replicas by default");
    let spec = pdb.spec.as_ref().expect("spec");
    assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
    assert!(
        resources::pod_disruption_budget(&tiproxy(&format!("{SELECTOR}replicas: 1\n"))).is_none()
    );
    assert!(resources::pod_disruption_budget(&tiproxy(&format!(
        "{SELECTOR}podDisruptionBudget:\n  enabled: false\n"
    )))
    .is_none());
}

#[test]
fn secrets() {
    let tp = tiproxy(SELECTOR);
    let a = resources::api_token_secret(&tp).expect("token");
    let b = resources::api_token_secret(&tp).expect("token");
    let token =
        |s: &k8s_openapi::api::core::v1::Secret| s.data.as_ref().expect("data")["token"].0.clone();
    assert_eq!(token(&a).len(), 64);
    assert_ne!(token(&a), token(&b), "tokens are random");
    assert!(a.metadata.owner_references.is_some());

    let st = resources::session_token_secret(&tp).expect("cert");
    assert_eq!(st.metadata.name.as_deref(), Some("main-session-token"));
    assert_eq!(st.type_.as_deref(), Some("kubernetes.io/tls"));
    assert!(
        st.metadata.owner_references.is_none(),
        "TiDB depends on it beyond the TiProxy"
    );
    let data = st.data.as_ref().expect("data");
    let crt = String::from_utf8(data["tls.crt"].0.clone()).expect("pem");
    let key = String::from_utf8(data["tls.key"].0.clone()).expect("pem");
    assert!(crt.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(key.contains("PRIVATE KEY-----"));
}

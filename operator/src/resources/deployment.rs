//! The proxy Deployment: surge-first rollouts, probes on the admin API, and a preStop sleep and
//! termination grace period derived from the graceful-shutdown settings.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, HTTPGetAction, KeyToPath,
    Lifecycle, LifecycleHandler, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    SeccompProfile, SecretVolumeSource, SecurityContext, SleepAction, TopologySpreadConstraint,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::config::{RenderedConfig, API_TOKEN_DIR, BACKEND_CA_DIR, SERVER_TLS_DIR};
use super::{object_meta, Defaults, RESTART_HASH_ANNOTATION};
use crate::api::{PullPolicy, TiProxy};
use crate::names;

/// Unprivileged user and group of the proxy process (the distroless `nonroot` ids).
const RUN_AS: i64 = 65532;
/// Seconds past the proxy's own graceful shutdown before the kubelet may kill it.
const SHUTDOWN_MARGIN_SECONDS: i64 = 10;

/// A terminating proxy pod first sleeps `gracefulWaitBeforeShutdownSeconds` in its preStop
/// hook, serving as usual while Service endpoints and load balancers stop sending it new
/// clients; on SIGTERM it stops accepting and gives sessions up to
/// `gracefulCloseConnTimeoutSeconds` to reach a transaction boundary. The kubelet must not
/// kill it before that.
pub fn termination_grace_period_seconds(tp: &TiProxy) -> i64 {
    i64::from(tp.spec.graceful_wait_before_shutdown_seconds)
        + i64::from(tp.spec.graceful_close_conn_timeout_seconds)
        + SHUTDOWN_MARGIN_SECONDS
}

/// The preStop hook: the native sleep action (no shell in the image), when there is a wait.
fn pre_stop(tp: &TiProxy) -> Option<Lifecycle> {
    let seconds = tp.spec.graceful_wait_before_shutdown_seconds;
    (seconds > 0).then(|| Lifecycle {
        pre_stop: Some(LifecycleHandler {
            sleep: Some(SleepAction {
                seconds: i64::from(seconds),
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

pub fn deployment(tp: &TiProxy, defaults: &Defaults, rendered: &RenderedConfig) -> Deployment {
    let name = tp.name_any();
    let spec = &tp.spec;
    let selector = names::selector_labels(&name);

    let mut pod_labels = spec.pod_labels.clone();
    pod_labels.extend(names::labels(&name));
    let mut pod_annotations = spec.pod_annotations.clone();
    pod_annotations.extend([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        (
            "prometheus.io/port".to_string(),
            names::API_PORT.to_string(),
        ),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
        (
            RESTART_HASH_ANNOTATION.to_string(),
            rendered.restart_hash.clone(),
        ),
    ]);

    let (volumes, mounts) = volumes(tp);
    let topology_spread_constraints =
        if spec.topology_spread_constraints.is_empty() && spec.affinity.is_none() {
            default_spread(&selector)
        } else {
            spec.topology_spread_constraints.clone()
        };

    let container = Container {
        name: names::CONTAINER_NAME.to_string(),
        image: Some(
            spec.image
                .clone()
                .unwrap_or_else(|| defaults.proxy_image.clone()),
        ),
        image_pull_policy: spec.image_pull_policy.map(|p| pull_policy(p).to_string()),
        args: Some(vec![
            "--config".to_string(),
            format!("{}/{}", names::CONFIG_DIR, names::CONFIG_FILE),
        ]),
        ports: Some(vec![
            container_port(names::SQL_PORT_NAME, names::SQL_PORT),
            container_port(names::API_PORT_NAME, names::API_PORT),
        ]),
        // Readiness stays 503 until the proxy knows a backend (and turns 503 on SIGTERM);
        // checked often so the Service follows quickly.
        readiness_probe: Some(http_probe("/readyz", 2, 1, 2)),
        liveness_probe: Some(http_probe("/healthz", 10, 2, 3)),
        startup_probe: Some(http_probe("/healthz", 1, 1, 60)),
        lifecycle: pre_stop(tp),
        resources: spec.resources.clone(),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    Deployment {
        metadata: object_meta(tp, names::workload_name(&name)),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            min_ready_seconds: Some(spec.min_ready_seconds),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            // Surge first: a new proxy is ready before an old one starts draining.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_string()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes),
                    termination_grace_period_seconds: Some(termination_grace_period_seconds(tp)),
                    // The proxy never talks to the Kubernetes API.
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    image_pull_secrets: (!spec.image_pull_secrets.is_empty())
                        .then(|| spec.image_pull_secrets.clone()),
                    node_selector: (!spec.node_selector.is_empty())
                        .then(|| spec.node_selector.clone()),
                    tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
                    affinity: spec.affinity.clone(),
                    topology_spread_constraints: (!topology_spread_constraints.is_empty())
                        .then_some(topology_spread_constraints),
                    priority_class_name: spec.priority_class_name.clone(),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS),
                        run_as_group: Some(RUN_AS),
                        fs_group: Some(RUN_AS),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_string(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The config, the admin API token and the TLS Secrets, each mounted read-only.
fn volumes(tp: &TiProxy) -> (Vec<Volume>, Vec<VolumeMount>) {
    let name = tp.name_any();
    let mut volumes = vec![
        Volume {
            name: "config".to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::workload_name(&name),
                items: Some(vec![KeyToPath {
                    key: names::CONFIG_KEY.to_string(),
                    path: names::CONFIG_FILE.to_string(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        secret_volume("api-token", &names::api_token_secret(&name)),
    ];
    let mut mounts = vec![
        mount("config", names::CONFIG_DIR),
        mount("api-token", API_TOKEN_DIR),
    ];
    let tls = tp.spec.tls.clone().unwrap_or_default();
    if let Some(server) = &tls.server {
        volumes.push(secret_volume("server-tls", &server.secret_name));
        mounts.push(mount("server-tls", SERVER_TLS_DIR));
    }
    if let Some(ca) = &tls.backend_ca {
        volumes.push(secret_volume("backend-ca", &ca.secret_name));
        mounts.push(mount("backend-ca", BACKEND_CA_DIR));
    }
    (volumes, mounts)
}

fn secret_volume(volume: &str, secret: &str) -> Volume {
    Volume {
        name: volume.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_string()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mount(volume: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: volume.to_string(),
        mount_path: path.to_string(),
        read_only: Some(true),
        ..Default::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_string()),
        container_port: port,
        protocol: Some("TCP".to_string()),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, timeout: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String(names::API_PORT_NAME.to_string()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(timeout),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// Without user placement rules, spread proxies over zones and nodes, best effort, so one
/// failure domain does not take every proxy with it.
fn default_spread(selector: &BTreeMap<String, String>) -> Vec<TopologySpreadConstraint> {
    ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
        .into_iter()
        .map(|key| TopologySpreadConstraint {
            max_skew: 1,
            topology_key: key.to_string(),
            when_unsatisfiable: "ScheduleAnyway".to_string(),
            label_selector: Some(LabelSelector {
                match_labels: Some(selector.clone()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect()
}

fn pull_policy(p: PullPolicy) -> &'static str {
    match p {
        PullPolicy::Always => "Always",
        PullPolicy::IfNotPresent => "IfNotPresent",
        PullPolicy::Never => "Never",
    }
}

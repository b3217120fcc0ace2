//! The `TiProxy` custom resource (`proxy.tidb.io/v1alpha1`).
//!
//! The CRD YAML in `crds/tiproxy.yaml` is generated from these types with
//! `cargo run -p tiproxy-operator -- crd > crds/tiproxy.yaml`; a test fails when it drifts.
//!
//! Cross-field rules are CEL rules (`x-kubernetes-validations`) enforced by the apiserver.
//! Every string / list a rule touches is bounded (`maxLength` / `maxItems`) so the rules stay
//! within the apiserver's CEL cost budget.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the `TiProxy` resource.
pub const GROUP: &str = "proxy.tidb.io";
/// API version of the `TiProxy` resource.
pub const VERSION: &str = "v1alpha1";

/// Default number of proxy replicas.
pub const DEFAULT_REPLICAS: i32 = 2;
/// Default TiDB SQL port.
pub const DEFAULT_SQL_PORT: i32 = 4000;
/// Default TiDB status (HTTP) port.
pub const DEFAULT_STATUS_PORT: i32 = 10080;
/// Default port of the proxy Service.
pub const DEFAULT_SERVICE_PORT: i32 = 6000;
/// Default seconds a terminating proxy keeps serving before it starts closing connections.
pub const DEFAULT_GRACEFUL_WAIT_BEFORE_SHUTDOWN_SECONDS: i32 = 10;
/// Default seconds a terminating proxy waits for connections to close.
pub const DEFAULT_GRACEFUL_CLOSE_CONN_TIMEOUT_SECONDS: i32 = 15;
/// Default seconds a new proxy pod must be ready before the rollout continues.
pub const DEFAULT_MIN_READY_SECONDS: i32 = 5;
/// Maximum length of a `TiProxy` name: derived object names (`<name>-session-token`, …) must
/// stay valid DNS-1035 labels (63 characters).
pub const MAX_NAME_LENGTH: usize = 48;

/// Desired state of a tiproxy deployment in front of a TiDB cluster.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "proxy.tidb.io",
    version = "v1alpha1",
    kind = "TiProxy",
    plural = "tiproxies",
    singular = "tiproxy",
    shortname = "tip",
    namespaced,
    status = "TiProxyStatus",
    derive = "PartialEq",
    doc = "A tiproxy deployment (MySQL proxy for TiDB with session migration) managed by tiproxy-operator.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "Status of the Ready condition",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        description = "Ready proxy replicas",
        json_path = ".status.readyReplicas"
    ),
    printcolumn(
        name = "Backends",
        type_ = "integer",
        description = "Active TiDB backends",
        json_path = ".status.activeBackends"
    ),
    printcolumn(
        name = "Generation",
        type_ = "integer",
        description = "Generation of the backend set last pushed to the proxies",
        json_path = ".status.backendGeneration",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 48")
        .message("metadata.name must be at most 48 characters")
)]
#[serde(rename_all = "camelCase")]
pub struct TiProxySpec {
    /// Number of proxy pods.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Proxy container image; the operator's default proxy image when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Image pull policy of the proxy container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,

    /// Secrets used to pull the proxy image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// Proxy configuration overrides (TOML), merged over the configuration the operator renders.
    /// Keys the operator manages (listen addresses, backends, TLS paths) are rejected by the
    /// operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub config: Option<String>,

    /// Where the TiDB servers are: a TiDB pod selector, or PD addresses.
    pub backends: BackendsSpec,

    /// TLS for clients (server certificate) and towards TiDB (backend CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    /// Session-token signing certificate shared with TiDB, required for session migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_token: Option<SessionTokenSpec>,

    /// The Service clients connect through.
    #[serde(default)]
    pub service: ServiceSpec,

    /// Compute resources of the proxy container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Node selector of the proxy pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of the proxy pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Affinity of the proxy pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Topology spread constraints of the proxy pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,

    /// Extra labels on the proxy pods (operator-managed labels win).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,

    /// Extra annotations on the proxy pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,

    /// Priority class of the proxy pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,

    /// Seconds a new proxy pod must be ready before the rollout replaces the next one.
    #[serde(default = "default_min_ready_seconds")]
    #[schemars(range(min = 0, max = 3600))]
    pub min_ready_seconds: i32,

    /// PodDisruptionBudget for the proxy pods.
    #[serde(default)]
    pub pod_disruption_budget: PodDisruptionBudgetSpec,

    /// Seconds a terminating proxy keeps accepting and serving connections (while it is removed
    /// from Service endpoints) before it starts closing them.
    #[serde(default = "default_graceful_wait_before_shutdown_seconds")]
    #[schemars(range(min = 0, max = 3600))]
    pub graceful_wait_before_shutdown_seconds: i32,

    /// Seconds a terminating proxy waits for client connections to finish before closing them.
    #[serde(default = "default_graceful_close_conn_timeout_seconds")]
    #[schemars(range(min = 0, max = 3600))]
    pub graceful_close_conn_timeout_seconds: i32,
}

/// Image pull policy.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// TiDB backends: exactly one of `tidbSelector` or `pdAddrs`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.tidbSelector) != has(self.pdAddrs)")
        .message("exactly one of tidbSelector or pdAddrs must be set"),
    validation = Rule::new("!has(self.tidbNamespace) || has(self.tidbSelector)")
        .message("tidbNamespace requires tidbSelector")
)]
pub struct BackendsSpec {
    /// Selects the TiDB pods (in `tidbNamespace`) the proxy routes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tidb_selector: Option<LabelSelector>,

    /// Namespace of the TiDB pods; the TiProxy's namespace when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub tidb_namespace: Option<String>,

    /// TiDB SQL port.
    #[serde(default = "default_sql_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub sql_port: i32,

    /// TiDB status (HTTP) port, used for health checks.
    #[serde(default = "default_status_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub status_port: i32,

    /// PD addresses (`host:port`); the proxy discovers TiDB servers through PD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 253)))]
    pub pd_addrs: Option<Vec<String>>,
}

impl Default for BackendsSpec {
    fn default() -> Self {
        Self {
            tidb_selector: None,
            tidb_namespace: None,
            sql_port: DEFAULT_SQL_PORT,
            status_port: DEFAULT_STATUS_PORT,
            pd_addrs: None,
        }
    }
}

/// TLS settings.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Server certificate for client connections (a `kubernetes.io/tls` Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<SecretRef>,

    /// CA (Secret key `ca.crt`) used to verify TiDB servers; enables TLS towards TiDB.
    #[serde(default, rename = "backendCA", skip_serializing_if = "Option::is_none")]
    pub backend_ca: Option<SecretRef>,
}

/// A reference to a Secret in the TiProxy's namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

/// Session-token signing certificate: either an existing Secret or one the operator generates
/// (`<name>-session-token`) for users to mount on TiDB as well.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.secretName) != self.generate")
        .message("set exactly one of secretName or generate: true")
)]
pub struct SessionTokenSpec {
    /// Existing `kubernetes.io/tls` Secret with the signing certificate and key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,

    /// Generate a self-signed signing certificate into `<name>-session-token`.
    #[serde(default)]
    pub generate: bool,
}

/// The proxy Service.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.nodePort) || self.type != 'ClusterIP'")
        .message("nodePort requires type NodePort or LoadBalancer"),
    validation = Rule::new("!has(self.loadBalancerSourceRanges) || size(self.loadBalancerSourceRanges) == 0 || self.type == 'LoadBalancer'")
        .message("loadBalancerSourceRanges requires type LoadBalancer"),
    validation = Rule::new("!has(self.externalTrafficPolicy) || self.type != 'ClusterIP'")
        .message("externalTrafficPolicy requires type NodePort or LoadBalancer"),
    validation = Rule::new("!has(self.loadBalancerClass) || self.type == 'LoadBalancer'")
        .message("loadBalancerClass requires type LoadBalancer")
)]
pub struct ServiceSpec {
    /// Service type.
    #[serde(rename = "type", default)]
    pub service_type: ServiceType,

    /// Service port clients connect to.
    #[serde(default = "default_service_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Fixed node port (NodePort / LoadBalancer only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub node_port: Option<i32>,

    /// Annotations on the Service (e.g. cloud load-balancer settings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,

    /// Extra labels on the Service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,

    /// Load balancer implementation (LoadBalancer only), e.g. `service.k8s.aws/nlb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub load_balancer_class: Option<String>,

    /// Client CIDRs allowed through the load balancer (LoadBalancer only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 64)))]
    pub load_balancer_source_ranges: Vec<String>,

    /// External traffic policy (NodePort / LoadBalancer only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<ExternalTrafficPolicy>,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            service_type: ServiceType::default(),
            port: DEFAULT_SERVICE_PORT,
            node_port: None,
            annotations: BTreeMap::new(),
            labels: BTreeMap::new(),
            load_balancer_class: None,
            load_balancer_source_ranges: Vec::new(),
            external_traffic_policy: None,
        }
    }
}

/// Service type.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

/// Service external traffic policy.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExternalTrafficPolicy {
    Cluster,
    Local,
}

/// PodDisruptionBudget settings.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodDisruptionBudgetSpec {
    /// Create a PodDisruptionBudget for the proxy pods.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Maximum number of unavailable proxy pods during voluntary disruptions.
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 1))]
    pub max_unavailable: i32,
}

impl Default for PodDisruptionBudgetSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            max_unavailable: 1,
        }
    }
}

/// Observed state of a TiProxy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TiProxyStatus {
    /// The `metadata.generation` the operator last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Number of proxy pods (scale subresource).
    #[serde(default)]
    pub replicas: i32,

    /// Number of ready proxy pods.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Number of proxy pods running the current pod template.
    #[serde(default)]
    pub updated_replicas: i32,

    /// Label selector of the proxy pods, as a string (scale subresource, HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// Conditions: Ready, Progressing, BackendsSynced, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Number of Active backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_backends: Option<i32>,

    /// Generation of the backend set last pushed to the proxies (rises with every change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_generation: Option<u64>,

    /// TiDB backends known to the operator.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub backends: Vec<BackendStatus>,

    /// Proxy pods and the backend generation each has acknowledged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub proxies: Vec<ProxyStatus>,
}

/// One proxy pod, as the operator last reached it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    /// Proxy pod name.
    pub pod: String,
    /// Backend generation the proxy acknowledged; unset until the first push succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_generation: Option<u64>,
    /// Why the last push failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One TiDB backend.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackendStatus {
    /// TiDB pod name.
    pub pod: String,
    /// `host:port` the proxy connects to.
    pub address: String,
    /// Routing state of the backend.
    pub state: BackendState,
}

/// Routing state of a backend.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// Ready; receives new connections.
    Active,
    /// Terminating or no longer ready; sessions are being migrated away.
    Draining,
}

fn default_replicas() -> i32 {
    DEFAULT_REPLICAS
}
fn default_sql_port() -> i32 {
    DEFAULT_SQL_PORT
}
fn default_status_port() -> i32 {
    DEFAULT_STATUS_PORT
}
fn default_service_port() -> i32 {
    DEFAULT_SERVICE_PORT
}
fn default_graceful_wait_before_shutdown_seconds() -> i32 {
    DEFAULT_GRACEFUL_WAIT_BEFORE_SHUTDOWN_SECONDS
}
fn default_graceful_close_conn_timeout_seconds() -> i32 {
    DEFAULT_GRACEFUL_CLOSE_CONN_TIMEOUT_SECONDS
}
fn default_min_ready_seconds() -> i32 {
    DEFAULT_MIN_READY_SECONDS
}
fn default_true() -> bool {
    true
}
fn default_max_unavailable() -> i32 {
    1
}

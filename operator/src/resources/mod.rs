//! Pure builders: a `TiProxy` in, the Kubernetes objects that run it out. Nothing here talks
//! to the API server, so every rendering rule is unit-tested.

pub mod config;
mod deployment;
mod secrets;
mod service;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::api::TiProxy;
use crate::names;

pub use config::{ConfigError, RenderedConfig};
pub use deployment::{deployment, termination_grace_period_seconds};
pub use secrets::{api_token_secret, session_token_secret, SecretError};
pub use service::{pod_disruption_budget, service};

/// Operator-wide settings the builders need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// Proxy image used when `spec.image` is unset.
    pub proxy_image: String,
}

/// Pod-template annotation carrying [`RenderedConfig::restart_hash`].
pub const RESTART_HASH_ANNOTATION: &str = "proxy.tidb.io/config-hash";

/// Everything the reconciler applies for one TiProxy (Secrets are created separately, once).
#[derive(Debug, Clone)]
pub struct Resources {
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub service: Service,
    /// `None` when disabled or with fewer than two replicas (it would block node drains).
    pub pod_disruption_budget: Option<PodDisruptionBudget>,
}

/// Renders the objects of `tp`.
pub fn build(tp: &TiProxy, defaults: &Defaults) -> Result<Resources, ConfigError> {
    let rendered = config::render(tp)?;
    Ok(Resources {
        config_map: config_map(tp, &rendered),
        deployment: deployment(tp, defaults, &rendered),
        service: service(tp),
        pod_disruption_budget: pod_disruption_budget(tp),
    })
}

fn config_map(tp: &TiProxy, rendered: &RenderedConfig) -> ConfigMap {
    ConfigMap {
        metadata: object_meta(tp, names::workload_name(&tp.name_any())),
        data: Some(BTreeMap::from([(
            names::CONFIG_KEY.to_string(),
            rendered.text.clone(),
        )])),
        ..Default::default()
    }
}

/// Metadata of an object owned by `tp`: its namespace, the operator's labels, and a controller
/// owner reference so the object is garbage-collected with the TiProxy.
pub fn object_meta(tp: &TiProxy, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: tp.namespace(),
        labels: Some(names::labels(&tp.name_any())),
        owner_references: owner_reference(tp).map(|o| vec![o]),
        ..Default::default()
    }
}

/// The controller owner reference to `tp`; `None` for an object without a UID (never stored).
pub fn owner_reference(tp: &TiProxy) -> Option<OwnerReference> {
    tp.controller_owner_ref(&())
}

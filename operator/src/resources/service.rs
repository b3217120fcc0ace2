//! The client Service and the PodDisruptionBudget of the proxy pods.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::object_meta;
use crate::api::{ExternalTrafficPolicy, ServiceType, TiProxy};
use crate::names;

/// The Service clients connect through. Only ready proxies are behind it, so a proxy that is
/// shutting down (its `/readyz` answers 503) stops getting new clients.
pub fn service(tp: &TiProxy) -> Service {
    let name = tp.name_any();
    let spec = &tp.spec.service;
    let mut metadata = object_meta(tp, names::workload_name(&name));
    let mut labels = spec.labels.clone();
    labels.extend(names::labels(&name));
    metadata.labels = Some(labels);
    if !spec.annotations.is_empty() {
        metadata.annotations = Some(spec.annotations.clone());
    }
    let external = spec.service_type != ServiceType::ClusterIP;
    let load_balancer = spec.service_type == ServiceType::LoadBalancer;
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(service_type(spec.service_type).to_string()),
            selector: Some(names::selector_labels(&name)),
            ports: Some(vec![ServicePort {
                name: Some(names::SQL_PORT_NAME.to_string()),
                port: spec.port,
                target_port: Some(IntOrString::String(names::SQL_PORT_NAME.to_string())),
                protocol: Some("TCP".to_string()),
                node_port: spec.node_port.filter(|_| external),
                ..Default::default()
            }]),
            external_traffic_policy: spec
                .external_traffic_policy
                .filter(|_| external)
                .map(|p| traffic_policy(p).to_string()),
            load_balancer_source_ranges: (load_balancer
                && !spec.load_balancer_source_ranges.is_empty())
            .then(|| spec.load_balancer_source_ranges.clone()),
            load_balancer_class: spec.load_balancer_class.clone().filter(|_| load_balancer),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn service_type(t: ServiceType) -> &'static str {
    match t {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    }
}

fn traffic_policy(p: ExternalTrafficPolicy) -> &'static str {
    match p {
        ExternalTrafficPolicy::Cluster => "Cluster",
        ExternalTrafficPolicy::Local => "Local",
    }
}

/// The PodDisruptionBudget, when enabled and there are at least two replicas: with one replica
/// any budget would block node drains forever.
pub fn pod_disruption_budget(tp: &TiProxy) -> Option<PodDisruptionBudget> {
    let pdb = &tp.spec.pod_disruption_budget;
    if !pdb.enabled || tp.spec.replicas < 2 {
        return None;
    }
    let name = tp.name_any();
    Some(PodDisruptionBudget {
        metadata: object_meta(tp, names::workload_name(&name)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(pdb.max_unavailable)),
            selector: Some(LabelSelector {
                match_labels: Some(names::selector_labels(&name)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

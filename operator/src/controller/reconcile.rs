//! One reconcile of a TiProxy: make sure its Secrets exist, apply its objects with server-side
//! apply, and write its status.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::status::{self, Observed, DEGRADED};
use super::{Context, Error};
use crate::api::TiProxy;
use crate::{metrics, names, resources};

/// Periodic re-check even when nothing changed (drift, missed events).
const RESYNC: Duration = Duration::from_secs(300);

pub async fn reconcile(tp: Arc<TiProxy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&tp, &ctx).await;
    metrics::get()
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    let label = if result.is_ok() { "ok" } else { "error" };
    metrics::get().reconciles.with_label_values(&[label]).inc();
    if result.is_ok() {
        ctx.reset_failures(&ObjectRef::from_obj(tp.as_ref()));
    }
    result
}

async fn reconcile_inner(tp: &TiProxy, ctx: &Context) -> Result<Action, Error> {
    let name = tp.name_any();
    let namespace = tp.namespace().ok_or(Error::NotNamespaced)?;
    if tp.meta().deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove what we created.
        return Ok(Action::await_change());
    }
    let client = ctx.client.clone();

    ensure_secret(
        ctx,
        tp,
        &Api::namespaced(client.clone(), &namespace),
        names::api_token_secret(&name),
        || resources::api_token_secret(tp),
    )
    .await?;
    if tp.spec.session_token.as_ref().is_some_and(|s| s.generate) {
        ensure_secret(
            ctx,
            tp,
            &Api::namespaced(client.clone(), &namespace),
            names::session_token_secret(&name),
            || resources::session_token_secret(tp),
        )
        .await?;
    }

    let rendered = resources::build(tp, &ctx.defaults);
    let mut observed = Observed::default();
    let deployment;
    match rendered {
        Err(e) => {
            tracing::warn!(tiproxy = %name, %namespace, error = %e, "cannot render the TiProxy");
            observed.render_error = Some(e.to_string());
            deployment = Api::<Deployment>::namespaced(client.clone(), &namespace)
                .get_opt(&names::workload_name(&name))
                .await
                .map_err(|e| Error::kube("get", "Deployment", &name, e))?;
        }
        Ok(res) => {
            apply(&client, &namespace, &res.config_map).await?;
            deployment = Some(apply(&client, &namespace, &res.deployment).await?);
            apply(&client, &namespace, &res.service).await?;
            match &res.pod_disruption_budget {
                Some(pdb) => {
                    apply(&client, &namespace, pdb).await?;
                }
                None => {
                    delete_if_present::<PodDisruptionBudget>(&client, &namespace, &name).await?
                }
            }
        }
    }
    observed.deployment = deployment.as_ref();
    let report = ctx.topology.report(&ObjectRef::from_obj(tp));
    observed.report = report.as_ref();

    let new = status::compute(tp, &observed, Time(k8s_openapi::jiff::Timestamp::now()));
    if tp.status.as_ref() != Some(&new) {
        announce_degraded(ctx, tp, &new).await;
        let api: Api<TiProxy> = Api::namespaced(client, &namespace);
        let patch = serde_json::json!({
            "apiVersion": TiProxy::api_version(&()),
            "kind": TiProxy::kind(&()),
            "status": new,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(names::MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|e| Error::kube("update status of", "TiProxy", &name, e))?;
    }
    Ok(Action::requeue(RESYNC))
}

/// Server-side applies `obj` with forced ownership and returns what the API server stored.
async fn apply<K>(client: &kube::Client, namespace: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let name = obj.name_any();
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(
            &name,
            &PatchParams::apply(names::MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await
        .map_err(|e| Error::kube("apply", K::kind(&()).as_ref(), &name, e))
}

async fn delete_if_present<K>(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    match Api::<K>::namespaced(client.clone(), namespace)
        .delete(name, &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(Error::kube("delete", K::kind(&()).as_ref(), name, e)),
    }
}

/// Creates the Secret `name` with `build` unless it exists; an existing one is never touched,
/// so generated tokens and certificates stay stable.
async fn ensure_secret(
    ctx: &Context,
    tp: &TiProxy,
    api: &Api<Secret>,
    name: String,
    build: impl FnOnce() -> Result<Secret, resources::SecretError>,
) -> Result<(), Error> {
    let existing = api
        .get_metadata_opt(&name)
        .await
        .map_err(|e| Error::kube("get", "Secret", &name, e))?;
    if existing.is_some() {
        return Ok(());
    }
    let secret = build()?;
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(tiproxy = %tp.name_any(), secret = %name, "created Secret");
            ctx.publish(
                tp,
                Event {
                    type_: EventType::Normal,
                    reason: "SecretCreated".into(),
                    note: Some(format!("created Secret {name}")),
                    action: "CreateSecret".into(),
                    secondary: None,
                },
            )
            .await;
            Ok(())
        }
        // Another reconcile won the race; its Secret is as good as ours.
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
        Err(e) => Err(Error::kube("create", "Secret", &name, e)),
    }
}

/// A Warning event when the Degraded condition turns true or changes its reason.
async fn announce_degraded(ctx: &Context, tp: &TiProxy, new: &crate::api::TiProxyStatus) {
    let find = |s: Option<&crate::api::TiProxyStatus>| {
        s.and_then(|s| s.conditions.iter().find(|c| c.type_ == DEGRADED).cloned())
    };
    let Some(now) = find(Some(new)) else { return };
    if now.status != "True" {
        return;
    }
    let before = find(tp.status.as_ref());
    if before.is_some_and(|b| b.status == "True" && b.reason == now.reason) {
        return;
    }
    ctx.publish(
        tp,
        Event {
            type_: EventType::Warning,
            reason: now.reason.clone(),
            note: Some(now.message.clone()),
            action: "Reconcile".into(),
            secondary: None,
        },
    )
    .await;
}

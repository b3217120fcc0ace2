//! The TiProxy controller: watches TiProxies and the objects they own, reconciles each one
//! (`reconcile`), and retries failures with capped exponential backoff (`error_policy`).

mod reconcile;
pub mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};

use crate::api::TiProxy;
use crate::resources::{Defaults, SecretError};
use crate::topology::Topology;
use crate::{names, scoped_api};

pub use reconcile::reconcile;

/// First retry delay after a failed reconcile; doubled per consecutive failure.
const BACKOFF_BASE: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {action} {kind} {name}: {source}")]
    Kube {
        action: &'static str,
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("TiProxy has no namespace")]
    NotNamespaced,
}

impl Error {
    fn kube(action: &'static str, kind: &str, name: &str, source: kube::Error) -> Self {
        Error::Kube {
            action,
            kind: kind.to_string(),
            name: name.to_string(),
            source,
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub defaults: Defaults,
    pub topology: Arc<Topology>,
    recorder: Recorder,
    /// Consecutive failures per TiProxy, for the backoff.
    failures: Mutex<HashMap<ObjectRef<TiProxy>, u32>>,
}

impl Context {
    pub fn new(client: Client, defaults: Defaults, topology: Arc<Topology>) -> Self {
        let reporter = Reporter {
            controller: names::MANAGER.to_string(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            defaults,
            topology,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes an event on `tp`; a failure to record an event never fails a reconcile.
    async fn publish(&self, tp: &TiProxy, event: Event) {
        if let Err(e) = self.recorder.publish(&event, &tp.object_ref(&())).await {
            tracing::warn!(tiproxy = %tp.name_any(), reason = %event.reason, error = %e, "cannot record event");
        }
    }

    fn reset_failures(&self, key: &ObjectRef<TiProxy>) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Counts a failure of `key` and returns how long to wait before the next attempt.
    fn backoff(&self, key: ObjectRef<TiProxy>) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        backoff_delay(*n)
    }
}

/// `BACKOFF_BASE * 2^(failures-1)`, capped at `BACKOFF_MAX`.
fn backoff_delay(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_MAX)
}

fn error_policy(tp: Arc<TiProxy>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff(ObjectRef::from_obj(tp.as_ref()));
    tracing::warn!(
        tiproxy = %tp.name_any(),
        namespace = tp.namespace().unwrap_or_default(),
        error = %error,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// Runs the controller until the process is told to stop (SIGTERM / Ctrl-C).
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    let tiproxies = scoped_api::<TiProxy>(&client, namespace.as_deref());
    let deployments = scoped_api::<Deployment>(&client, namespace.as_deref());
    let services = scoped_api::<Service>(&client, namespace.as_deref());
    let config_maps = scoped_api::<ConfigMap>(&client, namespace.as_deref());
    let pdbs = scoped_api::<PodDisruptionBudget>(&client, namespace.as_deref());
    // Only objects the operator made matter; this keeps the watches small in big clusters.
    let owned = watcher::Config::default()
        .labels(&format!("app.kubernetes.io/managed-by={}", names::MANAGER));
    let mut controller = Controller::new(tiproxies, watcher::Config::default().any_semantic())
        .owns(deployments, owned.clone())
        .owns(services, owned.clone())
        .owns(config_maps, owned.clone())
        .owns(pdbs, owned);
    if let Some(changes) = ctx.topology.take_changes() {
        controller = controller
            .reconcile_on(futures::stream::unfold(changes, |mut rx| async move {
                rx.recv().await.map(|r| (r, rx))
            }));
    }
    controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(tiproxy = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "controller event"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff_delay(1), Duration::from_secs(2));
        assert_eq!(backoff_delay(2), Duration::from_secs(4));
        assert_eq!(backoff_delay(5), Duration::from_secs(32));
        assert_eq!(backoff_delay(9), BACKOFF_MAX);
        assert_eq!(backoff_delay(u32::MAX), BACKOFF_MAX);
    }
}

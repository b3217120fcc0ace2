//! Names, labels and ports shared by everything the operator renders and watches, so the
//! reconciler, the topology pusher and the Helm chart agree on them.

use std::collections::BTreeMap;

/// Field manager for server-side apply, and the `app.kubernetes.io/managed-by` value.
pub const MANAGER: &str = "tiproxy-operator";

/// `app.kubernetes.io/name` of proxy pods.
pub const APP_NAME: &str = "tiproxy";
/// `app.kubernetes.io/component` of proxy pods.
pub const COMPONENT: &str = "proxy";

/// Container port clients connect to (MySQL protocol).
pub const SQL_PORT: i32 = 6000;
/// Name of the SQL container / Service port.
pub const SQL_PORT_NAME: &str = "mysql";
/// Container port of the proxy's HTTP admin API (`/healthz`, `/readyz`, `/metrics`,
/// `/api/v1/backends`).
pub const API_PORT: i32 = 3080;
/// Name of the admin API container port; the pusher looks it up on each proxy pod.
pub const API_PORT_NAME: &str = "api";

/// Name of the proxy container.
pub const CONTAINER_NAME: &str = "tiproxy";
/// Where the rendered configuration is mounted, and the file the proxy reads.
pub const CONFIG_DIR: &str = "/etc/tiproxy";
pub const CONFIG_FILE: &str = "proxy.toml";
/// Key of the configuration in the ConfigMap.
pub const CONFIG_KEY: &str = "proxy.toml";

/// Key of the admin API token in its Secret.
pub const API_TOKEN_KEY: &str = "token";

/// Labels that select the proxy pods of one TiProxy (a stable subset of [`labels`]).
pub fn selector_labels(tiproxy: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), APP_NAME.to_string()),
        (
            "app.kubernetes.io/instance".to_string(),
            tiproxy.to_string(),
        ),
    ])
}

/// Labels on every object rendered for one TiProxy.
pub fn labels(tiproxy: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(tiproxy);
    labels.insert(
        "app.kubernetes.io/managed-by".to_string(),
        MANAGER.to_string(),
    );
    labels.insert(
        "app.kubernetes.io/component".to_string(),
        COMPONENT.to_string(),
    );
    labels
}

/// `k=v,k=v` form of [`selector_labels`] (status.selector, list calls).
pub fn selector_string(tiproxy: &str) -> String {
    selector_labels(tiproxy)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Deployment, Service, ConfigMap and PodDisruptionBudget share the TiProxy's name.
pub fn workload_name(tiproxy: &str) -> String {
    tiproxy.to_string()
}

/// Secret holding the generated session-token signing certificate.
pub fn session_token_secret(tiproxy: &str) -> String {
    format!("{tiproxy}-session-token")
}

/// Secret holding the bearer token that guards the proxies' mutating admin endpoints.
pub fn api_token_secret(tiproxy: &str) -> String {
    format!("{tiproxy}-api-token")
}

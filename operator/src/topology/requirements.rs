//! What TiDB pods need for sessions to move, checked from their pod spec and their `/config`
//! (pure checks, plus the `/config` fetch).

use std::collections::BTreeMap;
use std::time::Duration;

use hyper::{Method, StatusCode};
use k8s_openapi::api::core::v1::{Container, LifecycleHandler, Pod, Volume};

use super::http::{self, HttpError};
use super::Problem;

/// Minimum seconds between a TiDB pod's deletion and TiDB closing its connections (preStop
/// sleep + `graceful-wait-before-shutdown`). The operator marks the backend draining when the
/// pod gets its deletionTimestamp, and the proxy moves a draining backend's sessions within
/// about 5 s (sessions idle or between transactions move at once; busy ones at their next
/// safe point); the other 5 s is margin for the push and slow statements.
pub const MIN_MIGRATION_WINDOW_SECS: i64 = 10;
/// Seconds TiDB needs after the graceful wait to close its remaining connections and exit,
/// plus margin, before the kubelet's SIGKILL (`terminationGracePeriodSeconds`).
pub const SHUTDOWN_MARGIN_SECS: i64 = 20;
/// Kubernetes' default `terminationGracePeriodSeconds`.
pub const DEFAULT_TERMINATION_GRACE_PERIOD_SECS: i64 = 30;
/// Pods named in one problem message before "and N more".
const MAX_NAMED_PODS: usize = 5;

/// The parts of TiDB's `GET /config` the checks use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TidbConfig {
    /// `security.session-token-signing-cert` (empty: unset).
    pub session_token_signing_cert: String,
    /// `graceful-wait-before-shutdown`, seconds.
    pub graceful_wait_before_shutdown: i64,
}

/// Why `/config` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Http(#[from] HttpError),
    #[error("GET /config answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("GET /config: {0}")]
    Parse(String),
}

/// Parses TiDB's `/config` JSON. A missing `graceful-wait-before-shutdown` is 0 (TiDB's
/// default); a missing signing cert is empty.
pub fn parse_config(body: &[u8]) -> Result<TidbConfig, ConfigError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ConfigError::Parse(format!("not JSON: {e}")))?;
    if !v.is_object() {
        return Err(ConfigError::Parse("not a JSON object".into()));
    }
    let cert = match v.pointer("/security/session-token-signing-cert") {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.trim().to_string(),
        Some(other) => {
            return Err(ConfigError::Parse(format!(
                "security.session-token-signing-cert is not a string: {other}"
            )))
        }
    };
    let wait = match v.get("graceful-wait-before-shutdown") {
        None | Some(serde_json::Value::Null) => 0,
        Some(g) => g.as_i64().ok_or_else(|| {
            ConfigError::Parse(format!(
                "graceful-wait-before-shutdown is not an integer: {g}"
            ))
        })?,
    };
    Ok(TidbConfig {
        session_token_signing_cert: cert,
        graceful_wait_before_shutdown: wait,
    })
}

/// `GET http://{status_addr}/config`, parsed.
pub async fn fetch_config(status_addr: &str, timeout: Duration) -> Result<TidbConfig, ConfigError> {
    let resp = http::request(status_addr, Method::GET, "/config", None, None, timeout).await?;
    if resp.status != StatusCode::OK {
        return Err(ConfigError::Status {
            status: resp.status,
            body: http::snippet(&resp.body),
        });
    }
    parse_config(&resp.body)
}

/// The TiDB container of a pod: the one named `tidb`, else the one exposing `sql_port`, else
/// the first.
pub fn tidb_container(pod: &Pod, sql_port: u16) -> Option<&Container> {
    let containers = &pod.spec.as_ref()?.containers;
    containers
        .iter()
        .find(|c| c.name == "tidb")
        .or_else(|| {
            containers.iter().find(|c| {
                c.ports
                    .iter()
                    .flatten()
                    .any(|p| p.container_port == i32::from(sql_port))
            })
        })
        .or_else(|| containers.first())
}

/// Seconds the container's preStop hook sleeps: `sleep.seconds`, or an exec of `sleep N`
/// (directly or in `sh -c "…"`, summing every `sleep` of the script). 0 when there is no hook
/// or it is not recognised.
pub fn pre_stop_sleep_seconds(container: &Container) -> i64 {
    container
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .map_or(0, handler_sleep_seconds)
}

fn handler_sleep_seconds(h: &LifecycleHandler) -> i64 {
    if let Some(s) = &h.sleep {
        return s.seconds.max(0);
    }
    let Some(cmd) = h.exec.as_ref().and_then(|e| e.command.as_ref()) else {
        return 0;
    };
    let Some(first) = cmd.first() else { return 0 };
    let prog = basename(first);
    if prog == "sleep" {
        return sleep_args(cmd[1..].iter().map(String::as_str));
    }
    if matches!(prog, "sh" | "bash" | "dash" | "ash" | "zsh") {
        if let Some(pos) = cmd
            .iter()
            .position(|a| a == "-c" || a == "-ec" || a == "-ce")
        {
            if let Some(script) = cmd.get(pos + 1) {
                return script_sleep_seconds(script);
            }
        }
    }
    0
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Sum of the `sleep` commands of a simple shell script (`;`, `&&`, `||`, newlines).
fn script_sleep_seconds(script: &str) -> i64 {
    script
        .split(['\n', ';', '&', '|'])
        .map(|segment| {
            let mut words = segment.split_whitespace();
            let mut w = words.next();
            if w == Some("exec") {
                w = words.next();
            }
            match w {
                Some(c) if basename(c) == "sleep" => sleep_args(words),
                _ => 0,
            }
        })
        .sum()
}

/// Seconds of `sleep ARGS` (GNU: several arguments add up; suffixes s/m/h/d; fractions).
fn sleep_args<'a>(args: impl Iterator<Item = &'a str>) -> i64 {
    let mut total = 0f64;
    for a in args {
        let a = a.trim_matches(|c| c == '"' || c == '\'');
        let (num, mult) = match a.chars().last() {
            Some('s') => (&a[..a.len() - 1], 1.0),
            Some('m') => (&a[..a.len() - 1], 60.0),
            Some('h') => (&a[..a.len() - 1], 3600.0),
            Some('d') => (&a[..a.len() - 1], 86400.0),
            _ => (a, 1.0),
        };
        match num.parse::<f64>() {
            Ok(n) if n.is_finite() && n >= 0.0 => total += n * mult,
            _ => return 0,
        }
    }
    total.min(i64::MAX as f64) as i64
}

/// Where a TiDB pod's signing cert file comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum CertSource {
    Secret(String),
    ConfigMap(String),
    /// A projected volume: its Secret and ConfigMap names.
    Projected {
        secrets: Vec<String>,
        config_maps: Vec<String>,
    },
    /// Another kind of volume (`emptyDir`, `hostPath`, …).
    OtherVolume {
        volume: String,
        kind: String,
    },
    /// No volume mount holds the path (the image, or a relative path).
    NotMounted,
}

impl CertSource {
    fn describe(&self) -> String {
        match self {
            CertSource::Secret(n) => format!("Secret {n}"),
            CertSource::ConfigMap(n) => format!("ConfigMap {n} (not a Secret)"),
            CertSource::Projected {
                secrets,
                config_maps,
            } => {
                let mut parts = Vec::new();
                if !secrets.is_empty() {
                    parts.push(format!("Secrets {}", secrets.join(", ")));
                }
                if !config_maps.is_empty() {
                    parts.push(format!("ConfigMaps {}", config_maps.join(", ")));
                }
                format!("a projected volume of {}", parts.join(" and "))
            }
            CertSource::OtherVolume { volume, kind } => {
                format!("{kind} volume {volume} (not a Secret)")
            }
            CertSource::NotMounted => "no mounted volume (not a Secret)".to_string(),
        }
    }

    fn secret_names(&self) -> Vec<&str> {
        match self {
            CertSource::Secret(n) => vec![n.as_str()],
            CertSource::Projected { secrets, .. } => secrets.iter().map(String::as_str).collect(),
            _ => Vec::new(),
        }
    }
}

/// The volume of `container` that holds `path` (the longest mountPath that is a path prefix).
pub fn cert_source(pod: &Pod, container: &Container, path: &str) -> CertSource {
    if !path.starts_with('/') {
        return CertSource::NotMounted;
    }
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| {
            let mp = m.mount_path.trim_end_matches('/');
            path == mp || mp.is_empty() || path.starts_with(&format!("{mp}/"))
        })
        .max_by_key(|m| m.mount_path.trim_end_matches('/').len());
    let Some(mount) = mount else {
        return CertSource::NotMounted;
    };
    let volume = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .and_then(|vs| vs.iter().find(|v| v.name == mount.name));
    match volume {
        Some(v) => volume_source(v),
        None => CertSource::OtherVolume {
            volume: mount.name.clone(),
            kind: "undeclared".into(),
        },
    }
}

fn volume_source(v: &Volume) -> CertSource {
    if let Some(s) = &v.secret {
        return CertSource::Secret(s.secret_name.clone().unwrap_or_default());
    }
    if let Some(c) = &v.config_map {
        return CertSource::ConfigMap(c.name.clone());
    }
    if let Some(p) = &v.projected {
        let mut secrets = Vec::new();
        let mut config_maps = Vec::new();
        for src in p.sources.iter().flatten() {
            if let Some(s) = &src.secret {
                secrets.push(s.name.clone());
            }
            if let Some(c) = &src.config_map {
                config_maps.push(c.name.clone());
            }
        }
        secrets.sort();
        config_maps.sort();
        return CertSource::Projected {
            secrets,
            config_maps,
        };
    }
    let kind = serde_json::to_value(v)
        .ok()
        .and_then(|j| {
            j.as_object()
                .and_then(|o| o.keys().find(|k| k.as_str() != "name").cloned())
        })
        .unwrap_or_else(|| "unknown".into());
    CertSource::OtherVolume {
        volume: v.name.clone(),
        kind,
    }
}

/// One TiDB pod as the checks see it.
#[derive(Debug, Clone, Copy)]
pub struct TidbPod<'a> {
    pub pod: &'a Pod,
    /// Its `/config`, when it could be read (pods without one are not judged).
    pub config: Option<&'a TidbConfig>,
}

/// Problems of the TiDB pods, in a fixed order of reasons. `expected_secret` is the Secret the
/// TiProxy says TiDB should mount (`spec.sessionToken`), if any.
pub fn check(pods: &[TidbPod<'_>], expected_secret: Option<&str>, sql_port: u16) -> Vec<Problem> {
    let mut no_cert: Vec<String> = Vec::new();
    let mut sources: BTreeMap<CertSource, Vec<String>> = BTreeMap::new();
    let mut short_window: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut short_grace: BTreeMap<String, Vec<String>> = BTreeMap::new();

    let mut pods: Vec<&TidbPod<'_>> = pods.iter().collect();
    pods.sort_by(|a, b| a.pod.metadata.name.cmp(&b.pod.metadata.name));
    for p in pods {
        let Some(config) = p.config else { continue };
        let name = p.pod.metadata.name.clone().unwrap_or_default();
        let container = tidb_container(p.pod, sql_port);
        if config.session_token_signing_cert.is_empty() {
            no_cert.push(name.clone());
        } else if let Some(c) = container {
            sources
                .entry(cert_source(p.pod, c, &config.session_token_signing_cert))
                .or_default()
                .push(name.clone());
        }
        let pre_stop = container.map_or(0, pre_stop_sleep_seconds);
        let wait = config.graceful_wait_before_shutdown.max(0);
        let window = pre_stop.saturating_add(wait);
        if window < MIN_MIGRATION_WINDOW_SECS {
            short_window
                .entry(format!(
                    "preStop sleep {pre_stop} s + graceful-wait-before-shutdown {wait} s = {window} s"
                ))
                .or_default()
                .push(name.clone());
        }
        let tgps = p
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(DEFAULT_TERMINATION_GRACE_PERIOD_SECS);
        let needed = window.saturating_add(SHUTDOWN_MARGIN_SECS);
        if tgps < needed {
            short_grace
                .entry(format!(
                    "terminationGracePeriodSeconds {tgps} < preStop sleep {pre_stop} s + \
                     graceful-wait-before-shutdown {wait} s + {SHUTDOWN_MARGIN_SECS} s = {needed} s"
                ))
                .or_default()
                .push(name);
        }
    }

    let mut problems = Vec::new();
    if !no_cert.is_empty() {
        problems.push(Problem {
            reason: "NoSessionTokenCert".into(),
            message: format!(
                "TiDB {} {} no security.session-token-signing-cert: sessions cannot migrate to \
                 or from {}",
                pod_word(no_cert.len()),
                list(&no_cert),
                if no_cert.len() == 1 { "it" } else { "them" }
            ),
        });
    }
    if sources.len() > 1 {
        let groups: Vec<String> = sources
            .iter()
            .map(|(src, pods)| format!("{} from {}", list(pods), src.describe()))
            .collect();
        problems.push(Problem {
            reason: "SigningCertNotShared".into(),
            message: format!(
                "TiDB pods read the session-token signing cert from different sources ({}): \
                 every TiDB must use the same cert, or sessions cannot migrate between them",
                groups.join("; ")
            ),
        });
    } else if let (Some((src, pods)), Some(expected)) = (sources.iter().next(), expected_secret) {
        let names = src.secret_names();
        if !names.is_empty() && !names.contains(&expected) {
            problems.push(Problem {
                reason: "SigningCertNotShared".into(),
                message: format!(
                    "TiDB {} {} the session-token signing cert from {}, not from this \
                     TiProxy's session-token Secret {expected}",
                    pod_word(pods.len()),
                    list(pods),
                    src.describe()
                ),
            });
        }
    }
    if !short_window.is_empty() {
        problems.push(Problem {
            reason: "MigrationWindowTooShort".into(),
            message: format!(
                "{}: under {MIN_MIGRATION_WINDOW_SECS} s, sessions may not all move off a \
                 stopping TiDB before it closes them (raise graceful-wait-before-shutdown or \
                 the preStop sleep)",
                groups(&short_window)
            ),
        });
    }
    if !short_grace.is_empty() {
        problems.push(Problem {
            reason: "TerminationGracePeriodTooShort".into(),
            message: format!(
                "{}: the kubelet may kill TiDB before it has closed its connections",
                groups(&short_grace)
            ),
        });
    }
    problems
}

fn pod_word(n: usize) -> &'static str {
    if n == 1 {
        "pod"
    } else {
        "pods"
    }
}

fn groups(g: &BTreeMap<String, Vec<String>>) -> String {
    g.iter()
        .map(|(detail, pods)| format!("TiDB {} {}: {detail}", pod_word(pods.len()), list(pods)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `a, b, c` (at most [`MAX_NAMED_PODS`] names, then "and N more").
fn list(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(MAX_NAMED_PODS)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > MAX_NAMED_PODS {
        s.push_str(&format!(" and {} more", names.len() - MAX_NAMED_PODS));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapVolumeSource, ContainerPort, EmptyDirVolumeSource, ExecAction, Lifecycle, PodSpec,
        ProjectedVolumeSource, SecretProjection, SecretVolumeSource, SleepAction, VolumeMount,
        VolumeProjection,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    const CERT: &str = "/var/lib/tidb-session-token/tls.crt";

    fn config(cert: &str, wait: i64) -> TidbConfig {
        TidbConfig {
            session_token_signing_cert: cert.into(),
            graceful_wait_before_shutdown: wait,
        }
    }

    fn secret_volume(name: &str, secret: &str) -> Volume {
        Volume {
            name: name.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A TiDB pod with the cert dir mounted from `volume`, preStop `sleep`, TGPS `tgps`.
    fn tidb(
        name: &str,
        volume: Volume,
        pre_stop: Option<LifecycleHandler>,
        tgps: Option<i64>,
    ) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![
                    Container {
                        name: "sidecar".into(),
                        ..Default::default()
                    },
                    Container {
                        name: "tidb".into(),
                        volume_mounts: Some(vec![
                            VolumeMount {
                                name: "data".into(),
                                mount_path: "/var/lib".into(),
                                ..Default::default()
                            },
                            VolumeMount {
                                name: volume.name.clone(),
                                mount_path: "/var/lib/tidb-session-token/".into(),
                                ..Default::default()
                            },
                        ]),
                        lifecycle: pre_stop.map(|h| Lifecycle {
                            pre_stop: Some(h),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ],
                volumes: Some(vec![
                    Volume {
                        name: "data".into(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Default::default()
                    },
                    volume,
                ]),
                termination_grace_period_seconds: tgps,
                ..Default::default()
            }),
            status: None,
        }
    }

    fn sleep(seconds: i64) -> Option<LifecycleHandler> {
        Some(LifecycleHandler {
            sleep: Some(SleepAction { seconds }),
            ..Default::default()
        })
    }

    fn exec(cmd: &[&str]) -> LifecycleHandler {
        LifecycleHandler {
            exec: Some(ExecAction {
                command: Some(cmd.iter().map(|s| s.to_string()).collect()),
            }),
            ..Default::default()
        }
    }

    /// A healthy pod: shared Secret, preStop 5 s, TGPS 60.
    fn good(name: &str) -> Pod {
        tidb(name, secret_volume("st", "shared"), sleep(5), Some(60))
    }

    fn run(pods: &[(&Pod, Option<&TidbConfig>)], expected: Option<&str>) -> Vec<Problem> {
        let pods: Vec<TidbPod> = pods
            .iter()
            .map(|&(pod, config)| TidbPod { pod, config })
            .collect();
        check(&pods, expected, 4000)
    }

    fn reasons(ps: &[Problem]) -> Vec<&str> {
        ps.iter().map(|p| p.reason.as_str()).collect()
    }

    #[test]
    fn healthy_pods_have_no_problem() {
        let c = config(CERT, 10);
        let (a, b) = (good("tidb-0"), good("tidb-1"));
        assert_eq!(run(&[(&a, Some(&c)), (&b, Some(&c))], Some("shared")), []);
        assert_eq!(run(&[(&a, Some(&c)), (&b, Some(&c))], None), []);
        // Exactly at the limits: 5 + 5 = 10 s window, TGPS 30 = 10 + 20.
        let c = config(CERT, 5);
        let p = tidb("tidb-0", secret_volume("st", "shared"), sleep(5), None);
        assert_eq!(run(&[(&p, Some(&c))], Some("shared")), []);
    }

    #[test]
    fn pods_without_config_are_not_judged() {
        let bad = tidb("tidb-0", secret_volume("st", "other"), None, Some(1));
        assert_eq!(run(&[(&bad, None)], Some("shared")), []);
    }

    #[test]
    fn missing_cert_is_reported_with_the_pods() {
        let (a, b) = (good("tidb-0"), good("tidb-1"));
        let ps = run(
            &[(&b, Some(&config("", 10))), (&a, Some(&config(CERT, 10)))],
            None,
        );
        assert_eq!(reasons(&ps), ["NoSessionTokenCert"]);
        assert!(
            ps[0].message.contains("TiDB pod tidb-1 "),
            "{}",
            ps[0].message
        );
        assert!(!ps[0].message.contains("tidb-0"), "{}", ps[0].message);
    }

    #[test]
    fn different_secrets_are_not_shared() {
        let c = config(CERT, 10);
        let a = good("tidb-0");
        let b = tidb("tidb-1", secret_volume("st", "other"), sleep(5), Some(60));
        let ps = run(&[(&a, Some(&c)), (&b, Some(&c))], None);
        assert_eq!(reasons(&ps), ["SigningCertNotShared"]);
        assert!(
            ps[0].message.contains("tidb-1 from Secret other")
                && ps[0].message.contains("tidb-0 from Secret shared"),
            "{}",
            ps[0].message
        );
    }

    #[test]
    fn one_secret_other_than_the_expected_one() {
        let c = config(CERT, 10);
        let (a, b) = (good("tidb-0"), good("tidb-1"));
        let ps = run(&[(&a, Some(&c)), (&b, Some(&c))], Some("tp-session-token"));
        assert_eq!(reasons(&ps), ["SigningCertNotShared"]);
        assert!(
            ps[0].message.contains("tidb-0, tidb-1")
                && ps[0].message.contains("Secret shared")
                && ps[0].message.contains("tp-session-token"),
            "{}",
            ps[0].message
        );
    }

    #[test]
    fn projected_volume_with_the_expected_secret_is_fine() {
        let v = Volume {
            name: "st".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    secret: Some(SecretProjection {
                        name: "tp-session-token".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let p = tidb("tidb-0", v, sleep(5), Some(60));
        let c = config(CERT, 10);
        assert_eq!(run(&[(&p, Some(&c))], Some("tp-session-token")), []);
    }

    #[test]
    fn non_secret_sources_are_reported_only_when_pods_disagree() {
        let cm = Volume {
            name: "st".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: "certs".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = config(CERT, 10);
        let (a, b) = (
            tidb("tidb-0", cm.clone(), sleep(5), Some(60)),
            tidb("tidb-1", cm, sleep(5), Some(60)),
        );
        // Agreeing on a ConfigMap (or on the image's own file): cannot tell, no problem.
        assert_eq!(run(&[(&a, Some(&c)), (&b, Some(&c))], Some("shared")), []);
        let in_image = config("/etc/tidb/cert.pem", 10);
        assert_eq!(
            run(&[(&a, Some(&in_image)), (&b, Some(&in_image))], None),
            []
        );
        // One pod on the image's file, one on a Secret: they disagree.
        let s = good("tidb-2");
        let ps = run(&[(&a, Some(&in_image)), (&s, Some(&c))], None);
        assert_eq!(reasons(&ps), ["SigningCertNotShared"]);
        assert!(
            ps[0].message.contains("tidb-0 from no mounted volume"),
            "{}",
            ps[0].message
        );
        // Under the emptyDir mounted at /var/lib (not the cert dir): another kind of volume.
        let other = config("/var/lib/other/cert.pem", 10);
        let ps = run(&[(&a, Some(&other)), (&s, Some(&c))], None);
        assert!(
            ps[0].message.contains("emptyDir volume data"),
            "{}",
            ps[0].message
        );
    }

    #[test]
    fn short_migration_window() {
        let p = tidb("tidb-0", secret_volume("st", "shared"), None, Some(60));
        let ps = run(&[(&p, Some(&config(CERT, 5)))], None);
        assert_eq!(reasons(&ps), ["MigrationWindowTooShort"]);
        assert!(
            ps[0]
                .message
                .contains("tidb-0: preStop sleep 0 s + graceful-wait-before-shutdown 5 s = 5 s"),
            "{}",
            ps[0].message
        );
        // The preStop sleep counts.
        let p = tidb("tidb-0", secret_volume("st", "shared"), sleep(5), Some(60));
        assert_eq!(run(&[(&p, Some(&config(CERT, 5)))], None), []);
    }

    #[test]
    fn short_termination_grace_period() {
        // Default 30 s < 10 + 10 + 20.
        let p = tidb("tidb-0", secret_volume("st", "shared"), sleep(10), None);
        let ps = run(&[(&p, Some(&config(CERT, 10)))], None);
        assert_eq!(reasons(&ps), ["TerminationGracePeriodTooShort"]);
        assert!(
            ps[0].message.contains("terminationGracePeriodSeconds 30 < preStop sleep 10 s + graceful-wait-before-shutdown 10 s + 20 s = 40 s"),
            "{}",
            ps[0].message
        );
        let p = tidb("tidb-0", secret_volume("st", "shared"), sleep(10), Some(40));
        assert_eq!(run(&[(&p, Some(&config(CERT, 10)))], None), []);
    }

    #[test]
    fn all_problems_in_order_and_long_lists_are_cut() {
        let pods: Vec<Pod> = (0..7)
            .map(|i| {
                tidb(
                    &format!("tidb-{i}"),
                    secret_volume("st", "x"),
                    None,
                    Some(1),
                )
            })
            .collect();
        let c = config("", 0);
        let input: Vec<(&Pod, Option<&TidbConfig>)> = pods.iter().map(|p| (p, Some(&c))).collect();
        let ps = run(&input, None);
        assert_eq!(
            reasons(&ps),
            [
                "NoSessionTokenCert",
                "MigrationWindowTooShort",
                "TerminationGracePeriodTooShort"
            ]
        );
        assert!(
            ps[0]
                .message
                .contains("tidb-0, tidb-1, tidb-2, tidb-3, tidb-4 and 2 more"),
            "{}",
            ps[0].message
        );
    }

    #[test]
    fn pre_stop_forms() {
        let with = |h: LifecycleHandler| Container {
            lifecycle: Some(Lifecycle {
                pre_stop: Some(h),
                ..Default::default()
            }),
            ..Default::default()
        };
        let secs = |h| pre_stop_sleep_seconds(&with(h));
        assert_eq!(secs(sleep(15).unwrap()), 15);
        assert_eq!(secs(exec(&["sleep", "10"])), 10);
        assert_eq!(secs(exec(&["/bin/sleep", "1m"])), 60);
        assert_eq!(secs(exec(&["sh", "-c", "sleep 10"])), 10);
        assert_eq!(secs(exec(&["/bin/sh", "-c", "sleep 5 && sleep 2.5s"])), 7);
        assert_eq!(secs(exec(&["bash", "-c", "echo bye; exec sleep 12\n"])), 12);
        assert_eq!(secs(exec(&["sh", "-c", "/usr/local/bin/drain.sh"])), 0);
        assert_eq!(secs(exec(&["sleep", "forever"])), 0);
        assert_eq!(secs(exec(&[])), 0);
        assert_eq!(pre_stop_sleep_seconds(&Container::default()), 0);
    }

    #[test]
    fn the_tidb_container_is_found() {
        let mut p = good("tidb-0");
        assert_eq!(tidb_container(&p, 4000).unwrap().name, "tidb");
        let spec = p.spec.as_mut().unwrap();
        spec.containers[1].name = "server".into();
        spec.containers[1].ports = Some(vec![ContainerPort {
            container_port: 4000,
            ..Default::default()
        }]);
        assert_eq!(tidb_container(&p, 4000).unwrap().name, "server");
        assert_eq!(tidb_container(&p, 5000).unwrap().name, "sidecar");
    }

    #[test]
    fn config_json_is_parsed() {
        let c = parse_config(
            br#"{"graceful-wait-before-shutdown": 30, "security": {"session-token-signing-cert": " /a/tls.crt ", "session-token-signing-key": "/a/tls.key"}}"#,
        )
        .unwrap();
        assert_eq!(c, config("/a/tls.crt", 30));
        assert_eq!(parse_config(b"{}").unwrap(), config("", 0));
        assert!(parse_config(b"[]").is_err());
        assert!(parse_config(br#"{"graceful-wait-before-shutdown": "x"}"#).is_err());
        assert!(parse_config(b"<html>").is_err());
    }
}

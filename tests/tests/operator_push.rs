//! The operator's topology pusher and TiDB requirement reader against real processes, without
//! Kubernetes: `tiproxy_operator::topology::push` against a real proxy (push, read-back,
//! conflicts, an unreachable proxy, the bearer token), the per-TiProxy task logic driven by
//! scripted pod events against a real proxy, and `requirements::fetch_config` against a real
//! TiDB started with a shared session-token signing cert and a graceful wait.
//!
//! Needs the proxy binary (`cargo build -p tiproxy`) and, for the TiDB test, the TiDB binary
//! built by `tests/scripts/build-tidb.sh`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodCondition, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::Event;
use tiproxy_operator::api::BackendState;
use tiproxy_operator::names;
use tiproxy_operator::topology::push::{
    self, BackendSpec, Backoff, PushError, PushOutcome, PushState, Snapshot,
};
use tiproxy_operator::topology::requirements;
use tiproxy_operator::topology::state::{unix_ms, Ports};
use tiproxy_operator::topology::task::{self, TaskParams, TaskState, TaskTiming};
use tiproxy_tests::cluster::{migration_instance, TidbCluster};
use tiproxy_tests::{Proxy, TempDir};
use tokio::time::Instant;

const TIMEOUT: Duration = Duration::from_secs(2);

fn start_proxy(api: &str) -> Proxy {
    Proxy::start(&format!("[health]\ninterval = 0.5\n[api]\n{api}\n"))
}

fn spec(addr: &str, state: PushState, zone: Option<&str>) -> BackendSpec {
    BackendSpec {
        addr: addr.into(),
        status_addr: Some(addr.replace(":4000", ":10080")),
        state,
        labels: zone
            .map(|z| BTreeMap::from([("zone".to_string(), z.to_string())]))
            .unwrap_or_default(),
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test]
async fn push_shows_backends_and_states_and_is_idempotent() {
    let proxy = start_proxy("");
    let addr = proxy.api_addr().to_string();
    let snapshot = Snapshot {
        generation: unix_ms(),
        backends: vec![
            spec("127.0.0.201:4000", PushState::Active, Some("az1")),
            spec("127.0.0.202:4000", PushState::Draining, None),
        ],
    };
    assert_eq!(
        serde_json::to_value(&snapshot).unwrap(),
        serde_json::json!({"generation": snapshot.generation, "backends": [
            {"addr": "127.0.0.201:4000", "status-addr": "127.0.0.201:10080", "state": "active",
             "labels": {"zone": "az1"}},
            {"addr": "127.0.0.202:4000", "status-addr": "127.0.0.202:10080", "state": "draining"},
        ]})
    );
    assert_eq!(
        push::get_generation(&addr, None, TIMEOUT).await.unwrap(),
        None
    );
    let out = push::push_snapshot(&addr, None, &snapshot, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(out, PushOutcome::Accepted(snapshot.generation));

    let state = proxy.backends().await;
    assert_eq!(state.generation, Some(snapshot.generation));
    let a = state.get("127.0.0.201:4000").expect("listed");
    assert_eq!(a.state, "active", "{:#}", state.json);
    assert_eq!(a.json["labels"], serde_json::json!({"zone": "az1"}));
    assert_eq!(a.json["status-addr"], "127.0.0.201:10080");
    assert_eq!(a.json["sources"], serde_json::json!(["push"]));
    let b = state.get("127.0.0.202:4000").expect("listed");
    assert_eq!(b.state, "draining", "{:#}", state.json);

    // The same generation again is accepted (a retried push whose answer was lost).
    let out = push::push_snapshot(&addr, None, &snapshot, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(out, PushOutcome::Accepted(snapshot.generation));
    assert_eq!(
        push::get_generation(&addr, None, TIMEOUT).await.unwrap(),
        Some(snapshot.generation)
    );
}

#[tokio::test]
async fn lower_generation_conflicts_and_the_pusher_jumps_above() {
    let proxy = start_proxy("");
    let addr = proxy.api_addr().to_string();
    // Another operator replica, its clock 10 minutes ahead, pushed first.
    let theirs = unix_ms() + 600_000;
    proxy.push_ok(theirs, &[]).await;

    let mut snapshot = Snapshot {
        generation: unix_ms(),
        backends: vec![spec("127.0.0.203:4000", PushState::Active, None)],
    };
    let out = push::push_snapshot(&addr, None, &snapshot, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        out,
        PushOutcome::Conflict {
            offered: snapshot.generation,
            current: Some(theirs)
        }
    );
    assert_eq!(proxy.backends().await.generation, Some(theirs));

    let accepted = push::push_with_retry(
        &addr,
        None,
        &mut snapshot,
        TIMEOUT,
        Backoff::default(),
        Instant::now() + Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(accepted > theirs, "{accepted} > {theirs}");
    assert_eq!(snapshot.generation, accepted);
    let state = proxy.backends().await;
    assert_eq!(state.generation, Some(accepted));
    assert_eq!(
        state.get("127.0.0.203:4000").map(|b| b.state.as_str()),
        Some("active")
    );
}

#[tokio::test]
async fn unreachable_proxy_is_an_error_and_retried_until_it_answers() {
    let api = free_port();
    let addr = api.to_string();
    let snapshot = Snapshot {
        generation: unix_ms(),
        backends: vec![spec("127.0.0.204:4000", PushState::Active, None)],
    };
    let err = push::push_snapshot(&addr, None, &snapshot, TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, PushError::Http(_)), "{err:?}");
    assert_eq!(err.to_string(), "connection refused");

    // Retried with backoff until the deadline, then the last error.
    let started = std::time::Instant::now();
    let backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
    };
    let mut s = snapshot.clone();
    let err = push::push_with_retry(
        &addr,
        None,
        &mut s,
        TIMEOUT,
        backoff,
        Instant::now() + Duration::from_millis(600),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, PushError::Http(_)), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));

    // A proxy that comes up on that address while the pusher retries gets the set.
    let retry = tokio::spawn({
        let addr = addr.clone();
        let mut s = snapshot.clone();
        async move {
            push::push_with_retry(
                &addr,
                None,
                &mut s,
                TIMEOUT,
                backoff,
                Instant::now() + Duration::from_secs(30),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let proxy = start_proxy(&format!("addr = \"{api}\""));
    let accepted = retry.await.unwrap().unwrap();
    assert_eq!(accepted, snapshot.generation);
    assert_eq!(proxy.backends().await.generation, Some(accepted));
}

#[tokio::test]
async fn bearer_token_is_sent() {
    let dir = TempDir::new("operator-push-token");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let proxy = start_proxy(&format!("token-file = \"{}\"", token_file.display()));
    let addr = proxy.api_addr().to_string();
    let snapshot = Snapshot {
        generation: unix_ms(),
        backends: vec![spec("127.0.0.205:4000", PushState::Active, None)],
    };
    let err = push::push_snapshot(&addr, None, &snapshot, TIMEOUT)
        .await
        .unwrap_err();
    assert!(err.is_unauthorized(), "{err:?}");
    let err = push::push_snapshot(&addr, Some("wrong"), &snapshot, TIMEOUT)
        .await
        .unwrap_err();
    assert!(err.is_unauthorized(), "{err:?}");
    let out = push::push_snapshot(&addr, Some("s3cret-token"), &snapshot, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(out, PushOutcome::Accepted(snapshot.generation));
    assert_eq!(
        push::get_generation(&addr, Some("s3cret-token"), TIMEOUT)
            .await
            .unwrap(),
        Some(snapshot.generation)
    );
}

// ---- the task logic against a real proxy ------------------------------------------------------

fn pod(name: &str, uid: &str, ip: &str, ready: bool) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            uid: Some(uid.into()),
            ..Default::default()
        },
        spec: None,
        status: Some(PodStatus {
            pod_ip: Some(ip.into()),
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

fn proxy_pod(name: &str, api: SocketAddr) -> Pod {
    let mut p = pod(name, name, &api.ip().to_string(), true);
    p.spec = Some(PodSpec {
        containers: vec![Container {
            name: names::CONTAINER_NAME.into(),
            ports: Some(vec![ContainerPort {
                name: Some(names::API_PORT_NAME.into()),
                container_port: i32::from(api.port()),
                ..Default::default()
            }]),
            ..Default::default()
        }],
        ..Default::default()
    });
    p
}

/// Runs every due job against the real endpoints and feeds the results back.
async fn settle(state: &mut TaskState) {
    for _ in 0..10 {
        let jobs: Vec<_> = state
            .due(Instant::now())
            .into_iter()
            .filter(|j| matches!(j, task::Job::Push { .. }))
            .collect();
        if jobs.is_empty() {
            return;
        }
        for job in jobs {
            let r = task::run_job(job, state.token().map(str::to_string), TIMEOUT).await;
            state.on_job_result(r, Instant::now(), unix_ms());
        }
    }
    panic!("pushes did not settle");
}

/// A scripted TiDB rollout: the terminating pod is pushed as draining before it disappears;
/// its replacement is pushed only once Ready; both proxies acknowledge every generation.
#[tokio::test]
async fn scripted_rollout_pushes_draining_before_removal() {
    let (p1, p2) = (start_proxy(""), start_proxy(""));
    let params = TaskParams {
        tiproxy: ObjectRef::new("tp").within("ns"),
        uid: None,
        name: "tp".into(),
        namespace: "ns".into(),
        tidb_namespace: "ns".into(),
        tidb_selector: "app=tidb".into(),
        ports: Ports {
            sql: 4000,
            status: 10080,
        },
        expected_secret: None,
    };
    let timing = TaskTiming {
        resync: Duration::from_secs(30),
        push_timeout: TIMEOUT,
        backoff: Backoff::default(),
    };
    let mut state = TaskState::new(params, timing, None);
    let now = Instant::now;
    state.on_token_watch_error();
    state.on_tidb_event(Event::Init, now(), unix_ms());
    for p in [
        pod("tidb-0", "a0", "127.0.0.206", true),
        pod("tidb-1", "a1", "127.0.0.207", true),
    ] {
        state.on_tidb_event(Event::InitApply(p), now(), unix_ms());
    }
    state.on_tidb_event(Event::InitDone, now(), unix_ms());
    state.on_proxy_event(Event::Init, now());
    state.on_proxy_event(Event::InitApply(proxy_pod("tp-a", p1.api_addr())), now());
    state.on_proxy_event(Event::InitApply(proxy_pod("tp-b", p2.api_addr())), now());
    state.on_proxy_event(Event::InitDone, now());
    settle(&mut state).await;

    let check = |report: &tiproxy_operator::topology::TopologyReport| {
        let g = report.generation.expect("a generation");
        assert!(
            report
                .proxies
                .iter()
                .all(|p| p.acked_generation == Some(g) && p.error.is_none()),
            "{report:#?}"
        );
        g
    };
    let g1 = check(&state.report().unwrap());
    for p in [&p1, &p2] {
        let s = p.backends().await;
        assert_eq!(s.generation, Some(g1));
        assert_eq!(s.get("127.0.0.206:4000").unwrap().state, "active");
        assert_eq!(s.get("127.0.0.207:4000").unwrap().state, "active");
    }

    // tidb-0 is being deleted: draining, pushed to both.
    let mut going = pod("tidb-0", "a0", "127.0.0.206", true);
    going.metadata.deletion_timestamp = Some(Time(Default::default()));
    state.on_tidb_event(Event::Apply(going.clone()), now(), unix_ms());
    settle(&mut state).await;
    let report = state.report().unwrap();
    let g2 = check(&report);
    assert!(g2 > g1);
    assert_eq!(report.backends[0].state, BackendState::Draining);
    for p in [&p1, &p2] {
        let s = p.backends().await;
        assert_eq!(s.generation, Some(g2));
        assert_eq!(s.get("127.0.0.206:4000").unwrap().state, "draining");
    }

    // Gone, and its replacement not Ready yet: only tidb-1 is pushed.
    state.on_tidb_event(Event::Delete(going), now(), unix_ms());
    state.on_tidb_event(
        Event::Apply(pod("tidb-0", "b0", "127.0.0.208", false)),
        now(),
        unix_ms(),
    );
    settle(&mut state).await;
    let report = state.report().unwrap();
    let g3 = check(&report);
    assert!(g3 > g2);
    assert_eq!(report.backends.len(), 1, "{report:#?}");
    // The replacement becomes Ready.
    state.on_tidb_event(
        Event::Apply(pod("tidb-0", "b0", "127.0.0.208", true)),
        now(),
        unix_ms(),
    );
    settle(&mut state).await;
    let g4 = check(&state.report().unwrap());
    for p in [&p1, &p2] {
        let s = p.backends().await;
        assert_eq!(s.generation, Some(g4));
        assert_eq!(s.get("127.0.0.208:4000").unwrap().state, "active");
        assert_eq!(s.get("127.0.0.207:4000").unwrap().state, "active");
    }
}

// ---- a real TiDB's /config ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tidb_config_gives_signing_cert_and_graceful_wait() {
    let tidb = TidbCluster::start(migration_instance(0), 1, 7, false).await;
    let config = requirements::fetch_config(&tidb.status_addr(0), Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("GET /config of {}: {e}", tidb.status_addr(0)));
    assert_eq!(config.graceful_wait_before_shutdown, 7, "{config:?}");
    let expected = tidb.dir().join("session-cert.pem");
    assert_eq!(
        std::path::Path::new(&config.session_token_signing_cert),
        expected,
        "{config:?}"
    );
    // Nothing listens on the SQL port's neighbour: an error, which the checks treat as unknown.
    let err = requirements::fetch_config(&tidb.addr(0).replace(":4000", ":4002"), TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, requirements::ConfigError::Http(_)), "{err:?}");
}

//! End to end, with no kubelet: the test plays kubelet and kube-controller-manager. TiDB Pod
//! objects carry the IPs of real local TiDB processes (127.0.0.x), a proxy Pod object points at
//! a real local proxy process, and the real operator runs against a real kube-apiserver.
//!
//! A graceful delete of the TiDB pod that busy clients are on makes the operator push it as
//! draining; the proxy moves the sessions to the other TiDB; only then is that TiDB stopped
//! and its pod removed. The clients see no error at all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mysql_async::prelude::*;
use mysql_async::Conn;
use serde_json::json;
use tiproxy_operator::api::{BackendState, TiProxy, TiProxySpec};
use tiproxy_tests::cluster::{migration_instance, serving_tidb, tidb_ip, TidbCluster};
use tiproxy_tests::kube::KubeApiServer;
use tiproxy_tests::operator::{eventually, OperatorProcess};
use tiproxy_tests::{opts_for, Proxy, TempDir};

const WAIT: Duration = Duration::from_secs(30);
/// TiDB's graceful-wait-before-shutdown in this test.
const TIDB_GRACEFUL_WAIT: u32 = 5;
const CLIENTS: u64 = 4;

/// A TiDB Pod object as a StatefulSet would make it, bound to a (fake) node so that a graceful
/// delete leaves it Terminating until the "kubelet" (this test) confirms.
fn tidb_pod(name: &str, signing_dir: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": "tidb" } },
        "spec": {
            "nodeName": "node-1",
            "terminationGracePeriodSeconds": 60,
            "containers": [{
                "name": "tidb",
                "image": "pingcap/tidb:v8.5.3",
                "lifecycle": { "preStop": { "sleep": { "seconds": 5 } } },
                "volumeMounts": [{ "name": "session-token", "mountPath": signing_dir }],
            }],
            "volumes": [{ "name": "session-token", "secret": { "secretName": "tidb-signing" } }],
        },
    }))
    .expect("TiDB pod")
}

fn proxy_pod(api_port: u16) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "main-proxy-0",
            "labels": tiproxy_operator::names::selector_labels("main"),
        },
        "spec": {
            "nodeName": "node-1",
            "containers": [{
                "name": "tiproxy",
                "image": "tiproxy:test",
                "ports": [
                    { "name": "mysql", "containerPort": 6000 },
                    { "name": "api", "containerPort": api_port },
                ],
            }],
        },
    }))
    .expect("proxy pod")
}

/// Plays kubelet: the pod runs at `ip` and is Ready.
async fn mark_running(pods: &Api<Pod>, name: &str, ip: &str) {
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{ "ip": ip }],
            "conditions": [{ "type": "Ready", "status": "True" }],
        }})),
    )
    .await
    .unwrap_or_else(|e| panic!("mark pod {name} running: {e}"));
}

/// What one busy client did.
#[derive(Default)]
struct ClientLog {
    transactions: u64,
    /// The TiDB that served each transaction, in order (deduplicated runs).
    served_by: Vec<String>,
    errors: Vec<String>,
}

/// Transactions in a loop through the proxy until `stop`: a write, the serving TiDB, a
/// prepared-statement read of a session variable, commit.
async fn busy_client(proxy: String, n: u64, stop: Arc<AtomicBool>) -> ClientLog {
    let mut log = ClientLog::default();
    let opts = opts_for(&proxy, "root", None).db_name(Some("e2e"));
    let mut conn = match Conn::new(opts).await {
        Ok(c) => c,
        Err(e) => {
            log.errors.push(format!("client {n}: connect: {e}"));
            return log;
        }
    };
    if let Err(e) = conn.query_drop(format!("SET @cid = {n}")).await {
        log.errors.push(format!("client {n}: SET: {e}"));
        return log;
    }
    while !stop.load(Ordering::Relaxed) {
        let id = n * 1_000_000 + log.transactions;
        let step = async {
            conn.query_drop("BEGIN").await?;
            conn.query_drop(format!("INSERT INTO t (id) VALUES ({id})"))
                .await?;
            let inst = serving_tidb(&mut conn).await?;
            let cid: Option<u64> = conn.exec_first("SELECT @cid + ?", (0,)).await?;
            conn.query_drop("COMMIT").await?;
            Ok::<_, mysql_async::Error>((inst, cid))
        };
        match step.await {
            Ok((inst, cid)) => {
                if cid != Some(n) {
                    log.errors
                        .push(format!("client {n}: @cid is {cid:?} after a move"));
                    return log;
                }
                log.transactions += 1;
                if log.served_by.last() != Some(&inst) {
                    log.served_by.push(inst);
                }
            }
            Err(e) => {
                log.errors
                    .push(format!("client {n}: transaction {id}: {e}"));
                return log;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = conn.disconnect().await;
    log
}

#[tokio::test]
async fn graceful_tidb_pod_delete_moves_sessions_without_errors() {
    let tidb = TidbCluster::start(migration_instance(0), 2, TIDB_GRACEFUL_WAIT, false).await;
    tidb.run_on_all(&[
        "CREATE DATABASE IF NOT EXISTS e2e",
        "CREATE TABLE IF NOT EXISTS e2e.t (id BIGINT PRIMARY KEY)",
    ])
    .await;
    let signing_dir = tidb.dir().display().to_string();

    let server = KubeApiServer::shared();
    server.install_crd().await;
    let ns = server.namespace("e2e").await;
    let client = server.client().await;
    let operator = OperatorProcess::start(server.kubeconfig_path(), &ns).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let tps: Api<TiProxy> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    // TiDB pods, Running and Ready at the real servers' addresses.
    let tidb_pods = ["tidb-0", "tidb-1"];
    for (k, name) in tidb_pods.iter().enumerate() {
        pods.create(&PostParams::default(), &tidb_pod(name, &signing_dir))
            .await
            .expect("create TiDB pod");
        mark_running(&pods, name, &tidb_ip(tidb.instances()[k])).await;
    }

    let spec: TiProxySpec = serde_json::from_value(json!({
        "replicas": 1,
        "backends": { "tidbSelector": { "matchLabels": { "app": "tidb" } } },
        "sessionToken": { "secretName": "tidb-signing" },
    }))
    .expect("spec");
    tps.create(&PostParams::default(), &TiProxy::new("main", spec))
        .await
        .expect("create TiProxy");

    // The proxy "pod": a real proxy with the operator's admin-API token, ready only once it
    // knows a backend, as the operator configures it.
    let token_secret = eventually(WAIT, "API token Secret", || async {
        secrets
            .get_opt("main-api-token")
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "missing".to_string())
    })
    .await;
    let token = token_secret.data.as_ref().expect("data")["token"].0.clone();
    let token_dir = TempDir::new("e2e-token");
    let token_file = token_dir.path().join("token");
    std::fs::write(&token_file, &token).expect("write token");
    let proxy = Proxy::start(&format!(
        "[proxy]\nconnect-timeout = 5\n[api]\ntoken-file = {:?}\nready-requires-backend = true\n[health]\ninterval = 0.5\n",
        token_file.display().to_string()
    ));
    pods.create(&PostParams::default(), &proxy_pod(proxy.api_addr().port()))
        .await
        .expect("create proxy pod");
    mark_running(&pods, "main-proxy-0", "127.0.0.1").await;

    // The operator pushes both TiDBs; the proxy finds them healthy; status says so.
    let addrs = tidb.addrs();
    proxy
        .wait_backends("both TiDBs pushed and healthy", WAIT, |s| {
            addrs
                .iter()
                .all(|a| s.health(a) == "healthy" && s.get(a).is_some_and(|b| b.state == "active"))
        })
        .await;
    let tp = eventually(WAIT, "status: synced, 2 active, not degraded", || async {
        let tp = tps.get("main").await.map_err(|e| e.to_string())?;
        let s = tp.status.clone().unwrap_or_default();
        let cond = |t: &str| {
            s.conditions
                .iter()
                .find(|c| c.type_ == t)
                .map(|c| (c.status.clone(), c.reason.clone()))
        };
        let synced = cond("BackendsSynced").is_some_and(|c| c.0 == "True");
        let degraded = cond("Degraded");
        if synced
            && s.active_backends == Some(2)
            && degraded.as_ref().is_some_and(|c| c.0 == "False")
        {
            Ok(tp)
        } else {
            Err(format!(
                "synced={synced} active={:?} degraded={degraded:?} proxies={:?}",
                s.active_backends, s.proxies
            ))
        }
    })
    .await;
    let generation = tp
        .status
        .as_ref()
        .and_then(|s| s.backend_generation)
        .expect("generation");
    assert_eq!(
        tp.status.as_ref().expect("status").proxies[0].acked_generation,
        Some(generation)
    );

    // Busy clients through the proxy.
    let stop = Arc::new(AtomicBool::new(false));
    let proxy_addr = proxy.addr().to_string();
    let clients: Vec<_> = (1..=CLIENTS)
        .map(|n| tokio::spawn(busy_client(proxy_addr.clone(), n, stop.clone())))
        .collect();
    let (backends, _) = proxy
        .wait_backends("all clients connected", WAIT, |s| {
            addrs.iter().map(|a| s.sessions(a)).sum::<u64>() == CLIENTS
        })
        .await;
    // Delete the pod of the TiDB with the most sessions.
    let k = if backends.sessions(&addrs[0]) >= backends.sessions(&addrs[1]) {
        0
    } else {
        1
    };
    let (victim, victim_addr, other_addr) = (tidb_pods[k], addrs[k].clone(), addrs[1 - k].clone());
    let before = backends.sessions(&victim_addr);
    assert!(
        before > 0,
        "no session on {victim_addr}: {:?}",
        backends.json
    );

    let deleted_at = Instant::now();
    pods.delete(
        victim,
        &DeleteParams {
            grace_period_seconds: Some(60),
            ..Default::default()
        },
    )
    .await
    .expect("graceful delete");
    // The operator marks it draining and the proxy empties it, while TiDB still runs normally.
    proxy
        .wait_backends("victim drained", WAIT, |s| {
            s.get(&victim_addr).is_some_and(|b| b.state == "draining")
                && s.sessions(&victim_addr) == 0
        })
        .await;
    let drained_in = deleted_at.elapsed();
    let tp = eventually(WAIT, "status shows the victim draining", || async {
        let tp = tps.get("main").await.map_err(|e| e.to_string())?;
        let backends = tp.status.clone().unwrap_or_default().backends;
        backends
            .iter()
            .find(|b| b.pod == victim)
            .filter(|b| b.state == BackendState::Draining)
            .map(|_| tp.clone())
            .ok_or_else(|| format!("{backends:?}"))
    })
    .await;
    assert_eq!(tp.status.as_ref().and_then(|s| s.active_backends), Some(1));
    eprintln!("{before} sessions left {victim_addr} {drained_in:?} after the pod delete");

    // Now the "kubelet" stops that TiDB (SIGTERM, graceful) and confirms the pod deletion.
    tidb.stop_graceful(k).wait(Duration::from_secs(60)).await;
    pods.delete(
        victim,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .expect("final delete");
    eventually(WAIT, "victim gone from status", || async {
        let tp = tps.get("main").await.map_err(|e| e.to_string())?;
        let backends = tp.status.unwrap_or_default().backends;
        if backends.iter().any(|b| b.pod == victim) {
            Err(format!("{backends:?}"))
        } else {
            Ok(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut errors = Vec::new();
    let mut moved = 0;
    for c in clients {
        let log = c.await.expect("client task");
        total += log.transactions;
        errors.extend(log.errors);
        if log.served_by.len() > 1 {
            moved += 1;
        }
        // The deleted pod's TiDB is gone: every session ends on the other one.
        assert_eq!(
            log.served_by.last(),
            Some(&other_addr),
            "{:?}",
            log.served_by
        );
    }
    assert!(errors.is_empty(), "client errors: {errors:#?}");
    // Connection balancing may have moved a session earlier too.
    assert!(
        moved >= before,
        "{moved} sessions moved, {before} were on the deleted pod's TiDB"
    );
    assert!(
        total > 50 * CLIENTS,
        "clients were busy: {total} transactions"
    );
    let metrics = operator.metrics().await;
    assert!(
        metrics.contains("tiproxy_operator_push_total{result=\"ok\"}"),
        "{metrics}"
    );
}

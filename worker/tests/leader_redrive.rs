//! Dead-letter redrive as the leader runs it, on the real local control
//! plane (sluice-dev) with a real redis-server: the `sluice-worker` binary
//! holding the `<name>-leader` Lease redrives `spec.deadLetter.redrive.id`,
//! records it on the Lease (`sluice.io/redrive-done`, kept through the
//! Lease manager's renewals), and a restarted worker with the same spec
//! does not run it again.

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use redis::AsyncCommands;
use serde_json::json;
use sluice_tests::{
    brokers::Redis,
    e2e::{init_logs, start_cluster},
};
use sluice_worker::redrive::{ANNOTATION_DONE, HEADER_REDRIVE_ID};

const LEASE: &str = "orders-leader";

fn start_worker(spec: &Path, dir: &Path, pod: &str, kubeconfig: &Path) -> common::process::WorkerProcess {
    common::process::WorkerProcess::start(
        spec,
        dir.join(format!("{pod}.log")),
        pod,
        &[
            ("LOG_LEVEL", "info,kube=warn"),
            ("POD_NAMESPACE", "default"),
            ("SLUICE_LEASE_NAME", LEASE),
            ("KUBECONFIG", kubeconfig.to_str().expect("kubeconfig path")),
        ],
    )
}

async fn wait_for_log(worker: &mut common::process::WorkerProcess, text: &str) {
    let start = Instant::now();
    while !worker.log_text().contains(text) {
        worker.assert_running();
        assert!(start.elapsed() < Duration::from_secs(90), "no `{text}` within 90 s:\n{}", worker.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn annotation(leases: &Api<Lease>) -> Option<String> {
    leases.get(LEASE).await.expect("the Lease").metadata.annotations.and_then(|mut a| a.remove(ANNOTATION_DONE))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_redrives_once_and_records_it_on_its_lease() {
    init_logs();
    let cluster = start_cluster().await;
    let leases: Api<Lease> = Api::namespaced(cluster.client().await.expect("client"), "default");
    let redis = Redis::start();
    let mut conn = redis::aio::ConnectionManager::new(redis::Client::open(redis.url()).expect("url"))
        .await
        .expect("redis connection");
    // Dead letters as the Redis dead-letter sink writes them.
    for i in 0..3 {
        let payload = json!({"id": i, "amount": "not a number"}).to_string();
        let _: String = conn
            .xadd(
                "dlq",
                "*",
                &[
                    ("payload", payload.as_str()),
                    ("key", "k1"),
                    ("sluice-error", "no such overload"),
                    ("sluice-reason", "expression"),
                    ("sluice-step", "pipeline[0].map"),
                    ("sluice-source", "redis/in"),
                ],
            )
            .await
            .expect("XADD");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = dir.path().join("spec.json");
    let body = json!({
        "source": {"redis": {"url": redis.url(), "stream": "in", "group": "orders"}},
        "sink": {"redis": {"url": redis.url(), "stream": "out"}},
        "deadLetter": {"redis": {"url": redis.url(), "stream": "dlq"}, "redrive": {"id": "fix-1"}}
    });
    std::fs::write(&spec, serde_json::to_vec(&body).expect("json")).expect("spec");
    let kubeconfig = cluster.kubeconfig_path();

    let mut worker = start_worker(&spec, dir.path(), "worker-a", &kubeconfig);
    wait_for_log(&mut worker, "redrive done").await;
    assert_eq!(annotation(&leases).await.as_deref(), Some("fix-1"));
    let redriven: Vec<redis::streams::StreamId> = conn
        .xrange_all::<_, redis::streams::StreamRangeReply>("in")
        .await
        .expect("XRANGE")
        .ids
        .into_iter()
        .filter(|e| e.get::<String>(HEADER_REDRIVE_ID).as_deref() == Some("fix-1"))
        .collect();
    assert_eq!(redriven.len(), 3, "{redriven:?}");
    assert!(redriven.iter().all(|e| !e.contains_key("sluice-error")));

    // Renewals (every few seconds) leave the annotation alone.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(annotation(&leases).await.as_deref(), Some("fix-1"), "the Lease manager's patches dropped it");
    let status = worker.terminate();
    assert!(status.success(), "worker exited with {status}:\n{}", worker.log_tail());

    // Restarted with the same spec: nothing is redriven again.
    let mut again = start_worker(&spec, dir.path(), "worker-b", &kubeconfig);
    wait_for_log(&mut again, "redrive already done").await;
    let len: usize = conn.xlen("in").await.expect("XLEN");
    assert_eq!(len, 3, "the same id ran twice");
    let status = again.terminate();
    assert!(status.success(), "worker exited with {status}:\n{}", again.log_tail());
}

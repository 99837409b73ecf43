//! Singleton tasks under the `<name>-leader` Lease, on the real local
//! control plane (sluice-dev) with real Kafka: two `sluice-worker`
//! processes of one processor take turns. Exactly one runs the singleton
//! tasks (it provisions the output topics); when it is killed with
//! SIGKILL the other takes over after the Lease expires, and when it is
//! stopped with SIGTERM it stops its tasks and releases the Lease first, so
//! the other takes over at once. At no moment do both run them.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::json;
use sluice_tests::{
    brokers::Kafka,
    e2e::{init_logs, start_cluster},
};

const STARTED: &str = "holding the Lease: singleton tasks started";
const STOPPED: &str = "singleton tasks stopped";
const LEASE: &str = "orders-leader";

mod common;

/// A worker process as one pod of the processor, with the Lease settings
/// the operator gives its pods.
struct Worker(common::process::WorkerProcess);

impl Worker {
    fn start(spec: &Path, dir: &Path, pod: &str, kubeconfig: &Path) -> Worker {
        let kubeconfig = kubeconfig.to_str().expect("kubeconfig path");
        Worker(common::process::WorkerProcess::start(
            spec,
            dir.join(format!("{pod}.log")),
            pod,
            &[
                ("LOG_LEVEL", "info,rdkafka=warn,kube=warn"),
                ("POD_NAMESPACE", "default"),
                ("SLUICE_LEASE_NAME", LEASE),
                ("KUBECONFIG", kubeconfig),
            ],
        ))
    }

    fn log(&self) -> String {
        self.0.log_text()
    }

    fn leads(&self) -> bool {
        self.log().contains(STARTED)
    }

    fn kill9(&mut self) {
        self.0.kill9();
    }

    fn terminate(&mut self) {
        let status = self.0.terminate();
        assert!(status.success(), "worker exited with {status} after SIGTERM:\n{}", self.log());
    }
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool, context: impl Fn() -> String) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}\n{}", context());
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

fn partitions(kafka: &Kafka, topic: &str) -> usize {
    let consumer: BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", kafka.bootstrap()).create().expect("client");
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)).expect("metadata");
    md.topics().iter().filter(|t| t.name() == topic && t.error().is_none()).map(|t| t.partitions().len()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_at_a_time_runs_the_singleton_tasks_and_the_other_takes_over() {
    init_logs();
    let cluster = start_cluster().await;
    let client = cluster.client().await.expect("client");
    let leases: Api<Lease> = Api::namespaced(client, "default");
    let kafka = Kafka::start();
    kafka.create_topic("in", 6).expect("topic");
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = dir.path().join("spec.json");
    let body = json!({
        "source": {"kafka": {"brokers": [kafka.bootstrap()], "topic": "in", "group": "orders"}},
        "sink": {"kafka": {"topic": "orders-out"}},
        "deadLetter": {"kafka": {"topic": "orders-dlq"}}
    });
    std::fs::write(&spec, serde_json::to_vec(&body).expect("json")).expect("spec");
    let kubeconfig = cluster.kubeconfig_path();

    let a = Worker::start(&spec, dir.path(), "worker-a", &kubeconfig);
    let b = Worker::start(&spec, dir.path(), "worker-b", &kubeconfig);
    let both = |a: &Worker, b: &Worker| format!("worker-a:\n{}\nworker-b:\n{}", a.log(), b.log());
    wait_until("one worker leads", Duration::from_secs(60), || a.leads() || b.leads(), || both(&a, &b));
    std::thread::sleep(Duration::from_secs(2));
    assert!(!(a.leads() && b.leads()), "both run the singleton tasks:\n{}", both(&a, &b));
    let (mut leader, mut standby) = if a.leads() { (a, b) } else { (b, a) };
    let holder = leases.get(LEASE).await.expect("the Lease").spec.and_then(|s| s.holder_identity);
    let leader_name = leader.0.log.file_stem().map(|s| s.to_string_lossy().to_string());
    assert_eq!(holder, leader_name, "the Lease names the worker that runs the tasks");

    // The singleton task: the leader provisions the output topics, with the
    // source's partition count for the sink's.
    wait_until(
        "the leader creates the output topics",
        Duration::from_secs(60),
        || partitions(&kafka, "orders-out") == 6 && partitions(&kafka, "orders-dlq") == 1,
        || leader.log(),
    );

    // SIGKILL: no release; the standby waits for the Lease to expire (15 s).
    assert!(!standby.leads(), "the standby runs the tasks too:\n{}", standby.log());
    leader.kill9();
    let failover = wait_until(
        "the standby takes over after a SIGKILL",
        Duration::from_secs(60),
        || standby.leads(),
        || standby.log(),
    );
    eprintln!("takeover after SIGKILL of the leader: {failover:.1?}");
    let holder = leases.get(LEASE).await.expect("the Lease").spec.and_then(|s| s.holder_identity);
    assert_eq!(holder, standby.0.log.file_stem().map(|s| s.to_string_lossy().to_string()));

    // SIGTERM: the leader stops its tasks, then releases the Lease.
    let mut next = Worker::start(&spec, dir.path(), "worker-c", &kubeconfig);
    std::thread::sleep(Duration::from_secs(3));
    assert!(!next.leads(), "a second leader:\n{}", next.log());
    standby.terminate();
    let handover = wait_until(
        "the next worker takes over after a SIGTERM",
        Duration::from_secs(30),
        || next.leads(),
        || next.log(),
    );
    let old = standby.log();
    assert!(old.contains(STOPPED) && old.contains("released the Lease"), "no clean release:\n{old}");
    eprintln!("takeover after SIGTERM of the leader (released): {handover:.1?}");
    next.terminate();
}

//! Singleton tasks under the `<name>-leader` Lease, on the real local
//! control plane (sluice-dev) with real Kafka: two `sluice-worker`
//! processes of one processor take turns. Exactly one runs the singleton
//! tasks (it provisions the output topics); when it is killed with
//! SIGKILL the other takes over after the Lease expires, and when it is
//! stopped with SIGTERM it stops its tasks and releases the Lease first, so
//! the other takes over at once. A leader cut off from the API server (its
//! renewals fail, its brokers still answer) stops its tasks before its Lease
//! can expire. At no moment do both run them.

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
        Worker::start_on(spec, dir, pod, kubeconfig, LEASE)
    }

    fn start_on(spec: &Path, dir: &Path, pod: &str, kubeconfig: &Path, lease: &str) -> Worker {
        let kubeconfig = kubeconfig.to_str().expect("kubeconfig path");
        Worker(common::process::WorkerProcess::start(
            spec,
            dir.join(format!("{pod}.log")),
            pod,
            &[
                ("LOG_LEVEL", "info,rdkafka=warn,kube=warn"),
                ("POD_NAMESPACE", "default"),
                ("SLUICE_LEASE_NAME", lease),
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

/// A TCP proxy between one worker and the API server that the test can
/// cut, as a network partition would: open connections are dropped and new
/// ones refused.
struct Partition {
    addr: std::net::SocketAddr,
    cut: tokio_util::sync::CancellationToken,
}

impl Partition {
    async fn start(target: String) -> Partition {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let cut = tokio_util::sync::CancellationToken::new();
        let accepting = cut.clone();
        tokio::spawn(async move {
            loop {
                let mut inbound = tokio::select! {
                    _ = accepting.cancelled() => return,
                    r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => return },
                };
                let (cut, target) = (accepting.clone(), target.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Partition { addr, cut }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.cut.cancel();
    }
}

/// The API server's `host:port` in `kubeconfig`.
fn api_server(kubeconfig: &Path) -> String {
    let text = std::fs::read_to_string(kubeconfig).expect("kubeconfig");
    let line = text.lines().find(|l| l.trim_start().starts_with("server:")).expect("a server in the kubeconfig");
    let url = line.trim_start().trim_start_matches("server:").trim().trim_matches('"');
    url.trim_start_matches("https://").trim_end_matches('/').to_string()
}

/// A copy of `kubeconfig` at `out` whose server (`target`) is reached
/// through `proxy`; TLS still checks the server's own name.
fn write_kubeconfig_through(kubeconfig: &Path, out: &Path, target: &str, proxy: std::net::SocketAddr) {
    let text = std::fs::read_to_string(kubeconfig).expect("kubeconfig");
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h).trim_matches(['[', ']']);
    let mut lines = Vec::new();
    for l in text.lines() {
        if l.trim_start().starts_with("server:") {
            let indent = &l[..l.len() - l.trim_start().len()];
            lines.push(format!("{indent}server: https://{proxy}"));
            if host.parse::<std::net::IpAddr>().is_err() {
                lines.push(format!("{indent}tls-server-name: {host}"));
            }
        } else {
            lines.push(l.to_string());
        }
    }
    std::fs::write(out, lines.join("\n")).expect("write kubeconfig");
}

/// When the first line of `log` containing `what` was written.
fn logged_at(log: &str, what: &str) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    let line = log.lines().find(|l| l.contains(what))?;
    chrono::DateTime::parse_from_rfc3339(line.split_whitespace().next()?).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_api_server_stops_its_tasks_before_another_takes_over() {
    const CUT_LEASE: &str = "cut-leader";
    init_logs();
    let cluster = start_cluster().await;
    let client = cluster.client().await.expect("client");
    let leases: Api<Lease> = Api::namespaced(client, "default");
    let kafka = Kafka::start();
    kafka.create_topic("in", 2).expect("topic");
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = dir.path().join("spec.json");
    let body = json!({
        "source": {"kafka": {"brokers": [kafka.bootstrap()], "topic": "in", "group": "cut"}},
        "sink": {"kafka": {"topic": "cut-out"}}
    });
    std::fs::write(&spec, serde_json::to_vec(&body).expect("json")).expect("spec");
    let kubeconfig = cluster.kubeconfig_path();
    let (through, target) = (dir.path().join("kubeconfig-through-proxy"), api_server(&kubeconfig));
    let partition = Partition::start(target.clone()).await;
    write_kubeconfig_through(&kubeconfig, &through, &target, partition.addr);

    let mut a = Worker::start_on(&spec, dir.path(), "worker-a", &through, CUT_LEASE);
    wait_until("worker A leads", Duration::from_secs(60), || a.leads(), || a.log());
    let b = Worker::start_on(&spec, dir.path(), "worker-b", &kubeconfig, CUT_LEASE);
    std::thread::sleep(Duration::from_secs(3));
    assert!(!b.leads(), "a second leader while the first renews:\n{}", b.log());

    partition.cut.cancel();
    let cut_at = chrono::Utc::now();
    let takeover =
        wait_until("worker B takes over from the cut-off leader", Duration::from_secs(60), || b.leads(), || b.log());
    let (a_log, b_log) = (a.log(), b.log());
    let stopped = logged_at(&a_log, STOPPED).unwrap_or_else(|| panic!("worker A never stopped its tasks:\n{a_log}"));
    let started = logged_at(&b_log, STARTED).expect("worker B's start line");
    eprintln!(
        "cut at {cut_at}: worker A stopped its tasks {:.1} s later, worker B started its own {:.1} s later ({takeover:.1?} of waiting)",
        (stopped.to_utc() - cut_at).as_seconds_f64(),
        (started.to_utc() - cut_at).as_seconds_f64()
    );
    assert!(
        stopped < started,
        "both ran the singleton tasks: A stopped at {stopped}, B started at {started}\nworker-a:\n{a_log}\nworker-b:\n{b_log}"
    );
    assert!(a_log.contains("no renewal of the Lease seen"), "worker A stopped for another reason:\n{a_log}");
    a.0.assert_running();
    let holder = leases.get(CUT_LEASE).await.expect("the Lease").spec.and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("worker-b"));
    let _ = leases.delete(CUT_LEASE, &Default::default()).await;
}

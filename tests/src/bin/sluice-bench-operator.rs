//! Operator scale benchmark on the real local control plane with KWOK nodes:
//! N StreamProcessors exist, then the operator (the release binary, as its
//! own process) starts cold. Prints the time until every processor is
//! reconciled and until every one is Ready, reconcile latency quantiles from
//! the operator's own histogram, its RSS, and the writes it makes at steady
//! state (from the audit log).
//!
//!   cargo build --release -p sluice-operator
//!   cargo run --release -p sluice-tests --bin sluice-bench-operator -- 1000

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::json;
use sluice_crds::StreamProcessor;
use sluice_dev::{Cluster, ClusterOptions};
use sluice_tests::e2e::install_crd;

const NS: &str = "bench";
const ADMIN: &str = "sluice-admin";

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0)))
        .unwrap_or(0)
}

/// Quantile from a Prometheus histogram's cumulative buckets, interpolated
/// linearly within the bucket (as histogram_quantile does).
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return prev.0;
            }
            let within = if count > prev.1 { (rank - prev.1) / (count - prev.1) } else { 1.0 };
            return prev.0 + (le - prev.0) * within;
        }
        prev = (le, count);
    }
    prev.0
}

fn reconcile_buckets(metrics: &str) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with("sluice_operator_reconcile_duration_seconds_bucket") && l.contains("outcome=\"ok\""))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            let count: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

async fn scrape(port: u16) -> String {
    let out = Command::new("curl").args(["-s", &format!("http://127.0.0.1:{port}/metrics")]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let nodes = u32::try_from(n / 100 + 2).unwrap_or(12);
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let operator_bin = format!("{target}/release/sluice-operator");
    assert!(
        std::path::Path::new(&operator_bin).is_file(),
        "{operator_bin} is missing: cargo build --release -p sluice-operator"
    );

    let t = Instant::now();
    let cluster = Cluster::start(ClusterOptions { virtual_nodes: nodes, ..ClusterOptions::default() })
        .await
        .unwrap_or_else(|e| panic!("start the cluster (bash dev/scripts/build-cluster.sh; root): {e}"));
    eprintln!("cluster with {nodes} KWOK nodes up in {:?}", t.elapsed());
    let client = cluster.client().await.expect("client");
    install_crd(&client).await;
    let _ = cluster.kubectl().args(["create", "namespace", NS]).output();

    let sps: Api<StreamProcessor> = Api::namespaced(client.clone(), NS);
    let t = Instant::now();
    stream::iter(0..n)
        .for_each_concurrent(16, |i| {
            let sps = sps.clone();
            async move {
                let sp: StreamProcessor = serde_json::from_value(json!({
                    "apiVersion": "sluice.io/v1alpha1", "kind": "StreamProcessor",
                    "metadata": {"name": format!("p{i:04}"), "namespace": NS},
                    "spec": {
                        "source": {"generator": {"rate": 10, "template": {"id": "seq"}}},
                        "pipeline": [{"filter": "msg.id % 2 == 0"}],
                        "sink": {"stdout": {}},
                        "replicas": 1,
                        "pod": {"nodeSelector": {"type": "kwok"},
                                "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}]}
                    }
                }))
                .expect("manifest");
                sps.create(&PostParams::default(), &sp).await.expect("create");
            }
        })
        .await;
    eprintln!("{n} StreamProcessors created in {:?}", t.elapsed());

    let port = 18_000 + (std::process::id() % 1000) as u16;
    let child = Command::new(&operator_bin)
        .args(["run", "--leader-elect=false", "--watch-namespace", NS, "--worker-image", "sluice:bench"])
        .arg(format!("--http-addr=127.0.0.1:{port}"))
        .env("KUBECONFIG", cluster.kubeconfig_path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the operator");
    let pid = child.id();
    let _operator = Operator(child);
    let cold = Instant::now();

    let mut reconciled_at = None;
    let mut ready_at = None;
    let mut peak_rss = 0;
    while ready_at.is_none() && cold.elapsed() < Duration::from_secs(600) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak_rss = peak_rss.max(rss_kib(pid, "VmRSS:"));
        let Ok(list) = sps.list(&ListParams::default()).await else { continue };
        let reconciled = list
            .items
            .iter()
            .filter(|sp| sp.status.as_ref().is_some_and(|s| s.observed_generation == sp.metadata.generation))
            .count();
        let ready = list
            .items
            .iter()
            .filter(|sp| sp.status.as_ref().and_then(|s| s.condition("Ready")).is_some_and(|c| c.status == "True"))
            .count();
        if reconciled == n && reconciled_at.is_none() {
            reconciled_at = Some(cold.elapsed());
        }
        if ready == n {
            ready_at = Some(cold.elapsed());
        }
    }

    // Steady state: nothing changes; count what the operator asks of the API server.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let before = cluster.audit_records().expect("audit").len();
    let metrics_before = scrape(port).await;
    let window = Duration::from_secs(30);
    tokio::time::sleep(window).await;
    let records = cluster.audit_records().expect("audit");
    let ours: Vec<_> = records[before..].iter().filter(|r| r.user == ADMIN).collect();
    let writes = ours.iter().filter(|r| matches!(r.verb.as_str(), "create" | "update" | "patch" | "delete")).count();
    let metrics = scrape(port).await;
    let reconciles_in_window = reconcile_buckets(&metrics).last().map(|b| b.1).unwrap_or(0.0)
        - reconcile_buckets(&metrics_before).last().map(|b| b.1).unwrap_or(0.0);

    let buckets = reconcile_buckets(&metrics);
    println!("operator scale benchmark: {n} StreamProcessors, {nodes} KWOK nodes, operator {operator_bin}");
    println!("| figure | value | target |");
    println!("|---|---|---|");
    println!(
        "| all reconciled (status.observedGeneration current) after a cold start | {:.2?} | < 10 s |",
        reconciled_at.unwrap_or_default()
    );
    println!("| all Ready (workers Running on KWOK nodes) | {:.2?} | |", ready_at.unwrap_or_default());
    println!("| reconciles | {} | |", buckets.last().map(|b| b.1).unwrap_or(0.0));
    println!("| reconcile p50 | {:.1} ms | |", quantile(&buckets, 0.5) * 1000.0);
    println!("| reconcile p99 | {:.1} ms | < 50 ms |", quantile(&buckets, 0.99) * 1000.0);
    println!(
        "| operator RSS peak (sampled) / high-water mark | {} MiB / {} MiB | < 100 MiB |",
        peak_rss / 1024,
        rss_kib(pid, "VmHWM:") / 1024
    );
    println!(
        "| API requests by the operator in {window:?} of steady state | {} ({} writes) | 0 writes |",
        ours.len(),
        writes
    );
    println!("| reconciles in that window | {reconciles_in_window} | |");
}

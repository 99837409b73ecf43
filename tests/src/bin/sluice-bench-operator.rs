//! Operator scale benchmark on the real local control plane with KWOK nodes:
//! N StreamProcessors exist, then the operator (the release binary, as its
//! own process) starts cold. Prints the time until every processor is
//! reconciled and until every one is Ready, reconcile latency quantiles from
//! the operator's own histogram, its RSS, and the writes it makes at steady
//! state (from the audit log); then the latency of 50 edits made one at a
//! time; then the baseline: the same writes made without the operator on a
//! fresh cluster (docs/benchmarks.md, "Operator at scale").
//!
//!   cargo build --release -p sluice-operator
//!   cargo run --release -p sluice-tests --bin sluice-bench-operator -- 1000

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use sluice_crds::StreamProcessor;
use sluice_dev::{Cluster, ClusterOptions};
use sluice_operator::{
    build::{self, Settings},
    reconcile::{APPLIED_HASH, MANAGER},
};
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

/// The cumulative buckets `(le, count)` of histogram `name` on the lines
/// carrying `label`, in order of `le`.
fn buckets(metrics: &str, name: &str, label: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket");
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(label))
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

fn reconcile_buckets(metrics: &str) -> Vec<(f64, f64)> {
    buckets(metrics, "sluice_operator_reconcile_duration_seconds", "outcome=\"ok\"")
}

async fn scrape(port: u16) -> String {
    let out = Command::new("curl").args(["-s", &format!("http://127.0.0.1:{port}/metrics")]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

fn step_buckets(metrics: &str, step: &str) -> Vec<(f64, f64)> {
    buckets(metrics, "sluice_operator_reconcile_step_seconds", &format!("step=\"{step}\""))
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12].iter().filter_map(|&i| f.get(i)?.parse::<f64>().ok()).sum();
    ticks / clock_ticks()
}

/// (busy, all) CPU seconds of the whole machine so far, from /proc/stat.
fn machine_cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> =
        stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let all: f64 = ticks.iter().take(8).sum();
    // idle and iowait are not busy
    let idle = ticks.get(3).unwrap_or(&0.0) + ticks.get(4).unwrap_or(&0.0);
    ((all - idle) / clock_ticks(), all / clock_ticks())
}

fn clock_ticks() -> f64 {
    // Asked once: CPU samples are taken in the poll loop.
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// One completed request from the API server's audit log, with the server's
/// own timing (received -> response complete) and, for slow requests, its
/// latency breakdown (the `apiserver.latency.k8s.io/*` annotations).
struct Request {
    user: String,
    verb: String,
    resource: String,
    subresource: String,
    received: Timestamp,
    seconds: f64,
    apf_wait: f64,
}

fn go_duration(s: &str) -> f64 {
    // "1.5s", "250.3ms", "12µs", "1m2.5s"
    let mut total = 0.0;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        while let Some(&n) = chars.peek() {
            if n.is_ascii_digit() || n == '.' {
                break;
            }
            unit.push(n);
            chars.next();
        }
        let v: f64 = num.parse().unwrap_or(0.0);
        num.clear();
        total += v * match unit.as_str() {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "µs" | "us" => 1e-6,
            "ns" => 1e-9,
            _ => 0.0,
        };
    }
    total
}

fn audit_requests(path: &std::path::Path) -> Vec<Request> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["stage"] == "ResponseComplete")
        .filter_map(|e| {
            let ts = |k: &str| e[k].as_str()?.parse::<Timestamp>().ok();
            let (received, done) = (ts("requestReceivedTimestamp")?, ts("stageTimestamp")?);
            let str_of = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
            Some(Request {
                user: str_of(&e["user"]["username"]),
                verb: str_of(&e["verb"]),
                resource: str_of(&e["objectRef"]["resource"]),
                subresource: str_of(&e["objectRef"]["subresource"]),
                received,
                seconds: done.duration_since(received).as_secs_f64(),
                apf_wait: e["annotations"]["apiserver.latency.k8s.io/apf-queue-wait"]
                    .as_str()
                    .map(go_duration)
                    .unwrap_or(0.0),
            })
        })
        .collect()
}

fn is_write(verb: &str) -> bool {
    matches!(verb, "create" | "update" | "patch" | "delete")
}

fn exact_quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let i = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[i]
}

/// The local cluster with `nodes` KWOK nodes, the CRD and the benchmark's namespace.
async fn start_cluster(nodes: u32) -> (Cluster, kube::Client) {
    let t = Instant::now();
    let cluster = Cluster::start(ClusterOptions { virtual_nodes: nodes, ..ClusterOptions::default() })
        .await
        .unwrap_or_else(|e| panic!("start the cluster (bash dev/scripts/build-cluster.sh; root): {e}"));
    eprintln!("cluster with {nodes} KWOK nodes up in {:?}", t.elapsed());
    let client = cluster.client().await.expect("client");
    install_crd(&client).await;
    let _ = cluster.kubectl().args(["create", "namespace", NS]).output();
    (cluster, client)
}

/// One line per process that used CPU between the two samples.
fn print_cpu(components: &[(&str, u32)], before: &[f64], after: &[f64]) {
    for ((name, _), (a, b)) in components.iter().zip(after.iter().zip(before)) {
        let used = a - b;
        if used > 0.05 {
            println!("  {name}: {used:.1}");
        }
    }
}

/// N processors `p0000`..., generator source (nothing to probe), workers on
/// the KWOK nodes; returns them as created (with their uids).
async fn create_processors(sps: &Api<StreamProcessor>, n: usize) -> Vec<StreamProcessor> {
    stream::iter(0..n)
        .map(|i| {
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
                sps.create(&PostParams::default(), &sp).await.expect("create")
            }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

/// Server-side apply as the operator does it (its field manager, forced).
async fn apply<K>(client: &kube::Client, mut obj: K)
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    // The operator's hash annotation, so the bodies weigh what its do.
    obj.annotations_mut().insert(APPLIED_HASH.into(), "0123456789abcdef".into());
    let api: Api<K> = Api::namespaced(client.clone(), NS);
    api.patch(&obj.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&obj)).await.expect("apply");
}

/// The baseline: the operator's cold-start writes made directly, on a fresh
/// cluster of the same shape with the same N processors. For each processor
/// its seven children, built by the operator's own functions and applied as
/// it applies them (all at once, the RoleBinding after its Role), then a
/// status like the one the operator wrote; as many processors at a time as
/// the operator reconciles at once. No watches, no queue, no decisions:
/// what remains is the control plane's time for these writes on this
/// machine, the floor under any operator that makes them.
async fn baseline(n: usize, nodes: u32, concurrency: usize, status: serde_json::Value) {
    let (cluster, client) = start_cluster(nodes).await;
    let sps: Api<StreamProcessor> = Api::namespaced(client.clone(), NS);
    let created = create_processors(&sps, n).await;
    let settings = Settings { worker_image: "sluice:bench".into(), ..Settings::default() };
    let components = cluster.pids();
    let cpu_before: Vec<f64> = components.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    let machine_before = machine_cpu_seconds();
    let t = Instant::now();
    let start_wall = Timestamp::now();
    let mut latencies: Vec<f64> = stream::iter(created)
        .map(|sp| {
            let (client, settings, sps, status) = (client.clone(), settings.clone(), sps.clone(), status.clone());
            async move {
                let t = Instant::now();
                let service_account = async {
                    if let Some(sa) = build::service_account(&sp) {
                        apply(&client, sa).await;
                    }
                };
                let rbac = async {
                    apply(&client, build::role(&sp)).await;
                    apply(&client, build::role_binding(&sp)).await;
                };
                futures::join!(
                    apply(&client, build::configmap(&sp)),
                    service_account,
                    rbac,
                    apply(&client, build::service(&sp)),
                    apply(&client, build::pdb(&sp)),
                    apply(&client, build::deployment(&sp, &settings, 1)),
                );
                let mut status = status;
                status["observedGeneration"] = json!(sp.metadata.generation);
                let doc = json!({"apiVersion": "sluice.io/v1alpha1", "kind": "StreamProcessor", "status": status});
                sps.patch_status(&sp.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&doc))
                    .await
                    .expect("status");
                t.elapsed().as_secs_f64()
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let took = t.elapsed();
    let end_wall = Timestamp::now();
    let machine = machine_cpu_seconds();
    let cpu_after: Vec<f64> = components.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    println!();
    println!(
        "baseline, the same writes without the operator (fresh cluster, {n} processors, {concurrency} at a time): all written in {took:.2?}"
    );
    println!(
        "- one processor's writes (the analogue of a reconcile's wall time): p50 {:.1} ms, p99 {:.1} ms",
        exact_quantile(&mut latencies, 0.5) * 1000.0,
        exact_quantile(&mut latencies, 0.99) * 1000.0
    );
    // The audit log is written in batches, at most a second apart.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = audit_requests(&cluster.audit_log());
    let within = |r: &&Request| r.received >= start_wall && r.received <= end_wall && is_write(&r.verb);
    let writes: Vec<&Request> = requests.iter().filter(within).filter(|r| r.user == ADMIN).collect();
    let mut lat: Vec<f64> = writes.iter().map(|r| r.seconds).collect();
    println!(
        "- writes by the baseline: {} ({:.0}/s); API server time per write p50 {:.1} ms, p99 {:.1} ms",
        writes.len(),
        writes.len() as f64 / took.as_secs_f64(),
        exact_quantile(&mut lat, 0.5) * 1000.0,
        exact_quantile(&mut lat, 0.99) * 1000.0
    );
    let others = requests.iter().filter(within).filter(|r| r.user != ADMIN).count();
    println!("- writes by the control plane's own controllers meanwhile: {others}");
    println!("- CPU seconds used (2 cores = {:.0} CPU-s available):", 2.0 * took.as_secs_f64());
    print_cpu(&components, &cpu_before, &cpu_after);
    println!("  whole machine: {:.1} of {:.1} CPU-s busy", machine.0 - machine_before.0, machine.1 - machine_before.1);
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

    let (cluster, client) = start_cluster(nodes).await;

    let sps: Api<StreamProcessor> = Api::namespaced(client.clone(), NS);
    let t = Instant::now();
    create_processors(&sps, n).await;
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
    let cold_wall = Timestamp::now();
    let mut components: Vec<(&str, u32)> = cluster.pids();
    components.push(("sluice-operator", pid));
    let cpu_at_cold: Vec<f64> = components.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    let machine_at_cold = machine_cpu_seconds();
    let mut machine_at_reconciled = machine_at_cold;
    let mut cpu_at_reconciled = cpu_at_cold.clone();
    let mut reconciled_wall = cold_wall;

    // The processors' state, kept by one watch: polling with LISTs of all
    // 1000 (four a second) cost the API server about 5% of its CPU during
    // the cold start (a CPU profile showed it), load the operator does not
    // cause.
    let seen: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, (bool, bool)>>> = Default::default();
    let watch = tokio::spawn({
        let seen = seen.clone();
        let stream = watcher(sps.clone(), watcher::Config::default()).default_backoff().applied_objects();
        async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                let Ok(sp) = item else { continue };
                let reconciled = sp.status.as_ref().is_some_and(|s| s.observed_generation == sp.metadata.generation);
                let ready = sp.status.as_ref().and_then(|s| s.condition("Ready")).is_some_and(|c| c.status == "True");
                seen.lock().expect("not poisoned").insert(sp.name_any(), (reconciled, ready));
            }
        }
    });

    let mut reconciled_at = None;
    // When the first 50%, 90% and 99% of processors were reconciled: a long
    // tail after most are done is the controller's queue, not the API server.
    let mut milestones: Vec<(f64, Option<Duration>)> = vec![(0.5, None), (0.9, None), (0.99, None)];
    let mut ready_at = None;
    let mut peak_rss = 0;
    while ready_at.is_none() && cold.elapsed() < Duration::from_secs(600) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak_rss = peak_rss.max(rss_kib(pid, "VmRSS:"));
        let (reconciled, ready) = {
            let seen = seen.lock().expect("not poisoned");
            (seen.values().filter(|s| s.0).count(), seen.values().filter(|s| s.1).count())
        };
        for (share, at) in milestones.iter_mut() {
            if at.is_none() && reconciled as f64 >= *share * n as f64 {
                *at = Some(cold.elapsed());
            }
        }
        if reconciled == n && reconciled_at.is_none() {
            reconciled_at = Some(cold.elapsed());
            reconciled_wall = Timestamp::now();
            cpu_at_reconciled = components.iter().map(|(_, p)| cpu_seconds(*p)).collect();
            machine_at_reconciled = machine_cpu_seconds();
        }
        if ready == n {
            ready_at = Some(cold.elapsed());
        }
    }

    watch.abort();
    // A status as the operator wrote it, for the baseline to write its like.
    let status = serde_json::to_value(sps.get("p0000").await.expect("p0000").status).expect("status");

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

    // Then one change at a time on the settled control plane, as a person
    // editing a processor: a new filter, so its ConfigMap, its Deployment
    // (a rollout) and its status are written.
    let edits = 50;
    let before_edits = scrape(port).await;
    let mut edit_walls = Vec::with_capacity(edits);
    for i in 0..edits {
        let name = format!("p{i:04}");
        let t = Instant::now();
        let patch = json!({"spec": {"pipeline": [{"filter": "msg.id % 3 == 0"}]}});
        let generation =
            sps.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("edit").metadata.generation;
        while sps.get(&name).await.expect("get").status.is_none_or(|s| s.observed_generation != generation) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        edit_walls.push(t.elapsed().as_secs_f64());
    }
    let after_edits = scrape(port).await;
    let delta = |after: Vec<(f64, f64)>, before: Vec<(f64, f64)>| -> Vec<(f64, f64)> {
        after.iter().zip(before).map(|(a, b)| (a.0, a.1 - b.1)).collect()
    };
    let edit_buckets = delta(reconcile_buckets(&after_edits), reconcile_buckets(&before_edits));
    let edit_steps: Vec<(&str, Vec<(f64, f64)>)> = ["dereference", "scale", "apply", "report"]
        .into_iter()
        .map(|st| (st, delta(step_buckets(&after_edits, st), step_buckets(&before_edits, st))))
        .collect();

    let buckets = reconcile_buckets(&metrics);
    println!("operator scale benchmark: {n} StreamProcessors, {nodes} KWOK nodes, operator {operator_bin}");
    println!("| figure | value | target |");
    println!("|---|---|---|");
    println!(
        "| all reconciled (status.observedGeneration current) after a cold start | {:.2?} | < 10 s |",
        reconciled_at.unwrap_or_default()
    );
    for (share, at) in &milestones {
        println!("| {:.0}% reconciled | {:.2?} | |", share * 100.0, at.unwrap_or_default());
    }
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
    println!(
        "| then {edits} edits one at a time: reconciles / p50 / p99 | {} / {:.1} ms / {:.1} ms | < 50 ms |",
        edit_buckets.last().map(|b| b.1).unwrap_or(0.0),
        quantile(&edit_buckets, 0.5) * 1000.0,
        quantile(&edit_buckets, 0.99) * 1000.0
    );
    println!(
        "| edit to status.observedGeneration, seen by a client: p50 / max | {:.1} ms / {:.1} ms | |",
        exact_quantile(&mut edit_walls, 0.5) * 1000.0,
        exact_quantile(&mut edit_walls, 1.0) * 1000.0
    );
    for (st, b) in &edit_steps {
        println!(
            "|   of which {st}: p50 / p99 | {:.1} ms / {:.1} ms | |",
            quantile(b, 0.5) * 1000.0,
            quantile(b, 0.99) * 1000.0
        );
    }

    // Where the cold start's time went: the API server's own view (audit log).
    if let Ok(copy) = std::env::var("SLUICE_BENCH_KEEP_AUDIT") {
        let _ = std::fs::copy(cluster.audit_log(), &copy);
        eprintln!("audit log copied to {copy}");
    }
    let requests = audit_requests(&cluster.audit_log());
    let in_cold: Vec<&Request> =
        requests.iter().filter(|r| r.received >= cold_wall && r.received <= reconciled_wall).collect();
    // The bench watches StreamProcessors with the same admin credentials; it writes none of them.
    let by_operator = |r: &&&Request| r.user == ADMIN;
    let op_writes: Vec<&&Request> = in_cold.iter().filter(by_operator).filter(|r| is_write(&r.verb)).collect();
    let all_writes: Vec<&&Request> = in_cold.iter().filter(|r| is_write(&r.verb)).collect();
    let window_s = reconciled_wall.duration_since(cold_wall).as_secs_f64().max(0.001);
    let mut lat: Vec<f64> = op_writes.iter().map(|r| r.seconds).collect();
    let mut all_lat: Vec<f64> = all_writes.iter().map(|r| r.seconds).collect();
    let apf_waited = op_writes.iter().filter(|r| r.apf_wait > 0.0).count();
    let apf_total: f64 = op_writes.iter().map(|r| r.apf_wait).sum();
    let mut by_resource: std::collections::BTreeMap<String, usize> = Default::default();
    for r in &op_writes {
        let key =
            if r.subresource.is_empty() { r.resource.clone() } else { format!("{}/{}", r.resource, r.subresource) };
        *by_resource.entry(format!("{} {key}", r.verb)).or_default() += 1;
    }
    let mut others: std::collections::BTreeMap<String, usize> = Default::default();
    for r in all_writes.iter().filter(|r| r.user != ADMIN) {
        *others.entry(r.user.clone()).or_default() += 1;
    }
    println!();
    println!("cold start, {window_s:.1} s from the operator's start until all reconciled (API server audit log):");
    println!(
        "- operator writes: {} ({:.1} per processor); API server time per write p50 {:.1} ms, p99 {:.1} ms; {} waited in priority-and-fairness queues, {:.1} s in all",
        op_writes.len(),
        op_writes.len() as f64 / n as f64,
        exact_quantile(&mut lat, 0.5) * 1000.0,
        exact_quantile(&mut lat, 0.99) * 1000.0,
        apf_waited,
        apf_total
    );
    println!("  by verb and resource: {by_resource:?}");
    println!(
        "- all writes to the API server: {} ({:.0}/s); p50 {:.1} ms, p99 {:.1} ms",
        all_writes.len(),
        all_writes.len() as f64 / window_s,
        exact_quantile(&mut all_lat, 0.5) * 1000.0,
        exact_quantile(&mut all_lat, 0.99) * 1000.0
    );
    println!("  writes by other users: {others:?}");
    println!("- CPU seconds used in that window (2 cores = {:.0} CPU-s available):", 2.0 * window_s);
    print_cpu(&components, &cpu_at_cold, &cpu_at_reconciled);
    let ours: f64 = cpu_at_reconciled.iter().zip(&cpu_at_cold).map(|(a, b)| a - b).sum();
    let busy = machine_at_reconciled.0 - machine_at_cold.0;
    println!(
        "  whole machine: {busy:.1} of {:.1} CPU-s busy; processes outside the cluster and the operator (other builds and tests): {:.1}",
        machine_at_reconciled.1 - machine_at_cold.1,
        (busy - ours).max(0.0)
    );
    let reconciles = buckets.last().map(|b| b.1).unwrap_or(0.0);
    println!("- operator CPU per reconcile (whole run): {:.2} ms", cpu_seconds(pid) * 1000.0 / reconciles.max(1.0));
    println!("- reconcile steps (wall time, operator histogram):");
    for st in ["dereference", "scale", "apply", "report"] {
        let b = step_buckets(&metrics, st);
        if b.last().is_some_and(|x| x.1 > 0.0) {
            println!(
                "  {st}: {} runs, p50 {:.2} ms, p99 {:.2} ms",
                b.last().map(|x| x.1).unwrap_or(0.0),
                quantile(&b, 0.5) * 1000.0,
                quantile(&b, 0.99) * 1000.0
            );
        }
    }

    // The baseline on a fresh cluster, after this one is gone.
    drop(_operator);
    drop(cluster);
    let concurrency = std::env::var("SLUICE_RECONCILE_CONCURRENCY").ok().and_then(|v| v.parse().ok()).unwrap_or(32);
    baseline(n, nodes, concurrency, status).await;
}

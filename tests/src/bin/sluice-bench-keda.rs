//! The built-in autoscaler against KEDA, on one local cluster (with KEDA
//! v2.21 running) and the same backlog: 20,000 messages of lag on 12
//! partitions, lagPerReplica / lagThreshold 1000, pollInterval /
//! pollingInterval 10 s, 1 to 12 replicas. Three ways to scale a
//! StreamProcessor, N runs each:
//!
//! - `builtin`: spec.scaling with the operator's defaults otherwise;
//! - `keda-default`: no spec.scaling, a ScaledObject with KEDA's (and the
//!   HPA's) defaults otherwise;
//! - `keda-fast`: the same ScaledObject with HPA behavior tuned for speed
//!   (no stabilization up or down, any step size every second).
//!
//! The workers do real work per message (a CEL comprehension over a list of
//! 200 integers in each payload) under a CPU limit (default 20m,
//! `--worker-cpu none` for none): with neither, one worker drains the backlog
//! seconds after the producer finishes and no autoscaler gets to act.
//!
//! Per run it prints seconds from the end of producing to the worker
//! Deployment's first replica change, to all replicas Ready at the partition
//! cap (12), and from the lag's end (every partition's committed offset at
//! its high watermark) back to the minimum (1).
//!
//!   bash dev/scripts/build-keda.sh
//!   cargo build --release -p sluice-operator -p sluice-worker
//!   cargo run --release -p sluice-tests --bin sluice-bench-keda -- 2 [--worker-cpu 20m] [--only builtin,keda-fast]

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams},
};
use rdkafka::{
    Offset, TopicPartitionList,
    config::ClientConfig,
    consumer::{BaseConsumer, Consumer},
};
use serde_json::json;
use sluice_crds::StreamProcessor;
use sluice_tests::{
    brokers::{Kafka, KafkaConfig},
    e2e::{InProcessOperator, install_crd, restricted_namespace},
    keda::{KafkaTrigger, ScaledObjectSpec, apply_scaled_object, scaled_objects, start_cluster_with_keda},
};

const NS: &str = "bench";
const PARTITIONS: i32 = 12;
const MESSAGES: usize = 20_000;
const LAG_PER_REPLICA: u64 = 1000;
const POLL_SECONDS: u32 = 10;
const MIN: i32 = 1;
const MAX: i32 = 12;
/// Integers per message the pipeline's CEL map walks (the per-message work).
const LIST: u32 = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Builtin,
    KedaDefault,
    KedaFast,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Builtin, Mode::KedaDefault, Mode::KedaFast];

    fn name(self) -> &'static str {
        match self {
            Mode::Builtin => "builtin",
            Mode::KedaDefault => "keda-default",
            Mode::KedaFast => "keda-fast",
        }
    }
}

/// HPA behavior for `keda-fast`: every step allowed at once, nothing held.
fn fast_behavior() -> serde_json::Value {
    json!({
        "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
                    "policies": [{"type": "Pods", "value": 12, "periodSeconds": 1},
                                 {"type": "Percent", "value": 1200, "periodSeconds": 1}]},
        "scaleDown": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
                      "policies": [{"type": "Percent", "value": 100, "periodSeconds": 1}]}
    })
}

/// One run's figures, in seconds (None: did not happen within the run's deadline).
#[derive(Debug, Default)]
struct Run {
    first_change: Option<f64>,
    cap_ready: Option<f64>,
    lag_end: Option<f64>,
    back_to_min: Option<f64>,
    max_replicas: i32,
}

fn fmt(v: Option<f64>) -> String {
    v.map(|s| format!("{s:.1}")).unwrap_or_else(|| "-".into())
}

/// Sum over partitions of high watermark - committed offset of `group`
/// (no commit yet: high - low, as the workers start from the earliest).
fn lag(consumer: &BaseConsumer, topic: &str) -> Option<i64> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(5)).ok()?;
    let mut total = 0;
    for p in 0..PARTITIONS {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(5)).ok()?;
        let at = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => low,
        };
        total += (high - at).max(0);
    }
    Some(total)
}

fn group_reader(bootstrap: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()
        .expect("a consumer to read the group's committed offsets")
}

async fn deployment_replicas(api: &Api<Deployment>, name: &str) -> Option<(i32, i32)> {
    let d = api.get(name).await.ok()?;
    Some((d.spec.replicas?, d.status.and_then(|s| s.ready_replicas).unwrap_or(0)))
}

#[allow(clippy::too_many_arguments)]
async fn run_once(
    client: &Client,
    kafka: &Kafka,
    mode: Mode,
    index: usize,
    worker_cpu: Option<&str>,
    settle: Duration,
) -> Run {
    let name = format!("{}-{index}", mode.name());
    let topic = name.clone();
    let group = format!("{NS}.{name}");
    kafka.create_topic(&topic, PARTITIONS).expect("create the topic");
    kafka.create_topic(&format!("{name}-out"), PARTITIONS).expect("create the output topic");
    let mut resources = json!({"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "192Mi"}});
    if let Some(cpu) = worker_cpu {
        resources["limits"]["cpu"] = json!(cpu);
    }
    let mut spec = json!({
        "source": {"kafka": {"brokers": [kafka.bootstrap()], "topic": topic}},
        // Per-message work: a CEL comprehension over the payload's list.
        "pipeline": [{"map": {"set": {"sevens": "size(msg.xs.filter(x, x % 7 == 0))"}, "drop": ["xs"]}}],
        "sink": {"kafka": {"topic": format!("{name}-out")}},
        "resources": resources,
    });
    match mode {
        Mode::Builtin => {
            spec["scaling"] = json!({"minReplicas": MIN, "maxReplicas": MAX, "lagPerReplica": LAG_PER_REPLICA,
                                     "pollInterval": format!("{POLL_SECONDS}s")});
        }
        Mode::KedaDefault | Mode::KedaFast => spec["replicas"] = json!(MIN),
    }
    let sps: Api<StreamProcessor> = Api::namespaced(client.clone(), NS);
    let sp = json!({"apiVersion": "sluice.io/v1alpha1", "kind": "StreamProcessor",
                    "metadata": {"name": name, "namespace": NS}, "spec": spec});
    sps.patch(&name, &PatchParams::apply("sluice-bench").force(), &Patch::Apply(&sp))
        .await
        .expect("apply the processor");
    if mode != Mode::Builtin {
        let trigger = KafkaTrigger {
            bootstrap: kafka.bootstrap(),
            topic: topic.clone(),
            group: group.clone(),
            lag_threshold: LAG_PER_REPLICA,
        };
        let so = ScaledObjectSpec {
            name: name.clone(),
            namespace: NS.into(),
            target: name.clone(),
            trigger,
            min: MIN,
            max: MAX,
            polling_seconds: POLL_SECONDS,
            behavior: (mode == Mode::KedaFast).then(fast_behavior),
        };
        apply_scaled_object(client, &so).await;
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    // Idle and settled at the minimum.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if deployment_replicas(&deployments, &name).await == Some((MIN, MIN)) {
            break;
        }
        assert!(Instant::now() < deadline, "{name}: never settled at {MIN} ready worker");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(settle).await;

    let xs: Vec<u32> = (0..LIST).collect();
    let records: Vec<(Option<String>, String)> =
        (0..MESSAGES).map(|i| (Some(format!("k{}", i % 97)), json!({"id": i, "xs": xs}).to_string())).collect();
    kafka.produce(&topic, records).expect("produce the backlog");
    let produced = Instant::now();
    let reader = group_reader(&kafka.bootstrap(), &group);
    let mut run = Run { max_replicas: MIN, ..Run::default() };
    let mut last_lag_check = Instant::now() - Duration::from_secs(1);
    // The HPA's default scale-down stabilization is 300 s, the operator's too.
    let deadline = produced + Duration::from_secs(480);
    while Instant::now() < deadline {
        let t = produced.elapsed().as_secs_f64();
        if let Some((want, ready)) = deployment_replicas(&deployments, &name).await {
            run.max_replicas = run.max_replicas.max(want);
            if run.first_change.is_none() && want != MIN {
                run.first_change = Some(t);
            }
            if run.cap_ready.is_none() && want == MAX && ready == MAX {
                run.cap_ready = Some(t);
            }
            if let Some(end) = run.lag_end
                && want == MIN
                && run.first_change.is_some()
            {
                run.back_to_min = Some(t - end);
                break;
            }
        }
        if run.lag_end.is_none() && last_lag_check.elapsed() >= Duration::from_millis(500) {
            last_lag_check = Instant::now();
            if lag(&reader, &topic) == Some(0) {
                run.lag_end = Some(produced.elapsed().as_secs_f64());
            }
        }
        if run.lag_end.is_some() && run.first_change.is_none() && produced.elapsed() > Duration::from_secs(120) {
            // Drained without a scale: nothing comes back down.
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if mode != Mode::Builtin {
        let _ = scaled_objects(client, NS).delete(&name, &DeleteParams::default()).await;
    }
    let _ = sps.delete(&name, &DeleteParams::default()).await;
    run
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(2);
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    // A worker on a whole core drains a trivial backlog before any
    // autoscaler could act: see the module docs.
    let worker_cpu = Some(flag("--worker-cpu").unwrap_or_else(|| "20m".into())).filter(|c| c != "none");
    let modes: Vec<Mode> = match flag("--only") {
        Some(list) => Mode::ALL.into_iter().filter(|m| list.split(',').any(|n| n == m.name())).collect(),
        None => Mode::ALL.to_vec(),
    };
    let settle = Duration::from_secs(flag("--settle").and_then(|s| s.parse().ok()).unwrap_or(10));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();

    let t0 = Instant::now();
    let cluster = start_cluster_with_keda().await;
    eprintln!("cluster with KEDA {} up in {:.1} s", sluice_dev::keda::VERSION, t0.elapsed().as_secs_f64());
    let client = cluster.client().await.expect("client");
    install_crd(&client).await;
    restricted_namespace(&client, NS).await;
    let kafka = Kafka::start_with(KafkaConfig { host: cluster.host_ip(), ..KafkaConfig::default() })
        .unwrap_or_else(|e| panic!("{e}"));
    let operator = InProcessOperator::start(&client, NS);

    println!(
        "# {MESSAGES} messages on {PARTITIONS} partitions, {LAG_PER_REPLICA}/replica, poll {POLL_SECONDS} s, {MIN}..{MAX} replicas, worker CPU limit {}",
        worker_cpu.as_deref().unwrap_or("none")
    );
    println!("mode          run  first change s  {MAX} ready s  lag end s  back to {MIN} s  max replicas");
    // Ctrl-C or SIGTERM ends the benchmark between polls, and the cluster and
    // Kafka still stop (they are dropped below, not left to die with us).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    'runs: for i in 0..runs {
        for &mode in &modes {
            let r = tokio::select! {
                r = run_once(&client, &kafka, mode, i, worker_cpu.as_deref(), settle) => r,
                _ = tokio::signal::ctrl_c() => break 'runs,
                _ = term.recv() => break 'runs,
            };
            println!(
                "{:<13} {:>3}  {:>14}  {:>10}  {:>9}  {:>12}  {:>12}",
                mode.name(),
                i + 1,
                fmt(r.first_change),
                fmt(r.cap_ready),
                fmt(r.lag_end),
                fmt(r.back_to_min),
                r.max_replicas
            );
        }
    }
    operator.stop().await;
    drop(kafka);
    drop(cluster);
}

//! The examples in examples/, applied unchanged with kubectl as a user would,
//! each against the real broker it names, on the real cluster with worker
//! pods running the project's image:
//!
//! - kafka-orders-by-country: Kafka in, windows (event time, per country)
//!   with Redis state behind a password, Kafka out, poison to the dead-letter
//!   topic; the window results are checked against sums computed here;
//! - nats-clean-events: JetStream with user and password, bots dropped,
//!   fields normalised and dropped, two replicas on one durable;
//! - redis-payments-dlq: Redis Streams with a password, large payments
//!   flagged, poison dead-lettered, the sink's dedupe on;
//! - generator-windows: the generator and stdout, window results in the
//!   worker's log.
//!
//! For each: the owned objects appear, the workers run, the output is what
//! the pipeline says, and the status is Ready for the current generation.
//! The brokers run on this machine; a selector-less Service with an
//! EndpointSlice gives each the in-cluster name the example uses
//! (`kafka.shop.svc:9092`, ...). quickstart.yaml runs in the demo suite,
//! kafka-exactly-once.yaml needs a SASL_SSL listener on port 9093 and is
//! covered by the worker's secured-broker and exactly-once suites instead.
//!
//! Runs against another cluster with `SLUICE_E2E_KUBECONFIG` (see README).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    time::Duration,
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount},
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};
use sluice_crds::StreamProcessor;
use sluice_dev::{bootstrap::HostPort, e2e::E2eCluster};
use sluice_tests::{
    brokers::{Kafka, KafkaConfig, Nats, NatsConfig, Redis, RedisConfig},
    e2e::{
        InProcessOperator, assert_operator_never_denied, chart_operator_client, condition, eventually_on, install_crd,
        restricted_namespace, start_cluster,
    },
    repo_root,
};

const DEADLINE: Duration = Duration::from_secs(240);

fn kubectl_apply(cluster: &E2eCluster, example: &str, namespace: Option<&str>) {
    let path = repo_root().join("examples").join(example);
    let mut cmd = cluster.kubectl();
    cmd.arg("apply").arg("-f").arg(&path);
    if let Some(ns) = namespace {
        cmd.args(["-n", ns]);
    }
    let out = cmd.output().expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl apply -f {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `<name>.<namespace>.svc:<port>` reaches `target` on this machine.
async fn host_service(client: &Client, namespace: &str, name: &str, ip: Ipv4Addr, port: u16, target: u16) {
    let ports = [HostPort { name: "tcp".into(), protocol: "TCP", port, target_port: target }];
    sluice_dev::bootstrap::apply_host_service(client, namespace, name, None, ip, &ports)
        .await
        .unwrap_or_else(|e| panic!("Service {namespace}/{name}: {e}"));
}

async fn secret(client: &Client, namespace: &str, name: &str, data: &[(&str, &str)]) {
    let data: BTreeMap<&str, &str> = data.iter().copied().collect();
    let s: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}, "stringData": data
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), namespace)
        .patch(name, &PatchParams::apply("sluice-e2e").force(), &Patch::Apply(&s))
        .await
        .unwrap_or_else(|e| panic!("Secret {namespace}/{name}: {e}"));
}

/// The owned objects are there and owned, the workers run the project's
/// image, and the processor is Ready for its current generation with
/// `replicas` workers (None: as many as its autoscaler decided).
async fn check_running(cluster: &E2eCluster, client: &Client, namespace: &str, name: &str, replicas: Option<i32>) {
    let sps: Api<StreamProcessor> = Api::namespaced(client.clone(), namespace);
    let (sp, replicas) = eventually_on(cluster, &format!("{namespace}/{name} is Ready"), DEADLINE, || async {
        let sp = sps.get(name).await.ok()?;
        let st = sp.status.as_ref()?;
        let current = st.observed_generation == sp.metadata.generation;
        let want = replicas.or(st.desired_replicas)?;
        let ready = condition(&sp, "Ready")?.0 == "True" && current && st.ready_replicas == want && want > 0;
        ready.then_some((sp, want))
    })
    .await;
    let uid = sp.uid().expect("uid");
    macro_rules! owned {
        ($k:ty) => {{
            let obj = Api::<$k>::namespaced(client.clone(), namespace)
                .get(name)
                .await
                .unwrap_or_else(|e| panic!("{} {namespace}/{name}: {e}", stringify!($k)));
            assert!(
                obj.owner_references().iter().any(|o| o.uid == uid && o.controller == Some(true)),
                "{} {namespace}/{name} is not owned by its StreamProcessor",
                stringify!($k)
            );
            obj
        }};
    }
    let cm: ConfigMap = owned!(ConfigMap);
    let doc = &cm.data.expect("ConfigMap data")["processor.json"];
    assert!(doc.contains(&format!("\"{}\"", sp.spec.source.kind())), "the config names the source: {doc}");
    owned!(Service);
    owned!(PodDisruptionBudget);
    let deployment: Deployment = owned!(Deployment);
    assert_eq!(deployment.spec.replicas, Some(replicas));
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={name}")))
        .await
        .expect("pods");
    assert_eq!(pods.items.len(), replicas as usize);
    for pod in &pods.items {
        let spec = pod.spec.as_ref().expect("pod spec");
        assert_eq!(spec.containers[0].image.as_deref(), Some(sluice_tests::e2e::IMAGE));
        let account = spec.service_account_name.clone().expect("a service account");
        Api::<ServiceAccount>::namespaced(client.clone(), namespace)
            .get(&account)
            .await
            .unwrap_or_else(|e| panic!("the workers' ServiceAccount {namespace}/{account}: {e}"));
    }
    eprintln!("{namespace}/{name}: Ready, generation {:?}, {replicas} worker(s)", sp.metadata.generation);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_broker_example_runs_as_written() {
    sluice_tests::e2e::init_logs();
    let cluster = start_cluster().await;
    let client = cluster.client().await.expect("client");
    let host = cluster.host_ip().unwrap_or_else(|e| panic!("{e}"));
    install_crd(&client).await;
    for ns in ["shop", "web", "payments", "gen"] {
        restricted_namespace(&client, ns).await;
    }
    let operator = InProcessOperator::start_cluster_wide(&chart_operator_client(&cluster, &client).await);

    // Brokers first, so each example starts against a ready one.
    let kafka = Kafka::start_with(KafkaConfig { host, ..KafkaConfig::default() }).unwrap_or_else(|e| panic!("{e}"));
    kafka.create_topic("orders", 3).expect("topic");
    host_service(&client, "shop", "kafka", host, 9092, kafka.broker_port()).await;
    let redis_with_password = |password: &str| {
        let mut config = RedisConfig::default();
        config.directives.insert("requirepass".into(), password.into());
        config.directives.insert("bind".into(), host.to_string());
        Redis::start_with(config).unwrap_or_else(|e| panic!("{e}"))
    };
    let shop_redis = redis_with_password("shop-secret");
    host_service(&client, "shop", "redis", host, 6379, shop_redis.port()).await;
    secret(&client, "shop", "redis-auth", &[("password", "shop-secret")]).await;

    let nats = Nats::start_with(NatsConfig {
        user: Some(("clicks".into(), "clicks-secret".into())),
        args: vec!["--addr".into(), "0.0.0.0".into()],
        ..NatsConfig::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    host_service(&client, "web", "nats", host, 4222, nats.port()).await;
    secret(&client, "web", "nats-user", &[("username", "clicks"), ("password", "clicks-secret")]).await;

    let payments_redis = redis_with_password("payments-secret");
    host_service(&client, "payments", "redis", host, 6379, payments_redis.port()).await;
    secret(&client, "payments", "redis-auth", &[("password", "payments-secret")]).await;

    // ---- kafka-orders-by-country.yaml
    let orders = Orders::new();
    kafka.produce("orders", orders.records()).expect("produce orders");
    kubectl_apply(&cluster, "kafka-orders-by-country.yaml", None);
    check_running(&cluster, &client, "shop", "orders-by-country", None).await;

    // ---- nats-clean-events.yaml
    let clicks = publish_clicks(&nats).await;
    kubectl_apply(&cluster, "nats-clean-events.yaml", None);
    check_running(&cluster, &client, "web", "clean-clicks", Some(2)).await;

    // ---- redis-payments-dlq.yaml
    let payments = produce_payments(&payments_redis);
    kubectl_apply(&cluster, "redis-payments-dlq.yaml", None);
    check_running(&cluster, &client, "payments", "flag-payments", Some(1)).await;

    // ---- generator-windows.yaml (no namespace of its own)
    kubectl_apply(&cluster, "generator-windows.yaml", Some("gen"));
    check_running(&cluster, &client, "gen", "generator-windows", Some(1)).await;

    // The outputs, each checked against what the pipeline should make of its input.
    orders.check(&cluster, &kafka).await;
    check_clicks(&cluster, &nats, &clicks).await;
    check_payments(&cluster, &payments_redis, &payments).await;
    check_generator_windows(&cluster).await;

    operator.stop().await;
    assert_operator_never_denied(&cluster);
}

// ------------------------------------------------------------ kafka orders --

/// Three minutes of event time, one order every 60 ms, over three countries;
/// every 10th is `ignore`, every 50th has amount 0, 40 are sent twice (the
/// dedupe step drops the copies) and 5 are not JSON (dead letters).
struct Orders {
    /// The minute the event times start at (epoch ms).
    t0: i64,
    n: i64,
}

impl Orders {
    fn new() -> Self {
        let minute = 60_000;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
        Self { t0: (now / minute - 10) * minute, n: 3_000 }
    }

    fn order(&self, i: i64) -> Value {
        let country = ["de", "fr", "us"][(i % 3) as usize];
        let kind = if i % 10 == 9 { "ignore" } else { "order" };
        json!({"id": i, "key": format!("c{}", i % 7), "country": country, "type": kind,
               "amount": i % 50, "ts": self.t0 + i * 60, "internal": "drop me"})
    }

    fn records(&self) -> Vec<(Option<String>, Vec<u8>)> {
        let mut out: Vec<(Option<String>, Vec<u8>)> =
            (0..self.n).map(|i| (Some(format!("o{i}")), serde_json::to_vec(&self.order(i)).expect("json"))).collect();
        // The same orders again, under the same key (so the same partition):
        // the dedupe step keeps the first.
        for i in (100..140).chain(1_100..1_140) {
            out.insert((i + 50) as usize, (Some(format!("o{i}")), serde_json::to_vec(&self.order(i)).expect("json")));
        }
        for p in 0..5 {
            out.insert(500 + p * 300, (Some(format!("poison{p}")), format!("{{not json {p}").into_bytes()));
        }
        out
    }

    /// Per (country, window start): count, sum and max of amountEur, for the
    /// windows the watermark closes (the last minute stays open).
    fn expected(&self) -> BTreeMap<(String, i64), (u64, f64, f64)> {
        let mut out: BTreeMap<(String, i64), (u64, f64, f64)> = BTreeMap::new();
        for i in 0..self.n {
            let o = self.order(i);
            let amount = o["amount"].as_i64().expect("amount");
            if o["type"] == "ignore" || amount <= 0 {
                continue;
            }
            let start = self.t0 + (i * 60) / 60_000 * 60_000;
            if start >= self.t0 + 120_000 {
                continue;
            }
            let eur = amount as f64 * 0.92;
            let e = out.entry((o["country"].as_str().expect("country").to_uppercase(), start)).or_insert((0, 0.0, 0.0));
            e.0 += 1;
            e.1 += eur;
            e.2 = e.2.max(eur);
        }
        out
    }

    async fn check(&self, cluster: &E2eCluster, kafka: &Kafka) {
        let want = self.expected();
        // One result per (country, window) from each partition that saw
        // it: added up here.
        let got = eventually_on(cluster, "the window results of the first two minutes", DEADLINE, || async {
            let records =
                kafka.read_topic("orders-by-country", "read_uncommitted", Duration::from_secs(5), |_| false).ok()?;
            let mut got: BTreeMap<(String, i64), (u64, f64, f64)> = BTreeMap::new();
            for r in &records {
                let v: Value = serde_json::from_slice(&r.payload).ok()?;
                let key = (v["key"].as_str()?.to_string(), v["start"].as_i64()?);
                assert_eq!(v["end"].as_i64(), Some(key.1 + 60_000), "tumbling 1m: {v}");
                assert_eq!(r.key.as_deref(), Some(key.0.as_bytes()), "the sink key is msg.key: {v}");
                let e = got.entry(key).or_insert((0, 0.0, 0.0));
                e.0 += v["count"].as_u64()?;
                e.1 += v["sum"].as_f64()?;
                e.2 = e.2.max(v["max"].as_f64()?);
            }
            (want.keys().all(|k| got.get(k).is_some_and(|g| g.0 >= want[k].0))).then_some(got)
        })
        .await;
        for (k, w) in &want {
            let g = got[k];
            assert_eq!(g.0, w.0, "{k:?}: count (duplicates dropped by the dedupe step)");
            assert!((g.1 - w.1).abs() < 1e-6 * w.1.max(1.0), "{k:?}: sum {} vs {}", g.1, w.1);
            assert!((g.2 - w.2).abs() < 1e-9, "{k:?}: max {} vs {}", g.2, w.2);
        }
        let dead = eventually_on(cluster, "the 5 poison orders in orders-dlq", DEADLINE, || async {
            let r =
                kafka.read_topic("orders-dlq", "read_uncommitted", Duration::from_secs(5), |r| r.len() >= 5).ok()?;
            (r.len() >= 5).then_some(r)
        })
        .await;
        assert_eq!(dead.len(), 5, "exactly the poison orders");
        for d in &dead {
            assert_eq!(d.header("sluice-reason"), Some("bad_payload"), "{d:?}");
        }
        eprintln!("kafka-orders-by-country: {} (country, minute) results as computed; 5 dead letters", want.len());
    }
}

// ------------------------------------------------------------ nats clicks --

struct Clicks {
    humans: HashSet<String>,
    total: usize,
}

/// JetStream as the user the example's Secret names.
async fn clicks_jetstream(nats: &Nats) -> async_nats::jetstream::Context {
    let client = async_nats::ConnectOptions::with_user_and_password("clicks".into(), "clicks-secret".into())
        .connect(nats.url())
        .await
        .expect("connect to nats");
    async_nats::jetstream::new(client)
}

async fn publish_clicks(nats: &Nats) -> Clicks {
    let js = clicks_jetstream(nats).await;
    for (name, subject) in [("CLICKS", "clicks.raw.>"), ("CLEAN", "clicks.clean")] {
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            ..Default::default()
        })
        .await
        .expect("create stream");
    }
    let mut humans = HashSet::new();
    let mut acks = Vec::new();
    let total = 2_000;
    for i in 0..total {
        let bot = i % 4 == 0;
        let agent = if bot { "crawler-bot/2.1" } else { "Mozilla/5.0" };
        let event = json!({"eventId": format!("e{i}"), "url": format!("/Shop/Item/{}", i % 37),
                           "userAgent": agent, "ip": "10.0.0.1"});
        if !bot {
            humans.insert(format!("e{i}"));
        }
        let subject = format!("clicks.raw.site{}", i % 3);
        acks.push(js.publish(subject, serde_json::to_vec(&event).expect("json").into()).await.expect("publish"));
    }
    for a in acks {
        a.await.expect("publish ack");
    }
    Clicks { humans, total }
}

async fn check_clicks(cluster: &E2eCluster, nats: &Nats, clicks: &Clicks) {
    let js = clicks_jetstream(nats).await;
    let stored = eventually_on(cluster, "every human click in CLEAN", DEADLINE, || async {
        let mut stream = js.get_stream("CLEAN").await.ok()?;
        let n = stream.info().await.ok()?.state.messages;
        (n >= clicks.humans.len() as u64).then_some(n)
    })
    .await;
    let stream = js.get_stream("CLEAN").await.expect("CLEAN");
    let mut seen = HashMap::new();
    for seq in 1..=stored {
        let m = stream.get_raw_message(seq).await.expect("message");
        let v: Value = serde_json::from_slice(&m.payload).expect("JSON");
        let id = v["eventId"].as_str().expect("eventId").to_string();
        assert!(v.get("userAgent").is_none() && v.get("ip").is_none(), "dropped fields: {v}");
        let path = v["path"].as_str().expect("path");
        assert_eq!(path, path.to_lowercase(), "path is lower case: {v}");
        assert!(v["partition"].is_number(), "meta.partition: {v}");
        *seen.entry(id).or_insert(0) += 1;
    }
    let ids: HashSet<String> = seen.keys().cloned().collect();
    assert_eq!(ids, clicks.humans, "exactly the human clicks, no bot");
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "nats-clean-events: {} of {} clicks were human, all in CLEAN; {duplicates} duplicates",
        clicks.humans.len(),
        clicks.total
    );
}

// ---------------------------------------------------------- redis payments --

struct Payments {
    large: HashSet<u64>,
}

fn produce_payments(redis: &Redis) -> Payments {
    let mut c = redis::Client::open(redis.authenticated_url()).expect("client").get_connection().expect("connect");
    let mut large = HashSet::new();
    let mut pipe = redis::pipe();
    for id in 0..3_000u64 {
        let amount = (id * 37) % 20_000;
        if amount >= 10_000 {
            large.insert(id);
        }
        let payload = json!({"id": id, "amount": amount, "currency": "EUR"}).to_string();
        pipe.cmd("XADD").arg("payments").arg("*").arg("payload").arg(payload).ignore();
    }
    for p in 0..3 {
        pipe.cmd("XADD").arg("payments").arg("*").arg("payload").arg(format!("{{broken {p}")).ignore();
    }
    pipe.query::<()>(&mut c).expect("XADD payments");
    Payments { large }
}

async fn check_payments(cluster: &E2eCluster, redis: &Redis, payments: &Payments) {
    let url = redis.authenticated_url();
    let read = |stream: &'static str| {
        let url = url.clone();
        move || {
            let url = url.clone();
            async move {
                let mut c = redis::Client::open(url).ok()?.get_connection().ok()?;
                let reply: redis::streams::StreamRangeReply =
                    redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query(&mut c).ok()?;
                let entries: Vec<Value> = reply
                    .ids
                    .iter()
                    .filter_map(|e| e.get::<String>("payload"))
                    .filter_map(|p| serde_json::from_str(&p).ok().or(Some(Value::String(p))))
                    .collect();
                Some(entries)
            }
        }
    };
    let flagged = eventually_on(cluster, "every large payment flagged", DEADLINE, || {
        let read = read("payments-flagged");
        async move {
            let entries = read().await?;
            (entries.len() >= payments.large.len()).then_some(entries)
        }
    })
    .await;
    let ids: HashSet<u64> = flagged.iter().filter_map(|v| v["id"].as_u64()).collect();
    assert_eq!(ids, payments.large, "exactly the payments of 10000 or more");
    assert_eq!(flagged.len(), payments.large.len(), "each once");
    for v in &flagged {
        assert_eq!(v["flagged"], json!(true), "{v}");
        assert_eq!(v["reason"], json!(format!("amount {} over limit", v["amount"])), "{v}");
    }
    let dead = eventually_on(cluster, "the 3 broken payments in payments-dlq", DEADLINE, || {
        let read = read("payments-dlq");
        async move {
            let entries = read().await?;
            (entries.len() >= 3).then_some(entries)
        }
    })
    .await;
    assert_eq!(dead.len(), 3);
    eprintln!("redis-payments-dlq: {} large payments flagged once each; 3 dead letters", flagged.len());
}

// ---------------------------------------------------- generator windows --

async fn check_generator_windows(cluster: &E2eCluster) {
    let results = eventually_on(cluster, "window results in the generator's worker log", DEADLINE, || async {
        let out = cluster
            .kubectl()
            .args(["logs", "-n", "gen", "-l", "app.kubernetes.io/instance=generator-windows", "--tail=-1"])
            .output()
            .ok()?;
        let results: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("count").is_some() && v.get("start").is_some())
            .collect();
        (results.len() >= 8).then_some(results)
    })
    .await;
    for v in &results {
        let key = v["key"].as_str().expect("key");
        assert!(["DE", "FR", "US", "JP"].contains(&key), "keyed by upper-case country: {v}");
        assert_eq!(v["end"].as_i64().zip(v["start"].as_i64()).map(|(e, s)| e - s), Some(10_000), "10 s windows: {v}");
        assert!(v["count"].as_u64().is_some_and(|c| c > 0) && v["max"].as_i64().is_some_and(|m| m <= 500), "{v}");
    }
    // 100,000 orders at 2,000/s end after 50 s: the worker stays (a
    // Deployment would restart an exiting one, which would replay them).
    eventually_on(cluster, "the generator's input ends and the worker idles", DEADLINE, || async {
        let out = cluster
            .kubectl()
            .args(["logs", "-n", "gen", "-l", "app.kubernetes.io/instance=generator-windows", "--tail=-1"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).contains("idling until stopped").then_some(())
    })
    .await;
    let client = cluster.client().await.expect("client");
    let pods = Api::<Pod>::namespaced(client, "gen")
        .list(&ListParams::default().labels("app.kubernetes.io/instance=generator-windows"))
        .await
        .expect("pods");
    for pod in &pods.items {
        let restarts: i32 = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map_or(0, |c| c.iter().map(|c| c.restart_count).sum());
        assert_eq!(restarts, 0, "the worker of a finished generator must not be restarted: {}", pod.name_any());
    }
    eprintln!("generator-windows: {} window results in the log; the input ended and the worker stays", results.len());
}

//! The operator end to end on the real local cluster (sluice-dev): the CRD
//! from the chart, the operator's controller, and worker pods running the
//! project's own image on the real node in a namespace that enforces the
//! restricted Pod Security Standard.
//!
//! Needs root, the cluster binaries (dev/scripts/build-cluster.sh) and the
//! release binaries (`cargo build --release -p sluice-worker -p
//! sluice-operator`); `make test` provides all three. Missing ones FAIL with
//! the command to run.

use std::time::Duration;

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Pod, Service, ServiceAccount},
    events::v1::Event,
    policy::v1::PodDisruptionBudget,
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use sluice_crds::StreamProcessor;
use sluice_tests::e2e::{
    IMAGE, InProcessOperator, assert_operator_never_denied, chart_operator_client, condition, eventually, install_crd,
    restricted_namespace, start_cluster,
};

const NS: &str = "sluice-e2e";

/// A processor that runs for ever on the generator and prints to stdout.
fn generator_processor(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "sluice.io/v1alpha1",
        "kind": "StreamProcessor",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "source": {"generator": {"rate": 50, "partitions": 2, "keys": 10,
                "template": {"id": "seq", "country": "choice(de|fr)", "amount": "int(1,100)", "ts": "now"}}},
            "pipeline": [
                {"filter": "msg.amount > 10"},
                {"window": {"type": "count", "count": 20, "keyBy": "msg.country", "aggregate": {"count": {}, "sum": "msg.amount"}}}
            ],
            "sink": {"stdout": {}},
            "replicas": 1,
            "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_runs_a_processor_on_the_real_node() {
    let cluster = start_cluster().await;
    let client = cluster.client().await.expect("cluster client");
    install_crd(&client).await;
    restricted_namespace(&client, NS).await;

    let operator = InProcessOperator::start(&chart_operator_client(&cluster, &client).await, NS);

    let sps: Api<StreamProcessor> = Api::namespaced(client.clone(), NS);
    let sp: StreamProcessor = serde_json::from_value(generator_processor("counts")).expect("manifest");
    sps.create(&PostParams::default(), &sp).await.expect("create the StreamProcessor");

    // Owned objects appear, each with an owner reference to the processor.
    let uid = sps.get("counts").await.expect("get").uid().expect("uid");
    macro_rules! owned {
        ($k:ty) => {{
            let api: Api<$k> = Api::namespaced(client.clone(), NS);
            let obj = eventually(concat!("the ", stringify!($k), " exists"), Duration::from_secs(30), || async {
                api.get_opt("counts").await.ok().flatten()
            })
            .await;
            assert!(
                obj.owner_references().iter().any(|o| o.uid == uid && o.controller == Some(true)),
                "{} not owned",
                stringify!($k)
            );
            obj
        }};
    }
    let cm: ConfigMap = owned!(ConfigMap);
    assert!(cm.data.expect("data")["processor.json"].contains("\"generator\""));
    owned!(ServiceAccount);
    owned!(Role);
    owned!(RoleBinding);
    owned!(Service);
    owned!(PodDisruptionBudget);
    let deployment: Deployment = owned!(Deployment);
    assert_eq!(deployment.spec.replicas, Some(1));

    // Workers run the project's image under the restricted profile and become Ready.
    let ready = eventually("the processor is Ready", Duration::from_secs(120), || async {
        let sp = sps.get("counts").await.ok()?;
        let (status, _, _) = condition(&sp, "Ready")?;
        (status == "True").then_some(sp)
    })
    .await;
    let st = ready.status.clone().expect("status");
    assert_eq!(st.observed_generation, ready.metadata.generation);
    assert_eq!((st.replicas, st.ready_replicas, st.desired_replicas), (1, 1, Some(1)));
    assert_eq!(st.source.as_deref(), Some("generator"));
    assert_eq!(st.selector.as_deref(), Some("app.kubernetes.io/instance=counts,app.kubernetes.io/name=sluice-worker"));
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let listed = pods.list(&ListParams::default().labels("app.kubernetes.io/instance=counts")).await.expect("pods");
    assert_eq!(listed.items.len(), 1);
    let pod = &listed.items[0];
    assert_eq!(pod.spec.as_ref().unwrap().containers[0].image.as_deref(), Some(IMAGE));

    // kubectl shows the printer columns.
    let out = cluster.kubectl().args(["get", "sp", "-n", NS]).output().expect("kubectl");
    let text = String::from_utf8_lossy(&out.stdout);
    for col in
        ["NAME", "SOURCE", "PARTITIONS", "LAG", "DESIRED", "READY", "STATUS", "AGE", "counts", "generator", "Running"]
    {
        assert!(text.contains(col), "`kubectl get sp` lacks {col}:\n{text}");
    }

    // The worker really processes: its log has window results.
    let logs = eventually("the worker prints windows", Duration::from_secs(60), || async {
        let l = pods.logs(&pod.name_any(), &Default::default()).await.ok()?;
        l.contains("\"count\":20").then_some(l)
    })
    .await;
    assert!(logs.contains("\"sum\""), "{logs}");

    // An invalid expression: Degraded with the field, an Event, and the last good workers keep running.
    let hash_before = deployment_hash(&client).await;
    sps.patch(
        "counts",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"pipeline": [{"filter": "msg.amount >"}]}})),
    )
    .await
    .expect("patch an invalid filter");
    let (_, reason, message) = eventually("Degraded names the bad filter", Duration::from_secs(30), || async {
        let sp = sps.get("counts").await.ok()?;
        condition(&sp, "Degraded").filter(|(s, _, _)| s == "True")
    })
    .await;
    assert_eq!(reason, "InvalidSpec");
    assert!(message.contains("spec.pipeline[0].filter"), "{message}");
    assert_eq!(deployment_hash(&client).await, hash_before, "an invalid spec must not roll the workers");
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    eventually("an InvalidSpec Event is recorded", Duration::from_secs(30), || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items.iter().any(|e| e.reason.as_deref() == Some("InvalidSpec")).then_some(())
    })
    .await;

    // Fixed: it recovers, and the new pipeline rolls the pods.
    sps.patch(
        "counts",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"pipeline": [{"filter": "msg.amount > 50"}]}})),
    )
    .await
    .expect("patch a valid filter");
    eventually("Degraded clears", Duration::from_secs(30), || async {
        let sp = sps.get("counts").await.ok()?;
        condition(&sp, "Degraded").filter(|(s, _, _)| s == "False")
    })
    .await;
    eventually("the pods roll to the new pipeline", Duration::from_secs(30), || async {
        (deployment_hash(&client).await != hash_before).then_some(())
    })
    .await;

    // The scale subresource drives replicas when spec.scaling is absent.
    let out = cluster.kubectl().args(["scale", "sp/counts", "-n", NS, "--replicas=2"]).output().expect("kubectl scale");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually("two workers are ready", Duration::from_secs(120), || async {
        let sp = sps.get("counts").await.ok()?;
        let st = sp.status?;
        (st.ready_replicas == 2 && st.desired_replicas == Some(2)).then_some(())
    })
    .await;

    // Delete (background: the processor is gone at once and never
    // reconciled again): the real garbage collector removes what the
    // operator created, and the operator drops the processor's series.
    let series = r#"name="counts""#;
    assert!(operator.metrics().contains(series), "the processor has series:\n{}", operator.metrics());
    sps.delete("counts", &DeleteParams::background()).await.expect("delete");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    eventually("the Deployment is garbage-collected", Duration::from_secs(60), || async {
        deployments.get_opt("counts").await.ok()?.is_none().then_some(())
    })
    .await;
    eventually("the deleted processor's series are gone", Duration::from_secs(10), || async {
        (!operator.metrics().contains(series)).then_some(())
    })
    .await;

    operator.stop().await;
    assert_operator_never_denied(&cluster);
}

async fn deployment_hash(client: &Client) -> String {
    let d = Api::<Deployment>::namespaced(client.clone(), NS).get("counts").await.expect("deployment");
    d.spec
        .template
        .metadata
        .and_then(|m| m.annotations)
        .and_then(|a| a.get("sluice.io/config-hash").cloned())
        .unwrap_or_default()
}

/// What goes wrong with brokers and pods, on the real node with real Kafka:
/// a missing Secret and an unreachable broker are `Degraded` conditions with
/// the field and the fix, and clear when fixed; a worker pod force-deleted
/// mid-stream loses nothing (its partitions move to the other pods and its
/// uncommitted work is redone; counted by message id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_problems_are_conditions_and_a_killed_worker_loses_nothing() {
    use sluice_tests::brokers::{Kafka, KafkaConfig};
    const MESSAGES: u64 = 30_000;
    let cluster = start_cluster().await;
    let client = cluster.client().await.expect("cluster client");
    install_crd(&client).await;
    let ns = "sluice-e2e-brokers";
    restricted_namespace(&client, ns).await;
    let kafka = std::sync::Arc::new(
        Kafka::start_with(KafkaConfig { host: host_ip(&cluster), ..KafkaConfig::default() })
            .unwrap_or_else(|e| panic!("{e}")),
    );
    kafka.create_topic("orders", 6).expect("topic");
    kafka.create_topic("orders-out", 6).expect("topic");
    let operator = InProcessOperator::start(&chart_operator_client(&cluster, &client).await, ns);
    let sps: Api<StreamProcessor> = Api::namespaced(client.clone(), ns);
    let degraded = |name: &'static str| {
        let sps = sps.clone();
        async move {
            let sp = sps.get(name).await.ok()?;
            condition(&sp, "Degraded")
        }
    };

    // A Secret that does not exist: SecretMissing names the field and the Secret.
    let with_secret: StreamProcessor = serde_json::from_value(json!({
        "apiVersion": "sluice.io/v1alpha1", "kind": "StreamProcessor",
        "metadata": {"name": "secured", "namespace": ns},
        "spec": {
            "source": {"kafka": {"brokers": [kafka.bootstrap()], "topic": "orders",
                "auth": {"sasl": {"mechanism": "SCRAM-SHA-512", "secretRef": {"name": "kafka-creds"}}}}},
            "sink": {"stdout": {}}
        }
    }))
    .expect("manifest");
    sps.create(&PostParams::default(), &with_secret).await.expect("create");
    let (_, reason, message) = eventually("SecretMissing", Duration::from_secs(30), || async {
        degraded("secured").await.filter(|(s, _, _)| s == "True")
    })
    .await;
    assert_eq!(reason, "SecretMissing", "{message}");
    assert!(message.contains("kafka-creds") && message.contains("spec.source.kafka.auth"), "{message}");
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), ns);
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "kafka-creds"}, "stringData": {"username": "u", "password": "p"}
    }))
    .expect("secret");
    secrets.create(&PostParams::default(), &secret).await.expect("create the Secret");
    // Secrets are not watched: the operator looks again within 30 s.
    eventually("SecretMissing clears once the Secret exists", Duration::from_secs(60), || async {
        degraded("secured").await.filter(|(s, r, _)| s == "False" || r != "SecretMissing")
    })
    .await;
    sps.delete("secured", &DeleteParams::default()).await.expect("delete");

    // A broker nobody listens on: BrokerUnreachable with the address.
    let closed = format!("{}:1", host_ip(&cluster));
    let orders: StreamProcessor = serde_json::from_value(json!({
        "apiVersion": "sluice.io/v1alpha1", "kind": "StreamProcessor",
        "metadata": {"name": "orders", "namespace": ns},
        "spec": {
            "source": {"kafka": {"brokers": [closed], "topic": "orders"}},
            "sink": {"kafka": {"topic": "orders-out"}},
            "scaling": {"minReplicas": 1, "maxReplicas": 6, "lagPerReplica": 1000, "pollInterval": "2s"},
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "192Mi"}}
        }
    }))
    .expect("manifest");
    sps.create(&PostParams::default(), &orders).await.expect("create");
    let (_, reason, message) = eventually("BrokerUnreachable", Duration::from_secs(60), || async {
        degraded("orders").await.filter(|(s, _, _)| s == "True")
    })
    .await;
    assert_eq!(reason, "BrokerUnreachable", "{message}");
    assert!(message.contains(":1"), "the message names the broker: {message}");

    // Fixed, and three workers without autoscaling.
    sps.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"scaling": null, "replicas": 3,
            "source": {"kafka": {"brokers": [kafka.bootstrap()], "topic": "orders"}}}})),
    )
    .await
    .expect("fix the brokers");
    eventually("three workers Ready and Degraded clear", Duration::from_secs(180), || async {
        let sp = sps.get("orders").await.ok()?;
        let ok = condition(&sp, "Degraded")?.0 == "False" && sp.status?.ready_replicas == 3;
        ok.then_some(())
    })
    .await;

    // Input keeps arriving; one worker pod is force-deleted while the output flows.
    // `wait`: how long a read may wait for the whole set (short while the
    // stream flows, so a look does not itself outlast the input).
    let count =
        |kafka: &Kafka, wait: Duration| {
            let mut ids = std::collections::HashSet::new();
            let mut parsed = 0;
            kafka
                .read_topic("orders-out", "read_uncommitted", wait, |r| {
                    ids.extend(r[parsed..].iter().filter_map(|rec| {
                        serde_json::from_slice::<serde_json::Value>(&rec.payload).ok()?["id"].as_u64()
                    }));
                    parsed = r.len();
                    ids.len() as u64 >= MESSAGES
                })
                .expect("read the output");
            ids
        };
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let producer = std::thread::spawn({
        let (kafka, sent) = (kafka.clone(), sent.clone());
        move || {
            let records: Vec<(Option<String>, String)> =
                (0..MESSAGES).map(|i| (Some(format!("k{}", i % 97)), json!({"id": i}).to_string())).collect();
            for chunk in records.chunks(500) {
                kafka.produce("orders", chunk.iter().cloned()).expect("produce");
                sent.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    });
    // Kill once output flows and while a third or more of the input is yet
    // to come (the producer paces 500 ids per 250 ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while count(&kafka, Duration::from_millis(500)).is_empty()
        || sent.load(std::sync::atomic::Ordering::Relaxed) < MESSAGES / 3
    {
        assert!(std::time::Instant::now() < deadline, "the workers produce no output");
        std::thread::sleep(Duration::from_millis(200));
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let victim = pods
        .list(&ListParams::default().labels("app.kubernetes.io/instance=orders"))
        .await
        .expect("pods")
        .items
        .into_iter()
        .next()
        .expect("a worker pod")
        .name_any();
    let out = cluster
        .kubectl()
        .args(["delete", "pod", &victim, "-n", ns, "--grace-period=0", "--force"])
        .output()
        .expect("kubectl delete pod");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sent_at_kill = sent.load(std::sync::atomic::Ordering::Relaxed);
    let at_kill = count(&kafka, Duration::from_millis(500)).len();
    producer.join().expect("producer");
    assert!(sent_at_kill < MESSAGES, "the pod was killed while input was still arriving");
    let ids = eventually("every id arrives after the pod was killed", Duration::from_secs(240), || async {
        let ids = count(&kafka, Duration::from_secs(10));
        (ids.len() as u64 >= MESSAGES).then_some(ids)
    })
    .await;
    let missing: Vec<u64> = (0..MESSAGES).filter(|i| !ids.contains(i)).take(10).collect();
    assert!(missing.is_empty(), "missing ids, e.g. {missing:?}");
    eprintln!(
        "worker pod {victim} force-deleted with {sent_at_kill} of {MESSAGES} ids sent and {at_kill} out; all {MESSAGES} arrived"
    );

    operator.stop().await;
    assert_operator_never_denied(&cluster);
}

/// Where this machine is for the cluster's pods (the brokers start here).
fn host_ip(cluster: &sluice_dev::e2e::E2eCluster) -> std::net::Ipv4Addr {
    cluster.host_ip().unwrap_or_else(|e| panic!("{e}"))
}

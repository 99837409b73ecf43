//! Autoscaling on a real Kafka backlog, end to end on the real local cluster:
//! an idle processor scales to zero; 20,000 messages land on 12 partitions
//! (lagPerReplica 1000); replicas go from 0 to the partition cap in one step
//! within one poll interval (ScalingLimited says why); the workers (the
//! project's image on the real node) drain the lag into an output topic; and
//! replicas fall back to zero after the stabilization window. Every decision
//! is an Event with the numbers.

use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::json;
use sluice_crds::StreamProcessor;
use sluice_tests::{
    brokers::{Kafka, KafkaConfig},
    e2e::{
        InProcessOperator, assert_operator_never_denied, chart_operator_client, condition, eventually_on,
        restricted_namespace, start_cluster,
    },
};

const NS: &str = "scaling";
const MESSAGES: usize = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_scales_to_the_partition_cap_and_back() {
    sluice_tests::e2e::init_logs();
    let cluster = start_cluster().await;
    let client = cluster.client().await.expect("client");
    sluice_tests::e2e::install_crd(&client).await;
    restricted_namespace(&client, NS).await;

    // Kafka on this machine's own address, so the worker pods reach it too.
    let kafka = Kafka::start_with(KafkaConfig {
        host: cluster.host_ip().unwrap_or_else(|e| panic!("{e}")),
        ..KafkaConfig::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    kafka.create_topic("orders", 12).expect("create orders");
    kafka.create_topic("orders-out", 12).expect("create orders-out");

    let operator = InProcessOperator::start(&chart_operator_client(&cluster, &client).await, NS);

    let sps: Api<StreamProcessor> = Api::namespaced(client.clone(), NS);
    let sp: StreamProcessor = serde_json::from_value(json!({
        "apiVersion": "sluice.io/v1alpha1", "kind": "StreamProcessor",
        "metadata": {"name": "orders", "namespace": NS},
        "spec": {
            "source": {"kafka": {"brokers": [kafka.bootstrap()], "topic": "orders"}},
            "pipeline": [{"map": {"set": {"seen": "true"}}}],
            "sink": {"kafka": {"topic": "orders-out"}},
            "scaling": {"minReplicas": 1, "maxReplicas": 12, "lagPerReplica": 1000,
                        "pollInterval": "2s", "scaleDownStabilization": "15s", "scaleToZero": true},
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "192Mi"}}
        }
    }))
    .expect("manifest");
    sps.create(&PostParams::default(), &sp).await.expect("create");
    eventually_on(&cluster, "one idle worker is Ready", Duration::from_secs(120), || async {
        let sp = sps.get("orders").await.ok()?;
        let st = sp.status.clone()?;
        (condition(&sp, "Ready")?.0 == "True" && st.desired_replicas == Some(1) && st.partitions == Some(12))
            .then_some(())
    })
    .await;
    let zero = eventually_on(&cluster, "the idle processor scales to zero", Duration::from_secs(90), || async {
        let sp = sps.get("orders").await.ok()?;
        let (_, reason, _) = condition(&sp, "Ready")?;
        (sp.status.as_ref()?.desired_replicas == Some(0) && reason == "ScaledToZero").then_some(sp)
    })
    .await;
    eprintln!("scaled to zero: {:?}", zero.status.map(|s| (s.desired_replicas, s.lag)));

    // The backlog lands all at once, on a processor with no workers.
    let records: Vec<(Option<String>, String)> = (0..MESSAGES)
        .map(|i| (Some(format!("k{}", i % 97)), json!({"id": i, "amount": i % 500}).to_string()))
        .collect();
    let produced_at = Instant::now();
    kafka.produce("orders", records).expect("produce the backlog");
    let produced = produced_at.elapsed();
    eprintln!("produced {MESSAGES} messages in {produced:?}");

    // Up to the cap in one step, within a poll interval of the backlog's end.
    let scaled_up =
        eventually_on(&cluster, "desired replicas reach the partition cap", Duration::from_secs(30), || async {
            let sp = sps.get("orders").await.ok()?;
            (sp.status.as_ref()?.desired_replicas == Some(12)).then_some(sp)
        })
        .await;
    let up_after = produced_at.elapsed().saturating_sub(produced);
    eprintln!("desired 12 replicas {up_after:?} after the backlog was produced");
    let (status, reason, message) = condition(&scaled_up, "ScalingLimited").expect("ScalingLimited");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "PartitionCount"), "{message}");
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    let scaled: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Scaled"))
        .filter_map(|e| e.note)
        .collect();
    assert!(
        scaled.iter().any(|n| n.starts_with("scaled 0 -> 12: lag ") && n.ends_with("capped by 12 partitions")),
        "no single-step scale Event with the numbers: {scaled:?}"
    );

    // The workers drain the backlog into the output topic: every id arrives
    // (at least once) through 12 members joining and, later, 11 leaving.
    eventually_on(&cluster, "the workers drain the lag", Duration::from_secs(300), || async {
        let sp = sps.get("orders").await.ok()?;
        (sp.status?.lag == Some(0)).then_some(())
    })
    .await;
    let mut ids = std::collections::HashSet::new();
    let mut parsed = 0;
    let out = kafka
        .read_topic("orders-out", "read_uncommitted", Duration::from_secs(120), |r| {
            ids.extend(
                r[parsed..]
                    .iter()
                    .filter_map(|rec| serde_json::from_slice::<serde_json::Value>(&rec.payload).ok()?["id"].as_i64()),
            );
            parsed = r.len();
            ids.len() >= MESSAGES
        })
        .expect("read the output");
    eprintln!("output: {} records, {} distinct ids of {MESSAGES}", out.len(), ids.len());
    let missing: Vec<i64> = (0..MESSAGES as i64).filter(|i| !ids.contains(i)).take(20).collect();
    assert!(missing.is_empty(), "{} of {MESSAGES} ids missing from the output, e.g. {missing:?}", MESSAGES - ids.len());

    // Lag gone: back to zero after the stabilization window.
    let drained = Instant::now();
    eventually_on(&cluster, "replicas fall back to zero", Duration::from_secs(150), || async {
        let sp = sps.get("orders").await.ok()?;
        let st = sp.status?;
        (st.desired_replicas == Some(0) && st.lag == Some(0)).then_some(())
    })
    .await;
    eprintln!("back to 0 replicas {:?} after the output was complete", drained.elapsed());
    let down: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Scaled"))
        .filter_map(|e| e.note)
        .filter(|n| n.starts_with("scaled 12 -> "))
        .collect();
    assert!(!down.is_empty(), "no scale-down Event");

    operator.stop().await;
    assert_operator_never_denied(&cluster);
}

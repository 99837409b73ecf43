//! KEDA and plain HPAs driving a StreamProcessor through its scale
//! subresource, end to end on the real local cluster with KEDA v2.21 running
//! (built by dev/scripts/build-keda.sh) and a real Kafka:
//!
//! - a ScaledObject made before its StreamProcessor exists is refused by KEDA
//!   (said on the ScaledObject) and works once the processor is there;
//! - a Kafka backlog scales the processor (KEDA's HPA writes spec.replicas
//!   through the scale subresource), the operator moves the worker
//!   Deployment to match, status shows it, nobody else manages spec.replicas
//!   and the replicas hold still (no second writer);
//! - a plain autoscaling/v2 HPA on an external metric (served by KEDA's
//!   metrics adapter through the aggregation layer) does the same;
//! - an HPA that cannot get its metrics (CPU, no metrics-server here) is
//!   reported on the processor (Degraded AutoscalerFailing, an Event);
//! - spec.scaling with a ScaledObject on the same processor is reported
//!   (Degraded ScalingConflict naming the ScaledObject and the fix, an Event)
//!   and not fought: the workers follow the built-in autoscaler alone;
//! - KEDA not running (CRDs installed, its operator stopped): a ScaledObject
//!   on a processor is reported (Degraded AutoscalerFailing saying KEDA has
//!   not acted, an Event) and the condition clears once KEDA is back.
//!
//! The triggers watch a consumer group that nobody commits for, so the lag
//! they see (and the replicas it asks for) stays put while the test looks for
//! flapping; the workers consume with their own group.

use std::time::{Duration, Instant};

use k8s_openapi::api::{apps::v1::Deployment, autoscaling::v2::HorizontalPodAutoscaler, events::v1::Event};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde_json::json;
use sluice_crds::StreamProcessor;
use sluice_tests::{
    brokers::{Kafka, KafkaConfig},
    e2e::{
        InProcessOperator, assert_operator_never_denied, chart_operator_client, condition, eventually_on, init_logs,
        install_crd, restricted_namespace,
    },
    keda::{
        KafkaTrigger, ScaledObjectSpec, apply_scaled_object, replicas_managers, scaled_object_condition,
        scaled_objects, start_cluster_with_keda,
    },
};

const NS: &str = "scaling";
const BACKLOG: usize = 4_000;
/// The group the triggers measure; no worker ever commits for it.
const WATCH_GROUP: &str = "keda-watch";
const OPERATOR: &str = "sluice-operator";

fn processor(name: &str, bootstrap: &str, topic: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut sp = json!({
        "apiVersion": "sluice.io/v1alpha1", "kind": "StreamProcessor",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "source": {"kafka": {"brokers": [bootstrap], "topic": topic}},
            "pipeline": [{"map": {"set": {"seen": "true"}}}],
            "sink": {"kafka": {"topic": format!("{name}-out")}},
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "192Mi"}}
        }
    });
    if let (Some(spec), Some(extra)) = (sp["spec"].as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    sp
}

/// A ScaledObject on `target`: 1 or `min` to 12 replicas, polling every 5 s, the HPA's default behavior.
fn scaled_object(name: &str, target: &str, trigger: KafkaTrigger, min: i32) -> ScaledObjectSpec {
    ScaledObjectSpec {
        name: name.into(),
        namespace: NS.into(),
        target: target.into(),
        trigger,
        min,
        max: 12,
        polling_seconds: 5,
        behavior: None,
    }
}

async fn apply<K>(api: &Api<K>, name: &str, body: &serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &PatchParams::apply("sluice-e2e").force(), &Patch::Apply(body))
        .await
        .unwrap_or_else(|e| panic!("apply {name}: {e}"));
}

/// (replicas the Deployment asks for, replicas it has ready).
async fn workers(deployments: &Api<Deployment>, name: &str) -> Option<(i32, i32)> {
    let d = deployments.get(name).await.ok()?;
    Some((d.spec.replicas?, d.status.and_then(|s| s.ready_replicas).unwrap_or(0)))
}

async fn event_notes(client: &Client, reason: &str, object: &str) -> Vec<String> {
    Api::<Event>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(object))
        .filter_map(|e| e.note)
        .collect()
}

/// spec.replicas is written only through the scale subresource, at least
/// once by the HPA controller, never by the operator (which writes status only).
fn assert_only_autoscalers_write_replicas(sp: &StreamProcessor) {
    let managers = replicas_managers(sp);
    assert!(
        managers.iter().any(|(m, s)| m == "kube-controller-manager" && s == "scale"),
        "the HPA controller never wrote spec.replicas of {:?}: {managers:?}",
        sp.metadata.name
    );
    assert!(
        managers.iter().all(|(m, s)| m != OPERATOR && s == "scale"),
        "spec.replicas of {:?} is managed by someone other than an autoscaler: {managers:?}",
        sp.metadata.name
    );
    for m in sp.metadata.managed_fields.iter().flatten().filter(|m| m.manager.as_deref() == Some(OPERATOR)) {
        assert_eq!(m.subresource.as_deref(), Some("status"), "the operator wrote outside status: {m:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keda_and_hpas_scale_stream_processors_through_the_scale_subresource() {
    init_logs();
    let t0 = Instant::now();
    let mut cluster = start_cluster_with_keda().await;
    eprintln!("cluster with KEDA up in {:?}", t0.elapsed());
    let client = cluster.client().await.expect("client");
    install_crd(&client).await;
    restricted_namespace(&client, NS).await;
    let kafka = Kafka::start_with(KafkaConfig { host: cluster.host_ip(), ..KafkaConfig::default() })
        .unwrap_or_else(|e| panic!("{e}"));
    for topic in ["orders", "idle"] {
        kafka.create_topic(topic, 12).expect("create topic");
    }
    let bootstrap = kafka.bootstrap();
    let operator = InProcessOperator::start(&chart_operator_client(&cluster, &client).await, NS);
    let sps: Api<StreamProcessor> = Api::namespaced(client.clone(), NS);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), NS);
    let sos = scaled_objects(&client, NS);
    let trigger = |topic: &str| KafkaTrigger {
        bootstrap: bootstrap.clone(),
        topic: topic.into(),
        group: WATCH_GROUP.into(),
        lag_threshold: 1000,
    };

    // --- (a) A ScaledObject before its StreamProcessor exists.
    apply_scaled_object(&client, &scaled_object("keda-so", "keda", trigger("orders"), 1)).await;
    let (_, reason, message) =
        eventually_on(&cluster, "KEDA reports the missing scale target", Duration::from_secs(60), || async {
            let so = sos.get("keda-so").await.ok()?;
            scaled_object_condition(&so, "Ready").filter(|c| c.0 == "False")
        })
        .await;
    eprintln!("ScaledObject at a missing StreamProcessor: Ready=False {reason}: {message}");

    // spec.replicas as a user sets it: applied, so that managedFields show it
    // move to the HPA controller (a defaulted one has no manager until then).
    apply(&sps, "keda", &processor("keda", &bootstrap, "orders", json!({"replicas": 1}))).await;
    eventually_on(&cluster, "the KEDA-driven processor runs one worker", Duration::from_secs(120), || async {
        let sp = sps.get("keda").await.ok()?;
        let so = sos.get("keda-so").await.ok()?;
        (condition(&sp, "Ready")?.0 == "True"
            && condition(&sp, "Degraded")?.1 == "AsExpected"
            && scaled_object_condition(&so, "Ready")?.0 == "True")
            .then_some(())
    })
    .await;
    eprintln!("(a) ScaledObject Ready and one worker after {:?}", t0.elapsed());

    let config_hash =
        |d: &Deployment| d.spec.template.metadata.as_ref()?.annotations.as_ref()?.get("sluice.io/config-hash").cloned();
    let hash_before = config_hash(&deployments.get("keda").await.expect("deployment"));
    let records: Vec<(Option<String>, String)> =
        (0..BACKLOG).map(|i| (Some(format!("k{}", i % 97)), json!({"id": i}).to_string())).collect();
    kafka.produce("orders", records).expect("produce the backlog");
    let produced = Instant::now();
    let sp = eventually_on(
        &cluster,
        "KEDA scales the processor to 4 and the workers follow",
        Duration::from_secs(120),
        || async {
            let sp = sps.get("keda").await.ok()?;
            let st = sp.status.clone()?;
            let (want, ready) = workers(&deployments, "keda").await?;
            (sp.spec.replicas == Some(4)
                && want == 4
                && ready == 4
                && st.replicas == 4
                && st.ready_replicas == 4
                && condition(&sp, "Ready")?.0 == "True")
                .then_some(sp)
        },
    )
    .await;
    eprintln!("(a) 4 workers Ready {:?} after the backlog was produced", produced.elapsed());
    assert_only_autoscalers_write_replicas(&sp);
    assert_eq!(condition(&sp, "Degraded").map(|c| c.1), Some("AsExpected".into()));
    // Scaling through spec.replicas adds workers; it rolls none.
    let hash_after = config_hash(&deployments.get("keda").await.expect("deployment"));
    assert!(hash_before.is_some() && hash_before == hash_after, "{hash_before:?} -> {hash_after:?}");

    // No second writer: the replicas hold still while the lag does.
    let mut seen = Vec::new();
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(20) {
        let sp = sps.get("keda").await.expect("get sp");
        let (want, _) = workers(&deployments, "keda").await.expect("deployment");
        seen.push((sp.spec.replicas, want));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(seen.iter().all(|s| *s == (Some(4), 4)), "the replicas moved while the lag held still: {seen:?}");

    // --- (b) A plain HPA on the external metric KEDA's adapter serves.
    let keda_hpa = hpas.get("keda-hpa-keda-so").await.expect("KEDA's HPA");
    let external = keda_hpa
        .spec
        .metrics
        .as_ref()
        .and_then(|m| m.first())
        .and_then(|m| m.external.clone())
        .expect("external metric");
    apply(&sps, "plain", &processor("plain", &bootstrap, "orders", json!({"replicas": 1}))).await;
    apply(
        &hpas,
        "plain",
        &json!({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "plain", "namespace": NS},
            "spec": {
                "scaleTargetRef": {"apiVersion": "sluice.io/v1alpha1", "kind": "StreamProcessor", "name": "plain"},
                "minReplicas": 1, "maxReplicas": 12,
                "metrics": [{"type": "External", "external": {
                    "metric": external.metric,
                    "target": {"type": "AverageValue", "averageValue": "1000"}}}]
            }
        }),
    )
    .await;
    let hpa_started = Instant::now();
    let sp = eventually_on(&cluster, "the plain HPA scales its processor to 4", Duration::from_secs(120), || async {
        let sp = sps.get("plain").await.ok()?;
        let st = sp.status.clone()?;
        let (want, ready) = workers(&deployments, "plain").await?;
        (sp.spec.replicas == Some(4) && want == 4 && ready == 4 && st.ready_replicas == 4).then_some(sp)
    })
    .await;
    eprintln!("(b) plain HPA on {}: 4 workers Ready after {:?}", external.metric.name, hpa_started.elapsed());
    assert_only_autoscalers_write_replicas(&sp);
    assert_eq!(condition(&sp, "Degraded").map(|c| c.1), Some("AsExpected".into()));

    // --- An HPA that cannot get its metrics: its minimum applies, its failure is reported.
    apply(&sps, "blind", &processor("blind", &bootstrap, "idle", json!({"replicas": 1}))).await;
    apply(
        &hpas,
        "blind",
        &json!({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "blind", "namespace": NS},
            "spec": {
                "scaleTargetRef": {"apiVersion": "sluice.io/v1alpha1", "kind": "StreamProcessor", "name": "blind"},
                "minReplicas": 2, "maxReplicas": 4,
                "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 50}}}]
            }
        }),
    )
    .await;
    let (_, _, message) =
        eventually_on(&cluster, "the HPA's failure is on the processor", Duration::from_secs(120), || async {
            let sp = sps.get("blind").await.ok()?;
            let (want, _) = workers(&deployments, "blind").await?;
            let degraded = condition(&sp, "Degraded")?;
            (want == 2 && degraded.1 == "AutoscalerFailing").then_some(degraded)
        })
        .await;
    eprintln!("HPA without metrics: Degraded AutoscalerFailing: {message}");
    assert!(message.contains("HorizontalPodAutoscaler scaling/blind cannot scale"), "{message}");
    assert!(message.contains("ScalingActive=False"), "{message}");
    let notes = event_notes(&client, "AutoscalerFailing", "blind").await;
    assert!(
        notes.iter().any(|n| n.contains("HorizontalPodAutoscaler scaling/blind")),
        "no AutoscalerFailing Event: {notes:?}"
    );

    // --- (c) spec.scaling and a ScaledObject on one processor: reported, not fought.
    let builtin =
        json!({"scaling": {"minReplicas": 1, "maxReplicas": 12, "lagPerReplica": 1000, "pollInterval": "2s"}});
    apply(&sps, "both", &processor("both", &bootstrap, "idle", builtin)).await;
    eventually_on(&cluster, "the built-in autoscaler runs one worker", Duration::from_secs(120), || async {
        let sp = sps.get("both").await.ok()?;
        (condition(&sp, "Ready")?.0 == "True" && sp.status?.desired_replicas == Some(1)).then_some(())
    })
    .await;
    apply_scaled_object(&client, &scaled_object("both-so", "both", trigger("idle"), 3)).await;
    let (_, _, message) = eventually_on(&cluster, "the conflict is reported", Duration::from_secs(90), || async {
        let sp = sps.get("both").await.ok()?;
        condition(&sp, "Degraded").filter(|c| c.0 == "True" && c.1 == "ScalingConflict")
    })
    .await;
    eprintln!("spec.scaling + ScaledObject: Degraded ScalingConflict: {message}");
    assert!(message.contains("KEDA ScaledObject scaling/both-so (HPA keda-hpa-both-so)"), "{message}");
    assert!(message.contains("remove spec.scaling") && message.contains("delete ScaledObject both-so"), "{message}");
    let notes = event_notes(&client, "ScalingConflict", "both").await;
    assert!(notes.iter().any(|n| n.contains("both-so")), "no ScalingConflict Event: {notes:?}");
    // KEDA writes its minimum (3) to spec.replicas; the workers stay with the built-in autoscaler's 1.
    eventually_on(&cluster, "KEDA writes spec.replicas", Duration::from_secs(60), || async {
        (sps.get("both").await.ok()?.spec.replicas == Some(3)).then_some(())
    })
    .await;
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(10) {
        let (want, _) = workers(&deployments, "both").await.expect("deployment");
        assert_eq!(want, 1, "the workers followed the ScaledObject instead of spec.scaling");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let sp = sps.get("both").await.expect("get both");
    assert!(replicas_managers(&sp).iter().all(|(m, _)| m != OPERATOR), "{:?}", replicas_managers(&sp));
    // The ScaledObject goes: the condition clears.
    sos.delete("both-so", &DeleteParams::default()).await.expect("delete ScaledObject");
    eventually_on(&cluster, "the conflict clears", Duration::from_secs(60), || async {
        let sp = sps.get("both").await.ok()?;
        (condition(&sp, "Degraded")?.1 == "AsExpected").then_some(())
    })
    .await;

    // --- (d) KEDA not running (its CRDs still installed): a ScaledObject
    // nobody acts on is reported on the processor, and clears once KEDA is back.
    let keda_operator = cluster.stop_component(sluice_dev::keda::OPERATOR).expect("stop KEDA's operator");
    apply(&sps, "nokeda", &processor("nokeda", &bootstrap, "idle", json!({"replicas": 1}))).await;
    eventually_on(&cluster, "the processor without KEDA is Ready", Duration::from_secs(120), || async {
        let sp = sps.get("nokeda").await.ok()?;
        (condition(&sp, "Ready")?.0 == "True").then_some(())
    })
    .await;
    apply_scaled_object(&client, &scaled_object("nokeda-so", "nokeda", trigger("idle"), 2)).await;
    let (_, _, message) = eventually_on(&cluster, "KEDA not acting is reported", Duration::from_secs(120), || async {
        let sp = sps.get("nokeda").await.ok()?;
        condition(&sp, "Degraded").filter(|c| c.0 == "True" && c.1 == "AutoscalerFailing")
    })
    .await;
    eprintln!("ScaledObject with KEDA stopped: Degraded AutoscalerFailing: {message}");
    assert!(message.contains("KEDA ScaledObject scaling/nokeda-so targets this StreamProcessor"), "{message}");
    assert!(message.contains("KEDA has not acted on it") && message.contains("kubectl get pods -n keda"), "{message}");
    let notes = event_notes(&client, "AutoscalerFailing", "nokeda").await;
    assert!(notes.iter().any(|n| n.contains("nokeda-so")), "no AutoscalerFailing Event: {notes:?}");
    assert_eq!(workers(&deployments, "nokeda").await.map(|w| w.0), Some(1), "the workers stay at spec.replicas");
    cluster.start_component(keda_operator).await.expect("start KEDA's operator again");
    eventually_on(&cluster, "KEDA acts: 2 replicas, the condition clears", Duration::from_secs(180), || async {
        let sp = sps.get("nokeda").await.ok()?;
        let clear = condition(&sp, "Degraded")?.1 == "AsExpected";
        (clear && sp.spec.replicas == Some(2) && workers(&deployments, "nokeda").await?.0 == 2).then_some(())
    })
    .await;

    operator.stop().await;
    assert_operator_never_denied(&cluster);
    eprintln!("KEDA e2e done in {:?}", t0.elapsed());
}

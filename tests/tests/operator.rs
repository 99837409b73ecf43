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
    IMAGE, InProcessOperator, condition, eventually, install_crd, restricted_namespace, start_cluster,
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

    let operator = InProcessOperator::start(&client, NS);

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

    // Delete: the real garbage collector removes what the operator created.
    sps.delete("counts", &DeleteParams::foreground()).await.expect("delete");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    eventually("the Deployment is garbage-collected", Duration::from_secs(60), || async {
        deployments.get_opt("counts").await.ok()?.is_none().then_some(())
    })
    .await;

    operator.stop().await;
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

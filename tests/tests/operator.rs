//! The operator end to end on the real local cluster (sluice-dev): the CRD
//! from the chart, the operator's controller, and worker pods running the
//! project's own image on the real node in a namespace that enforces the
//! restricted Pod Security Standard.
//!
//! Needs root, the cluster binaries (dev/scripts/build-cluster.sh) and the
//! release binaries (`cargo build --release -p sluice-worker -p
//! sluice-operator`); `make test` provides all three. Missing ones FAIL with
//! the command to run.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Namespace, Pod, Service, ServiceAccount},
        events::v1::Event,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use sluice_crds::StreamProcessor;
use sluice_dev::{Cluster, ClusterOptions, image};
use sluice_operator::{build::Settings, controller, metrics::Metrics, probe::BrokerProbe};
use sluice_tests::repo_root;
use tokio::sync::watch;

const NS: &str = "sluice-e2e";
const IMAGE: &str = concat!("sluice:", env!("CARGO_PKG_VERSION"));

/// The project's image, built from the Dockerfile's `prebuilt` stage with the
/// release binaries (rebuilt only when they change).
fn project_image() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"));
    let release = target.join("release");
    let context = target.join("image-context");
    std::fs::create_dir_all(context.join("dist")).expect("create the image context");
    for bin in ["sluice-worker", "sluice-operator"] {
        let from = release.join(bin);
        assert!(
            from.is_file(),
            "{} is missing: build it with `cargo build --release -p sluice-worker -p sluice-operator` (make test does)",
            from.display()
        );
        let to = context.join("dist").join(bin);
        let stale = std::fs::metadata(&to).and_then(|m| m.modified()).ok()
            < std::fs::metadata(&from).and_then(|m| m.modified()).ok();
        if stale || !to.exists() {
            // The release profile keeps line tables for profiling; the image does not need them.
            let out = std::process::Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&to)
                .arg(&from)
                .output()
                .unwrap_or_else(|e| panic!("run strip (apt-get install binutils): {e}"));
            assert!(out.status.success(), "strip {}: {}", from.display(), String::from_utf8_lossy(&out.stderr));
        }
    }
    let spec = image::ImageSpec {
        dockerfile: repo_root().join("Dockerfile"),
        context,
        target: Some("prebuilt".into()),
        name: IMAGE.into(),
        build_args: vec![],
    };
    image::build(&spec, &sluice_dev::host::cache_root()).unwrap_or_else(|e| panic!("building the project image: {e}"))
}

async fn start_cluster() -> Cluster {
    let opts = ClusterOptions { images: vec![project_image()], ..ClusterOptions::default() };
    Cluster::start(opts).await.unwrap_or_else(|e| {
        panic!("could not start the sluice-dev cluster: {e}\n(build it with `bash dev/scripts/build-cluster.sh`, run as root)")
    })
}

async fn install_crd(client: &Client) {
    let text = std::fs::read_to_string(repo_root().join(sluice_crds::crd::CHECKED_IN_PATH)).expect("checked-in CRD");
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("CRD YAML");
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.patch(&crd.name_any(), &PatchParams::apply("sluice-e2e").force(), &Patch::Apply(&crd))
        .await
        .expect("apply CRD");
    eventually("the CRD is established", Duration::from_secs(30), || async {
        let c = api.get(&crd.name_any()).await.ok()?;
        c.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
    })
    .await;
}

async fn restricted_namespace(client: &Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest"}}
    }))
    .expect("namespace");
    Api::<Namespace>::all(client.clone())
        .patch(name, &PatchParams::apply("sluice-e2e").force(), &Patch::Apply(&ns))
        .await
        .expect("create namespace");
}

/// Poll `check` until it yields, or fail naming `what`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn condition(sp: &StreamProcessor, type_: &str) -> Option<(String, String, String)> {
    sp.status.as_ref()?.condition(type_).map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

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

    let (stop, stopped) = watch::channel(false);
    let settings =
        Settings { worker_image: IMAGE.into(), image_pull_policy: "Never".into(), termination_grace_seconds: 10 };
    let operator = tokio::spawn(controller::run(
        client.clone(),
        Some(NS.into()),
        settings,
        Metrics::new(),
        Arc::new(BrokerProbe::default()),
        async move {
            let mut s = stopped;
            let _ = s.wait_for(|v| *v).await;
        },
    ));

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

    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
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

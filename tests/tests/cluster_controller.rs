//! kube 5 and kube-runtime against the real sluice-dev cluster: a Controller
//! with `.owns()` children that survives a kube-apiserver restart, and
//! kube-lease-manager leader election with failover. Needs root and the
//! cluster binaries (bash dev/scripts/build-cluster.sh); fails otherwise.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, CustomResource, CustomResourceExt, Resource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sluice_dev::{Cluster, ClusterOptions};

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[kube(group = "test.sluice.io", version = "v1", kind = "Gadget", namespaced)]
pub struct GadgetSpec {
    value: String,
}

async fn start() -> Cluster {
    match Cluster::start(ClusterOptions::default()).await {
        Ok(c) => c,
        Err(e) => panic!(
            "could not start the sluice-dev cluster: {e}\n(build the binaries with `bash dev/scripts/build-cluster.sh` and run the tests as root)"
        ),
    }
}

async fn poll<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[derive(Debug, thiserror::Error)]
#[error("apply child: {0}")]
struct ReconcileError(#[from] kube::Error);

async fn reconcile(g: Arc<Gadget>, client: Arc<kube::Client>) -> Result<Action, ReconcileError> {
    let ns = g.namespace().unwrap_or_default();
    let owner = g.controller_owner_ref(&()).map(|o| vec![o]);
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": format!("{}-child", g.name_any()), "ownerReferences": owner},
        "data": {"value": g.spec.value},
    });
    Api::<ConfigMap>::namespaced((*client).clone(), &ns)
        .patch(&format!("{}-child", g.name_any()), &PatchParams::apply("gadget-controller").force(), &Patch::Apply(&cm))
        .await?;
    Ok(Action::await_change())
}

fn error_policy(_: Arc<Gadget>, _: &ReconcileError, _: Arc<kube::Client>) -> Action {
    Action::requeue(Duration::from_millis(500))
}

async fn child_value(cms: &Api<ConfigMap>, name: &str) -> Option<String> {
    cms.get_opt(name).await.ok().flatten().and_then(|c| c.data).and_then(|d| d.get("value").cloned())
}

#[tokio::test]
async fn controller_with_owned_children_survives_an_apiserver_restart() {
    let t0 = Instant::now();
    let mut cluster = start().await;
    eprintln!("cluster up after {:?}", t0.elapsed());
    let client = cluster.client().await.expect("client");
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    crds.patch("gadgets.test.sluice.io", &PatchParams::apply("test").force(), &Patch::Apply(Gadget::crd()))
        .await
        .expect("apply CRD");
    poll("CRD established", Duration::from_secs(30), || async {
        crds.get("gadgets.test.sluice.io").await.is_ok_and(|c| {
            c.status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
    })
    .await;

    eprintln!("{:?}: let gadgets = Api::<Gadget>::namespaced(", t0.elapsed());
    let gadgets = Api::<Gadget>::namespaced(client.clone(), "default");
    let cms = Api::<ConfigMap>::namespaced(client.clone(), "default");
    let controller = tokio::spawn(
        Controller::new(gadgets.clone(), watcher::Config::default())
            .owns(cms.clone(), watcher::Config::default())
            .run(reconcile, error_policy, Arc::new(client.clone()))
            .for_each(|_| async {}),
    );

    let apply_gadget = |name: &'static str, value: &'static str| {
        let gadgets = gadgets.clone();
        async move {
            gadgets
                .patch(
                    name,
                    &PatchParams::apply("test").force(),
                    &Patch::Apply(json!({
                        "apiVersion": "test.sluice.io/v1", "kind": "Gadget",
                        "metadata": {"name": name}, "spec": {"value": value},
                    })),
                )
                .await
                .expect("apply gadget")
        }
    };
    apply_gadget("g1", "one").await;
    poll("child of g1", Duration::from_secs(30), || async {
        child_value(&cms, "g1-child").await.as_deref() == Some("one")
    })
    .await;

    eprintln!("{:?}: // .owns(): deleting the child triggers ", t0.elapsed());
    // .owns(): deleting the child triggers a reconcile that recreates it.
    cms.delete("g1-child", &DeleteParams::default()).await.expect("delete child");
    poll("child of g1 recreated", Duration::from_secs(30), || async {
        child_value(&cms, "g1-child").await.as_deref() == Some("one")
    })
    .await;

    eprintln!("{:?}: // Restart kube-apiserver: the watches r", t0.elapsed());
    // Restart kube-apiserver: the watches reconnect and events flow again.
    let apiserver = cluster.stop_component("kube-apiserver").expect("stop kube-apiserver");
    eprintln!("{:?}: apiserver stopped", t0.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start_component(apiserver).await.expect("start kube-apiserver");
    eprintln!("{:?}: apply_gadget(g1, two).await;", t0.elapsed());
    apply_gadget("g1", "two").await;
    apply_gadget("g2", "three").await;
    poll("children after the restart", Duration::from_secs(60), || async {
        child_value(&cms, "g1-child").await.as_deref() == Some("two")
            && child_value(&cms, "g2-child").await.as_deref() == Some("three")
    })
    .await;
    eprintln!("{:?}: controller.abort();", t0.elapsed());
    controller.abort();
    cluster.stop();
    eprintln!("{:?}: cluster stopped", t0.elapsed());
}

#[tokio::test]
async fn lease_manager_elects_one_leader_and_fails_over() {
    use kube_lease_manager::LeaseManagerBuilder;
    let cluster = start().await;
    let client = cluster.client().await.expect("client");
    let manager = |id: &'static str| {
        let client = client.clone();
        async move {
            LeaseManagerBuilder::new(client, "sluice-test-leader")
                .with_namespace("default")
                .with_identity(id)
                .with_duration(4)
                .with_grace(1)
                .build()
                .await
                .expect("lease manager")
        }
    };
    let (a_rx, a_task) = manager("a").await.watch().await;
    let (b_rx, b_task) = manager("b").await.watch().await;
    poll("a leader", Duration::from_secs(20), || async { *a_rx.borrow() || *b_rx.borrow() }).await;
    // Hold for a few renewals: never two leaders.
    for _ in 0..10 {
        assert!(!(*a_rx.borrow() && *b_rx.borrow()), "two leaders at once");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (leader, leader_task, follower_rx, follower) =
        if *a_rx.borrow() { ("a", a_task, b_rx, "b") } else { ("b", b_task, a_rx, "a") };
    let leases = Api::<Lease>::namespaced(client.clone(), "default");
    let holder = leases.get("sluice-test-leader").await.expect("lease").spec.and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some(leader));

    // The leader stops renewing (its task is gone without releasing).
    leader_task.abort();
    let t0 = Instant::now();
    poll("failover to the other manager", Duration::from_secs(30), || async { *follower_rx.borrow() }).await;
    eprintln!("failover after {:?}", t0.elapsed());
    let holder = leases.get("sluice-test-leader").await.expect("lease").spec.and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some(follower));
}

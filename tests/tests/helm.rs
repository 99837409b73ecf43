//! The chart on the real local cluster: `helm install` runs the operator as
//! pods of the project's image in a namespace enforcing the restricted Pod
//! Security Standard, under the chart's own ServiceAccount and RBAC; it
//! reconciles a processor to Ready; the standby takes over when the leader
//! dies; a steady state costs no writes; the audit log shows no 403 for the
//! operator, and every (verb, resource) the chart grants it is used or is
//! justified in charts/sluice/templates/rbac.yaml; the API server enforces the
//! CRD's rules; upgrade and uninstall work.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Output,
    time::{Duration, Instant},
};

use k8s_openapi::api::{apps::v1::Deployment, coordination::v1::Lease, core::v1::Pod, rbac::v1::ClusterRole};
use kube::{
    Api, ResourceExt,
    api::{ListParams, PostParams},
};
use serde_json::json;
use sluice_crds::StreamProcessor;
use sluice_dev::Cluster;
use sluice_tests::{
    e2e::{condition, eventually, eventually_on, restricted_namespace, start_local_cluster},
    repo_root, require_tool,
};

const SYSTEM: &str = "sluice-system";
const APPS: &str = "shop";
const OPERATOR_USER: &str = "system:serviceaccount:sluice-system:sluice-sluice-operator";

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn helm(cluster: &Cluster, args: &[&str]) -> Output {
    let helm =
        require_tool("helm", "bash dev/scripts/build-cluster.sh, then put its bin folder on PATH (make test does)");
    std::process::Command::new(helm)
        .args(args)
        .env("KUBECONFIG", cluster.kubeconfig_path())
        .env("HELM_CACHE_HOME", std::env::temp_dir().join("sluice-helm-cache"))
        .env("HELM_CONFIG_HOME", std::env::temp_dir().join("sluice-helm-config"))
        .env("HELM_DATA_HOME", std::env::temp_dir().join("sluice-helm-data"))
        .current_dir(repo_root())
        .output()
        .expect("run helm")
}

fn kubectl(cluster: &Cluster, args: &[&str]) -> Output {
    cluster.kubectl().args(args).output().expect("run kubectl")
}

/// Every (verb, resource) a ClusterRole grants, `resource/subresource` for subresources.
fn grants(role: &ClusterRole) -> BTreeSet<(String, String)> {
    role.rules
        .iter()
        .flatten()
        .flat_map(|rule| {
            let resources = rule.resources.clone().unwrap_or_default();
            rule.verbs
                .iter()
                .flat_map(|verb| resources.iter().map(|r| (verb.clone(), r.clone())).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The grants charts/sluice/templates/rbac.yaml says the operator keeps
/// although this e2e never uses them, from its lines
/// `justified: <verb> <resource>[,<resource>...] -- <why>`.
fn justified_grants() -> BTreeMap<(String, String), String> {
    let path = repo_root().join("charts/sluice/templates/rbac.yaml");
    let text = std::fs::read_to_string(&path).expect("read the chart's RBAC template");
    let mut justified = BTreeMap::new();
    for line in text.lines().filter_map(|l| l.trim().strip_prefix("justified:")) {
        let (grant, why) = line
            .split_once(" -- ")
            .unwrap_or_else(|| panic!("{}: `justified:{line}` gives no ` -- <why>`", path.display()));
        let mut words = grant.split_whitespace();
        let (Some(verb), Some(resources), None) = (words.next(), words.next(), words.next()) else {
            panic!("{}: `justified:{line}` is not `<verb> <resource>[,<resource>...] -- <why>`", path.display())
        };
        assert!(!why.trim().is_empty(), "{}: `justified:{line}` gives no reason", path.display());
        for resource in resources.split(',') {
            justified.insert((verb.to_string(), resource.to_string()), why.trim().to_string());
        }
    }
    justified
}

/// The operator's (verb, resource[/subresource]) pairs in the audit log so far.
fn operator_requests(cluster: &Cluster) -> BTreeSet<(String, String)> {
    cluster
        .audit_records()
        .expect("audit")
        .iter()
        .filter(|r| r.user == OPERATOR_USER)
        .map(|r| {
            let resource =
                if r.subresource.is_empty() { r.resource.clone() } else { format!("{}/{}", r.resource, r.subresource) };
            (r.verb.clone(), resource)
        })
        .collect()
}

async fn lease_holder(client: &kube::Client) -> Option<String> {
    let lease = Api::<Lease>::namespaced(client.clone(), SYSTEM).get_opt("sluice-operator").await.ok()??;
    lease.spec?.holder_identity.filter(|h| !h.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_runs_the_operator_under_its_own_rbac() {
    let cluster = start_local_cluster().await;
    let client = cluster.client().await.expect("client");
    restricted_namespace(&client, SYSTEM).await;
    restricted_namespace(&client, APPS).await;

    let out = helm(
        &cluster,
        &[
            "install",
            "sluice",
            "charts/sluice",
            "-n",
            SYSTEM,
            "--set",
            "image.pullPolicy=Never",
            "--wait",
            "--timeout",
            "3m",
        ],
    );
    assert!(out.status.success(), "helm install failed:\n{}", text(&out));
    assert!(text(&out).contains("kubectl get sp -A -w"), "NOTES.txt tells the user what to run next:\n{}", text(&out));
    let roles = Api::<ClusterRole>::all(client.clone())
        .list(&ListParams::default().labels("app.kubernetes.io/instance=sluice"))
        .await
        .expect("the chart's ClusterRoles");
    let granted: BTreeSet<(String, String)> = roles.items.iter().flat_map(grants).collect();
    let justified = justified_grants();
    for grant in justified.keys() {
        assert!(granted.contains(grant), "rbac.yaml justifies {grant:?}, which the chart does not grant: {granted:?}");
    }

    // The API server enforces the CRD's schema and CEL rules, with the field in its message.
    for entry in std::fs::read_dir(repo_root().join("examples/invalid")).expect("examples/invalid") {
        let path = entry.expect("entry").path();
        let body = std::fs::read_to_string(&path).expect("read");
        let expected_path = body
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .and_then(|l| l.split(" | ").next())
            .expect("expect line");
        let out =
            kubectl(&cluster, &["apply", "--dry-run=server", "-n", APPS, "-f", path.to_str().expect("utf-8 path")]);
        if body.contains("# apiserver: rejects") {
            assert!(!out.status.success(), "{}: the API server accepted it", path.display());
            assert!(
                text(&out).contains(expected_path),
                "{}: kubectl's error does not name {expected_path}:\n{}",
                path.display(),
                text(&out)
            );
        } else {
            assert!(
                out.status.success(),
                "{}: only the operator can find this problem, yet the API server rejected it:\n{}",
                path.display(),
                text(&out)
            );
        }
    }

    // One leader among two replicas.
    let leader =
        eventually("an operator replica holds the Lease", Duration::from_secs(60), || lease_holder(&client)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM);
    let operator_pods =
        pods.list(&ListParams::default().labels("app.kubernetes.io/name=sluice-operator")).await.expect("pods");
    assert_eq!(operator_pods.items.len(), 2);
    assert!(operator_pods.items.iter().any(|p| p.name_any() == leader), "the holder {leader} is not an operator pod");

    // It reconciles a processor to Ready, its workers on the real node.
    let sps: Api<StreamProcessor> = Api::namespaced(client.clone(), APPS);
    let sp: StreamProcessor = serde_json::from_value(json!({
        "apiVersion": "sluice.io/v1alpha1", "kind": "StreamProcessor",
        "metadata": {"name": "orders", "namespace": APPS},
        "spec": {
            "source": {"generator": {"rate": 20, "template": {"id": "seq", "amount": "int(1,100)"}}},
            "pipeline": [{"filter": "msg.amount > 50"}],
            "sink": {"stdout": {}},
            "replicas": 1,
            "resources": {"limits": {"memory": "128Mi"}}
        }
    }))
    .expect("manifest");
    sps.create(&PostParams::default(), &sp).await.expect("create");
    eventually_on(&cluster, "the processor is Ready under the chart's operator", Duration::from_secs(120), || async {
        let sp = sps.get("orders").await.ok()?;
        condition(&sp, "Ready").filter(|(s, _, _)| s == "True")
    })
    .await;

    // The leader dies without a goodbye: the standby takes over after the lease expires.
    let killed = Instant::now();
    let out = kubectl(&cluster, &["delete", "pod", &leader, "-n", SYSTEM, "--grace-period=0", "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    let new_leader = eventually("the standby takes the Lease", Duration::from_secs(60), || async {
        lease_holder(&client).await.filter(|h| *h != leader)
    })
    .await;
    let failover = killed.elapsed();
    eprintln!("failover: {new_leader} took over {failover:?} after {leader} was killed");
    // The new leader acts: a scale through the subresource reaches the workers.
    let out = kubectl(&cluster, &["scale", "sp/orders", "-n", APPS, "--replicas=2"]);
    assert!(out.status.success(), "{}", text(&out));
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), APPS);
    eventually_on(&cluster, "the new leader scales the workers", Duration::from_secs(60), || async {
        let sp = sps.get("orders").await.ok()?;
        let st = sp.status?;
        (st.ready_replicas == 2 && deployments.get("orders").await.ok()?.spec.replicas == Some(2)).then_some(())
    })
    .await;

    // Steady state: nothing changes, so the operator writes nothing but its Lease.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = cluster.audit_records().expect("audit").len();
    let window = Duration::from_secs(20);
    tokio::time::sleep(window).await;
    let records = cluster.audit_records().expect("audit");
    let writes: Vec<_> = records[before..]
        .iter()
        .filter(|r| r.user == OPERATOR_USER)
        .filter(|r| matches!(r.verb.as_str(), "create" | "update" | "patch" | "delete"))
        .filter(|r| r.resource != "leases")
        .collect();
    assert!(writes.is_empty(), "the operator wrote during {window:?} of steady state: {writes:?}");

    // Never a 403 for the operator.
    let denied: Vec<_> = records.iter().filter(|r| r.user == OPERATOR_USER && r.code == 403).collect();
    assert!(denied.is_empty(), "the operator was denied: {denied:?}");
    let used: std::collections::BTreeSet<(String, String)> =
        records.iter().filter(|r| r.user == OPERATOR_USER).map(|r| (r.verb.clone(), r.resource.clone())).collect();
    for needed in
        [("watch", "streamprocessors"), ("patch", "deployments"), ("patch", "streamprocessors"), ("create", "events")]
    {
        assert!(
            used.contains(&(needed.0.to_string(), needed.1.to_string())),
            "the operator never did {needed:?}: {used:?}"
        );
    }

    // Upgrade rolls the operator; uninstall leaves only the CRD behind.
    let out = helm(
        &cluster,
        &[
            "upgrade",
            "sluice",
            "charts/sluice",
            "-n",
            SYSTEM,
            "--set",
            "image.pullPolicy=Never",
            "--set",
            "logLevel=debug",
            "--wait",
            "--timeout",
            "3m",
        ],
    );
    assert!(out.status.success(), "helm upgrade failed:\n{}", text(&out));
    let out = helm(&cluster, &["uninstall", "sluice", "-n", SYSTEM, "--wait"]);
    assert!(out.status.success(), "helm uninstall failed:\n{}", text(&out));
    eventually_on(&cluster, "uninstall leaves nothing of the release behind", Duration::from_secs(90), || async {
        let left = kubectl(
            &cluster,
            &[
                "get",
                "all,sa,role,rolebinding,clusterrole,clusterrolebinding",
                "-A",
                "-l",
                "app.kubernetes.io/instance=sluice",
                "-o",
                "name",
            ],
        );
        (left.status.success() && String::from_utf8_lossy(&left.stdout).trim().is_empty()).then_some(())
    })
    .await;
    let crd = kubectl(&cluster, &["get", "crd", "streamprocessors.sluice.io", "-o", "name"]);
    assert!(crd.status.success(), "the CRD must stay (helm keeps crds/): {}", text(&crd));

    // Every grant was used, or the template says why it stays. Watches enter
    // the audit log when they end, which the operator pods' exit made sure of;
    // the API server writes its audit batch every second.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (unused, used) = loop {
        let used = operator_requests(&cluster);
        let unused: Vec<_> = granted.iter().filter(|g| !used.contains(*g) && !justified.contains_key(*g)).collect();
        if unused.is_empty() || Instant::now() > deadline {
            break (unused, used);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(
        unused.is_empty(),
        "the chart grants the operator {unused:?}, which it never used in this e2e (audit log) and which \
         charts/sluice/templates/rbac.yaml does not justify: remove the grant, or add a line \
         `justified: <verb> <resource> -- <why>` to its comment. Used: {used:?}"
    );
    let unneeded: Vec<_> = justified.keys().filter(|g| used.contains(*g)).collect();
    eprintln!("RBAC: {} grants, {} used, justified but used anyway: {unneeded:?}", granted.len(), used.len());
}

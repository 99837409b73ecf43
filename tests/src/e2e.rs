//! The end-to-end harness: the project's image, the real local cluster
//! (sluice-dev) with it loaded, the CRD from the chart, and polling with
//! deadlines (never sleep-and-hope).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::Namespace, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
};
use serde_json::json;
use sluice_crds::StreamProcessor;
use sluice_dev::{Cluster, ClusterOptions, e2e::E2eCluster, image};

use crate::repo_root;

pub const IMAGE: &str = concat!("sluice:", env!("CARGO_PKG_VERSION"));

/// The project's image, built from the Dockerfile's `prebuilt` stage with the
/// release binaries (rebuilt only when they change).
pub fn project_image() -> PathBuf {
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

fn local_options() -> ClusterOptions {
    ClusterOptions { images: vec![project_image()], ..ClusterOptions::default() }
}

fn cannot_start(e: impl std::fmt::Display) -> ! {
    panic!(
        "could not start the sluice-dev cluster: {e}\n(build it with `bash dev/scripts/build-cluster.sh`, run as root)"
    )
}

/// A fresh local sluice-dev cluster with the project's image loaded.
pub async fn start_local_cluster() -> Cluster {
    Cluster::start(local_options()).await.unwrap_or_else(|e| cannot_start(e))
}

/// The cluster of a suite that can run anywhere: the one
/// `SLUICE_E2E_KUBECONFIG` names (with the project's image, [`IMAGE`],
/// loaded there and `SLUICE_E2E_HOST_IP` set), else a fresh local one.
pub async fn start_cluster() -> E2eCluster {
    let cluster = E2eCluster::connect(local_options).await.unwrap_or_else(|e| cannot_start(e));
    if let E2eCluster::External { kubeconfig } = &cluster {
        eprintln!("e2e against the cluster of {} (image {IMAGE} must be loaded there)", kubeconfig.display());
    }
    cluster
}

/// What [`diagnose`] needs of a cluster.
pub trait Inspect {
    fn kubectl(&self) -> std::process::Command;
    fn audit(&self) -> Option<Vec<sluice_dev::audit::AuditRecord>>;
}

impl Inspect for Cluster {
    fn kubectl(&self) -> std::process::Command {
        Cluster::kubectl(self)
    }
    fn audit(&self) -> Option<Vec<sluice_dev::audit::AuditRecord>> {
        self.audit_records().ok()
    }
}

impl Inspect for E2eCluster {
    fn kubectl(&self) -> std::process::Command {
        E2eCluster::kubectl(self)
    }
    fn audit(&self) -> Option<Vec<sluice_dev::audit::AuditRecord>> {
        self.audit_records()
    }
}

pub async fn install_crd(client: &Client) {
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

pub async fn restricted_namespace(client: &Client, name: &str) {
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
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
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

pub fn condition(sp: &StreamProcessor, type_: &str) -> Option<(String, String, String)> {
    sp.status.as_ref()?.condition(type_).map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// What a person would look at when an e2e wait times out: objects, Events,
/// the operator's and workers' logs, and denied requests in the audit log.
pub fn diagnose(cluster: &(impl Inspect + ?Sized)) -> String {
    let mut out = String::new();
    let namespaces = cluster
        .kubectl()
        .args([
            "get",
            "pods",
            "-A",
            "-l",
            "app.kubernetes.io/part-of=sluice",
            "-o",
            "jsonpath={.items[*].metadata.namespace}",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut namespaces: Vec<&str> = namespaces.split_whitespace().collect();
    namespaces.sort();
    namespaces.dedup();
    let mut commands: Vec<Vec<String>> = vec![
        ["get", "sp,deploy,pods,leases", "-A", "-o", "wide"].map(String::from).to_vec(),
        ["get", "events", "-A", "--sort-by=.metadata.creationTimestamp"].map(String::from).to_vec(),
    ];
    for ns in namespaces {
        commands.push(
            ["logs", "-n", ns, "-l", "app.kubernetes.io/part-of=sluice", "--tail=60", "--prefix", "--all-containers"]
                .map(String::from)
                .to_vec(),
        );
    }
    for args in &commands {
        match cluster.kubectl().args(args).output() {
            Ok(o) => out.push_str(&format!(
                "\n$ kubectl {}\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) => out.push_str(&format!("\nkubectl {args:?}: {e}")),
        }
    }
    if let Some(records) = cluster.audit() {
        let denied: Vec<String> = records.iter().filter(|r| r.code == 403).map(|r| format!("{r:?}")).take(20).collect();
        out.push_str(&format!("\n403s in the audit log: {denied:#?}\n"));
    }
    out
}

/// Like [`eventually`], with [`diagnose`] in the failure message.
pub async fn eventually_on<T, F, Fut>(
    cluster: &(impl Inspect + ?Sized),
    what: &str,
    within: Duration,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting until {what}\n{}", diagnose(cluster));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Send the in-process operator's logs to the test output (shown for a
/// failing test, or with --nocapture).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("sluice_operator=debug,warn")),
        )
        .with_test_writer()
        .try_init();
}

/// The operator's controller run in the test process (admin credentials),
/// watching one namespace, with the project's image for its workers.
pub struct InProcessOperator {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl InProcessOperator {
    pub fn start(client: &Client, namespace: &str) -> Self {
        Self::start_in(client, Some(namespace))
    }

    /// Watching every namespace, as the chart's default install does.
    pub fn start_cluster_wide(client: &Client) -> Self {
        Self::start_in(client, None)
    }

    fn start_in(client: &Client, namespace: Option<&str>) -> Self {
        use sluice_operator::{build::Settings, controller, metrics::Metrics, probe::BrokerProbe};
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let settings =
            Settings { worker_image: IMAGE.into(), image_pull_policy: "Never".into(), termination_grace_seconds: 10 };
        let task = tokio::spawn(controller::run(
            client.clone(),
            namespace.map(str::to_string),
            settings,
            Metrics::new(),
            std::sync::Arc::new(BrokerProbe::default()),
            async move {
                let _ = stopped.wait_for(|v| *v).await;
            },
        ));
        Self { stop, task }
    }

    /// Stop the controller and wait (bounded) for it to finish.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

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
    // The tests of a suite start their clusters at once: one copies the
    // binaries into the context and builds, the others wait and find it
    // built (`image::build` also locks across processes).
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _building = BUILDING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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

/// What [`diagnose`] and [`chart_operator_client`] need of a cluster.
pub trait Inspect {
    fn kubectl(&self) -> std::process::Command;
    /// The audit log's records: None where there is none to read (another
    /// cluster's is not ours), an error where ours cannot be read.
    fn audit(&self) -> Option<Result<Vec<sluice_dev::audit::AuditRecord>, String>>;
    fn kubeconfig_path(&self) -> PathBuf;
}

impl Inspect for Cluster {
    fn kubectl(&self) -> std::process::Command {
        Cluster::kubectl(self)
    }
    fn kubeconfig_path(&self) -> PathBuf {
        Cluster::kubeconfig_path(self)
    }
    fn audit(&self) -> Option<Result<Vec<sluice_dev::audit::AuditRecord>, String>> {
        Some(self.audit_records().map_err(|e| e.to_string()))
    }
}

impl Inspect for E2eCluster {
    fn kubectl(&self) -> std::process::Command {
        E2eCluster::kubectl(self)
    }
    fn kubeconfig_path(&self) -> PathBuf {
        E2eCluster::kubeconfig_path(self)
    }
    fn audit(&self) -> Option<Result<Vec<sluice_dev::audit::AuditRecord>, String>> {
        self.local().and_then(Inspect::audit)
    }
}

/// The namespace and release the suites install the chart's operator
/// identity under, and the user the API server sees for it.
pub const OPERATOR_NAMESPACE: &str = "sluice-system";
const OPERATOR_RELEASE: &str = "sluice";
pub const OPERATOR_USER: &str = "system:serviceaccount:sluice-system:sluice-sluice-operator";

/// A client that is the operator as the chart installs it: the chart's
/// ServiceAccount, ClusterRole and ClusterRoleBinding, rendered by helm from
/// charts/sluice and applied, and a TokenRequest token for that account. The
/// suites run their in-process operator with it, not with the admin
/// credentials, so a rule the chart lacks fails them (a 403) as it would a
/// user's install.
pub async fn chart_operator_client(cluster: &(impl Inspect + ?Sized), admin: &Client) -> Client {
    use k8s_openapi::api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::ServiceAccount,
    };
    let helm = crate::require_tool(
        "helm",
        "bash dev/scripts/build-cluster.sh, then put its bin folder on PATH (make test does)",
    );
    let out = std::process::Command::new(helm)
        .args(["template", OPERATOR_RELEASE, "charts/sluice", "--namespace", OPERATOR_NAMESPACE])
        .args(["--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml"])
        .current_dir(crate::repo_root())
        .output()
        .expect("run helm template");
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    let ns: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}
    }))
    .expect("namespace");
    Api::<Namespace>::all(admin.clone())
        .patch(OPERATOR_NAMESPACE, &PatchParams::apply("sluice-e2e").force(), &Patch::Apply(&ns))
        .await
        .expect("create the operator's namespace");
    let mut apply = cluster
        .kubectl()
        .args(["apply", "--server-side", "--field-manager=sluice-e2e", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kubectl apply");
    std::io::Write::write_all(&mut apply.stdin.take().expect("stdin"), &out.stdout).expect("write the chart's RBAC");
    let applied = apply.wait_with_output().expect("kubectl apply");
    assert!(applied.status.success(), "applying the chart's RBAC: {}", String::from_utf8_lossy(&applied.stderr));

    let account = OPERATOR_USER.rsplit(':').next().expect("account name");
    let request = TokenRequest {
        spec: Some(TokenRequestSpec { expiration_seconds: Some(4 * 3600), ..Default::default() }),
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), OPERATOR_NAMESPACE)
        .create_token_request(account, &Default::default(), &request)
        .await
        .expect("a token for the chart's operator ServiceAccount")
        .status
        .expect("token status")
        .token;

    // The admin kubeconfig with its user's credentials replaced by the token.
    let path = cluster.kubeconfig_path();
    let kc = kube::config::Kubeconfig::read_from(&path).expect("read the kubeconfig");
    let mut value = serde_json::to_value(&kc).expect("kubeconfig as JSON");
    for user in value["users"].as_array_mut().expect("kubeconfig users") {
        user["user"] = json!({ "token": token });
    }
    let kc: kube::config::Kubeconfig = serde_json::from_value(value).expect("kubeconfig with the token");
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.expect("client config");
    Client::try_from(config).expect("the operator's client")
}

/// Fails naming every request of the chart's operator identity the API
/// server refused (a local cluster: its audit log; elsewhere nothing to read).
pub fn assert_operator_never_denied(cluster: &(impl Inspect + ?Sized)) {
    if let Some(records) = cluster.audit() {
        let records = records.unwrap_or_else(|e| panic!("cannot read the local cluster's audit log: {e}"));
        // Not vacuous: the log holds the operator's requests.
        assert!(
            records.iter().any(|r| r.user == OPERATOR_USER),
            "the audit log has no request of {OPERATOR_USER}: the check below would prove nothing"
        );
        let denied: Vec<_> = records.iter().filter(|r| r.user == OPERATOR_USER && r.code == 403).collect();
        assert!(denied.is_empty(), "the chart's RBAC denied the operator: {denied:#?}");
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
    if let Some(Ok(records)) = cluster.audit() {
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

/// The operator's controller run in the test process, watching one
/// namespace, with the project's image for its workers. The suites give it
/// the chart's identity ([`chart_operator_client`]).
pub struct InProcessOperator {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    metrics: sluice_operator::metrics::Metrics,
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
        let metrics = Metrics::new();
        let settings =
            Settings { worker_image: IMAGE.into(), image_pull_policy: "Never".into(), termination_grace_seconds: 10 };
        let task = tokio::spawn(controller::run(
            client.clone(),
            namespace.map(str::to_string),
            settings,
            metrics.clone(),
            std::sync::Arc::new(BrokerProbe::default()),
            async move {
                let _ = stopped.wait_for(|v| *v).await;
            },
        ));
        Self { stop, task, metrics }
    }

    /// Its `/metrics` page, as the operator serves it.
    pub fn metrics(&self) -> String {
        self.metrics.render()
    }

    /// Stop the controller and wait (bounded) for it to finish.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

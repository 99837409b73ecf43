//! A running cluster: `Cluster::start` does what `sluice-dev up` does and
//! `Drop` what `sluice-dev down` does, so a test that panics leaves nothing
//! behind.
//!
//! ```text
//! preflight -> lock -> certificates + kubeconfigs
//!   -> etcd, containerd | kube-apiserver -> controller-manager, scheduler
//!   -> import pause (+ extra images) -> CoreDNS RBAC, kube-dns Service
//!   -> kubelet, kube-proxy, CoreDNS (, KWOK) -> node Ready, DNS answers
//! ```

use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::bootstrap::{self, BootstrapError, HostPort};
use crate::cleanup::{self, Teardown};
use crate::component::Component;
use crate::components;
use crate::config::{ClusterConfig, Network, Ports, run_dir_for};
use crate::host::{self, HostError, PortAllocator};
use crate::image::{self, ImageError};
use crate::keda::{self, KedaConfig, KedaError};
use crate::kubeconfig::{self, KubeconfigError};
use crate::pki::{self, CertSpec, PkiError, TinyCa};
use crate::runtime::{Runtime, RuntimeError};
use crate::template::TemplateError;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Kubeconfig(#[from] KubeconfigError),
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error("importing images: {0}")]
    Image(#[from] ImageError),
    #[error("KEDA: {0}")]
    Keda(#[from] KedaError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CoreDNS did not answer for {name} within {seconds} s")]
    Dns { name: String, seconds: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io { path: path.to_path_buf(), source }
}

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// None: a temporary folder, removed when the cluster stops.
    pub state_dir: Option<PathBuf>,
    pub bin_dir: PathBuf,
    pub node_name: String,
    pub virtual_nodes: u32,
    /// docker-archive tars imported into the node before it starts.
    pub images: Vec<PathBuf>,
    /// Deadline for the whole start.
    pub timeout: Duration,
    /// Also run KEDA from this build folder of dev/scripts/build-keda.sh
    /// (usually [`keda::default_dir`]): its CRDs, operator, metrics adapter
    /// and the external.metrics.k8s.io APIService. Off by default.
    pub keda: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            state_dir: None,
            bin_dir: host::default_bin_dir(),
            node_name: "sluice-dev".into(),
            virtual_nodes: 0,
            images: Vec::new(),
            timeout: Duration::from_secs(180),
            keda: None,
        }
    }
}

/// Figures of one start, for the benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartTimings {
    pub control_plane_ready: Duration,
    pub node_ready: Duration,
    pub total: Duration,
}

pub struct Cluster {
    config: ClusterConfig,
    keda: Option<KedaConfig>,
    runtime: Runtime,
    teardown: Teardown,
    timings: StartTimings,
    stopped: bool,
    // Dropped last: the temporary state folder, then the host lock.
    temp: Option<TempDir>,
    _lock: File,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("state_dir", &self.config.state_dir)
            .field("apiserver", &self.config.apiserver_url())
            .finish()
    }
}

/// One cluster per host: the bridge, pod range and iptables chains are
/// host-wide. Waits for another cluster of this host to stop.
fn lock_host() -> Result<File, ClusterError> {
    let dir = Path::new("/run/sluice-dev");
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join("lock");
    let f = File::create(&path).map_err(io_err(&path))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        tracing::info!("another sluice-dev cluster runs on this host; waiting for it to stop");
        // SAFETY: as above; blocks until the other holder closes its file.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err(&path)(std::io::Error::last_os_error()));
        }
    }
    Ok(f)
}

impl Cluster {
    pub async fn start(opts: ClusterOptions) -> Result<Cluster, ClusterError> {
        host::check_host()?;
        host::check_binaries(&opts.bin_dir)?;
        if let Some(dir) = &opts.keda {
            keda::check_build(dir)?;
        }
        let lock = lock_host()?;
        let t0 = Instant::now();
        let (temp, state_dir) = match &opts.state_dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::Builder::new().prefix("sluice-dev-").tempdir().map_err(io_err(Path::new("/tmp")))?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        fs::create_dir_all(&state_dir).map_err(io_err(&state_dir))?;
        let state_dir = state_dir.canonicalize().map_err(io_err(&state_dir))?;
        // A previous `up` on this folder that was killed: clean up after it.
        if let Some(old) = read_teardown(&state_dir) {
            tracing::info!(state_dir = %state_dir.display(), "cleaning up after a previous run");
            cleanup::after_stop(&old);
        }
        // A cluster of this host whose process died (we hold the lock, so it
        // is not running): its mounts, chains and folders go first.
        if let Some(old) = read_json::<Teardown>(Path::new(HOST_TEARDOWN)) {
            tracing::warn!(state_dir = %old.state_dir.display(), "cleaning up after a cluster whose process died");
            cleanup::after_stop(&old);
            let _ = fs::remove_file(HOST_TEARDOWN);
        }
        let mut ports = PortAllocator::default();
        let config = ClusterConfig {
            node_name: opts.node_name.clone(),
            run_dir: run_dir_for(&state_dir),
            share_dir: opts.bin_dir.parent().unwrap_or(&opts.bin_dir).join("share"),
            bin_dir: opts.bin_dir.clone(),
            state_dir,
            cni_bin_dir: "/usr/lib/cni".into(),
            runc: "/usr/sbin/runc".into(),
            ports: Ports {
                etcd_client: ports.allocate()?,
                etcd_peer: ports.allocate()?,
                apiserver: ports.allocate()?,
                controller_manager: ports.allocate()?,
                scheduler: ports.allocate()?,
                kubelet: ports.allocate()?,
                kubelet_healthz: ports.allocate()?,
                kube_proxy_healthz: ports.allocate()?,
                kube_proxy_metrics: ports.allocate()?,
                coredns: ports.allocate()?,
                coredns_ready: ports.allocate()?,
                kwok: ports.allocate()?,
            },
            network: Network::new(host::primary_ipv4()?),
            virtual_nodes: opts.virtual_nodes,
            pause_image: image::PAUSE_IMAGE.into(),
        };
        let keda = match &opts.keda {
            Some(dir) => Some(KedaConfig {
                dir: dir.clone(),
                grpc_port: ports.allocate()?,
                operator_health_port: ports.allocate()?,
                adapter_port: ports.allocate()?,
            }),
            None => None,
        };
        let teardown = Teardown {
            state_dir: config.state_dir.clone(),
            run_dir: config.run_dir.clone(),
            bin_dir: config.bin_dir.clone(),
            bridge: config.network.bridge.clone(),
            containerd_socket: config.containerd_socket(),
            runc: config.runc.clone(),
            before: cleanup::snapshot(),
        };
        write_teardown(&teardown)?;
        let mut cluster = Cluster {
            runtime: Runtime::new(config.logs_dir()),
            config,
            keda,
            teardown,
            timings: StartTimings::default(),
            stopped: false,
            temp,
            _lock: lock,
        };
        let deadline = opts.timeout;
        match tokio::time::timeout(deadline, cluster.bring_up(&opts, t0)).await {
            Ok(Ok(())) => Ok(cluster),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClusterError::Bootstrap(BootstrapError::Timeout {
                what: "cluster start".into(),
                seconds: deadline.as_secs(),
            })),
        }
        // On error `cluster` is dropped here, which stops and cleans up.
    }

    async fn bring_up(&mut self, opts: &ClusterOptions, t0: Instant) -> Result<(), ClusterError> {
        let c = self.config.clone();
        write_pki(&c)?;
        self.runtime.start(components::control_plane(&c)?).await?;
        self.timings.control_plane_ready = t0.elapsed();

        let ctr = c.bin("ctr");
        let pause = image::pause_image_tar(&c.bin_dir, &host::cache_root())?;
        image::import(&ctr, &c.containerd_socket(), &pause)?;
        for tar in &opts.images {
            image::import(&ctr, &c.containerd_socket(), tar)?;
        }

        let client = self.client().await?;
        bootstrap::apply_coredns_rbac(&client).await?;
        bootstrap::apply_host_service(
            &client,
            "kube-system",
            "kube-dns",
            Some(c.network.dns_service_ip),
            c.network.host_ip,
            &[
                HostPort { name: "dns".into(), protocol: "UDP", port: 53, target_port: c.ports.coredns },
                HostPort { name: "dns-tcp".into(), protocol: "TCP", port: 53, target_port: c.ports.coredns },
            ],
        )
        .await?;

        self.runtime.start(components::node(&c)?).await?;
        bootstrap::wait_node_ready(&client, &c.node_name, opts.timeout).await?;
        self.timings.node_ready = t0.elapsed();
        bootstrap::wait_default_service_account(&client, "default", opts.timeout).await?;
        let dns = SocketAddr::from((c.network.host_ip, c.ports.coredns));
        let name = "kubernetes.default.svc.cluster.local";
        let dns_deadline = Instant::now() + Duration::from_secs(30);
        while crate::dns::resolve(dns, name).await != Some(c.network.api_service_ip) {
            if Instant::now() > dns_deadline {
                return Err(ClusterError::Dns { name: name.into(), seconds: 30 });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if c.virtual_nodes > 0 {
            bootstrap::create_kwok_nodes(&client, c.virtual_nodes).await?;
        }
        match self.keda.clone() {
            Some(k) => {
                keda::write_pki(&c)?;
                keda::apply_namespace(&client).await?;
                keda::apply_crds(&client, &k.dir, opts.timeout).await?;
                self.runtime.start(vec![keda::operator(&c, &k), keda::adapter(&c, &k)]).await?;
                keda::register_api_service(&client, &c, &k, Duration::from_secs(60)).await?;
                tracing::info!(elapsed_ms = t0.elapsed().as_millis() as u64, "KEDA is up");
            }
            // A state folder that ran KEDA before: its APIService would name
            // an adapter that is not running.
            None => keda::unregister_api_service(&client).await,
        }
        self.timings.total = t0.elapsed();
        tracing::info!(
            node_ready_ms = self.timings.node_ready.as_millis() as u64,
            total_ms = self.timings.total.as_millis() as u64,
            "cluster is up"
        );
        Ok(())
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// KEDA's ports and build folder when it was started.
    pub fn keda(&self) -> Option<&KedaConfig> {
        self.keda.as_ref()
    }

    pub fn timings(&self) -> StartTimings {
        self.timings
    }

    /// The admin kubeconfig (user `sluice-admin`, group `system:masters`).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.config.admin_kubeconfig()
    }

    /// A client with admin rights.
    pub async fn client(&self) -> Result<kube::Client, ClusterError> {
        Ok(kubeconfig::client(&self.kubeconfig_path()).await?)
    }

    /// The API server's audit log (see [`crate::audit`]).
    pub fn audit_log(&self) -> PathBuf {
        self.config.audit_log()
    }

    pub fn audit_records(&self) -> Result<Vec<crate::audit::AuditRecord>, crate::audit::AuditError> {
        crate::audit::read(&self.audit_log())
    }

    /// The host's primary IPv4: where pods reach servers run on the host.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.config.network.host_ip
    }

    /// The pinned kubectl, for tests that assert its output.
    pub fn kubectl(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(self.config.bin("kubectl"));
        cmd.env("KUBECONFIG", self.kubeconfig_path()).env("KUBECACHEDIR", self.config.state_dir.join("kubectl-cache"));
        cmd
    }

    /// The pinned helm (v4.3.1), with KUBECONFIG set and its cache, config
    /// and data folders in the state folder (never the user's).
    pub fn helm(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(self.config.bin("helm"));
        let home = self.config.state_dir.join("helm");
        cmd.env("KUBECONFIG", self.kubeconfig_path())
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        cmd
    }

    /// Gives a server listening on this host at `port` the cluster DNS name
    /// `<name>.<namespace>.svc.cluster.local`: a selector-less Service and an
    /// EndpointSlice pointing at the host's primary IPv4.
    pub async fn expose_host_service(&self, namespace: &str, name: &str, port: u16) -> Result<(), ClusterError> {
        let client = self.client().await?;
        bootstrap::apply_host_service(&client, namespace, name, None, self.host_ip(), &[HostPort::tcp("tcp", port)])
            .await?;
        Ok(())
    }

    /// Imports a docker-archive tar into the node.
    pub fn import_image(&self, tar: &Path) -> Result<(), ClusterError> {
        image::import(&self.config.bin("ctr"), &self.config.containerd_socket(), tar)?;
        Ok(())
    }

    /// Stops one component (for restart tests).
    pub fn stop_component(&mut self, name: &str) -> Result<Component, ClusterError> {
        Ok(self.runtime.stop(name)?)
    }

    /// Starts a component stopped with [`Cluster::stop_component`] again.
    pub async fn start_component(&mut self, component: Component) -> Result<(), ClusterError> {
        Ok(self.runtime.start(vec![component]).await?)
    }

    /// (name, pid) of every running component.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.runtime.pids()
    }

    /// Stops everything and cleans the host. Also done on drop.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let t0 = Instant::now();
        // Node first, so that no pod is restarted while containers go.
        for name in ["kwok", "coredns", "kube-proxy", "kubelet"] {
            let _ = self.runtime.stop(name);
        }
        cleanup::remove_containers(&self.teardown);
        self.runtime.stop_all();
        cleanup::after_stop(&self.teardown);
        let _ = fs::remove_file(teardown_path(&self.teardown.state_dir));
        let _ = fs::remove_file(HOST_TEARDOWN);
        tracing::info!(elapsed_ms = t0.elapsed().as_millis() as u64, "cluster stopped");
    }

    /// Stops the cluster and keeps its state folder (which a temporary
    /// folder would otherwise take with it), returning its path.
    pub fn stop_keep_state(mut self) -> PathBuf {
        self.stop();
        match self.temp.take() {
            Some(t) => t.keep(),
            None => self.config.state_dir.clone(),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The teardown of the cluster that holds the host lock, kept outside its
/// state folder too (a test's temporary folder may be gone).
const HOST_TEARDOWN: &str = "/run/sluice-dev/teardown.json";

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_str(&fs::read_to_string(path).ok()?).ok()
}

fn teardown_path(state_dir: &Path) -> PathBuf {
    state_dir.join("teardown.json")
}

fn write_teardown(t: &Teardown) -> Result<(), ClusterError> {
    let path = teardown_path(&t.state_dir);
    let json = serde_json::to_string_pretty(t).map_err(|e| io_err(&path)(e.into()))?;
    fs::write(&path, &json).map_err(io_err(&path))?;
    fs::write(HOST_TEARDOWN, json).map_err(io_err(Path::new(HOST_TEARDOWN)))
}

/// What a previous `up` on `state_dir` recorded for `down`.
pub fn read_teardown(state_dir: &Path) -> Option<Teardown> {
    let text = fs::read_to_string(teardown_path(state_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

/// `down` for a cluster whose `up` process is gone: kill what is left of
/// its processes and clean the host.
pub fn teardown_orphaned(state_dir: &Path) -> bool {
    let Some(t) = read_teardown(state_dir) else {
        return false;
    };
    let state = t.state_dir.display().to_string();
    // Our components all have a flag naming a path in the state folder.
    let ours: Vec<i32> = list_pids()
        .into_iter()
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&state))
                .unwrap_or(false)
        })
        .collect();
    cleanup::remove_containers(&t);
    for pid in ours {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    std::thread::sleep(Duration::from_millis(500));
    cleanup::after_stop(&t);
    let _ = fs::remove_file(teardown_path(state_dir));
    if read_json::<Teardown>(Path::new(HOST_TEARDOWN)).is_some_and(|h| h.state_dir == t.state_dir) {
        let _ = fs::remove_file(HOST_TEARDOWN);
    }
    true
}

fn list_pids() -> Vec<i32> {
    let me = std::process::id() as i32;
    fs::read_dir("/proc")
        .map(|rd| rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()).filter(|p| *p != me).collect())
        .unwrap_or_default()
}

/// Certificates and kubeconfigs for every identity.
fn write_pki(c: &ClusterConfig) -> Result<(), ClusterError> {
    let dir = c.pki_dir();
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let kdir = c.admin_kubeconfig().parent().map(Path::to_path_buf);
    if let Some(k) = &kdir {
        fs::create_dir_all(k).map_err(io_err(k))?;
    }
    let write = |name: &str, text: &str| -> Result<(), ClusterError> {
        let p = c.pki(name);
        fs::write(&p, text).map_err(io_err(&p))
    };
    let ca = TinyCa::new("sluice-dev-ca")?;
    write("ca.crt", ca.cert_pem())?;
    write("ca.key", ca.key_pem())?;
    let front = TinyCa::new("sluice-dev-front-proxy-ca")?;
    write("front-proxy-ca.crt", front.cert_pem())?;
    let sa = pki::service_account_key()?;
    write("sa.pub", &sa.cert_pem)?;
    write("sa.key", &sa.key_pem)?;
    let ip = std::net::IpAddr::V4(c.network.host_ip);
    let lo: std::net::IpAddr = Ipv4Addr::LOCALHOST.into();
    let issue = |ca: &TinyCa, name: &str, spec: CertSpec| -> Result<(), ClusterError> {
        let pair = ca.issue(&spec)?;
        write(&format!("{name}.crt"), &pair.cert_pem)?;
        write(&format!("{name}.key"), &pair.key_pem)
    };
    issue(
        &ca,
        "apiserver",
        CertSpec::server(
            "kube-apiserver",
            &[
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                "localhost",
            ],
            &[lo, ip, c.network.api_service_ip.into()],
        ),
    )?;
    issue(&ca, "apiserver-kubelet-client", CertSpec::client("kube-apiserver-kubelet-client", &["system:masters"]))?;
    issue(&front, "front-proxy-client", CertSpec::client("front-proxy-client", &[]))?;
    let mut kubelet_serving = CertSpec::server(c.node_name.clone(), &["localhost"], &[lo, ip]);
    kubelet_serving.dns_names.push(c.node_name.clone());
    issue(&ca, "kubelet-serving", kubelet_serving)?;
    issue(&ca, "controller-manager-serving", CertSpec::server("kube-controller-manager", &["localhost"], &[lo]))?;
    issue(&ca, "scheduler-serving", CertSpec::server("kube-scheduler", &["localhost"], &[lo]))?;
    let node_user = format!("system:node:{}", c.node_name);
    let identities: [(&str, &str, &[&str]); 9] = [
        ("admin", "sluice-admin", &["system:masters"]),
        ("kube-controller-manager", "system:kube-controller-manager", &[]),
        ("kube-scheduler", "system:kube-scheduler", &[]),
        ("kubelet", node_user.as_str(), &["system:nodes"]),
        ("kube-proxy", "system:kube-proxy", &[]),
        ("coredns", "system:coredns", &[]),
        ("kwok", "system:kwok", &["system:masters"]),
        // KEDA, when asked for (crate::keda): host processes like KWOK.
        (crate::keda::OPERATOR, "system:keda-operator", &["system:masters"]),
        (crate::keda::ADAPTER, "system:keda-metrics-adapter", &["system:masters"]),
    ];
    for (file, user, groups) in identities {
        issue(&ca, &format!("{file}-client"), CertSpec::client(user, groups))?;
        let text = kubeconfig::render(
            &c.apiserver_url(),
            &c.pki("ca.crt"),
            &c.pki(&format!("{file}-client.crt")),
            &c.pki(&format!("{file}-client.key")),
        );
        let path = c.kubeconfig(file);
        fs::write(&path, text).map_err(io_err(&path))?;
    }
    Ok(())
}

//! Where the end-to-end suites run: the cluster that `SLUICE_E2E_KUBECONFIG`
//! names (any conformant cluster, with the project's image loaded the way that
//! cluster loads local images), or else a fresh sluice-dev cluster.

use std::path::PathBuf;
use std::process::Command;

use crate::cluster::{Cluster, ClusterError, ClusterOptions};
use crate::kubeconfig;

pub const KUBECONFIG_ENV: &str = "SLUICE_E2E_KUBECONFIG";
/// With `SLUICE_E2E_KUBECONFIG`: the address this machine has as seen from
/// that cluster's pods, where the suites' brokers listen and advertise.
pub const HOST_IP_ENV: &str = "SLUICE_E2E_HOST_IP";

#[derive(Debug)]
pub enum E2eCluster {
    /// Started here; stopped on drop.
    Local(Box<Cluster>),
    /// Someone else's cluster; left as it is.
    External { kubeconfig: PathBuf },
}

impl E2eCluster {
    /// `SLUICE_E2E_KUBECONFIG` if set, else `Cluster::start(opts())` (the
    /// options are made only for a local cluster: they may build images).
    pub async fn connect(opts: impl FnOnce() -> ClusterOptions) -> Result<Self, ClusterError> {
        match std::env::var_os(KUBECONFIG_ENV) {
            Some(path) if !path.is_empty() => Ok(E2eCluster::External { kubeconfig: PathBuf::from(path) }),
            _ => Ok(E2eCluster::Local(Box::new(Cluster::start(opts()).await?))),
        }
    }

    pub fn kubeconfig_path(&self) -> PathBuf {
        match self {
            E2eCluster::Local(c) => c.kubeconfig_path(),
            E2eCluster::External { kubeconfig } => kubeconfig.clone(),
        }
    }

    pub async fn client(&self) -> Result<kube::Client, ClusterError> {
        Ok(kubeconfig::client(&self.kubeconfig_path()).await?)
    }

    /// kubectl with KUBECONFIG set: the pinned build for a local cluster,
    /// the one on PATH for an external one.
    pub fn kubectl(&self) -> Command {
        match self {
            E2eCluster::Local(c) => c.kubectl(),
            E2eCluster::External { kubeconfig } => {
                let mut cmd = Command::new("kubectl");
                cmd.env("KUBECONFIG", kubeconfig);
                cmd
            }
        }
    }

    /// The local cluster, for what only it offers (audit log, host services,
    /// component restarts).
    pub fn local(&self) -> Option<&Cluster> {
        match self {
            E2eCluster::Local(c) => Some(c),
            E2eCluster::External { .. } => None,
        }
    }

    /// The address the cluster's pods reach this machine at: the local
    /// cluster's host address, or `SLUICE_E2E_HOST_IP` for another cluster.
    pub fn host_ip(&self) -> Result<std::net::Ipv4Addr, String> {
        match self {
            E2eCluster::Local(c) => Ok(c.host_ip()),
            E2eCluster::External { kubeconfig } => {
                let raw = std::env::var(HOST_IP_ENV).map_err(|_| {
                    format!(
                        "{KUBECONFIG_ENV}={} is set, so {HOST_IP_ENV} must say which IPv4 address of this machine \
                         that cluster's pods can reach (the suites start their brokers here), e.g. the docker \
                         bridge's gateway for kind: `docker network inspect kind -f '{{{{(index .IPAM.Config 0).Gateway}}}}'`",
                        kubeconfig.display()
                    )
                })?;
                raw.trim().parse().map_err(|e| format!("{HOST_IP_ENV}={raw}: not an IPv4 address: {e}"))
            }
        }
    }

    /// The local cluster's audit log (another cluster's is not ours to read).
    pub fn audit_records(&self) -> Option<Vec<crate::audit::AuditRecord>> {
        self.local().and_then(|c| c.audit_records().ok())
    }

    pub fn local_mut(&mut self) -> Option<&mut Cluster> {
        match self {
            E2eCluster::Local(c) => Some(c),
            E2eCluster::External { .. } => None,
        }
    }
}

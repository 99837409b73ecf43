//! The small configuration every component builder reads: where things live,
//! which ports were allocated, and the cluster's networks.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Ports of every listening component, allocated fresh for each cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports {
    pub etcd_client: u16,
    pub etcd_peer: u16,
    pub apiserver: u16,
    pub controller_manager: u16,
    pub scheduler: u16,
    pub kubelet: u16,
    pub kubelet_healthz: u16,
    pub kube_proxy_healthz: u16,
    pub kube_proxy_metrics: u16,
    pub coredns: u16,
    pub coredns_ready: u16,
    pub kwok: u16,
}

/// The cluster's address plan. One cluster per host at a time: the bridge,
/// the pod range and kube-proxy's iptables chains are host-wide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// The host's primary IPv4: the node address, where the API server and
    /// CoreDNS listen and what pods reach host-run servers through.
    pub host_ip: Ipv4Addr,
    pub pod_cidr: String,
    pub pod_gateway: Ipv4Addr,
    pub bridge: String,
    pub service_cidr: String,
    /// The first Service IP: the in-cluster `kubernetes` Service.
    pub api_service_ip: Ipv4Addr,
    /// The `kube-dns` Service IP, kubelet's clusterDNS.
    pub dns_service_ip: Ipv4Addr,
}

impl Network {
    pub fn new(host_ip: Ipv4Addr) -> Self {
        Network {
            host_ip,
            pod_cidr: "10.244.0.0/16".into(),
            pod_gateway: Ipv4Addr::new(10, 244, 0, 1),
            bridge: "sluice0".into(),
            service_cidr: "10.96.0.0/12".into(),
            api_service_ip: Ipv4Addr::new(10, 96, 0, 1),
            dns_service_ip: Ipv4Addr::new(10, 96, 0, 10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub node_name: String,
    /// Everything of this cluster: data, configuration, certificates, logs.
    pub state_dir: PathBuf,
    /// A short folder for unix sockets whose paths have a length limit
    /// (containerd's shim sockets: 42 characters) and for runc's state.
    pub run_dir: PathBuf,
    /// The binaries built by dev/scripts/build-cluster.sh.
    pub bin_dir: PathBuf,
    /// Data shipped with the binaries (KWOK's stage definitions).
    pub share_dir: PathBuf,
    /// Debian's CNI plugins.
    pub cni_bin_dir: PathBuf,
    pub runc: PathBuf,
    pub ports: Ports,
    pub network: Network,
    pub virtual_nodes: u32,
    /// Image name of the sandbox (pause) container, imported at start.
    pub pause_image: String,
}

impl ClusterConfig {
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
    pub fn pki_dir(&self) -> PathBuf {
        self.state_dir.join("pki")
    }
    pub fn pki(&self, file: &str) -> PathBuf {
        self.pki_dir().join(file)
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.state_dir.join("logs")
    }
    pub fn component_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join(name)
    }
    /// The kubeconfig of one identity (admin, kubelet, kube-proxy, ...).
    pub fn kubeconfig(&self, identity: &str) -> PathBuf {
        self.state_dir.join("kubeconfig").join(format!("{identity}.yaml"))
    }
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.kubeconfig("admin")
    }
    pub fn audit_log(&self) -> PathBuf {
        self.logs_dir().join("audit.log")
    }
    pub fn containerd_socket(&self) -> PathBuf {
        self.component_dir("containerd").join("containerd.sock")
    }
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.component_dir("cni").join("net.d")
    }
    pub fn apiserver_url(&self) -> String {
        format!("https://{}:{}", self.network.host_ip, self.ports.apiserver)
    }
}

/// `/run/sluice-dev/<8 hex digits derived from the state folder>`.
pub fn run_dir_for(state_dir: &Path) -> PathBuf {
    // FNV-1a: stable across runs and Rust versions, unlike DefaultHasher.
    let mut h: u32 = 0x811c_9dc5;
    for b in state_dir.as_os_str().as_encoded_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    PathBuf::from(format!("/run/sluice-dev/{h:08x}"))
}

#[cfg(test)]
pub(crate) fn test_config() -> ClusterConfig {
    ClusterConfig {
        node_name: "sluice-dev".into(),
        state_dir: "/s".into(),
        run_dir: "/run/sluice-dev/0000".into(),
        bin_dir: "/b".into(),
        share_dir: "/share".into(),
        cni_bin_dir: "/usr/lib/cni".into(),
        runc: "/usr/sbin/runc".into(),
        ports: Ports {
            etcd_client: 2001,
            etcd_peer: 2002,
            apiserver: 2003,
            controller_manager: 2004,
            scheduler: 2005,
            kubelet: 2006,
            kubelet_healthz: 2007,
            kube_proxy_healthz: 2008,
            kube_proxy_metrics: 2009,
            coredns: 2010,
            coredns_ready: 2011,
            kwok: 2012,
        },
        network: Network::new(Ipv4Addr::new(192, 0, 2, 2)),
        virtual_nodes: 0,
        pause_image: "localhost/sluice-dev/pause:3.10.2".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dir_is_short_and_stable() {
        let a = run_dir_for(Path::new("/tmp/.tmpAbCdEf/state"));
        assert_eq!(a, run_dir_for(Path::new("/tmp/.tmpAbCdEf/state")));
        assert_ne!(a, run_dir_for(Path::new("/tmp/other")));
        // containerd limits shim socket folders to 42 characters.
        assert!(a.join("s").as_os_str().len() <= 42);
    }
}

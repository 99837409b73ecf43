//! What sluice-dev needs from the host, checked before anything starts, and
//! the host facts it uses (primary address, free ports).

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("sluice-dev must run as root (it starts containerd, kubelet and kube-proxy); run it with sudo")]
    NotRoot,
    #[error(
        "no usable cgroup hierarchy under /sys/fs/cgroup (missing: {missing}); kubelet needs the cpu, memory and pids controllers"
    )]
    Cgroups { missing: String },
    #[error(
        "missing Debian package {package} ({path} not found); install it with: apt-get update && apt-get install -y {package}"
    )]
    MissingPackage { package: &'static str, path: PathBuf },
    #[error(
        "cluster binary {path} not found; build the pinned cluster with: bash dev/scripts/build-cluster.sh (about 18 minutes cold on 2 cores), or point SLUICE_CLUSTER_BIN_DIR at its bin folder"
    )]
    MissingBinary { path: PathBuf },
    #[error("cannot find this host's primary IPv4 address (no default route?): {0}")]
    NoPrimaryAddress(std::io::Error),
    #[error("allocating a free port: {0}")]
    Port(std::io::Error),
}

/// Binaries the cluster runs from the pinned build.
pub const CLUSTER_BINARIES: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "coredns",
    "kwok",
    "helm",
    "pause",
];

/// Files that Debian packages provide, and the package to install.
pub const DEBIAN_FILES: &[(&str, &str)] = &[
    ("/usr/sbin/runc", "runc"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("/usr/lib/cni/host-local", "containernetworking-plugins"),
    ("/usr/lib/cni/portmap", "containernetworking-plugins"),
    ("/usr/lib/cni/loopback", "containernetworking-plugins"),
    ("/usr/sbin/iptables", "iptables"),
    ("/usr/sbin/conntrack", "conntrack"),
];

/// Where build-cluster.sh put the binaries: `$SLUICE_CLUSTER_BIN_DIR` (or
/// `$SLUICE_CLUSTER_BIN`, as dev/scripts/setup.sh exports it), or the
/// last complete build under `${XDG_CACHE_HOME:-~/.cache}/sluice/cluster/current/bin`.
pub fn default_bin_dir() -> PathBuf {
    for var in ["SLUICE_CLUSTER_BIN_DIR", "SLUICE_CLUSTER_BIN"] {
        if let Some(dir) = std::env::var_os(var).filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
    }
    cache_root().join("cluster/current/bin")
}

/// `${XDG_CACHE_HOME:-$HOME/.cache}/sluice`.
pub fn cache_root() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"));
    base.join("sluice")
}

/// Every check that does not need the cluster binaries.
pub fn check_host() -> Result<(), HostError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(HostError::NotRoot);
    }
    check_cgroups(Path::new("/sys/fs/cgroup"))?;
    check_debian_files(DEBIAN_FILES)
}

pub fn check_cgroups(root: &Path) -> Result<(), HostError> {
    if root.join("cgroup.controllers").exists() {
        return Ok(()); // unified (v2) hierarchy
    }
    let missing: Vec<&str> = ["cpu", "memory", "pids"].into_iter().filter(|c| !root.join(c).is_dir()).collect();
    if missing.is_empty() { Ok(()) } else { Err(HostError::Cgroups { missing: missing.join(", ") }) }
}

pub fn check_debian_files(files: &[(&str, &'static str)]) -> Result<(), HostError> {
    for (path, package) in files {
        if !Path::new(path).exists() {
            return Err(HostError::MissingPackage { package, path: PathBuf::from(path) });
        }
    }
    Ok(())
}

pub fn check_binaries(bin_dir: &Path) -> Result<(), HostError> {
    for b in CLUSTER_BINARIES {
        let path = bin_dir.join(b);
        if !path.is_file() {
            return Err(HostError::MissingBinary { path });
        }
    }
    Ok(())
}

/// The address of the interface on the default route. No packet is sent:
/// connecting a UDP socket only picks the route.
pub fn primary_ipv4() -> Result<Ipv4Addr, HostError> {
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(HostError::NoPrimaryAddress)?;
    sock.connect("192.0.2.255:9").or_else(|_| sock.connect("10.255.255.255:9")).map_err(HostError::NoPrimaryAddress)?;
    match sock.local_addr().map_err(HostError::NoPrimaryAddress)? {
        SocketAddr::V4(a) if !a.ip().is_unspecified() => Ok(*a.ip()),
        other => Err(HostError::NoPrimaryAddress(std::io::Error::other(format!("route chose {other}")))),
    }
}

/// Hands out ports that were free when asked and never the same one twice
/// (after envtest's `addr/manager.go`), from [`unused_port`].
#[derive(Debug, Default)]
pub struct PortAllocator {
    given: HashSet<u16>,
}

impl PortAllocator {
    pub fn allocate(&mut self) -> Result<u16, HostError> {
        for _ in 0..100 {
            // Also free for UDP (CoreDNS listens on both).
            let port = unused_port(Protocols::TcpAndUdp).map_err(HostError::Port)?;
            if self.given.insert(port) {
                return Ok(port);
            }
        }
        Err(HostError::Port(std::io::Error::other("no free port after 100 tries")))
    }
}

/// Which protocols a port from [`unused_port`] must be free for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocols {
    Tcp,
    TcpAndUdp,
}

/// Where [`unused_port`] looks: from 15000 up to the kernel's ephemeral
/// range (Linux's default starts at 32768), and below Kubernetes' NodePort
/// range (30000-32767), where kube-proxy's rules would send a connection
/// to a local server on such a port into the cluster.
const RANGE: (u16, u16) = (15_000, 29_999);

/// A port that was free on every address when asked, for a server that binds
/// it a moment later, and never one this process handed out before.
///
/// It is taken from below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`) on purpose. Asking the kernel for port 0
/// gives one from that range, and so does every outgoing connection for its
/// source port: between the moment a port is chosen and the moment the
/// server binds it, any client on the host (the API server dialing etcd, a
/// test's consumer) may take it, and the server then fails with "address
/// already in use". That happened in CI to kube-controller-manager. Ports
/// below the range are only ever taken by listeners that ask for them.
pub fn unused_port(protocols: Protocols) -> std::io::Result<u16> {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let (low, high) = below_ephemeral_range();
    let span = u32::from(high - low) + 1;
    let start = random_u32() % span;
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for i in 0..span {
        let port = low + ((start + i) % span) as u16;
        if given.contains(&port) || TcpListener::bind(("0.0.0.0", port)).is_err() {
            continue;
        }
        if protocols == Protocols::TcpAndUdp && UdpSocket::bind(("0.0.0.0", port)).is_err() {
            continue;
        }
        given.insert(port);
        return Ok(port);
    }
    Err(std::io::Error::other(format!("no free port in {low}-{high} (below the kernel's ephemeral range)")))
}

/// [`RANGE`], cut at the first port of the kernel's ephemeral range when a
/// machine starts that range lower.
fn below_ephemeral_range() -> (u16, u16) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let first = range.as_deref().and_then(|r| r.split_whitespace().next()).and_then(|p| p.parse::<u16>().ok());
    match first {
        Some(first) if first > RANGE.0 + 1000 => (RANGE.0, RANGE.1.min(first - 1)),
        _ => RANGE,
    }
}

/// A random start for the scan, so that processes do not all try the same
/// ports first. std's hasher keys are random per process; no crate needed.
fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unused_ports_are_below_the_ephemeral_range_and_distinct() {
        let (low, high) = below_ephemeral_range();
        assert!(low < high);
        let ports: HashSet<u16> = (0..50).map(|_| unused_port(Protocols::Tcp).unwrap()).collect();
        assert_eq!(ports.len(), 50);
        assert!(ports.iter().all(|p| (low..=high).contains(p)), "{ports:?} not in {low}-{high}");
    }

    #[test]
    fn ports_are_distinct() {
        let mut p = PortAllocator::default();
        let ports: HashSet<u16> = (0..20).map(|_| p.allocate().unwrap()).collect();
        assert_eq!(ports.len(), 20);
    }

    #[test]
    fn missing_package_names_the_install_command() {
        let err = check_debian_files(&[("/nonexistent/runc", "runc")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing Debian package runc (/nonexistent/runc not found); install it with: apt-get update && apt-get install -y runc"
        );
    }

    #[test]
    fn cgroup_v1_needs_controllers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("cpu")).unwrap();
        let err = check_cgroups(dir.path()).unwrap_err();
        assert!(err.to_string().contains("memory, pids"), "{err}");
        std::fs::create_dir(dir.path().join("memory")).unwrap();
        std::fs::create_dir(dir.path().join("pids")).unwrap();
        check_cgroups(dir.path()).unwrap();
    }

    #[test]
    fn missing_binaries_say_how_to_build() {
        let err = check_binaries(Path::new("/nonexistent")).unwrap_err();
        assert!(err.to_string().contains("bash dev/scripts/build-cluster.sh"));
    }
}

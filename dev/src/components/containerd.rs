//! containerd with a private root, state and socket (never the system's), the
//! CNI bridge configuration, and runc from Debian.

use crate::component::{Component, HealthCheck};
use crate::config::ClusterConfig;
use crate::template::{self, TemplateError};

pub const NAME: &str = "containerd";

/// PATH for the node's processes: containerd finds its shim there.
pub fn node_path(c: &ClusterConfig) -> String {
    format!("{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", c.bin_dir.display())
}

pub fn build(c: &ClusterConfig) -> Result<Component, TemplateError> {
    let dir = c.component_dir(NAME);
    let config = dir.join("config.toml");
    let socket = c.containerd_socket();
    let s = |p: std::path::PathBuf| p.display().to_string();
    let rendered = template::CONTAINERD.render(&[
        ("root", &s(dir.join("root"))),
        ("state", &s(c.run_dir.join("containerd"))),
        ("socket", &s(socket.clone())),
        ("debug_socket", &s(c.run_dir.join("containerd-debug.sock"))),
        ("shim_socket_dir", &s(c.run_dir.join("s"))),
        ("sandbox_image", &c.pause_image),
        ("runc", &s(c.runc.clone())),
        ("runc_root", &s(c.run_dir.join("runc"))),
        ("cni_bin_dir", &s(c.cni_bin_dir.clone())),
        ("cni_conf_dir", &s(c.cni_conf_dir())),
    ])?;
    let gateway = c.network.pod_gateway.to_string();
    let conflist = template::CNI_BRIDGE.render(&[
        ("bridge", &c.network.bridge),
        ("ipam_dir", &s(c.component_dir("cni").join("ipam"))),
        ("pod_cidr", &c.network.pod_cidr),
        ("gateway", &gateway),
    ])?;
    let mut comp = Component::new(NAME, c.bin(NAME), dir).flag("config", config.display());
    comp.env = vec![("PATH".into(), node_path(c))];
    comp.files = vec![(config, rendered), (c.cni_conf_dir().join("10-sluice-dev.conflist"), conflist)];
    comp.health = HealthCheck::UnixSocket { path: socket };
    Ok(comp)
}

//! etcd: the API server's store, on loopback only.

use std::time::Duration;

use crate::component::{Component, HealthCheck};
use crate::config::ClusterConfig;

pub const NAME: &str = "etcd";

/// Where etcd keeps its data, inside its component folder.
pub fn data_dir(component_dir: &std::path::Path) -> std::path::PathBuf {
    component_dir.join("data")
}

pub fn build(c: &ClusterConfig) -> Component {
    let client = format!("http://127.0.0.1:{}", c.ports.etcd_client);
    let peer = format!("http://127.0.0.1:{}", c.ports.etcd_peer);
    let dir = c.component_dir(NAME);
    let mut comp = Component::new(NAME, c.bin("etcd"), dir.clone())
        .flag("name", &c.node_name)
        .flag("data-dir", data_dir(&dir).display())
        .flag("listen-client-urls", &client)
        .flag("advertise-client-urls", &client)
        .flag("listen-peer-urls", &peer)
        .flag("initial-advertise-peer-urls", &peer)
        .flag("initial-cluster", format!("{}={peer}", c.node_name))
        .flag("initial-cluster-state", "new")
        // A throwaway development store: durability across power loss is not
        // worth an fsync per write.
        .flag("unsafe-no-fsync", true)
        .flag("log-level", "warn");
    comp.ports = vec![("client", c.ports.etcd_client), ("peer", c.ports.etcd_peer)];
    comp.health = HealthCheck::Http { url: format!("{client}/health") };
    comp.start_timeout = Duration::from_secs(30);
    comp
}

//! KWOK: fake nodes on the same control plane for scale benchmarks. It only
//! manages nodes annotated `kwok.x-k8s.io/node=fake`, never the real one.

use crate::component::{Component, HealthCheck};
use crate::config::ClusterConfig;

pub const NAME: &str = "kwok";
pub const NODE_ANNOTATION: &str = "kwok.x-k8s.io/node";

pub fn build(c: &ClusterConfig) -> Component {
    let mut comp = Component::new(NAME, c.bin(NAME), c.component_dir(NAME))
        .flag("kubeconfig", c.kubeconfig(NAME).display())
        .flag("config", c.share_dir.join("kwok/stages.yaml").display())
        .flag("manage-all-nodes", false)
        .flag("manage-nodes-with-annotation-selector", format!("{NODE_ANNOTATION}=fake"))
        .flag("node-lease-duration-seconds", 40)
        .flag("cidr", "10.128.0.0/12")
        .flag("node-ip", c.network.host_ip)
        .flag("server-address", format!("127.0.0.1:{}", c.ports.kwok));
    comp.waits_for = vec![super::kube_apiserver::NAME];
    comp.ports = vec![("http", c.ports.kwok)];
    comp.health = HealthCheck::Http { url: format!("http://127.0.0.1:{}/healthz", c.ports.kwok) };
    comp
}

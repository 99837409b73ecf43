//! kube-proxy in iptables mode: Services (including the in-cluster
//! `kubernetes` Service) work from pods. `down` runs `kube-proxy --cleanup`.

use crate::component::{Component, HealthCheck};
use crate::config::ClusterConfig;
use crate::template::{self, TemplateError};

pub const NAME: &str = "kube-proxy";

pub fn build(c: &ClusterConfig) -> Result<Component, TemplateError> {
    let dir = c.component_dir(NAME);
    let config = dir.join("config.yaml");
    let rendered = template::KUBE_PROXY.render(&[
        ("kubeconfig", &c.kubeconfig(NAME).display().to_string()),
        ("node_name", &c.node_name),
        ("node_ip", &c.network.host_ip.to_string()),
        ("healthz_port", &c.ports.kube_proxy_healthz.to_string()),
        ("metrics_port", &c.ports.kube_proxy_metrics.to_string()),
        ("pod_cidr", &c.network.pod_cidr),
    ])?;
    let mut comp = Component::new(NAME, c.bin(NAME), dir).flag("config", config.display()).flag("v", 1);
    comp.waits_for = vec![super::kube_apiserver::NAME];
    comp.env = vec![("PATH".into(), super::containerd::node_path(c))];
    comp.ports = vec![("healthz", c.ports.kube_proxy_healthz), ("metrics", c.ports.kube_proxy_metrics)];
    comp.files = vec![(config, rendered)];
    comp.health = HealthCheck::Http { url: format!("http://127.0.0.1:{}/livez", c.ports.kube_proxy_healthz) };
    Ok(comp)
}

/// The arguments that remove kube-proxy's iptables chains.
pub fn cleanup_args() -> Vec<String> {
    vec!["--cleanup".into(), "--proxy-mode=iptables".into()]
}

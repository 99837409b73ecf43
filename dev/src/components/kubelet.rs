//! kubelet: registers the node as `system:node:<name>` with its own client
//! certificate, serves with a certificate the API server verifies, and runs
//! pods through containerd.

use crate::component::{Component, HealthCheck};
use crate::config::ClusterConfig;
use crate::template::{self, TemplateError};

pub const NAME: &str = "kubelet";

pub fn build(c: &ClusterConfig) -> Result<Component, TemplateError> {
    let dir = c.component_dir(NAME);
    let config = dir.join("config.yaml");
    let s = |p: std::path::PathBuf| p.display().to_string();
    let rendered = template::KUBELET.render(&[
        ("node_ip", &c.network.host_ip.to_string()),
        ("port", &c.ports.kubelet.to_string()),
        ("healthz_port", &c.ports.kubelet_healthz.to_string()),
        ("tls_cert", &s(c.pki("kubelet-serving.crt"))),
        ("tls_key", &s(c.pki("kubelet-serving.key"))),
        ("client_ca", &s(c.pki("ca.crt"))),
        ("containerd_socket", &s(c.containerd_socket())),
        ("cluster_dns", &c.network.dns_service_ip.to_string()),
        ("pod_logs_dir", &s(dir.join("pod-logs"))),
    ])?;
    let mut comp = Component::new(NAME, c.bin(NAME), dir.clone())
        .flag("config", config.display())
        .flag("kubeconfig", c.kubeconfig(NAME).display())
        .flag("root-dir", dir.join("root").display())
        .flag("hostname-override", &c.node_name)
        .flag("node-ip", c.network.host_ip)
        .flag("v", 1);
    comp.waits_for = vec![super::containerd::NAME, super::kube_apiserver::NAME];
    comp.env = vec![("PATH".into(), super::containerd::node_path(c))];
    comp.ports = vec![("https", c.ports.kubelet)];
    comp.files = vec![(config, rendered)];
    comp.health = HealthCheck::Http { url: format!("http://127.0.0.1:{}/healthz", c.ports.kubelet_healthz) };
    Ok(comp)
}

//! CoreDNS as a host process bound to the host address, behind the `kube-dns`
//! Service (a selector-less Service plus an EndpointSlice made at bootstrap).

use crate::component::{Component, HealthCheck};
use crate::config::ClusterConfig;
use crate::template::{self, TemplateError};

pub const NAME: &str = "coredns";

pub fn build(c: &ClusterConfig) -> Result<Component, TemplateError> {
    let dir = c.component_dir(NAME);
    let corefile = dir.join("Corefile");
    let rendered = template::COREFILE.render(&[
        ("port", &c.ports.coredns.to_string()),
        ("bind", &c.network.host_ip.to_string()),
        ("ready_port", &c.ports.coredns_ready.to_string()),
        ("kubeconfig", &c.kubeconfig(NAME).display().to_string()),
    ])?;
    let mut comp = Component::new(NAME, c.bin(NAME), dir);
    // CoreDNS takes single-dash flags.
    comp.args = vec!["-conf".into(), corefile.display().to_string()];
    comp.waits_for = vec![super::kube_apiserver::NAME];
    comp.ports = vec![("dns", c.ports.coredns), ("ready", c.ports.coredns_ready)];
    comp.files = vec![(corefile, rendered)];
    comp.health = HealthCheck::Http { url: format!("http://127.0.0.1:{}/ready", c.ports.coredns_ready) };
    Ok(comp)
}

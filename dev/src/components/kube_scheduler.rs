//! kube-scheduler, configured by a KubeSchedulerConfiguration file.

use crate::component::{Component, HealthCheck};
use crate::config::ClusterConfig;
use crate::template::{self, TemplateError};

pub const NAME: &str = "kube-scheduler";

pub fn build(c: &ClusterConfig) -> Result<Component, TemplateError> {
    let dir = c.component_dir(NAME);
    let config = dir.join("config.yaml");
    let kubeconfig = c.kubeconfig(NAME).display().to_string();
    let pki = |f: &str| c.pki(f).display().to_string();
    let mut comp = Component::new(NAME, c.bin(NAME), dir)
        .flag("config", config.display())
        .flag("authentication-kubeconfig", &kubeconfig)
        .flag("authorization-kubeconfig", &kubeconfig)
        .flag("bind-address", "127.0.0.1")
        .flag("secure-port", c.ports.scheduler)
        .flag("tls-cert-file", pki("scheduler-serving.crt"))
        .flag("tls-private-key-file", pki("scheduler-serving.key"))
        .flag("client-ca-file", pki("ca.crt"))
        .flag("v", 1);
    comp.waits_for = vec![super::kube_apiserver::NAME];
    comp.ports = vec![("https", c.ports.scheduler)];
    comp.files = vec![(config, template::KUBE_SCHEDULER.render(&[("kubeconfig", &kubeconfig)])?)];
    comp.health =
        HealthCheck::Https { url: format!("https://127.0.0.1:{}/healthz", c.ports.scheduler), ca: c.pki("ca.crt") };
    Ok(comp)
}

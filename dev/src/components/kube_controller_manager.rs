//! kube-controller-manager: one identity per controller
//! (`--use-service-account-credentials`), the cluster CA for pods' ca.crt and
//! for signing CSRs, and QPS high enough for 1000-pod benchmarks.

use crate::component::{Component, HealthCheck};
use crate::config::ClusterConfig;

pub const NAME: &str = "kube-controller-manager";

pub fn build(c: &ClusterConfig) -> Component {
    let kubeconfig = c.kubeconfig(NAME).display().to_string();
    let pki = |f: &str| c.pki(f).display().to_string();
    let mut comp = Component::new(NAME, c.bin(NAME), c.component_dir(NAME))
        .flag("kubeconfig", &kubeconfig)
        .flag("authentication-kubeconfig", &kubeconfig)
        .flag("authorization-kubeconfig", &kubeconfig)
        .flag("bind-address", "127.0.0.1")
        .flag("secure-port", c.ports.controller_manager)
        .flag("tls-cert-file", pki("controller-manager-serving.crt"))
        .flag("tls-private-key-file", pki("controller-manager-serving.key"))
        .flag("client-ca-file", pki("ca.crt"))
        .flag("root-ca-file", pki("ca.crt"))
        .flag("cluster-signing-cert-file", pki("ca.crt"))
        .flag("cluster-signing-key-file", pki("ca.key"))
        .flag("service-account-private-key-file", pki("sa.key"))
        .flag("use-service-account-credentials", true)
        .flag("leader-elect", false)
        .flag("kube-api-qps", 200)
        .flag("kube-api-burst", 400)
        .flag("concurrent-deployment-syncs", 10)
        .flag("concurrent-replicaset-syncs", 10)
        .flag("v", 1);
    comp.waits_for = vec![super::kube_apiserver::NAME];
    comp.ports = vec![("https", c.ports.controller_manager)];
    comp.health = HealthCheck::Https {
        url: format!("https://127.0.0.1:{}/healthz", c.ports.controller_manager),
        ca: c.pki("ca.crt"),
    };
    comp
}

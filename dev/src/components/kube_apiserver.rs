//! kube-apiserver: real certificates for every client, Node and RBAC
//! authorization, NodeRestriction and PodSecurity admission, and an audit log
//! of every request.

use crate::component::{Component, HealthCheck};
use crate::config::ClusterConfig;
use crate::template::{self, TemplateError};

pub const NAME: &str = "kube-apiserver";

pub fn build(c: &ClusterConfig) -> Result<Component, TemplateError> {
    let dir = c.component_dir(NAME);
    let audit_policy = dir.join("audit-policy.yaml");
    let pki = |f: &str| c.pki(f).display().to_string();
    let mut comp = Component::new(NAME, c.bin(NAME), dir.clone())
        .flag("etcd-servers", format!("http://127.0.0.1:{}", c.ports.etcd_client))
        .flag("bind-address", c.network.host_ip)
        .flag("advertise-address", c.network.host_ip)
        .flag("secure-port", c.ports.apiserver)
        .flag("service-cluster-ip-range", &c.network.service_cidr)
        .flag("tls-cert-file", pki("apiserver.crt"))
        .flag("tls-private-key-file", pki("apiserver.key"))
        .flag("client-ca-file", pki("ca.crt"))
        .flag("kubelet-client-certificate", pki("apiserver-kubelet-client.crt"))
        .flag("kubelet-client-key", pki("apiserver-kubelet-client.key"))
        .flag("kubelet-certificate-authority", pki("ca.crt"))
        .flag("kubelet-preferred-address-types", "InternalIP")
        .flag("service-account-issuer", "https://kubernetes.default.svc.cluster.local")
        .flag("service-account-key-file", pki("sa.pub"))
        .flag("service-account-signing-key-file", pki("sa.key"))
        .flag("authorization-mode", "Node,RBAC")
        .flag("enable-admission-plugins", "NodeRestriction,PodSecurity")
        .flag("allow-privileged", true)
        .flag("audit-policy-file", audit_policy.display())
        .flag("audit-log-path", c.audit_log().display())
        .flag("audit-log-format", "json")
        .flag("audit-log-mode", "batch")
        .flag("audit-log-batch-max-wait", "1s")
        .flag("audit-log-batch-buffer-size", 10000)
        // The aggregation layer, for APIServices such as a metrics adapter.
        .flag("requestheader-client-ca-file", pki("front-proxy-ca.crt"))
        .flag("requestheader-allowed-names", "front-proxy-client")
        .flag("requestheader-extra-headers-prefix", "X-Remote-Extra-")
        .flag("requestheader-group-headers", "X-Remote-Group")
        .flag("requestheader-username-headers", "X-Remote-User")
        .flag("proxy-client-cert-file", pki("front-proxy-client.crt"))
        .flag("proxy-client-key-file", pki("front-proxy-client.key"))
        .flag("enable-aggregator-routing", true)
        // Without it, a client's open watch holds the shutdown until SIGKILL.
        .flag("shutdown-watch-termination-grace-period", "2s")
        // /debug/pprof, for a closer look at where the API server spends its
        // CPU (docs/benchmarks.md, "Operator at scale").
        .flag("profiling", std::env::var_os("SLUICE_DEV_APISERVER_PROFILING").is_some())
        .flag("v", 1);
    comp.waits_for = vec![super::etcd::NAME];
    comp.ports = vec![("https", c.ports.apiserver)];
    comp.files = vec![(audit_policy, template::AUDIT_POLICY.render(&[])?)];
    comp.health = HealthCheck::Https { url: format!("{}/readyz", c.apiserver_url()), ca: c.pki("ca.crt") };
    Ok(comp)
}

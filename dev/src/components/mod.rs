//! The cluster's components, one module each. `up` starts them in two phases:
//! the control plane (and containerd, which needs nothing), then, after the
//! bootstrap objects exist, the node and the add-ons.

pub mod containerd;
pub mod coredns;
pub mod etcd;
pub mod kube_apiserver;
pub mod kube_controller_manager;
pub mod kube_proxy;
pub mod kube_scheduler;
pub mod kubelet;
pub mod kwok;

use crate::component::Component;
use crate::config::ClusterConfig;
use crate::template::TemplateError;

/// etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd.
pub fn control_plane(c: &ClusterConfig) -> Result<Vec<Component>, TemplateError> {
    Ok(vec![
        etcd::build(c),
        containerd::build(c)?,
        kube_apiserver::build(c)?,
        kube_controller_manager::build(c),
        kube_scheduler::build(c)?,
    ])
}

/// kubelet, kube-proxy, CoreDNS, and KWOK when virtual nodes were asked for.
pub fn node(c: &ClusterConfig) -> Result<Vec<Component>, TemplateError> {
    let mut v = vec![kubelet::build(c)?, kube_proxy::build(c)?, coredns::build(c)?];
    if c.virtual_nodes > 0 {
        v.push(kwok::build(c));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::component::HealthCheck;
    use crate::config::test_config;

    fn all(c: &ClusterConfig) -> Vec<Component> {
        let mut v = control_plane(c).unwrap();
        v.extend(node(c).unwrap());
        v
    }

    #[test]
    fn every_dependency_is_started_earlier() {
        let mut c = test_config();
        c.virtual_nodes = 2;
        let comps = all(&c);
        for (i, comp) in comps.iter().enumerate() {
            for dep in &comp.waits_for {
                let pos = comps.iter().position(|x| x.name == *dep);
                assert!(matches!(pos, Some(p) if p < i), "{} waits for {dep}", comp.name);
            }
        }
        assert_eq!(comps.len(), 9);
        assert!(node(&test_config()).unwrap().iter().all(|x| x.name != "kwok"));
    }

    #[test]
    fn apiserver_flags() {
        let c = test_config();
        let a = kube_apiserver::build(&c).unwrap();
        assert_eq!(a.flag_value("authorization-mode"), Some("Node,RBAC"));
        assert_eq!(a.flag_value("enable-admission-plugins"), Some("NodeRestriction,PodSecurity"));
        assert_eq!(a.flag_value("etcd-servers"), Some("http://127.0.0.1:2001"));
        assert_eq!(a.flag_value("advertise-address"), Some("192.0.2.2"));
        assert_eq!(a.flag_value("audit-log-path"), Some("/s/logs/audit.log"));
        assert_eq!(
            a.health,
            HealthCheck::Https { url: "https://192.0.2.2:2003/readyz".into(), ca: "/s/pki/ca.crt".into() }
        );
        assert!(a.files[0].1.contains("level: Metadata"));
    }

    #[test]
    fn controller_manager_gives_pods_the_ca() {
        let cm = kube_controller_manager::build(&test_config());
        assert_eq!(cm.flag_value("root-ca-file"), Some("/s/pki/ca.crt"));
        assert_eq!(cm.flag_value("use-service-account-credentials"), Some("true"));
    }

    #[test]
    fn kubelet_config_is_rendered() {
        let k = kubelet::build(&test_config()).unwrap();
        let (path, text) = &k.files[0];
        assert_eq!(path.to_str(), Some("/s/kubelet/config.yaml"));
        let v: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
        assert_eq!(v["kind"].as_str(), Some("KubeletConfiguration"));
        assert_eq!(v["port"].as_u64(), Some(2006));
        assert_eq!(v["cgroupDriver"].as_str(), Some("cgroupfs"));
        assert_eq!(v["failCgroupV1"].as_bool(), Some(false));
        assert_eq!(v["clusterDNS"][0].as_str(), Some("10.96.0.10"));
        assert_eq!(v["containerRuntimeEndpoint"].as_str(), Some("unix:///s/containerd/containerd.sock"));
        assert_eq!(k.flag_value("hostname-override"), Some("sluice-dev"));
    }

    #[test]
    fn containerd_is_private() {
        let c = test_config();
        let comp = containerd::build(&c).unwrap();
        let toml = &comp.files[0].1;
        assert!(toml.starts_with("# containerd"));
        assert!(toml.contains("version = 4"));
        assert!(toml.contains("root = \"/s/containerd/root\""));
        assert!(toml.contains("state = \"/run/sluice-dev/0000/containerd\""));
        assert!(toml.contains("socket_dir = \"/run/sluice-dev/0000/s\""));
        assert!(toml.contains("restrict_oom_score_adj = true"));
        assert!(toml.contains("SystemdCgroup = false"));
        assert!(toml.contains("sandbox = 'localhost/sluice-dev/pause:3.10.2'"));
        assert!(!toml.contains("/var/lib/containerd"));
        let conflist: serde_json::Value = serde_json::from_str(&comp.files[1].1).unwrap();
        assert_eq!(conflist["plugins"][0]["bridge"], "sluice0");
        assert_eq!(conflist["plugins"][0]["hairpinMode"], true);
        assert_eq!(conflist["plugins"][0]["ipam"]["ranges"][0][0]["subnet"], "10.244.0.0/16");
        assert!(comp.env[0].1.starts_with("/b:"));
    }

    #[test]
    fn kube_proxy_leaves_host_sysctls_alone() {
        let p = kube_proxy::build(&test_config()).unwrap();
        let v: serde_yaml::Value = serde_yaml::from_str(&p.files[0].1).unwrap();
        assert_eq!(v["conntrack"]["maxPerCore"].as_u64(), Some(0));
        assert_eq!(v["mode"].as_str(), Some("iptables"));
        assert_eq!(v["nodePortAddresses"][0].as_str(), Some("192.0.2.2/32"));
        assert_eq!(v["iptables"]["localhostNodePorts"].as_bool(), Some(false));
    }

    #[test]
    fn coredns_serves_cluster_local_on_the_host_address() {
        let d = coredns::build(&test_config()).unwrap();
        assert_eq!(d.args, vec!["-conf", "/s/coredns/Corefile"]);
        let corefile = &d.files[0].1;
        assert!(corefile.contains(".:2010 {"));
        assert!(corefile.contains("bind 192.0.2.2"));
        assert!(corefile.contains("kubernetes cluster.local"));
        assert!(corefile.contains("kubeconfig /s/kubeconfig/coredns.yaml"));
    }

    #[test]
    fn kwok_never_manages_the_real_node() {
        let k = kwok::build(&test_config());
        assert_eq!(k.flag_value("manage-all-nodes"), Some("false"));
        assert_eq!(k.flag_value("manage-nodes-with-annotation-selector"), Some("kwok.x-k8s.io/node=fake"));
        assert_eq!(k.flag_value("config"), Some("/share/kwok/stages.yaml"));
    }

    #[test]
    fn scheduler_config_is_rendered() {
        let s = kube_scheduler::build(&test_config()).unwrap();
        let v: serde_yaml::Value = serde_yaml::from_str(&s.files[0].1).unwrap();
        assert_eq!(v["clientConnection"]["qps"].as_u64(), Some(200));
        assert_eq!(v["leaderElection"]["leaderElect"].as_bool(), Some(false));
    }
}

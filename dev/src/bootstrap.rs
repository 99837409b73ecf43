//! Objects the cluster needs before its node and add-ons start: CoreDNS's RBAC,
//! the `kube-dns` Service, and later the KWOK nodes. Also the helper that gives
//! host-run servers a cluster DNS name.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Node, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::template;

pub const FIELD_MANAGER: &str = "sluice-dev";

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("parsing dev/config/coredns-rbac.yaml: {0}")]
    Parse(#[from] serde_yaml::Error),
    #[error("{what} did not happen within {seconds} s")]
    Timeout { what: String, seconds: u64 },
    #[error("reading {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: kube::Error,
    },
}

/// One port of a host service: (name, protocol, Service port, host port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub name: String,
    pub protocol: &'static str,
    pub port: u16,
    pub target_port: u16,
}

impl HostPort {
    pub fn tcp(name: &str, port: u16) -> Self {
        HostPort { name: name.into(), protocol: "TCP", port, target_port: port }
    }
}

/// The selector-less Service and its EndpointSlice pointing at `ip` (an
/// address of this host), as server-side apply bodies.
pub fn host_service_objects(
    namespace: &str,
    name: &str,
    cluster_ip: Option<Ipv4Addr>,
    ip: Ipv4Addr,
    ports: &[HostPort],
) -> (serde_json::Value, serde_json::Value) {
    let mut spec = json!({
        "type": "ClusterIP",
        "ports": ports.iter().map(|p| json!({
            "name": p.name, "protocol": p.protocol, "port": p.port, "targetPort": p.target_port,
        })).collect::<Vec<_>>(),
    });
    if let Some(ip) = cluster_ip {
        spec["clusterIP"] = json!(ip.to_string());
    }
    let svc = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/managed-by": FIELD_MANAGER}},
        "spec": spec,
    });
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-host"),
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "sluice-dev.sluice.io",
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip.to_string()], "conditions": {"ready": true}}],
        "ports": ports.iter().map(|p| json!({
            "name": p.name, "protocol": p.protocol, "port": p.target_port,
        })).collect::<Vec<_>>(),
    });
    (svc, slice)
}

fn apply_err(kind: &'static str, name: &str) -> impl FnOnce(kube::Error) -> BootstrapError {
    let name = name.to_string();
    move |source| BootstrapError::Apply { kind, name, source }
}

pub async fn apply_host_service(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    cluster_ip: Option<Ipv4Addr>,
    ip: Ipv4Addr,
    ports: &[HostPort],
) -> Result<(), BootstrapError> {
    let (svc, slice) = host_service_objects(namespace, name, cluster_ip, ip, ports);
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    Api::<Service>::namespaced(client.clone(), namespace)
        .patch(name, &pp, &Patch::Apply(&svc))
        .await
        .map_err(apply_err("Service", name))?;
    let slice_name = format!("{name}-host");
    Api::<EndpointSlice>::namespaced(client.clone(), namespace)
        .patch(&slice_name, &pp, &Patch::Apply(&slice))
        .await
        .map_err(apply_err("EndpointSlice", &slice_name))?;
    Ok(())
}

/// CoreDNS's ClusterRole and binding from dev/config/coredns-rbac.yaml.
pub async fn apply_coredns_rbac(client: &kube::Client) -> Result<(), BootstrapError> {
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    for doc in serde_yaml::Deserializer::from_str(template::COREDNS_RBAC.text) {
        let v = serde_json::Value::deserialize_yaml(doc)?;
        let name = v["metadata"]["name"].as_str().unwrap_or_default().to_string();
        match v["kind"].as_str() {
            Some("ClusterRole") => {
                Api::<ClusterRole>::all(client.clone())
                    .patch(&name, &pp, &Patch::Apply(&v))
                    .await
                    .map_err(apply_err("ClusterRole", &name))?;
            }
            Some("ClusterRoleBinding") => {
                Api::<ClusterRoleBinding>::all(client.clone())
                    .patch(&name, &pp, &Patch::Apply(&v))
                    .await
                    .map_err(apply_err("ClusterRoleBinding", &name))?;
            }
            _ => {}
        }
    }
    Ok(())
}

trait DeserializeYaml: Sized {
    fn deserialize_yaml(d: serde_yaml::Deserializer<'_>) -> Result<Self, serde_yaml::Error>;
}

impl DeserializeYaml for serde_json::Value {
    fn deserialize_yaml(d: serde_yaml::Deserializer<'_>) -> Result<Self, serde_yaml::Error> {
        serde::Deserialize::deserialize(d)
    }
}

/// A fake node KWOK manages (annotated, and tainted so that only pods that
/// tolerate it land there).
pub fn kwok_node(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {crate::components::kwok::NODE_ANNOTATION: "fake"},
            "labels": {"type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "kubernetes.io/role": "agent"},
        },
        "spec": {"taints": [{"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}]},
        "status": {"allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                   "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"}},
    })
}

pub async fn create_kwok_nodes(client: &kube::Client, count: u32) -> Result<(), BootstrapError> {
    let api = Api::<Node>::all(client.clone());
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    for i in 0..count {
        let name = format!("kwok-node-{i}");
        api.patch(&name, &pp, &Patch::Apply(kwok_node(&name))).await.map_err(apply_err("Node", &name))?;
    }
    Ok(())
}

/// Waits until `node` reports Ready=True.
pub async fn wait_node_ready(
    client: &kube::Client,
    node: &str,
    timeout: std::time::Duration,
) -> Result<(), BootstrapError> {
    let api = Api::<Node>::all(client.clone());
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(n) =
            api.get_opt(node).await.map_err(|source| BootstrapError::Read { what: format!("node {node}"), source })?
        {
            let ready = n
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if ready {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(BootstrapError::Timeout { what: format!("node {node} Ready"), seconds: timeout.as_secs() });
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Waits for the `default` ServiceAccount of `namespace` (pods cannot be
/// created before it exists).
pub async fn wait_default_service_account(
    client: &kube::Client,
    namespace: &str,
    timeout: std::time::Duration,
) -> Result<(), BootstrapError> {
    let api = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if api.get_opt("default").await.ok().flatten().is_some() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(BootstrapError::Timeout {
                what: format!("ServiceAccount {namespace}/default"),
                seconds: timeout.as_secs(),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_service_is_selectorless_with_a_matching_slice() {
        let (svc, slice) = host_service_objects(
            "kube-system",
            "kube-dns",
            Some(Ipv4Addr::new(10, 96, 0, 10)),
            Ipv4Addr::new(192, 0, 2, 2),
            &[HostPort { name: "dns".into(), protocol: "UDP", port: 53, target_port: 5353 }],
        );
        assert!(svc["spec"].get("selector").is_none());
        assert_eq!(svc["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(svc["spec"]["ports"][0]["port"], 53);
        assert_eq!(slice["metadata"]["labels"]["kubernetes.io/service-name"], "kube-dns");
        assert_eq!(slice["endpoints"][0]["addresses"][0], "192.0.2.2");
        assert_eq!(slice["ports"][0]["port"], 5353);
        assert_eq!(slice["ports"][0]["name"], "dns");
    }

    #[test]
    fn kwok_nodes_are_tainted_and_annotated() {
        let n = kwok_node("kwok-node-0");
        assert_eq!(n["metadata"]["annotations"]["kwok.x-k8s.io/node"], "fake");
        assert_eq!(n["spec"]["taints"][0]["effect"], "NoSchedule");
    }

    #[test]
    fn coredns_rbac_parses() {
        let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(template::COREDNS_RBAC.text)
            .map(|d| serde_json::Value::deserialize_yaml(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1]["subjects"][0]["name"], "system:coredns");
    }
}

//! KEDA (v2.21, built by dev/scripts/build-keda.sh) as an optional part of
//! the cluster: `sluice-dev up --with keda`, or `ClusterOptions::keda`.
//!
//! ```text
//! KEDA CRDs (from the module source) -> namespace keda
//!   -> keda-operator (host process; gRPC metrics service on loopback, mTLS)
//!   -> keda-metrics-adapter (host process; serves external.metrics.k8s.io on the host IP)
//!   -> Service keda-metrics-apiserver + EndpointSlice -> host IP:adapter port
//!   -> APIService v1beta1.external.metrics.k8s.io (caBundle: KEDA's CA) -> Available
//! ```
//!
//! Both run as host processes like CoreDNS and KWOK: there is no registry to
//! pull KEDA's images from. Their certificates come from a CA of their own
//! (one certificate for the operator's gRPC server, the adapter's client side
//! of it and the adapter's serving side, as KEDA's own cert rotation makes
//! it); their client certificates to the API server are in group
//! system:masters, as KWOK's are, so KEDA's RBAC manifests are not needed.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::json;

use crate::bootstrap::{self, FIELD_MANAGER, HostPort};
use crate::component::{Component, HealthCheck};
use crate::config::ClusterConfig;
use crate::pki::{CertSpec, PkiError, TinyCa};

pub const OPERATOR: &str = "keda-operator";
pub const ADAPTER: &str = "keda-metrics-adapter";
pub const NAMESPACE: &str = "keda";
/// The Service the APIService points at (the name KEDA's manifests use).
pub const ADAPTER_SERVICE: &str = "keda-metrics-apiserver";
pub const API_SERVICE: &str = "v1beta1.external.metrics.k8s.io";
/// The pinned version, as dev/scripts/build-keda.sh builds it.
pub const VERSION: &str = "v2.21.0";

#[derive(Debug, thiserror::Error)]
pub enum KedaError {
    #[error(
        "KEDA binary {path} not found; build the pinned KEDA {VERSION} with: bash dev/scripts/build-keda.sh (about 9 minutes cold on 2 cores), or point SLUICE_KEDA_DIR at its build folder (the one holding bin/ and crds/)"
    )]
    MissingBuild { path: PathBuf },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing KEDA's CRD {path}: {source}")]
    Crd {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Bootstrap(#[from] bootstrap::BootstrapError),
    #[error("{what} did not happen within {seconds} s{detail}")]
    Timeout { what: String, seconds: u64, detail: String },
}

/// Where build-keda.sh put KEDA: `$SLUICE_KEDA_DIR`, else the last complete
/// build under `${XDG_CACHE_HOME:-~/.cache}/sluice/keda/current`.
pub fn default_dir() -> PathBuf {
    match std::env::var_os("SLUICE_KEDA_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => crate::host::cache_root().join("keda/current"),
    }
}

/// Fails with the build command when the binaries or CRDs are missing.
pub fn check_build(dir: &Path) -> Result<(), KedaError> {
    for p in [dir.join("bin/keda"), dir.join("bin/keda-adapter"), dir.join("crds/keda.sh_scaledobjects.yaml")] {
        if !p.is_file() {
            return Err(KedaError::MissingBuild { path: p });
        }
    }
    Ok(())
}

/// KEDA's part of the cluster: the build folder and its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KedaConfig {
    /// build-keda.sh's output: bin/keda, bin/keda-adapter, crds/*.yaml.
    pub dir: PathBuf,
    /// The operator's gRPC metrics service (loopback, mTLS).
    pub grpc_port: u16,
    pub operator_health_port: u16,
    /// The adapter's HTTPS port on the host IP (the APIService backend).
    pub adapter_port: u16,
}

impl KedaConfig {
    pub fn cert_dir(c: &ClusterConfig) -> PathBuf {
        c.state_dir.join("keda/certs")
    }
}

fn env(c: &ClusterConfig, identity: &str) -> Vec<(String, String)> {
    vec![
        ("KUBECONFIG".into(), c.kubeconfig(identity).display().to_string()),
        ("WATCH_NAMESPACE".into(), String::new()),
        ("POD_NAMESPACE".into(), NAMESPACE.into()),
        ("KEDA_CLUSTER_OBJECT_NAMESPACE".into(), NAMESPACE.into()),
    ]
}

/// The KEDA operator: ScaledObject controller (makes `keda-hpa-<name>`
/// HPAs), scalers, and the gRPC metrics service the adapter asks.
pub fn operator(c: &ClusterConfig, k: &KedaConfig) -> Component {
    let certs = KedaConfig::cert_dir(c);
    let mut comp = Component::new(OPERATOR, k.dir.join("bin/keda"), c.component_dir(OPERATOR))
        .flag("leader-elect", false)
        .flag("metrics-bind-address", "0")
        .flag("health-probe-bind-address", format!("127.0.0.1:{}", k.operator_health_port))
        .flag("metrics-service-bind-address", format!("127.0.0.1:{}", k.grpc_port))
        .flag("enable-cert-rotation", false)
        .flag("cert-dir", certs.display())
        .flag("ca-dir", certs.display())
        .flag("zap-log-level", "info")
        .flag("zap-encoder", "console");
    comp.env = env(c, OPERATOR);
    comp.waits_for = vec![super::components::kube_apiserver::NAME];
    comp.ports = vec![("grpc", k.grpc_port), ("health", k.operator_health_port)];
    comp.health = HealthCheck::Http { url: format!("http://127.0.0.1:{}/readyz", k.operator_health_port) };
    comp
}

/// The metrics adapter: an aggregated API server for external.metrics.k8s.io
/// that asks the operator's gRPC service for each metric.
pub fn adapter(c: &ClusterConfig, k: &KedaConfig) -> Component {
    let certs = KedaConfig::cert_dir(c);
    let kubeconfig = c.kubeconfig(ADAPTER).display().to_string();
    let mut comp = Component::new(ADAPTER, k.dir.join("bin/keda-adapter"), c.component_dir(ADAPTER))
        .flag("bind-address", c.network.host_ip)
        .flag("secure-port", k.adapter_port)
        .flag("tls-cert-file", certs.join("tls.crt").display())
        .flag("tls-private-key-file", certs.join("tls.key").display())
        .flag("cert-dir", certs.display())
        .flag("metrics-service-address", format!("127.0.0.1:{}", k.grpc_port))
        .flag("authentication-kubeconfig", &kubeconfig)
        .flag("authorization-kubeconfig", &kubeconfig)
        .flag("lister-kubeconfig", &kubeconfig)
        .flag("zap-log-level", "info")
        .flag("zap-encoder", "console");
    comp.env = env(c, ADAPTER);
    comp.waits_for = vec![OPERATOR];
    comp.ports = vec![("https", k.adapter_port)];
    comp.health = HealthCheck::Https {
        url: format!("https://{}:{}/readyz", c.network.host_ip, k.adapter_port),
        ca: certs.join("ca.crt"),
    };
    comp.start_timeout = Duration::from_secs(90);
    comp
}

/// KEDA's CA and the shared certificate (tls.crt/tls.key/ca.crt as KEDA's
/// cert folder expects them). The kubeconfigs of both processes are written
/// with every other identity's (cluster.rs, `write_pki`).
pub fn write_pki(c: &ClusterConfig) -> Result<(), KedaError> {
    let dir = KedaConfig::cert_dir(c);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let write = |path: PathBuf, text: &str| std::fs::write(&path, text).map_err(io_err(&path));
    let ca = TinyCa::new("sluice-dev-keda-ca")?;
    write(dir.join("ca.crt"), ca.cert_pem())?;
    let lo: IpAddr = Ipv4Addr::LOCALHOST.into();
    let svc = |name: &str| format!("{name}.{NAMESPACE}.svc");
    let mut spec = CertSpec::server(
        OPERATOR,
        &[
            "localhost",
            &svc(OPERATOR),
            &format!("{}.cluster.local", svc(OPERATOR)),
            &svc(ADAPTER_SERVICE),
            &format!("{}.cluster.local", svc(ADAPTER_SERVICE)),
        ],
        &[lo, c.network.host_ip.into()],
    );
    spec.client = true;
    let pair = ca.issue(&spec)?;
    write(dir.join("tls.crt"), &pair.cert_pem)?;
    write(dir.join("tls.key"), &pair.key_pem)?;

    Ok(())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KedaError + '_ {
    move |source| KedaError::Io { path: path.to_path_buf(), source }
}

fn apply_err(kind: &'static str, name: &str) -> impl FnOnce(kube::Error) -> KedaError {
    let name = name.to_string();
    move |source| KedaError::Apply { kind, name, source }
}

/// KEDA's CRDs from the build folder, applied, and waited on until Established.
pub async fn apply_crds(client: &kube::Client, dir: &Path, timeout: Duration) -> Result<(), KedaError> {
    let crds_dir = dir.join("crds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&crds_dir)
        .map_err(io_err(&crds_dir))?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let mut names = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let crd: serde_json::Value =
            serde_yaml::from_str(&text).map_err(|source| KedaError::Crd { path: path.clone(), source })?;
        let name = crd["metadata"]["name"].as_str().unwrap_or_default().to_string();
        api.patch(&name, &pp, &Patch::Apply(&crd)).await.map_err(apply_err("CustomResourceDefinition", &name))?;
        names.push(name);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    for name in names {
        loop {
            let crd = api.get(&name).await.map_err(apply_err("CustomResourceDefinition", &name))?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(KedaError::Timeout {
                    what: format!("CRD {name} Established"),
                    seconds: timeout.as_secs(),
                    detail: String::new(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

pub async fn apply_namespace(client: &kube::Client) -> Result<(), KedaError> {
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}});
    Api::<Namespace>::all(client.clone())
        .patch(NAMESPACE, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&ns))
        .await
        .map_err(apply_err("Namespace", NAMESPACE))?;
    Ok(())
}

fn api_service_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apiregistration.k8s.io", "v1", "APIService"),
        "apiservices",
    )
}

/// The APIService that sends external.metrics.k8s.io to the adapter,
/// trusting KEDA's CA.
pub fn api_service(ca_pem: &str) -> serde_json::Value {
    use base64_engine::encode;
    json!({
        "apiVersion": "apiregistration.k8s.io/v1",
        "kind": "APIService",
        "metadata": {"name": API_SERVICE, "labels": {"app.kubernetes.io/managed-by": FIELD_MANAGER}},
        "spec": {
            "service": {"name": ADAPTER_SERVICE, "namespace": NAMESPACE, "port": 443},
            "group": "external.metrics.k8s.io",
            "version": "v1beta1",
            "caBundle": encode(ca_pem.as_bytes()),
            "groupPriorityMinimum": 100,
            "versionPriority": 100,
        },
    })
}

/// The adapter's Service (selector-less, at the host IP) and the APIService;
/// returns when the API server reports the APIService Available.
pub async fn register_api_service(
    client: &kube::Client,
    c: &ClusterConfig,
    k: &KedaConfig,
    timeout: Duration,
) -> Result<(), KedaError> {
    bootstrap::apply_host_service(
        client,
        NAMESPACE,
        ADAPTER_SERVICE,
        None,
        c.network.host_ip,
        &[HostPort { name: "https".into(), protocol: "TCP", port: 443, target_port: k.adapter_port }],
    )
    .await?;
    let ca_path = KedaConfig::cert_dir(c).join("ca.crt");
    let ca = std::fs::read_to_string(&ca_path).map_err(io_err(&ca_path))?;
    let api = Api::<DynamicObject>::all_with(client.clone(), &api_service_resource());
    api.patch(API_SERVICE, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&api_service(&ca)))
        .await
        .map_err(apply_err("APIService", API_SERVICE))?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let obj = api.get(API_SERVICE).await.map_err(apply_err("APIService", API_SERVICE))?;
        let available = obj.data["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Available"))
            .cloned();
        if available.as_ref().is_some_and(|c| c["status"] == "True") {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            let detail = available
                .map(|c| format!(": {} {}", c["reason"].as_str().unwrap_or(""), c["message"].as_str().unwrap_or("")))
                .unwrap_or_default();
            return Err(KedaError::Timeout {
                what: format!("APIService {API_SERVICE} Available"),
                seconds: timeout.as_secs(),
                detail,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Removes the APIService (it would otherwise make discovery of the whole
/// cluster report an unavailable group once the adapter has stopped).
pub async fn unregister_api_service(client: &kube::Client) {
    let api = Api::<DynamicObject>::all_with(client.clone(), &api_service_resource());
    let _ = api.delete(API_SERVICE, &Default::default()).await;
}

/// Standard base64 without a dependency (the caBundle is the only use).
mod base64_engine {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(input: &[u8]) -> String {
        let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
        for chunk in input.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_config;

    fn keda_config() -> KedaConfig {
        KedaConfig { dir: "/k".into(), grpc_port: 3001, operator_health_port: 3002, adapter_port: 3003 }
    }

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64_engine::encode(b""), "");
        assert_eq!(base64_engine::encode(b"f"), "Zg==");
        assert_eq!(base64_engine::encode(b"fo"), "Zm8=");
        assert_eq!(base64_engine::encode(b"foo"), "Zm9v");
        assert_eq!(base64_engine::encode(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn operator_runs_without_cert_rotation_on_loopback() {
        let o = operator(&test_config(), &keda_config());
        assert_eq!(o.command, PathBuf::from("/k/bin/keda"));
        assert_eq!(o.flag_value("enable-cert-rotation"), Some("false"));
        assert_eq!(o.flag_value("metrics-service-bind-address"), Some("127.0.0.1:3001"));
        assert_eq!(o.flag_value("cert-dir"), Some("/s/keda/certs"));
        assert!(o.env.contains(&("KUBECONFIG".into(), "/s/kubeconfig/keda-operator.yaml".into())));
        assert_eq!(o.health, HealthCheck::Http { url: "http://127.0.0.1:3002/readyz".into() });
    }

    #[test]
    fn adapter_serves_on_the_host_address_and_asks_the_operator() {
        let a = adapter(&test_config(), &keda_config());
        assert_eq!(a.waits_for, vec![OPERATOR]);
        assert_eq!(a.flag_value("bind-address"), Some("192.0.2.2"));
        assert_eq!(a.flag_value("secure-port"), Some("3003"));
        assert_eq!(a.flag_value("metrics-service-address"), Some("127.0.0.1:3001"));
        assert_eq!(a.flag_value("authentication-kubeconfig"), Some("/s/kubeconfig/keda-metrics-adapter.yaml"));
    }

    #[test]
    fn api_service_points_at_the_adapter_service() {
        let s = api_service("-----BEGIN CERTIFICATE-----\n");
        assert_eq!(s["metadata"]["name"], API_SERVICE);
        assert_eq!(s["spec"]["service"]["name"], ADAPTER_SERVICE);
        assert_eq!(s["spec"]["service"]["namespace"], NAMESPACE);
        assert_eq!(s["spec"]["caBundle"], "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==");
    }

    #[test]
    fn missing_build_says_how_to_build() {
        let err = check_build(Path::new("/nonexistent")).unwrap_err();
        assert!(err.to_string().contains("bash dev/scripts/build-keda.sh"), "{err}");
    }
}

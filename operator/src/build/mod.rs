//! Desired state: pure functions from a validated StreamProcessor to the
//! objects that run it. No client, no runtime: tested from YAML fixtures.
//!
//! ```text
//! StreamProcessor ──> ConfigMap (the spec as JSON, mounted for the worker)
//!                 ──> ServiceAccount, Role + RoleBinding (Leases, Events)
//!                 ──> Deployment (workers; config hash on the pod template)
//!                 ──> Service (metrics), PodDisruptionBudget
//! ```
//!
//! Each builder sets only the fields the operator means to own under
//! server-side apply, with an owner reference to the StreamProcessor so the
//! garbage collector removes them with it.

mod configmap;
mod deployment;
mod rbac;
mod service;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use sluice_crds::StreamProcessor;

pub use configmap::{CONFIG_FILE, CONFIG_MOUNT, config_hash, configmap};
pub use deployment::{HTTP_PORT, deployment};
pub use rbac::{role, role_binding, service_account};
pub use service::{pdb, service};

/// Settings of the operator that shape what it builds.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Image for workers whose spec names none.
    pub worker_image: String,
    pub image_pull_policy: String,
    /// Seconds a worker gets to drain, flush and commit after SIGTERM.
    pub termination_grace_seconds: i64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            worker_image: format!("sluice:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: "IfNotPresent".into(),
            termination_grace_seconds: 60,
        }
    }
}

/// Labels that select one processor's workers; also the scale subresource's selector.
pub fn selector_labels(sp: &StreamProcessor) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "sluice-worker".to_string()),
        ("app.kubernetes.io/instance".to_string(), sp.name_any()),
    ])
}

/// `key=value,...` form of [`selector_labels`], as `status.selector` wants it.
pub fn selector_string(sp: &StreamProcessor) -> String {
    selector_labels(sp).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn labels(sp: &StreamProcessor) -> BTreeMap<String, String> {
    let mut l = selector_labels(sp);
    l.insert("app.kubernetes.io/component".into(), "worker".into());
    l.insert("app.kubernetes.io/managed-by".into(), "sluice-operator".into());
    l.insert("app.kubernetes.io/part-of".into(), "sluice".into());
    l
}

fn owner_reference(sp: &StreamProcessor) -> OwnerReference {
    sp.controller_owner_ref(&()).unwrap_or_else(|| OwnerReference {
        api_version: StreamProcessor::api_version(&()).into_owned(),
        kind: StreamProcessor::kind(&()).into_owned(),
        name: sp.name_any(),
        uid: sp.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// Metadata of a child object named `name`.
fn meta(sp: &StreamProcessor, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: sp.namespace(),
        labels: Some(labels(sp)),
        owner_references: Some(vec![owner_reference(sp)]),
        ..ObjectMeta::default()
    }
}

/// The ServiceAccount the workers run under.
pub fn service_account_name(sp: &StreamProcessor) -> String {
    sp.spec.pod.as_ref().and_then(|p| p.service_account_name.clone()).unwrap_or_else(|| sp.name_any())
}

/// Name of the worker Lease for singleton tasks.
pub fn lease_name(sp: &StreamProcessor) -> String {
    format!("{}-leader", sp.name_any())
}

#[cfg(test)]
pub(crate) mod fixtures {
    use sluice_crds::{StreamProcessor, validate::parse_manifest};

    /// An example from examples/, as the API server would hand it over.
    pub fn example(file: &str) -> StreamProcessor {
        let path = format!("{}/../examples/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut sp = parse_manifest(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
        sp.metadata.uid = Some("0b7f6b7e-1111-4222-8333-944455556666".into());
        sp.metadata.namespace.get_or_insert_with(|| "default".into());
        sp
    }
}

//! The spec, as the JSON file the worker reads.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use sha2::{Digest, Sha256};
use sluice_crds::StreamProcessor;

use super::meta;

/// Where the worker finds its configuration.
pub const CONFIG_MOUNT: &str = "/etc/sluice";
pub const CONFIG_FILE: &str = "processor.json";

/// The document the worker reads: the StreamProcessor without status and
/// without server-managed metadata, so that only spec changes change it.
/// Without spec.replicas too: the workers do not need it, and an HPA or KEDA
/// writing it through the scale subresource must scale the workers, not
/// roll every one of them (and rebalance the consumer group) on each step.
/// Likewise spec.scaling: only the operator reads it, so tuning the
/// autoscaler must not restart the workers.
fn document(sp: &StreamProcessor) -> String {
    let mut spec = sp.spec.clone();
    spec.replicas = None;
    spec.scaling = None;
    let doc = serde_json::json!({
        "apiVersion": "sluice.io/v1alpha1",
        "kind": "StreamProcessor",
        "metadata": {"name": sp.name_any(), "namespace": sp.namespace().unwrap_or_default()},
        "spec": spec,
    });
    serde_json::to_string_pretty(&doc).expect("a spec always serializes")
}

pub fn configmap(sp: &StreamProcessor) -> ConfigMap {
    ConfigMap {
        metadata: meta(sp, sp.name_any()),
        data: Some(BTreeMap::from([(CONFIG_FILE.to_string(), document(sp))])),
        ..ConfigMap::default()
    }
}

/// Hash of what the workers run with; on the pod template it rolls the
/// workers when the pipeline changes.
pub fn config_hash(sp: &StreamProcessor) -> String {
    let digest = Sha256::digest(document(sp).as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::example;

    #[test]
    fn holds_the_spec_the_worker_validates_again() {
        let sp = example("kafka-orders-by-country.yaml");
        let cm = configmap(&sp);
        let text = &cm.data.as_ref().unwrap()[CONFIG_FILE];
        let again = sluice_crds::validate::parse_manifest(text).expect("worker accepts the mounted document");
        let mut expected = sp.spec.clone();
        expected.replicas = None;
        expected.scaling = None;
        assert_eq!(again.spec, expected);
        assert_eq!(again.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(cm.metadata.owner_references.unwrap()[0].kind, "StreamProcessor");
    }

    #[test]
    fn hash_changes_with_the_spec_only() {
        let sp = example("kafka-orders-by-country.yaml");
        let mut relabelled = sp.clone();
        relabelled.metadata.labels = Some([("team".to_string(), "a".to_string())].into());
        relabelled.metadata.generation = Some(7);
        assert_eq!(config_hash(&sp), config_hash(&relabelled));
        let mut changed = sp.clone();
        changed.spec.pipeline[0].filter = Some("msg.amount > 1".into());
        assert_ne!(config_hash(&sp), config_hash(&changed));
        assert_eq!(config_hash(&sp).len(), 16);
    }

    #[test]
    fn scaling_through_spec_replicas_rolls_no_worker() {
        let mut sp = example("kafka-orders-by-country.yaml");
        sp.spec.replicas = Some(1);
        let mut scaled = sp.clone();
        scaled.spec.replicas = Some(12);
        assert_eq!(config_hash(&sp), config_hash(&scaled));
        assert_eq!(configmap(&sp).data, configmap(&scaled).data);
    }

    #[test]
    fn tuning_the_autoscaler_rolls_no_worker() {
        let sp = example("kafka-orders-by-country.yaml");
        assert!(sp.spec.scaling.is_some(), "the example scales on lag");
        let mut tuned = sp.clone();
        if let Some(s) = tuned.spec.scaling.as_mut() {
            s.min_replicas += 1;
        }
        assert_eq!(config_hash(&sp), config_hash(&tuned));
    }
}

//! KEDA on the local cluster, for the KEDA e2e suite (tests/tests/keda.rs)
//! and the autoscaler benchmark (src/bin/sluice-bench-keda.rs): a cluster
//! with KEDA running, ScaledObjects aimed at StreamProcessors, and who wrote
//! `spec.replicas` according to managedFields.

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use serde_json::{Value, json};
use sluice_crds::StreamProcessor;
use sluice_dev::{Cluster, ClusterOptions};

use crate::e2e::project_image;

/// The local cluster with the project's image loaded and KEDA running (its
/// CRDs, operator, metrics adapter, and the external metrics APIService
/// Available). Panics with the build command when KEDA was not built.
pub async fn start_cluster_with_keda() -> Cluster {
    let opts = ClusterOptions {
        images: vec![project_image()],
        keda: Some(sluice_dev::keda::default_dir()),
        ..ClusterOptions::default()
    };
    Cluster::start(opts).await.unwrap_or_else(|e| {
        panic!(
            "could not start the sluice-dev cluster with KEDA: {e}\n(build the cluster with `bash dev/scripts/build-cluster.sh` and KEDA with `bash dev/scripts/build-keda.sh`; run as root)"
        )
    })
}

pub fn scaled_object_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject"), "scaledobjects")
}

pub fn scaled_objects(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &scaled_object_resource())
}

/// The Kafka trigger's settings.
#[derive(Clone, Debug)]
pub struct KafkaTrigger {
    pub bootstrap: String,
    pub topic: String,
    pub group: String,
    pub lag_threshold: u64,
}

/// A ScaledObject whose scaleTargetRef is the StreamProcessor `target`.
#[derive(Clone, Debug)]
pub struct ScaledObjectSpec {
    pub name: String,
    pub namespace: String,
    pub target: String,
    pub trigger: KafkaTrigger,
    pub min: i32,
    pub max: i32,
    pub polling_seconds: u32,
    /// The HPA behavior KEDA passes on (None: the HPA's defaults).
    pub behavior: Option<Value>,
}

impl ScaledObjectSpec {
    pub fn manifest(&self) -> Value {
        let t = &self.trigger;
        let mut spec = json!({
            "scaleTargetRef": {"apiVersion": "sluice.io/v1alpha1", "kind": "StreamProcessor", "name": self.target},
            "pollingInterval": self.polling_seconds,
            "minReplicaCount": self.min,
            "maxReplicaCount": self.max,
            "triggers": [{
                "type": "kafka",
                "metadata": {
                    "bootstrapServers": t.bootstrap,
                    "consumerGroup": t.group,
                    "topic": t.topic,
                    "lagThreshold": t.lag_threshold.to_string(),
                    "offsetResetPolicy": "earliest",
                },
            }],
        });
        if let Some(b) = &self.behavior {
            spec["advanced"] = json!({"horizontalPodAutoscalerConfig": {"behavior": b}});
        }
        json!({
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": spec,
        })
    }
}

pub async fn apply_scaled_object(client: &Client, so: &ScaledObjectSpec) {
    scaled_objects(client, &so.namespace)
        .patch(&so.name, &PatchParams::apply("sluice-e2e").force(), &Patch::Apply(so.manifest()))
        .await
        .unwrap_or_else(|e| panic!("apply ScaledObject {}/{}: {e}", so.namespace, so.name));
}

/// The ScaledObject's condition `type_`: (status, reason, message).
pub fn scaled_object_condition(so: &DynamicObject, type_: &str) -> Option<(String, String, String)> {
    let c = so.data["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)?;
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    Some((s("status"), s("reason"), s("message")))
}

/// Who manages `spec.replicas` of `sp`: (manager, subresource) per entry.
pub fn replicas_managers(sp: &StreamProcessor) -> Vec<(String, String)> {
    sp.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.fields_v1.as_ref().is_some_and(|f| f.0["f:spec"].get("f:replicas").is_some()))
        .map(|m| (m.manager.clone().unwrap_or_default(), m.subresource.clone().unwrap_or_default()))
        .collect()
}

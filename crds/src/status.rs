//! `StreamProcessor` status: what the operator observed and decided.
//!
//! Conditions follow `metav1.Condition` and are merged by `type` under
//! server-side apply. The operator writes status only when something other
//! than a timestamp changed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Condition types.
pub mod condition {
    /// Workers are running, ready, and processing at the desired scale.
    pub const READY: &str = "Ready";
    /// A rollout or scale change is under way.
    pub const PROGRESSING: &str = "Progressing";
    /// Something needs a person: an invalid spec, a missing Secret, an unreachable broker, stuck partitions.
    pub const DEGRADED: &str = "Degraded";
    /// The autoscaler wants more replicas than maxReplicas or the partition count allows.
    pub const SCALING_LIMITED: &str = "ScalingLimited";
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StreamProcessorStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Source kind and topic/stream, e.g. `kafka:orders`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Worker pods (the scale subresource reads this).
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// What the operator asked the worker Deployment for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Label selector of the worker pods (the scale subresource reads this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<i32>,
    /// Total lag over the partitions that are not stuck.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
    /// Partitions with lag whose committed position has stopped moving.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stuck_partitions: Vec<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// The worker pod holding the `<name>-leader` Lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

impl StreamProcessorStatus {
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

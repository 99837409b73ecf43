//! HorizontalPodAutoscalers that target a StreamProcessor's scale subresource
//! (a plain HPA, or the `keda-hpa-<name>` one a KEDA ScaledObject makes), and
//! what they mean for the operator. Pure functions over the HPAs a reflector
//! caches; the reconcile turns their answers into `Degraded` problems.
//!
//! ```text
//! HPA ──scale subresource──> StreamProcessor.spec.replicas ──operator──> worker Deployment
//!                            (the operator never writes spec.replicas)
//! ```
//!
//! Only one autoscaler may decide the replicas. With `spec.scaling` set the
//! built-in autoscaler decides and `spec.replicas` is ignored, so an HPA that
//! also targets the processor writes a field nobody reads: the operator keeps
//! deciding (it does not fight over the Deployment) and says so, naming the
//! HPA and the ScaledObject behind it. Two HPAs on one processor would flap
//! spec.replicas between them: that is reported too. An HPA that cannot
//! scale (no metrics, no selector yet) is reported with its own words.

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;

use crate::status::Problem;

/// Reason on Degraded and the Event: more than one autoscaler decides.
pub const SCALING_CONFLICT: &str = "ScalingConflict";
/// Reason on Degraded and the Event: the HPA that drives spec.replicas cannot scale.
pub const AUTOSCALER_FAILING: &str = "AutoscalerFailing";

const GROUP: &str = "sluice.io";
const KIND: &str = "StreamProcessor";

/// One HPA targeting a StreamProcessor, as a person would name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalAutoscaler {
    pub namespace: String,
    pub hpa: String,
    /// The KEDA ScaledObject that owns the HPA, if any.
    pub scaled_object: Option<String>,
    /// A condition saying the HPA cannot scale: (type, reason, message).
    pub failing: Option<(String, String, String)>,
}

impl ExternalAutoscaler {
    /// "ScaledObject shop/orders (HPA keda-hpa-orders)" or "HorizontalPodAutoscaler shop/orders".
    pub fn describe(&self) -> String {
        match &self.scaled_object {
            Some(so) => format!("KEDA ScaledObject {}/{so} (HPA {})", self.namespace, self.hpa),
            None => format!("HorizontalPodAutoscaler {}/{}", self.namespace, self.hpa),
        }
    }

    /// The object to delete to hand scaling back to the operator.
    fn delete_hint(&self) -> String {
        match &self.scaled_object {
            Some(so) => format!("delete ScaledObject {so}"),
            None => format!("delete HorizontalPodAutoscaler {}", self.hpa),
        }
    }
}

/// Does `hpa` target the StreamProcessor `namespace/name`? An HPA's target
/// is always in its own namespace; the apiVersion's group must be sluice.io
/// (any version: the API server converts).
pub fn targets(hpa: &HorizontalPodAutoscaler, namespace: &str, name: &str) -> bool {
    let t = &hpa.spec.scale_target_ref;
    let group = t.api_version.as_deref().and_then(|v| v.split_once('/')).map(|(g, _)| g);
    hpa.metadata.namespace.as_deref() == Some(namespace) && t.kind == KIND && t.name == name && group == Some(GROUP)
}

/// The HPAs of `hpas` that target `namespace/name`, sorted by name so that
/// messages do not change with cache order.
pub fn targeting<'a>(
    hpas: impl IntoIterator<Item = &'a HorizontalPodAutoscaler>,
    namespace: &str,
    name: &str,
) -> Vec<ExternalAutoscaler> {
    let mut found: Vec<ExternalAutoscaler> = hpas
        .into_iter()
        .filter(|h| h.metadata.deletion_timestamp.is_none() && targets(h, namespace, name))
        .map(|h| ExternalAutoscaler {
            namespace: namespace.to_string(),
            hpa: h.metadata.name.clone().unwrap_or_default(),
            scaled_object: h
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.kind == "ScaledObject" && o.api_version.starts_with("keda.sh/"))
                .map(|o| o.name.clone()),
            failing: failing_condition(h),
        })
        .collect();
    found.sort_by(|a, b| a.hpa.cmp(&b.hpa));
    found
}

/// AbleToScale or ScalingActive False, except ScalingActive False because
/// the target is at zero replicas (KEDA's scale to zero; KEDA activates it).
fn failing_condition(hpa: &HorizontalPodAutoscaler) -> Option<(String, String, String)> {
    let conditions = hpa.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .filter(|c| c.status == "False")
        .filter(|c| c.type_ == "AbleToScale" || c.type_ == "ScalingActive")
        .find(|c| c.reason.as_deref() != Some("ScalingDisabled"))
        .map(|c| (c.type_.clone(), c.reason.clone().unwrap_or_default(), c.message.clone().unwrap_or_default()))
}

/// The problems the external autoscalers of one processor make, for Degraded.
pub fn problems(builtin_scaling: bool, autoscalers: &[ExternalAutoscaler]) -> Vec<Problem> {
    let mut out = Vec::new();
    if builtin_scaling && !autoscalers.is_empty() {
        let names: Vec<String> = autoscalers.iter().map(ExternalAutoscaler::describe).collect();
        let fixes: Vec<String> = autoscalers.iter().map(ExternalAutoscaler::delete_hint).collect();
        out.push(Problem {
            reason: SCALING_CONFLICT,
            message: format!(
                "spec.scaling is set and {} also targets this StreamProcessor's scale subresource; the built-in autoscaler keeps deciding the replicas and what the other writes to spec.replicas is ignored; remove spec.scaling to let it scale the processor, or {}",
                names.join(" and "),
                fixes.join(" and ")
            ),
        });
    } else if autoscalers.len() > 1 {
        let names: Vec<String> = autoscalers.iter().map(ExternalAutoscaler::describe).collect();
        out.push(Problem {
            reason: SCALING_CONFLICT,
            message: format!(
                "{} autoscalers target this StreamProcessor's scale subresource and would overwrite each other's spec.replicas: {}; keep one",
                autoscalers.len(),
                names.join(", ")
            ),
        });
    }
    // Only the one in charge matters: with spec.scaling its failures change nothing.
    if !builtin_scaling {
        for a in autoscalers {
            if let Some((type_, reason, message)) = &a.failing {
                out.push(Problem {
                    reason: AUTOSCALER_FAILING,
                    message: format!(
                        "{} cannot scale this StreamProcessor ({type_}=False, {reason}): {message}; replicas stay at spec.replicas until it recovers",
                        a.describe()
                    ),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hpa(value: serde_json::Value) -> HorizontalPodAutoscaler {
        serde_json::from_value(value).expect("HPA fixture")
    }

    fn plain(name: &str, target_kind: &str, target: &str, api_version: &str) -> HorizontalPodAutoscaler {
        hpa(serde_json::json!({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"scaleTargetRef": {"apiVersion": api_version, "kind": target_kind, "name": target},
                     "minReplicas": 1, "maxReplicas": 12}
        }))
    }

    fn keda(scaled_object: &str, target: &str) -> HorizontalPodAutoscaler {
        hpa(serde_json::json!({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": format!("keda-hpa-{scaled_object}"), "namespace": "shop",
                         "ownerReferences": [{"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
                                              "name": scaled_object, "uid": "u", "controller": true}]},
            "spec": {"scaleTargetRef": {"apiVersion": "sluice.io/v1alpha1", "kind": "StreamProcessor", "name": target},
                     "maxReplicas": 12},
            "status": {"currentReplicas": 1, "desiredReplicas": 1, "conditions": [
                {"type": "AbleToScale", "status": "True", "reason": "ReadyForNewScale"},
                {"type": "ScalingActive", "status": "False", "reason": "FailedGetExternalMetric",
                 "message": "the HPA was unable to compute the replica count: unable to get external metric"}]}
        }))
    }

    #[test]
    fn only_hpas_on_this_stream_processor_count() {
        let hpas = [
            plain("b", "StreamProcessor", "orders", "sluice.io/v1alpha1"),
            plain("a", "StreamProcessor", "orders", "sluice.io/v1"),
            plain("deploy", "Deployment", "orders", "apps/v1"),
            plain("other-group", "StreamProcessor", "orders", "example.com/v1"),
            plain("other-name", "StreamProcessor", "payments", "sluice.io/v1alpha1"),
        ];
        let found = targeting(&hpas, "shop", "orders");
        assert_eq!(found.iter().map(|a| a.hpa.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(targeting(&hpas, "other-namespace", "orders").is_empty());
    }

    #[test]
    fn a_keda_hpa_is_named_by_its_scaled_object() {
        let found = targeting(&[keda("orders-so", "orders")], "shop", "orders");
        assert_eq!(found[0].scaled_object.as_deref(), Some("orders-so"));
        assert_eq!(found[0].describe(), "KEDA ScaledObject shop/orders-so (HPA keda-hpa-orders-so)");
    }

    #[test]
    fn no_autoscaler_no_problem() {
        assert!(problems(true, &[]).is_empty());
        assert!(problems(false, &[]).is_empty());
    }

    #[test]
    fn one_healthy_hpa_without_spec_scaling_is_the_intended_setup() {
        let found = targeting(&[plain("orders", "StreamProcessor", "orders", "sluice.io/v1alpha1")], "shop", "orders");
        assert!(problems(false, &found).is_empty());
    }

    #[test]
    fn spec_scaling_and_a_scaled_object_conflict_with_the_fix_in_the_message() {
        let found = targeting(&[keda("orders-so", "orders")], "shop", "orders");
        let p = problems(true, &found);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].reason, SCALING_CONFLICT);
        assert!(p[0].message.contains("KEDA ScaledObject shop/orders-so (HPA keda-hpa-orders-so)"), "{}", p[0].message);
        assert!(p[0].message.contains("remove spec.scaling"), "{}", p[0].message);
        assert!(p[0].message.contains("delete ScaledObject orders-so"), "{}", p[0].message);
    }

    #[test]
    fn two_autoscalers_conflict_even_without_spec_scaling() {
        let hpas = [keda("orders-so", "orders"), plain("orders", "StreamProcessor", "orders", "sluice.io/v1alpha1")];
        let p = problems(false, &targeting(&hpas, "shop", "orders"));
        assert_eq!(p[0].reason, SCALING_CONFLICT);
        assert!(p[0].message.starts_with("2 autoscalers target"), "{}", p[0].message);
        assert!(p[0].message.contains("HorizontalPodAutoscaler shop/orders"), "{}", p[0].message);
        // The KEDA HPA's metric failure is reported as well.
        assert_eq!(p[1].reason, AUTOSCALER_FAILING);
    }

    #[test]
    fn an_hpa_without_metrics_is_reported_in_its_own_words() {
        let p = problems(false, &targeting(&[keda("orders-so", "orders")], "shop", "orders"));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].reason, AUTOSCALER_FAILING);
        assert!(p[0].message.contains("ScalingActive=False, FailedGetExternalMetric"), "{}", p[0].message);
        assert!(p[0].message.contains("unable to get external metric"), "{}", p[0].message);
    }

    #[test]
    fn scaled_to_zero_by_keda_is_not_a_failure() {
        let mut h = keda("orders-so", "orders");
        let conditions = h.status.as_mut().and_then(|s| s.conditions.as_mut()).expect("conditions");
        conditions[1].reason = Some("ScalingDisabled".into());
        assert!(problems(false, &targeting(&[h], "shop", "orders")).is_empty());
    }

    #[test]
    fn a_deleted_hpa_no_longer_counts() {
        let mut h = keda("orders-so", "orders");
        h.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert!(targeting(&[h], "shop", "orders").is_empty());
    }
}

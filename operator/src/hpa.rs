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
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};

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

/// KEDA's ScaledObject, watched as a dynamic object: the operator does not
/// depend on KEDA's types, and runs the same where KEDA is not installed.
pub fn scaled_object_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject"), "scaledobjects")
}

/// How long KEDA may take to act on a new ScaledObject (make its HPA, write
/// its status) before the operator says it does not.
pub const KEDA_GRACE_SECONDS: i64 = 30;

/// A KEDA ScaledObject that targets a StreamProcessor, as far as the
/// operator needs to know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScaledObjectView {
    pub namespace: String,
    pub name: String,
    /// Seconds since it was created.
    pub age_seconds: i64,
    /// Its Ready condition, if KEDA wrote one: (status, reason, message).
    pub ready: Option<(String, String, String)>,
    /// The HPA KEDA makes for it (`status.hpaName`, else `keda-hpa-<name>`).
    pub hpa: String,
}

impl ScaledObjectView {
    fn describe(&self) -> String {
        format!("KEDA ScaledObject {}/{}", self.namespace, self.name)
    }
}

/// Does the ScaledObject `so` target the StreamProcessor `namespace/name`?
/// (KEDA's scaleTargetRef defaults to apps/v1 Deployment.)
pub fn scaled_object_target(so: &DynamicObject) -> Option<(String, String)> {
    let t = so.data.get("spec")?.get("scaleTargetRef")?;
    let kind = t.get("kind").and_then(|k| k.as_str()).unwrap_or("Deployment");
    let api_version = t.get("apiVersion").and_then(|v| v.as_str()).unwrap_or("apps/v1");
    let group = api_version.split_once('/').map(|(g, _)| g);
    let name = t.get("name")?.as_str()?;
    (kind == KIND && group == Some(GROUP))
        .then(|| (so.metadata.namespace.clone().unwrap_or_default(), name.to_string()))
}

/// The ScaledObjects of `objects` that target `namespace/name`, sorted by name.
pub fn scaled_objects_targeting<'a>(
    objects: impl IntoIterator<Item = &'a DynamicObject>,
    namespace: &str,
    name: &str,
    now: k8s_openapi::jiff::Timestamp,
) -> Vec<ScaledObjectView> {
    let mut found: Vec<ScaledObjectView> = objects
        .into_iter()
        .filter(|so| so.metadata.deletion_timestamp.is_none())
        .filter(|so| scaled_object_target(so).is_some_and(|(ns, n)| ns == namespace && n == name))
        .map(|so| {
            let so_name = so.metadata.name.clone().unwrap_or_default();
            let status = so.data.get("status");
            let ready = status
                .and_then(|s| s.get("conditions"))
                .and_then(|c| c.as_array())
                .and_then(|c| c.iter().find(|c| c.get("type").and_then(|t| t.as_str()) == Some("Ready")))
                .map(|c| {
                    let field = |f: &str| c.get(f).and_then(|v| v.as_str()).unwrap_or_default().to_string();
                    (field("status"), field("reason"), field("message"))
                });
            let hpa = status
                .and_then(|s| s.get("hpaName"))
                .and_then(|h| h.as_str())
                .filter(|h| !h.is_empty())
                .map_or_else(|| format!("keda-hpa-{so_name}"), str::to_string);
            let age_seconds = so.metadata.creation_timestamp.as_ref().map_or(0, |t| now.as_second() - t.0.as_second());
            ScaledObjectView { namespace: namespace.to_string(), name: so_name, age_seconds, ready, hpa }
        })
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

/// Has KEDA made the HPA of `so`?
fn has_hpa(so: &ScaledObjectView, hpas: &[ExternalAutoscaler]) -> bool {
    hpas.iter().any(|h| h.hpa == so.hpa)
}

/// When to look again at ScaledObjects KEDA has not acted on yet: a second
/// after the youngest one's grace ends (None when none is waiting).
pub fn recheck_after(scaled_objects: &[ScaledObjectView]) -> Option<std::time::Duration> {
    scaled_objects
        .iter()
        .filter(|so| so.ready.is_none() && so.age_seconds < KEDA_GRACE_SECONDS)
        .map(|so| std::time::Duration::from_secs((KEDA_GRACE_SECONDS - so.age_seconds) as u64 + 1))
        .min()
}

/// The autoscalers of a processor: its HPAs, and the ScaledObjects whose
/// HPA KEDA has not made (yet, or at all), which intend to scale it all the
/// same (a conflict with spec.scaling, or with another HPA, either way).
pub fn with_scaled_objects(
    mut hpas: Vec<ExternalAutoscaler>,
    scaled_objects: &[ScaledObjectView],
) -> Vec<ExternalAutoscaler> {
    for so in scaled_objects {
        if has_hpa(so, &hpas) {
            continue;
        }
        hpas.push(ExternalAutoscaler {
            namespace: so.namespace.clone(),
            hpa: so.hpa.clone(),
            scaled_object: Some(so.name.clone()),
            failing: None,
        });
    }
    hpas.sort_by(|a, b| a.hpa.cmp(&b.hpa));
    hpas
}

/// What ScaledObjects without their HPA mean when KEDA is the one meant to
/// scale (no spec.scaling; the conflict otherwise is [`problems`]'s): KEDA
/// is not running (no status after the grace period), or KEDA refuses the
/// ScaledObject (its Ready condition is False, e.g. the processor has no
/// scale selector yet). Those whose HPA exists are judged through the HPA.
pub fn scaled_object_problems(
    builtin_scaling: bool,
    scaled_objects: &[ScaledObjectView],
    hpas: &[ExternalAutoscaler],
) -> Vec<Problem> {
    let mut out = Vec::new();
    if builtin_scaling {
        return out;
    }
    for so in scaled_objects.iter().filter(|so| !has_hpa(so, hpas)) {
        match &so.ready {
            Some((status, reason, message)) if status == "False" => out.push(Problem {
                reason: AUTOSCALER_FAILING,
                message: format!(
                    "{} cannot scale this StreamProcessor (Ready=False, {reason}): {message}; replicas stay at spec.replicas until KEDA accepts it",
                    so.describe()
                ),
            }),
            None if so.age_seconds >= KEDA_GRACE_SECONDS => out.push(Problem {
                reason: AUTOSCALER_FAILING,
                message: format!(
                    "{} targets this StreamProcessor but KEDA has not acted on it in {}s (no status, no HPA {}): KEDA is not installed or not running (check `kubectl get pods -n keda` and the APIService v1beta1.external.metrics.k8s.io); replicas stay at spec.replicas",
                    so.describe(),
                    so.age_seconds,
                    so.hpa
                ),
            }),
            _ => {}
        }
    }
    out
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

    fn scaled_object(
        name: &str,
        target: serde_json::Value,
        age: i64,
        ready: Option<(&str, &str, &str)>,
    ) -> DynamicObject {
        let created = k8s_openapi::jiff::Timestamp::from_second(1_000_000 - age).expect("time");
        let mut v = serde_json::json!({
            "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
            "metadata": {"name": name, "namespace": "shop", "creationTimestamp": created.to_string()},
            "spec": {"scaleTargetRef": target, "triggers": [{"type": "kafka", "metadata": {"lagThreshold": "1000"}}]}
        });
        if let Some((status, reason, message)) = ready {
            v["status"] = serde_json::json!({"conditions": [
                {"type": "Ready", "status": status, "reason": reason, "message": message},
                {"type": "Active", "status": "Unknown"}]});
        }
        serde_json::from_value(v).expect("ScaledObject fixture")
    }

    fn now() -> k8s_openapi::jiff::Timestamp {
        k8s_openapi::jiff::Timestamp::from_second(1_000_000).expect("time")
    }

    fn on_orders() -> serde_json::Value {
        serde_json::json!({"apiVersion": "sluice.io/v1alpha1", "kind": "StreamProcessor", "name": "orders"})
    }

    #[test]
    fn scaled_objects_on_this_stream_processor_count_and_keda_defaults_to_deployments() {
        let objects = [
            scaled_object("b", on_orders(), 5, None),
            scaled_object("a", on_orders(), 5, None),
            scaled_object("deploy", serde_json::json!({"name": "orders"}), 5, None),
            scaled_object(
                "other",
                serde_json::json!({"apiVersion": "sluice.io/v1alpha1", "kind": "StreamProcessor", "name": "payments"}),
                5,
                None,
            ),
        ];
        let found = scaled_objects_targeting(&objects, "shop", "orders", now());
        assert_eq!(found.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(found[0].hpa, "keda-hpa-a");
        assert_eq!(found[0].age_seconds, 5);
        assert!(scaled_objects_targeting(&objects, "elsewhere", "orders", now()).is_empty());
    }

    #[test]
    fn keda_not_running_is_said_after_the_grace_period_and_not_before() {
        let fresh = scaled_objects_targeting(&[scaled_object("so", on_orders(), 10, None)], "shop", "orders", now());
        assert!(scaled_object_problems(false, &fresh, &[]).is_empty(), "KEDA gets time to act");
        let old = scaled_objects_targeting(&[scaled_object("so", on_orders(), 45, None)], "shop", "orders", now());
        let p = scaled_object_problems(false, &old, &[]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].reason, AUTOSCALER_FAILING);
        assert!(
            p[0].message
                .contains("KEDA ScaledObject shop/so targets this StreamProcessor but KEDA has not acted on it in 45s"),
            "{}",
            p[0].message
        );
        assert!(p[0].message.contains("no HPA keda-hpa-so"), "{}", p[0].message);
        assert!(p[0].message.contains("kubectl get pods -n keda"), "{}", p[0].message);
    }

    #[test]
    fn a_scaled_object_keda_refuses_is_reported_in_kedas_words() {
        let so = scaled_object(
            "so",
            on_orders(),
            5,
            Some((
                "False",
                "ScaledObjectCheckFailed",
                "StreamProcessor.sluice.io \"orders\" doesn't expose /scale subresource",
            )),
        );
        let p = scaled_object_problems(false, &scaled_objects_targeting(&[so], "shop", "orders", now()), &[]);
        assert_eq!(p[0].reason, AUTOSCALER_FAILING);
        assert!(
            p[0].message.contains("(Ready=False, ScaledObjectCheckFailed): StreamProcessor.sluice.io"),
            "{}",
            p[0].message
        );
    }

    #[test]
    fn a_scaled_object_with_its_hpa_is_judged_by_the_hpa_and_a_ready_one_is_fine() {
        let so = scaled_object("orders-so", on_orders(), 500, Some(("False", "Broken", "x")));
        let views = scaled_objects_targeting(&[so], "shop", "orders", now());
        let hpas = targeting(&[keda("orders-so", "orders")], "shop", "orders");
        assert!(scaled_object_problems(false, &views, &hpas).is_empty());
        let ok = scaled_object("so", on_orders(), 500, Some(("True", "ScaledObjectReady", "ok")));
        assert!(
            scaled_object_problems(false, &scaled_objects_targeting(&[ok], "shop", "orders", now()), &[]).is_empty()
        );
    }

    #[test]
    fn spec_scaling_and_a_scaled_object_keda_never_acted_on_still_conflict() {
        let views = scaled_objects_targeting(&[scaled_object("so", on_orders(), 1, None)], "shop", "orders", now());
        assert!(scaled_object_problems(true, &views, &[]).is_empty(), "the conflict is problems()'s to say");
        let p = problems(true, &with_scaled_objects(vec![], &views));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].reason, SCALING_CONFLICT);
        assert!(p[0].message.contains("KEDA ScaledObject shop/so (HPA keda-hpa-so)"), "{}", p[0].message);
        assert!(p[0].message.contains("delete ScaledObject so"), "{}", p[0].message);
        // Once KEDA made the HPA, it is one autoscaler, not two.
        let hpas = targeting(&[keda("so", "orders")], "shop", "orders");
        assert_eq!(with_scaled_objects(hpas, &views).len(), 1);
    }

    #[test]
    fn a_deleted_hpa_no_longer_counts() {
        let mut h = keda("orders-so", "orders");
        h.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert!(targeting(&[h], "shop", "orders").is_empty());
    }
}

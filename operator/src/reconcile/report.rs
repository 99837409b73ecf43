//! Report what happened: status (only when it changed), Events (on
//! transitions, never every loop) and metrics.

use k8s_openapi::{
    api::{apps::v1::Deployment, coordination::v1::Lease, core::v1::ObjectReference},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    core::error_boundary::InvalidObject,
    runtime::events::{Event, EventType},
};
use sluice_crds::{StreamProcessor, StreamProcessorStatus, condition};
use tracing::warn;

use super::{Context, MANAGER, scale::Replicas};
use crate::{
    autoscale::Policy,
    build,
    status::{self, Observed, Problem, Workers},
};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("patching the status of {namespace}/{name}: {source}")]
    Status { namespace: String, name: String, source: kube::Error },
    #[error("reading Lease {namespace}/{name}: {source}")]
    Lease { namespace: String, name: String, source: kube::Error },
}

fn workers(d: &Deployment) -> Workers {
    let s = d.status.clone().unwrap_or_default();
    Workers {
        replicas: s.replicas.unwrap_or(0),
        ready: s.ready_replicas.unwrap_or(0),
        updated: s.updated_replicas.unwrap_or(0),
        observed_current: s.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0),
    }
}

fn source_column(sp: &StreamProcessor) -> String {
    let s = &sp.spec.source;
    match (&s.kafka, &s.nats, &s.redis) {
        (Some(k), _, _) => format!("kafka:{}", k.topic),
        (_, Some(n), _) => format!("nats:{}", n.stream),
        (_, _, Some(r)) => format!("redis:{}", r.stream),
        _ => s.kind().to_string(),
    }
}

pub async fn report(
    ctx: &Context,
    sp: &StreamProcessor,
    live: Option<&Deployment>,
    spec_problem: Option<Problem>,
    runtime_problems: &[Problem],
    current: i32,
    replicas: Option<&Replicas>,
) -> Result<(), ReportError> {
    let (ns, name) = (sp.namespace().unwrap_or_default(), sp.name_any());
    let old = sp.status.as_ref();
    let now = Time(Timestamp::now());
    let decision = replicas.and_then(|r| r.decision.as_ref());
    let desired = replicas.map(|r| r.desired).unwrap_or(current);

    let observed = Observed {
        generation: sp.metadata.generation,
        spec_problem: spec_problem.clone(),
        runtime_problems: runtime_problems.to_vec(),
        workers: live.map(workers),
        desired,
        decision,
    };
    let conditions = status::conditions(old.map(|s| s.conditions.as_slice()).unwrap_or(&[]), &observed, &now);

    // Only a ready worker can hold the Lease; and between polls the last
    // answer stands, so a steady state costs no reads either.
    let ready_now = live.and_then(|d| d.status.as_ref()).and_then(|s| s.ready_replicas).unwrap_or(0);
    let polled = decision.is_some() && replicas.is_some_and(|r| r.polled);
    let ask = ready_now > 0
        && (polled
            || old.and_then(|o| o.leader.as_ref()).is_none()
            || old.is_some_and(|o| o.ready_replicas != ready_now));
    let leader = match live {
        Some(_) if !ask => old.and_then(|o| o.leader.clone()).filter(|_| ready_now > 0),
        Some(_) => {
            let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ns);
            let lease_name = build::lease_name(sp);
            leases
                .get_opt(&lease_name)
                .await
                .map_err(|source| ReportError::Lease { namespace: ns.clone(), name: lease_name, source })?
                .and_then(|l| l.spec.and_then(|s| s.holder_identity))
                .filter(|h| !h.is_empty())
        }
        None => None,
    };

    let changed_from = replicas.and_then(|r| r.changed_from);
    let new = StreamProcessorStatus {
        observed_generation: sp.metadata.generation,
        conditions,
        source: Some(source_column(sp)),
        replicas: live.and_then(|d| d.status.as_ref()).and_then(|s| s.replicas).unwrap_or(0),
        ready_replicas: live.and_then(|d| d.status.as_ref()).and_then(|s| s.ready_replicas).unwrap_or(0),
        desired_replicas: Some(desired),
        selector: Some(build::selector_string(sp)),
        partitions: decision.map(|d| d.partitions).or_else(|| old.and_then(|o| o.partitions)),
        lag: decision.map(|d| d.lag).or_else(|| old.and_then(|o| o.lag)),
        stuck_partitions: decision.map(|d| d.stuck.clone()).unwrap_or_default(),
        last_scale_time: if changed_from.is_some() {
            Some(now.clone())
        } else {
            old.and_then(|o| o.last_scale_time.clone())
        },
        leader,
    };

    ctx.remember(&ns, &name);
    ctx.metrics.desired_replicas.with_label_values(&[&ns, &name]).set(i64::from(desired));
    if let Some(d) = decision {
        ctx.metrics.lag.with_label_values(&[&ns, &name]).set(d.lag);
        ctx.metrics.stuck_partitions.with_label_values(&[&ns, &name]).set(d.stuck.len() as i64);
    }

    // Events: a scale change, a new problem, a recovery.
    let reference = sp.object_ref(&());
    if let Some(from) = changed_from {
        let note = match (decision, &sp.spec.scaling) {
            (Some(d), Some(s)) => d.explain(from, &Policy::from(s)),
            _ => format!("scaled {from} -> {desired}: spec.replicas"),
        };
        let direction = if desired > from { "up" } else { "down" };
        ctx.metrics.scale_events.with_label_values(&[&ns, &name, direction]).inc();
        // The Recorder folds Events with the same reason and action into one
        // series that keeps the first note; every transition gets its own.
        let action = format!("Scale{from}To{desired}");
        publish(ctx, &reference, EventType::Normal, "Scaled", &action, note).await;
    }
    let was = old.and_then(|o| o.condition(condition::DEGRADED));
    let now_degraded = new.condition(condition::DEGRADED);
    if let Some(d) = now_degraded {
        let transition = was.is_none_or(|w| w.status != d.status || w.reason != d.reason || w.message != d.message);
        if transition && d.status == "True" {
            publish(ctx, &reference, EventType::Warning, &d.reason, "Reconcile", d.message.clone()).await;
        } else if transition && was.is_some_and(|w| w.status == "True") {
            publish(ctx, &reference, EventType::Normal, "Recovered", "Reconcile", "no problems found".into()).await;
        }
    }

    if status::changed(old, &new) {
        patch_status(ctx, &ns, &name, serde_json::json!({ "status": new })).await?;
    }
    Ok(())
}

async fn patch_status(ctx: &Context, ns: &str, name: &str, body: serde_json::Value) -> Result<(), ReportError> {
    let api: Api<StreamProcessor> = Api::namespaced(ctx.client.clone(), ns);
    let mut doc = serde_json::json!({"apiVersion": "sluice.io/v1alpha1", "kind": "StreamProcessor"});
    if let (Some(doc), Some(body)) = (doc.as_object_mut(), body.as_object()) {
        doc.extend(body.clone());
    }
    api.patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&doc))
        .await
        .map_err(|source| ReportError::Status { namespace: ns.into(), name: name.into(), source })?;
    Ok(())
}

async fn publish(
    ctx: &Context,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
    // An Event that cannot be recorded is logged, not retried: it must never block the reconcile.
    if let Err(e) = ctx.recorder.publish(&event, reference).await {
        warn!(reason, "could not record an Event: {e}");
    }
}

/// A StreamProcessor the operator cannot read (the API server accepted what
/// these types reject): say so on it, and leave it alone until it changes.
pub async fn undeserializable(ctx: &Context, invalid: &InvalidObject) -> Result<(), ReportError> {
    let meta = &invalid.metadata;
    let (ns, name) = (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default());
    let reference = ObjectReference {
        api_version: Some(StreamProcessor::api_version(&()).into_owned()),
        kind: Some(StreamProcessor::kind(&()).into_owned()),
        name: Some(name.clone()),
        namespace: Some(ns.clone()),
        uid: meta.uid.clone(),
        ..ObjectReference::default()
    };
    let message = format!("the operator cannot read this StreamProcessor: {}; fix the spec", invalid.error);
    warn!(namespace = %ns, name = %name, "{message}");
    publish(ctx, &reference, EventType::Warning, "InvalidSpec", "Reconcile", message.clone()).await;
    let problem = Problem { reason: "InvalidSpec", message };
    let observed = Observed { generation: meta.generation, spec_problem: Some(problem), ..Observed::default() };
    let conditions = status::conditions(&[], &observed, &Time(Timestamp::now()));
    patch_status(
        ctx,
        &ns,
        &name,
        serde_json::json!({"status": {"observedGeneration": meta.generation, "conditions": conditions}}),
    )
    .await
}

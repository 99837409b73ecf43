//! Decide the worker replicas: from `spec.replicas` (and so the scale
//! subresource, for `kubectl scale`, an HPA or KEDA), or from the broker's
//! lag under `spec.scaling`, probing at most once per pollInterval.

use std::time::Duration;

use kube::ResourceExt;
use sluice_crds::StreamProcessor;
use tokio::time::timeout;
use tracing::debug;

use super::Context;
use crate::{
    autoscale::{self, Decision, Policy},
    probe::{ProbeError, ResolvedSecrets},
    status::Problem,
};

/// How long one probe may take before it counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(8);
/// Resync period without autoscaling.
const RESYNC: Duration = Duration::from_secs(300);

/// The result of the latest probe, kept between polls.
#[derive(Clone, Debug)]
pub enum Outcome {
    Decided(Decision),
    Failed(Problem),
}

/// What the reconcile does with replicas this time.
pub struct Replicas {
    pub desired: i32,
    pub decision: Option<Decision>,
    pub problems: Vec<Problem>,
    /// Set when this reconcile changed the replica count.
    pub changed_from: Option<i32>,
    /// The broker was asked this time (not a cached answer).
    pub polled: bool,
    pub requeue: Duration,
}

pub async fn decide(
    ctx: &Context,
    sp: &StreamProcessor,
    secrets: &ResolvedSecrets,
    current: i32,
    exists: bool,
) -> Replicas {
    let Some(scaling) = &sp.spec.scaling else {
        let desired = sp.spec.replicas.unwrap_or(1);
        return Replicas {
            desired,
            decision: None,
            problems: vec![],
            changed_from: (exists && desired != current).then_some(current),
            polled: false,
            requeue: RESYNC,
        };
    };
    let policy = Policy::from(scaling);
    let poll_ms = scaling.poll_interval.as_millis().max(1000);
    let key = (sp.namespace().unwrap_or_default(), sp.name_any());
    let now = ctx.now_ms();
    // Before the first Deployment exists, start at minReplicas.
    let current = if exists { current } else { policy.min_replicas };

    let due = {
        let map = ctx.scale.lock().expect("scale state lock");
        map.get(&key).and_then(|s| s.last_probe_ms).is_none_or(|t| now.saturating_sub(t) + 50 >= poll_ms)
    };
    let outcome = if due {
        let result = match timeout(PROBE_TIMEOUT, ctx.probe.probe(sp, secrets)).await {
            Ok(r) => r,
            Err(_) => Err(ProbeError::Failed {
                reason: "BrokerUnreachable",
                message: format!("the broker did not answer within {}s", PROBE_TIMEOUT.as_secs()),
            }),
        };
        let mut map = ctx.scale.lock().expect("scale state lock");
        let state = map.entry(key.clone()).or_default();
        state.last_probe_ms = Some(now);
        let outcome = match result {
            Ok(partitions) => {
                Outcome::Decided(autoscale::decide(&mut state.memory, &policy, &partitions, current, now))
            }
            Err(ProbeError::NotProbeable(_)) => {
                Outcome::Decided(autoscale::decide(&mut state.memory, &policy, &[], current, now))
            }
            Err(ProbeError::Failed { reason, message }) => Outcome::Failed(Problem {
                reason,
                message: format!("lag probe failed: {message}; holding {current} replicas"),
            }),
        };
        state.last = Some(outcome.clone());
        outcome
    } else {
        let map = ctx.scale.lock().expect("scale state lock");
        match map.get(&key).and_then(|s| s.last.clone()) {
            Some(o) => o,
            None => Outcome::Failed(Problem { reason: "BrokerUnreachable", message: "not probed yet".into() }),
        }
    };
    debug!(namespace = %key.0, name = %key.1, due, ?outcome, "scale outcome");

    let (desired, decision, problems) = match outcome {
        Outcome::Decided(d) => {
            let mut problems = vec![];
            if !d.stuck.is_empty() {
                problems.push(Problem {
                    reason: "PartitionsStuck",
                    message: format!(
                        "partitions {:?} have lag but their committed offset has not moved for {} polls; left out of the lag sum (look for a poison message or a stalled consumer)",
                        d.stuck, policy.stuck_after
                    ),
                });
            }
            (d.desired, Some(d), problems)
        }
        Outcome::Failed(p) => (current, None, vec![p]),
    };
    let elapsed = ctx.now_ms().saturating_sub(now);
    Replicas {
        desired,
        decision,
        problems,
        changed_from: (exists && desired != current).then_some(current),
        polled: due,
        requeue: Duration::from_millis(poll_ms.saturating_sub(elapsed).max(500)),
    }
}

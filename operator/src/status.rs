//! Status: conditions a person can act on, computed as a pure function of
//! what the reconcile observed, and written only when something other than a
//! timestamp changed.
//!
//! | type           | True when                               | reasons |
//! |----------------|-----------------------------------------|---------|
//! | Ready          | every desired worker is ready           | Running, ScaledToZero / InvalidSpec, SecretMissing, WorkersNotReady, Pending |
//! | Progressing    | a rollout or scale change is under way  | RollingOut / Stable |
//! | Degraded       | something needs a person                | InvalidSpec, SecretMissing, BrokerUnreachable, PartitionsStuck, ScalingConflict, AutoscalerFailing / AsExpected |
//! | ScalingLimited | the lag asks for more than a cap allows | MaxReplicas, PartitionCount, PartitionsWithLag / WithinLimits |

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use sluice_crds::{StreamProcessorStatus, condition};

use crate::autoscale::{Cap, Decision};

/// A problem that stops or degrades the processor, for Degraded (and Ready).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// CamelCase, also the Event reason.
    pub reason: &'static str,
    pub message: String,
}

/// What the worker Deployment reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workers {
    pub replicas: i32,
    pub ready: i32,
    pub updated: i32,
    /// The Deployment controller has seen the latest Deployment spec.
    pub observed_current: bool,
}

/// Everything a status is computed from.
#[derive(Clone, Debug, Default)]
pub struct Observed<'a> {
    pub generation: Option<i64>,
    /// A spec problem: nothing is applied until it is fixed.
    pub spec_problem: Option<Problem>,
    /// A runtime problem (broker unreachable, stuck partitions, scaler conflict).
    pub runtime_problems: Vec<Problem>,
    pub workers: Option<Workers>,
    pub desired: i32,
    pub decision: Option<&'a Decision>,
}

fn cond(type_: &str, ok: bool, reason: &str, message: String, generation: Option<i64>, now: &Time) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// The four conditions for `observed`. A condition whose status did not
/// change keeps its lastTransitionTime from `old`.
pub fn conditions(old: &[Condition], observed: &Observed<'_>, now: &Time) -> Vec<Condition> {
    let g = observed.generation;
    let desired = observed.desired;
    let workers = observed.workers.clone();

    let ready = match (&observed.spec_problem, &workers) {
        (Some(p), _) => cond(condition::READY, false, p.reason, p.message.clone(), g, now),
        (None, None) => {
            cond(condition::READY, false, "Pending", "the worker Deployment does not exist yet".into(), g, now)
        }
        (None, Some(_)) if desired == 0 => {
            cond(condition::READY, true, "ScaledToZero", "no lag: scaled to zero workers".into(), g, now)
        }
        (None, Some(w)) if w.ready >= desired && w.updated >= desired && w.observed_current => {
            cond(condition::READY, true, "Running", format!("{}/{desired} workers ready", w.ready), g, now)
        }
        (None, Some(w)) => cond(
            condition::READY,
            false,
            "WorkersNotReady",
            format!("{}/{desired} workers ready; see `kubectl get pods -l app.kubernetes.io/instance=<name>`", w.ready),
            g,
            now,
        ),
    };

    let progressing = match &workers {
        Some(w)
            if observed.spec_problem.is_none()
                && (!w.observed_current || w.updated < desired || w.replicas != desired || w.ready < desired) =>
        {
            cond(
                condition::PROGRESSING,
                true,
                "RollingOut",
                format!("{} of {desired} workers updated, {} running, {} ready", w.updated, w.replicas, w.ready),
                g,
                now,
            )
        }
        _ => cond(condition::PROGRESSING, false, "Stable", "no rollout or scale change under way".into(), g, now),
    };

    let problems: Vec<&Problem> = observed.spec_problem.iter().chain(observed.runtime_problems.iter()).collect();
    let degraded = match problems.as_slice() {
        [] => cond(condition::DEGRADED, false, "AsExpected", "no problems found".into(), g, now),
        [first, rest @ ..] => {
            let mut message = first.message.clone();
            for p in rest {
                message.push_str(&format!("; {}", p.message));
            }
            cond(condition::DEGRADED, true, first.reason, message, g, now)
        }
    };

    let limited = match observed.decision.and_then(|d| d.capped_by.map(|c| (d, c))) {
        Some((d, cap)) => {
            let (reason, what) = match cap {
                Cap::MaxReplicas(m) => ("MaxReplicas", format!("maxReplicas {m}")),
                Cap::Partitions(p) => ("PartitionCount", format!("the partition count {p}")),
                Cap::PartitionsWithLag(p) => ("PartitionsWithLag", format!("{p} partition(s) with lag")),
            };
            cond(
                condition::SCALING_LIMITED,
                true,
                reason,
                format!("lag {} asks for more workers than {what} allows; running {}", d.lag, d.desired),
                g,
                now,
            )
        }
        None => {
            cond(condition::SCALING_LIMITED, false, "WithinLimits", "replicas are within every limit".into(), g, now)
        }
    };

    [ready, progressing, degraded, limited]
        .into_iter()
        .map(|mut c| {
            if let Some(prev) = old.iter().find(|o| o.type_ == c.type_)
                && prev.status == c.status
            {
                c.last_transition_time = prev.last_transition_time.clone();
            }
            c
        })
        .collect()
}

/// True when `new` differs from `old` in anything but condition timestamps:
/// the operator skips the status patch otherwise.
pub fn changed(old: Option<&StreamProcessorStatus>, new: &StreamProcessorStatus) -> bool {
    let strip = |s: &StreamProcessorStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(Default::default());
        }
        s.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
        s
    };
    match old {
        None => true,
        Some(old) => strip(old) != strip(new),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn find<'a>(cs: &'a [Condition], type_: &str) -> &'a Condition {
        cs.iter().find(|c| c.type_ == type_).unwrap()
    }

    fn running(n: i32) -> Option<Workers> {
        Some(Workers { replicas: n, ready: n, updated: n, observed_current: true })
    }

    #[test]
    fn all_ready_is_ready_and_stable() {
        let o = Observed { generation: Some(3), workers: running(4), desired: 4, ..Observed::default() };
        let cs = conditions(&[], &o, &t(100));
        let r = find(&cs, "Ready");
        assert_eq!(
            (r.status.as_str(), r.reason.as_str(), r.message.as_str()),
            ("True", "Running", "4/4 workers ready")
        );
        assert_eq!(r.observed_generation, Some(3));
        assert_eq!(find(&cs, "Progressing").status, "False");
        assert_eq!(find(&cs, "Degraded").reason, "AsExpected");
        assert_eq!(find(&cs, "ScalingLimited").status, "False");
    }

    #[test]
    fn a_scale_up_in_flight_is_progressing_not_ready() {
        let o = Observed {
            workers: Some(Workers { replicas: 6, ready: 2, updated: 6, observed_current: true }),
            desired: 6,
            ..Observed::default()
        };
        let cs = conditions(&[], &o, &t(0));
        assert_eq!(find(&cs, "Ready").reason, "WorkersNotReady");
        assert!(find(&cs, "Ready").message.starts_with("2/6 workers ready"));
        assert_eq!(find(&cs, "Progressing").status, "True");
    }

    #[test]
    fn a_spec_problem_is_degraded_and_not_ready_with_the_same_words() {
        let o = Observed {
            spec_problem: Some(Problem {
                reason: "InvalidSpec",
                message: "spec.pipeline[2].filter: invalid CEL expression".into(),
            }),
            workers: running(1),
            desired: 1,
            ..Observed::default()
        };
        let cs = conditions(&[], &o, &t(0));
        for type_ in ["Ready", "Degraded"] {
            let c = find(&cs, type_);
            assert_eq!(c.reason, "InvalidSpec");
            assert!(c.message.contains("spec.pipeline[2].filter"));
        }
        assert_eq!(find(&cs, "Degraded").status, "True");
        assert_eq!(find(&cs, "Progressing").status, "False", "nothing rolls while the spec is invalid");
    }

    #[test]
    fn runtime_problems_are_all_named() {
        let o = Observed {
            runtime_problems: vec![
                Problem { reason: "BrokerUnreachable", message: "kafka k:9092: connection refused".into() },
                Problem { reason: "PartitionsStuck", message: "partitions [3] stuck".into() },
            ],
            workers: running(2),
            desired: 2,
            ..Observed::default()
        };
        let cs = conditions(&[], &o, &t(0));
        let d = find(&cs, "Degraded");
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("True", "BrokerUnreachable"));
        assert_eq!(d.message, "kafka k:9092: connection refused; partitions [3] stuck");
        assert_eq!(find(&cs, "Ready").status, "True", "workers still run while the probe fails");
    }

    #[test]
    fn scaling_limited_names_the_cap() {
        let decision = Decision {
            desired: 12,
            recommendation: 12,
            lag: 20_000,
            partitions: 12,
            stuck: vec![],
            capped_by: Some(Cap::Partitions(12)),
            held_by_stabilization: false,
        };
        let o = Observed { workers: running(12), desired: 12, decision: Some(&decision), ..Observed::default() };
        let c = conditions(&[], &o, &t(0)).into_iter().find(|c| c.type_ == "ScalingLimited").unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "PartitionCount"));
        assert_eq!(c.message, "lag 20000 asks for more workers than the partition count 12 allows; running 12");
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let o = Observed { workers: running(1), desired: 1, ..Observed::default() };
        let first = conditions(&[], &o, &t(100));
        let second = conditions(&first, &o, &t(200));
        assert_eq!(find(&second, "Ready").last_transition_time, t(100));
        let broken = Observed { workers: Some(Workers { ready: 0, ..running(1).unwrap() }), ..o.clone() };
        let third = conditions(&second, &broken, &t(300));
        assert_eq!(find(&third, "Ready").last_transition_time, t(300));
        assert_eq!(find(&third, "Degraded").last_transition_time, t(100));
    }

    #[test]
    fn no_patch_when_only_timestamps_differ() {
        let o = Observed { workers: running(1), desired: 1, ..Observed::default() };
        let a = StreamProcessorStatus { conditions: conditions(&[], &o, &t(1)), replicas: 1, ..Default::default() };
        let mut b = a.clone();
        for c in &mut b.conditions {
            c.last_transition_time = t(999);
        }
        assert!(!changed(Some(&a), &b));
        b.ready_replicas = 1;
        assert!(changed(Some(&a), &b));
        assert!(changed(None, &a));
    }
}

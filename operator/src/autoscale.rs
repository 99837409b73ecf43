//! The autoscaling policy: a pure function from what the broker reports to a
//! replica count, with the memory it needs between polls.
//!
//! ```text
//! per-partition lag ──> leave out stuck partitions ──> ceil(lag / lagPerReplica)
//!   ──> cap: maxReplicas, partitions, partitions that have lag ──> floor: minReplicas
//!   ──> round up to a divisor of the partition count (never above the cap)
//!   ──> scale to zero / activation ──> stabilization (up at once, down to the
//!       highest recommendation seen within scaleDownStabilization)
//! ```
//!
//! Two defaults differ from KEDA's Kafka scaler on purpose: replicas never
//! exceed the partitions that have lag (keda#5880: `limitToPartitionsWithLag`
//! is opt-in there), and a partition whose committed offset stands still while
//! it has lag is left out of the sum (keda#5906), so one poison partition
//! cannot drive the Deployment to its maximum. Both are reported instead.

use std::collections::{BTreeMap, VecDeque};

use sluice_crds::Scaling;

/// The knobs of `spec.scaling`, with time in milliseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub lag_per_replica: i64,
    pub stabilization_ms: u64,
    pub scale_to_zero: bool,
    pub activation_lag: i64,
    pub stuck_after: u32,
}

impl From<&Scaling> for Policy {
    fn from(s: &Scaling) -> Self {
        Self {
            min_replicas: s.min_replicas.max(1),
            max_replicas: s.max_replicas.max(1),
            lag_per_replica: s.lag_per_replica.max(1),
            stabilization_ms: s.scale_down_stabilization.as_millis(),
            scale_to_zero: s.scale_to_zero,
            activation_lag: s.activation_lag.max(0),
            stuck_after: u32::try_from(s.stuck_after.max(1)).unwrap_or(1),
        }
    }
}

/// One partition as the lag probe saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    pub partition: i32,
    /// The group's committed position; None when it never committed.
    pub committed: Option<i64>,
    pub lag: i64,
}

/// What limited the replica count below what the lag asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    MaxReplicas(i32),
    Partitions(i32),
    PartitionsWithLag(i32),
}

/// The result of one poll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Replicas to run now.
    pub desired: i32,
    /// This poll's recommendation, before stabilization.
    pub recommendation: i32,
    /// Lag over the partitions that are not stuck.
    pub lag: i64,
    pub partitions: i32,
    /// Partitions left out of the lag sum, ascending.
    pub stuck: Vec<i32>,
    /// Set when the lag asked for more replicas than a cap allowed.
    pub capped_by: Option<Cap>,
    /// Set when a scale-down is being held back by the stabilization window.
    pub held_by_stabilization: bool,
}

/// What the policy remembers between polls of one StreamProcessor.
#[derive(Clone, Debug, Default)]
pub struct ScaleMemory {
    /// (time, recommendation) within the stabilization window.
    history: VecDeque<(u64, i32)>,
    /// partition -> (committed offset at the last poll, polls it has not moved with lag).
    committed: BTreeMap<i32, (Option<i64>, u32)>,
    /// When total lag last became zero.
    idle_since: Option<u64>,
}

/// Decide the replica count for this poll. `current` is what the worker
/// Deployment runs now; `now_ms` is a monotonic clock in milliseconds.
pub fn decide(
    mem: &mut ScaleMemory,
    policy: &Policy,
    partitions: &[PartitionLag],
    current: i32,
    now_ms: u64,
) -> Decision {
    let n = i32::try_from(partitions.len()).unwrap_or(i32::MAX);

    // Stuck partitions: lag, a committed position, and no movement for
    // `stuck_after` polls while a consumer runs. At zero replicas nothing
    // consumes, so nothing can be called stuck.
    let mut stuck = Vec::new();
    let mut seen = BTreeMap::new();
    for p in partitions {
        let polls_still = match mem.committed.get(&p.partition) {
            Some((prev, polls)) if *prev == p.committed && p.lag > 0 && p.committed.is_some() && current > 0 => {
                polls + 1
            }
            _ => 0,
        };
        if polls_still >= policy.stuck_after {
            stuck.push(p.partition);
        }
        seen.insert(p.partition, (p.committed, polls_still));
    }
    mem.committed = seen;

    let counted = partitions.iter().filter(|p| !stuck.contains(&p.partition));
    let lag: i64 = counted.clone().map(|p| p.lag.max(0)).sum();
    let with_lag = i32::try_from(counted.filter(|p| p.lag > 0).count()).unwrap_or(i32::MAX);
    let total_lag: i64 = partitions.iter().map(|p| p.lag.max(0)).sum();

    let raw = i32::try_from((lag + policy.lag_per_replica - 1) / policy.lag_per_replica).unwrap_or(i32::MAX);
    let caps = [
        Cap::MaxReplicas(policy.max_replicas),
        Cap::Partitions(if n > 0 { n } else { i32::MAX }),
        Cap::PartitionsWithLag(with_lag.max(1)),
    ];
    let cap_value = |c: &Cap| match *c {
        Cap::MaxReplicas(v) | Cap::Partitions(v) | Cap::PartitionsWithLag(v) => v,
    };
    // The binding cap; on a tie the partition count explains it best.
    let binding =
        caps.iter().copied().min_by_key(|c| (cap_value(c), matches!(c, Cap::MaxReplicas(_)))).unwrap_or(caps[0]);
    let cap = cap_value(&binding);
    let capped_by = (raw > cap).then_some(binding);

    let mut recommendation = raw.min(cap).max(policy.min_replicas);
    // Spread partitions evenly: the smallest divisor of the partition count at
    // or above the recommendation, but never above the cap.
    if n > 0
        && recommendation <= cap
        && let Some(d) = (recommendation..=cap.min(n)).find(|d| *d > 0 && n % d == 0)
    {
        recommendation = d;
    }

    if policy.scale_to_zero {
        if total_lag == 0 {
            let since = *mem.idle_since.get_or_insert(now_ms);
            if now_ms.saturating_sub(since) >= policy.stabilization_ms {
                recommendation = 0;
            }
        } else {
            mem.idle_since = None;
        }
        if current == 0 && total_lag <= policy.activation_lag {
            recommendation = 0;
        }
    }

    // Stabilization. After an operator restart there is no history: count the
    // current replicas as a recent recommendation so a restart never scales down early.
    if mem.history.is_empty() {
        mem.history.push_back((now_ms, current));
    }
    mem.history.push_back((now_ms, recommendation));
    while let Some(&(t, _)) = mem.history.front() {
        if now_ms.saturating_sub(t) > policy.stabilization_ms {
            mem.history.pop_front();
        } else {
            break;
        }
    }
    let (desired, held) = if recommendation >= current {
        (recommendation, false)
    } else {
        let highest = mem.history.iter().map(|&(_, r)| r).max().unwrap_or(recommendation);
        let desired = highest.min(current).max(recommendation);
        (desired, desired > recommendation)
    };

    Decision { desired, recommendation, lag, partitions: n, stuck, capped_by, held_by_stabilization: held }
}

impl Decision {
    /// The Event message for a change from `from` replicas, with the numbers,
    /// e.g. `scaled 2 -> 6: lag 5800 over 1000/replica, capped by 12 partitions`.
    pub fn explain(&self, from: i32, policy: &Policy) -> String {
        let mut s =
            format!("scaled {from} -> {}: lag {} over {}/replica", self.desired, self.lag, policy.lag_per_replica);
        match self.capped_by {
            Some(Cap::Partitions(p)) => s.push_str(&format!(", capped by {p} partitions")),
            Some(Cap::MaxReplicas(m)) => s.push_str(&format!(", capped by maxReplicas {m}")),
            Some(Cap::PartitionsWithLag(p)) => s.push_str(&format!(", capped by {p} partitions with lag")),
            None => {}
        }
        if self.desired == 0 {
            s.push_str(", idle for scaleDownStabilization: scaled to zero");
        } else if self.recommendation == policy.min_replicas && self.desired == policy.min_replicas && self.lag == 0 {
            s.push_str(&format!(", at minReplicas {}", policy.min_replicas));
        }
        if self.held_by_stabilization {
            s.push_str(&format!(", held above {} by scaleDownStabilization", self.recommendation));
        }
        if !self.stuck.is_empty() {
            s.push_str(&format!(", stuck partitions left out: {:?}", self.stuck));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MIN: u64 = 60_000;

    fn policy() -> Policy {
        Policy {
            min_replicas: 1,
            max_replicas: 12,
            lag_per_replica: 1000,
            stabilization_ms: 5 * MIN,
            scale_to_zero: false,
            activation_lag: 0,
            stuck_after: 3,
        }
    }

    /// `n` partitions sharing `total` lag evenly, each with a committed offset `c`.
    fn even(n: i32, total: i64, c: i64) -> Vec<PartitionLag> {
        (0..n)
            .map(|p| PartitionLag {
                partition: p,
                committed: Some(c),
                lag: total / i64::from(n) + i64::from(p < (total % i64::from(n)) as i32),
            })
            .collect()
    }

    fn once(policy: &Policy, parts: &[PartitionLag], current: i32) -> Decision {
        decide(&mut ScaleMemory::default(), policy, parts, current, 0)
    }

    #[test]
    fn lag_over_lag_per_replica_rounded_up_to_a_divisor_of_the_partitions() {
        let p = policy();
        let d = once(&p, &even(12, 5800, 0), 2);
        assert_eq!((d.recommendation, d.desired, d.lag, d.capped_by), (6, 6, 5800, None));
        assert_eq!(d.explain(2, &p), "scaled 2 -> 6: lag 5800 over 1000/replica");
        assert_eq!(once(&p, &even(12, 4200, 0), 1).desired, 6, "5 rounds up to 6 for 12 partitions");
        assert_eq!(once(&p, &even(12, 6500, 0), 1).desired, 12, "7 rounds up to 12");
        assert_eq!(once(&p, &even(10, 2500, 0), 1).desired, 5, "3 rounds up to 5 for 10 partitions");
        assert_eq!(once(&p, &even(7, 2500, 0), 1).desired, 7, "a prime partition count rounds to itself");
    }

    #[test]
    fn capped_by_the_partition_count() {
        let p = policy();
        let d = once(&p, &even(12, 20_000, 0), 1);
        assert_eq!((d.desired, d.capped_by), (12, Some(Cap::Partitions(12))));
        assert_eq!(d.explain(1, &p), "scaled 1 -> 12: lag 20000 over 1000/replica, capped by 12 partitions");
        let d = once(&p, &even(4, 20_000, 0), 1);
        assert_eq!((d.desired, d.capped_by), (4, Some(Cap::Partitions(4))));
    }

    #[test]
    fn capped_by_max_replicas() {
        let p = Policy { max_replicas: 4, ..policy() };
        let d = once(&p, &even(12, 20_000, 0), 1);
        assert_eq!((d.desired, d.capped_by), (4, Some(Cap::MaxReplicas(4))));
        let p = Policy { max_replicas: 5, ..policy() };
        let d = once(&p, &even(12, 20_000, 0), 1);
        assert_eq!(d.desired, 5, "no divisor of 12 between 5 and the cap 5: stay at 5");
    }

    #[test]
    fn never_more_replicas_than_partitions_with_lag() {
        let p = policy();
        // One hot partition with a huge backlog, eleven idle ones.
        let mut parts = even(12, 0, 0);
        parts[3].lag = 50_000;
        let d = once(&p, &parts, 1);
        assert_eq!((d.desired, d.capped_by), (1, Some(Cap::PartitionsWithLag(1))));
        // Eight partitions with lag; 7 needed; no divisor of 12 in 7..=8, so 7.
        let mut parts = even(12, 0, 0);
        for part in parts.iter_mut().take(8) {
            part.lag = 875;
        }
        let d = once(&p, &parts, 1);
        assert_eq!((d.desired, d.capped_by), (7, None));
    }

    #[test]
    fn min_replicas_is_a_floor() {
        let p = Policy { min_replicas: 2, ..policy() };
        assert_eq!(once(&p, &even(12, 0, 0), 2).desired, 2);
        let p = Policy { min_replicas: 5, ..policy() };
        assert_eq!(once(&p, &even(12, 0, 0), 1).desired, 5, "the floor holds even without lag");
    }

    #[test]
    fn no_partitions_known_means_no_partition_cap() {
        let p = policy();
        assert_eq!(once(&p, &[], 3).desired, 3, "no data: scale-down waits for stabilization");
        assert_eq!(once(&p, &[], 0).desired, 1);
    }

    #[test]
    fn a_stuck_partition_leaves_the_lag_sum_and_is_reported() {
        let p = policy();
        let mut mem = ScaleMemory::default();
        // Partition 0 is stuck at offset 100 with 10_000 lag; 1 and 2 progress.
        let poll = |i: i64| {
            vec![
                PartitionLag { partition: 0, committed: Some(100), lag: 10_000 },
                PartitionLag { partition: 1, committed: Some(100 + i * 50), lag: 500 },
                PartitionLag { partition: 2, committed: Some(100 + i * 50), lag: 500 },
            ]
        };
        for i in 0..3 {
            let d = decide(&mut mem, &p, &poll(i), 3, i as u64 * 10_000);
            assert!(d.stuck.is_empty(), "poll {i}: not stuck yet");
            assert_eq!(d.lag, 11_000);
        }
        let d = decide(&mut mem, &p, &poll(3), 3, 30_000);
        assert_eq!(d.stuck, vec![0]);
        assert_eq!(d.lag, 1000);
        assert_eq!(d.recommendation, 1);
        assert!(d.explain(3, &p).contains("stuck partitions left out: [0]"), "{}", d.explain(3, &p));
        // It moves again: it counts again.
        let mut moved = poll(4);
        moved[0].committed = Some(101);
        let d = decide(&mut mem, &p, &moved, 3, 40_000);
        assert!(d.stuck.is_empty());
        assert_eq!(d.lag, 11_000);
    }

    #[test]
    fn nothing_is_stuck_at_zero_replicas_or_without_a_commit() {
        let p = Policy { scale_to_zero: true, ..policy() };
        let mut mem = ScaleMemory::default();
        for i in 0..5 {
            let d = decide(&mut mem, &p, &[PartitionLag { partition: 0, committed: Some(5), lag: 10 }], 0, i * 1000);
            assert!(d.stuck.is_empty());
        }
        let mut mem = ScaleMemory::default();
        for i in 0..5 {
            let d = decide(&mut mem, &p, &[PartitionLag { partition: 0, committed: None, lag: 10 }], 1, i * 1000);
            assert!(d.stuck.is_empty());
        }
    }

    #[test]
    fn scale_up_at_once_and_down_only_after_stabilization() {
        let p = policy();
        let mut mem = ScaleMemory::default();
        assert_eq!(decide(&mut mem, &p, &even(12, 12_000, 0), 1, 0).desired, 12);
        // Lag drains: the recommendation falls, replicas hold for 5 minutes.
        let d = decide(&mut mem, &p, &even(12, 0, 0), 12, MIN);
        assert_eq!((d.recommendation, d.desired, d.held_by_stabilization), (1, 12, true));
        assert!(d.explain(12, &p).contains("held above 1 by scaleDownStabilization"));
        assert_eq!(decide(&mut mem, &p, &even(12, 3000, 0), 12, 2 * MIN).desired, 12);
        // 5 minutes after the 12-recommendation it leaves the window; the
        // highest left is the 3-lag poll's 3 -> 3 rounds to 3 (divides 12).
        assert_eq!(decide(&mut mem, &p, &even(12, 0, 0), 12, 5 * MIN + 1).desired, 3);
        assert_eq!(decide(&mut mem, &p, &even(12, 0, 0), 3, 7 * MIN + 1).desired, 1);
    }

    #[test]
    fn an_operator_restart_does_not_scale_down_early() {
        let p = policy();
        let mut fresh = ScaleMemory::default();
        let d = decide(&mut fresh, &p, &even(12, 0, 0), 6, 1_000_000);
        assert_eq!(d.desired, 6);
        assert_eq!(decide(&mut fresh, &p, &even(12, 0, 0), 6, 1_000_000 + 5 * MIN + 1).desired, 1);
    }

    #[test]
    fn scale_to_zero_after_idle_and_back_on_activation_lag() {
        let p = Policy { scale_to_zero: true, activation_lag: 10, ..policy() };
        let mut mem = ScaleMemory::default();
        assert_eq!(decide(&mut mem, &p, &even(4, 0, 0), 1, 0).desired, 1);
        assert_eq!(decide(&mut mem, &p, &even(4, 0, 0), 1, 4 * MIN).desired, 1);
        let d = decide(&mut mem, &p, &even(4, 0, 0), 1, 10 * MIN + 1);
        assert_eq!(d.desired, 0);
        assert!(d.explain(1, &p).contains("scaled to zero"));
        // Lag at or under the activation threshold does not wake it.
        assert_eq!(decide(&mut mem, &p, &even(4, 10, 0), 0, 11 * MIN).desired, 0);
        // Above it: straight back up, at once.
        assert_eq!(decide(&mut mem, &p, &even(4, 11, 0), 0, 12 * MIN).desired, 1);
        assert_eq!(decide(&mut mem, &p, &even(4, 4000, 0), 1, 12 * MIN + 1).desired, 4);
    }

    #[test]
    fn without_scale_to_zero_never_zero() {
        let p = policy();
        let mut mem = ScaleMemory::default();
        for i in 0..20 {
            assert_eq!(decide(&mut mem, &p, &even(4, 0, 0), 1, i * MIN).desired, 1);
        }
    }

    proptest! {
        #[test]
        fn invariants_hold_for_any_poll_sequence(
            n in 0i32..32,
            min in 1i32..6,
            extra in 0i32..20,
            lpr in 1i64..5000,
            polls in prop::collection::vec((0i64..100_000, 0u64..200_000), 1..20),
        ) {
            let p = Policy { min_replicas: min, max_replicas: min + extra, lag_per_replica: lpr, ..policy() };
            let mut mem = ScaleMemory::default();
            let mut current = 1;
            let mut now = 0;
            for (lag, dt) in polls {
                now += dt;
                let parts = if n == 0 { vec![] } else { even(n, lag, 0) };
                let d = decide(&mut mem, &p, &parts, current, now);
                // Never below the floor, never above the caps unless the floor demands it.
                prop_assert!(d.desired >= min);
                let ceiling = p.max_replicas.min(if n > 0 { n } else { i32::MAX }).max(min).max(current);
                prop_assert!(d.desired <= ceiling, "{d:?} ceiling {ceiling}");
                // Up at once.
                if d.recommendation > current { prop_assert_eq!(d.desired, d.recommendation); }
                // Down never below this poll's recommendation.
                prop_assert!(d.desired >= d.recommendation);
                current = d.desired;
            }
        }
    }
}

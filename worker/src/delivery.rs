//! Offset tracking: commit only what was delivered.
//!
//! ```text
//! fetched:   10 11 12 13 14 15        (tracked in fetch order)
//! finished:  ✓  ✓     ✓  ✓            (delivered, dead-lettered, filtered, windowed)
//! commit point = 12: the next offset to consume after the contiguous low-water mark
//! ```
//!
//! Messages finish out of order (pool tasks run in parallel); the commit
//! point advances only over a contiguous prefix, so a crash redelivers
//! everything not yet finished (at-least-once), never skips anything.
//! Offsets need not be contiguous (Kafka compaction, transaction markers):
//! only tracked offsets count.

use std::collections::{BTreeMap, VecDeque};

/// One partition's in-flight offsets, in fetch order.
#[derive(Debug, Default, Clone)]
pub struct PartitionTracker {
    /// (offset, finished), offsets strictly increasing.
    inflight: VecDeque<(i64, bool)>,
    /// Next offset to consume after everything finished; what to commit.
    commit: Option<i64>,
}

impl PartitionTracker {
    /// A fetched offset; offsets must arrive in increasing order.
    pub fn track(&mut self, offset: i64) -> bool {
        if self.inflight.back().is_some_and(|(o, _)| *o >= offset) || self.commit.is_some_and(|c| offset < c) {
            return false;
        }
        self.inflight.push_back((offset, false));
        true
    }

    /// A finished offset. Returns the new commit point if it advanced.
    pub fn finish(&mut self, offset: i64) -> Option<i64> {
        let Ok(i) = self.inflight.binary_search_by_key(&offset, |(o, _)| *o) else { return None };
        self.inflight[i].1 = true;
        let before = self.commit;
        while let Some((o, true)) = self.inflight.front().copied() {
            self.inflight.pop_front();
            self.commit = Some(o + 1);
        }
        (self.commit != before).then_some(self.commit).flatten()
    }

    pub fn commit_point(&self) -> Option<i64> {
        self.commit
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }
}

/// Trackers for every assigned partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: BTreeMap<i32, PartitionTracker>,
    /// Commit points that advanced since the last `take_commits`.
    dirty: BTreeMap<i32, i64>,
    /// Revoked and not assigned again. A consumer can still hand over
    /// messages it fetched before a revocation; tracking them would let this
    /// worker commit a position in a partition another worker now owns, past
    /// what that worker has delivered, and a later restart there would skip
    /// the gap. They are processed (at least once) but never committed here.
    revoked: std::collections::BTreeSet<i32>,
    /// Per partition, the first offset an open window still needs: nothing
    /// at or past it may be committed until the window's result is delivered.
    holds: BTreeMap<i32, i64>,
}

impl OffsetTracker {
    /// Track a consumed offset; false when it cannot be (out of order, or the
    /// partition was revoked from this worker).
    pub fn track(&mut self, partition: i32, offset: i64) -> bool {
        if self.revoked.contains(&partition) {
            return false;
        }
        self.partitions.entry(partition).or_default().track(offset)
    }

    /// A partition (re)assigned to this worker: track it again from scratch.
    pub fn assign(&mut self, partition: i32) {
        self.revoked.remove(&partition);
        self.partitions.remove(&partition);
        self.dirty.remove(&partition);
        self.holds.remove(&partition);
    }

    /// An open window's hold on `partition` (None: released).
    pub fn hold(&mut self, partition: i32, hold: Option<i64>) {
        match hold {
            Some(h) => self.holds.insert(partition, h),
            None => self.holds.remove(&partition),
        };
    }

    /// What may be committed for `partition`: the commit point, held back
    /// by open windows.
    pub fn safe_point(&self, partition: i32) -> Option<i64> {
        let point = self.commit_point(partition)?;
        Some(self.holds.get(&partition).map_or(point, |h| point.min(*h)))
    }

    /// Whether every tracked offset of `partition` has finished.
    pub fn drained(&self, partition: i32) -> bool {
        self.partitions.get(&partition).is_none_or(|p| p.in_flight() == 0)
    }

    pub fn finish(&mut self, partition: i32, offset: i64) {
        if let Some(c) = self.partitions.get_mut(&partition).and_then(|p| p.finish(offset)) {
            self.dirty.insert(partition, c);
        }
    }

    /// (partition, next offset) pairs to commit, once each.
    pub fn take_commits(&mut self) -> Vec<(i32, i64)> {
        std::mem::take(&mut self.dirty).into_iter().collect()
    }

    /// A revoked partition: stop tracking; its uncommitted work is redelivered elsewhere.
    pub fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
        self.dirty.remove(&partition);
        self.holds.remove(&partition);
        self.revoked.insert(partition);
    }

    /// The partitions tracked here (assigned, not revoked).
    pub fn partitions(&self) -> Vec<i32> {
        self.partitions.keys().copied().collect()
    }

    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(PartitionTracker::in_flight).sum()
    }

    pub fn commit_point(&self, partition: i32) -> Option<i64> {
        self.partitions.get(&partition).and_then(PartitionTracker::commit_point)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_revoked_partition_is_never_committed_until_assigned_again() {
        let mut t = OffsetTracker::default();
        assert!(t.track(3, 10));
        t.revoke(3);
        // Messages fetched before the revocation still arrive and finish here.
        assert!(!t.track(3, 11));
        t.finish(3, 10);
        t.finish(3, 11);
        assert_eq!(t.take_commits(), vec![]);
        assert_eq!(t.commit_point(3), None);
        t.assign(3);
        assert!(t.track(3, 40));
        t.finish(3, 40);
        assert_eq!(t.take_commits(), vec![(3, 41)]);
    }

    #[test]
    fn an_open_window_holds_the_safe_point_back_and_drained_waits_for_every_offset() {
        let mut t = OffsetTracker::default();
        for o in 10..15 {
            assert!(t.track(1, o));
        }
        assert!(t.drained(2), "a partition with nothing tracked is drained");
        for o in 10..14 {
            t.finish(1, o);
        }
        assert!(!t.drained(1), "14 is in flight");
        assert_eq!(t.safe_point(1), Some(14));
        t.hold(1, Some(12));
        assert_eq!(t.safe_point(1), Some(12), "the window opened at 12 is not delivered yet");
        t.finish(1, 14);
        assert!(t.drained(1));
        assert_eq!(t.safe_point(1), Some(12));
        t.hold(1, None);
        assert_eq!(t.safe_point(1), Some(15));
        t.hold(1, Some(13));
        t.revoke(1);
        t.assign(1);
        assert_eq!(t.safe_point(1), None, "a reassigned partition starts with no hold and no point");
    }

    #[test]
    fn commits_the_contiguous_low_water_mark() {
        let mut t = PartitionTracker::default();
        for o in [10, 11, 12, 13, 15] {
            assert!(t.track(o));
        }
        assert_eq!(t.finish(11), None);
        assert_eq!(t.finish(10), Some(12));
        assert_eq!(t.finish(13), None, "12 is still in flight");
        assert_eq!(t.finish(12), Some(14));
        assert_eq!(t.finish(15), Some(16), "gaps in offsets are fine");
        assert_eq!(t.finish(99), None, "unknown offsets are ignored");
        assert!(!t.track(15), "never move backwards");
    }

    proptest! {
        /// Against a naive model: the commit point is one past the largest
        /// offset o such that every tracked offset <= o has finished.
        #[test]
        fn matches_the_naive_model(gaps in prop::collection::vec(1i64..4, 1..60), order in prop::collection::vec(any::<prop::sample::Index>(), 0..80)) {
            let mut offsets = Vec::new();
            let mut o = 0;
            for g in gaps { o += g; offsets.push(o); }
            let mut t = OffsetTracker::default();
            for o in &offsets { t.track(3, *o); }
            let mut finished = std::collections::BTreeSet::new();
            for idx in order {
                let o = offsets[idx.index(offsets.len())];
                finished.insert(o);
                t.finish(3, o);
                let model = offsets.iter().take_while(|o| finished.contains(*o)).last().map(|o| o + 1);
                prop_assert_eq!(t.commit_point(3), model);
                let commits = t.take_commits();
                prop_assert!(commits.len() <= 1);
            }
        }
    }
}

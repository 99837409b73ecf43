//! Keyed state: where dedupe sets and window snapshots live between pods.
//!
//! ```text
//! pool task ──owns──> per-partition windows / dedupe sets (in memory, hot path)
//!     │ every snapshotInterval, at shutdown and on revoke
//!     v
//! StateStore (memory | redis) ── key "sluice:{processor}:p{partition}:{what}"
//!     │ on partition assignment
//!     └──> restore into the task that now owns the partition
//! ```
//!
//! The hot path never awaits the store: per-message state is local to the
//! task that owns the partition, and the store holds snapshots. That keeps
//! the engine at memory speed and makes Redis a recovery medium, not a
//! per-message round trip.

pub mod fingerprint;
pub mod memory;
pub mod redis;

use std::time::Duration;

use futures::future::BoxFuture;

/// Why a state operation failed; transient (the caller retries or keeps
/// the previous snapshot).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("state value under {key} is not an integer")]
    NotAnInteger { key: String },
    #[error("redis-server could not be started: {0}")]
    Spawn(String),
}

/// A keyed store with TTLs. Values are opaque bytes.
pub trait StateStore: Send + Sync {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StateError>>;
    /// Write many entries at once (pipelined in Redis), each with the TTL.
    fn put_many<'a>(
        &'a self,
        entries: Vec<(String, Vec<u8>)>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), StateError>>;
    /// Add `delta` to an integer value (created at 0), returning the new value.
    fn merge<'a>(&'a self, key: &'a str, delta: i64, ttl: Option<Duration>) -> BoxFuture<'a, Result<i64, StateError>>;
    /// Set a key's TTL; false when the key does not exist.
    fn expire<'a>(&'a self, key: &'a str, ttl: Duration) -> BoxFuture<'a, Result<bool, StateError>>;
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StateError>>;

    fn put<'a>(&'a self, key: &'a str, value: Vec<u8>, ttl: Option<Duration>) -> BoxFuture<'a, Result<(), StateError>> {
        self.put_many(vec![(key.to_string(), value)], ttl)
    }
}

/// Key layout: namespaced by processor and partition, so processors share a
/// Redis safely and a partition's state moves as a unit.
#[derive(Clone, Debug)]
pub struct StateKeys {
    processor: String,
}

impl StateKeys {
    /// `processor` is `<namespace>/<name>` of the StreamProcessor.
    pub fn new(processor: impl Into<String>) -> Self {
        Self { processor: processor.into() }
    }

    /// The snapshot of one step's state for one partition.
    pub fn snapshot(&self, partition: i32, step: usize) -> String {
        format!("sluice:{}:p{}:step{}", self.processor, partition, step)
    }

    pub fn partition_prefix(&self, partition: i32) -> String {
        format!("sluice:{}:p{}:", self.processor, partition)
    }

    /// A `SCAN MATCH` pattern for every snapshot key of this processor (glob
    /// characters in the processor's name escaped, so that it matches only
    /// this processor's keys).
    pub fn snapshot_pattern(&self) -> String {
        let mut escaped = String::with_capacity(self.processor.len());
        for c in self.processor.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                escaped.push('\\');
            }
            escaped.push(c);
        }
        format!("sluice:{escaped}:p*:step*")
    }

    /// (partition, step) of one of this processor's snapshot keys; `None`
    /// for any other key (another processor's, or not a snapshot).
    pub fn parse_snapshot(&self, key: &str) -> Option<(i32, usize)> {
        let rest = key.strip_prefix("sluice:")?.strip_prefix(self.processor.as_str())?.strip_prefix(":p")?;
        let (partition, step) = rest.split_once(":step")?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(partition) || !digits(step) {
            return None;
        }
        Some((partition.parse().ok()?, step.parse().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_namespaced_by_processor_and_partition() {
        let k = StateKeys::new("shop/orders");
        assert_eq!(k.snapshot(3, 2), "sluice:shop/orders:p3:step2");
        assert!(k.snapshot(3, 2).starts_with(&k.partition_prefix(3)));
        assert!(!k.snapshot(13, 2).starts_with(&k.partition_prefix(1)));
    }

    #[test]
    fn snapshot_keys_parse_back_and_nothing_else_does() {
        let k = StateKeys::new("shop/orders");
        assert_eq!(k.parse_snapshot(&k.snapshot(3, 2)), Some((3, 2)));
        assert_eq!(k.parse_snapshot(&k.snapshot(0, 17)), Some((0, 17)));
        for other in [
            "sluice:shop/orders-eu:p3:step2",
            "sluice:shop/order:p3:step2",
            "sluice:dedupe:{out}:abc",
            "sluice:shop/orders:p3:step2:x",
            "sluice:shop/orders:p-1:step2",
            "sluice:shop/orders:p3:step",
            "sluice:shop/orders:px:step2",
        ] {
            assert_eq!(k.parse_snapshot(other), None, "{other}");
        }
        assert_eq!(k.snapshot_pattern(), "sluice:shop/orders:p*:step*");
        assert_eq!(StateKeys::new("a/b*[c]").snapshot_pattern(), r"sluice:a/b\*\[c\]:p*:step*");
    }
}

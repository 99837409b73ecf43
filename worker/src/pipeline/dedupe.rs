//! `dedupe`: drop a message whose identity was seen within `ttl`.
//!
//! Identities live in a bounded TTL set per source partition (the same
//! ownership as window state), so a partition's set can be snapshotted and
//! moved with it.

use std::sync::Arc;

use serde_json::Value;

use crate::{
    expr::{CompileError, EvalError, Expression},
    message::Message,
    pipeline::window::key::canonical_json,
    state::memory::TtlSet,
};

#[derive(Clone, Debug)]
pub struct DedupeStep {
    key: Expression,
    ttl_ms: i64,
    max_keys: usize,
    seen: foldhash::HashMap<i32, TtlSet>,
}

impl DedupeStep {
    pub fn compile(d: &sluice_crds::Dedupe, max_keys: usize, env: &Arc<cel::Env>) -> Result<Self, CompileError> {
        Ok(Self {
            key: Expression::compile(&d.key, env)?,
            ttl_ms: i64::try_from(d.ttl.as_millis()).unwrap_or(i64::MAX),
            max_keys,
            seen: Default::default(),
        })
    }

    pub fn expressions(&self) -> Vec<&Expression> {
        vec![&self.key]
    }

    /// True when the message is new (and remembers it), false for a duplicate.
    pub fn first_sighting(&mut self, msg: &Message, now: i64) -> Result<bool, EvalError> {
        let id = match self.key.eval(msg)?.as_ref() {
            Value::String(s) => s.clone(),
            other => canonical_json(other),
        };
        let max_keys = self.max_keys;
        let set = self.seen.entry(msg.partition).or_insert_with(|| TtlSet::new(max_keys));
        Ok(set.insert(id, now, self.ttl_ms))
    }

    /// Partitions with ids remembered.
    pub fn partitions(&self) -> Vec<i32> {
        self.seen.keys().copied().collect()
    }

    pub fn state_keys(&self) -> usize {
        self.seen.values().map(TtlSet::len).sum()
    }

    pub fn snapshot(&self, partition: i32) -> Option<Result<Vec<u8>, serde_json::Error>> {
        self.seen.get(&partition).map(serde_json::to_vec)
    }

    pub fn restore(&mut self, partition: i32, bytes: &[u8]) -> Result<(), serde_json::Error> {
        let mut set: TtlSet = serde_json::from_slice(bytes)?;
        set.set_bound(self.max_keys);
        self.seen.insert(partition, set);
        Ok(())
    }

    pub fn revoke(&mut self, partition: i32) {
        self.seen.remove(&partition);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn duplicates_within_ttl_are_dropped() {
        let spec: sluice_crds::Dedupe = serde_json::from_value(json!({"key": "msg.id", "ttl": "10s"})).unwrap();
        let mut d = DedupeStep::compile(&spec, 100, &crate::expr::environment()).unwrap();
        let m = Message::new(0, 0, br#"{"id": "a"}"#.to_vec());
        assert!(d.first_sighting(&m, 0).unwrap());
        assert!(!d.first_sighting(&m, 9_999).unwrap());
        assert!(d.first_sighting(&m, 20_000).unwrap(), "expired after ttl");
        let other_partition = Message::new(1, 0, br#"{"id": "a"}"#.to_vec());
        assert!(d.first_sighting(&other_partition, 20_000).unwrap());
    }
}

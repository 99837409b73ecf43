//! Snapshots that name the step definition that wrote them.
//!
//! ```text
//! pool ── put_many(key step<i>, bytes) ──> FingerprintedStore ── "sluice-fp1:<hex>\n" + bytes ──> Redis
//! restore <── bytes ── (fingerprint = this pipeline's step i?) <── get ──┘   else None + a warning
//! ```
//!
//! Snapshot keys name a step by its index only. After an edit that keeps a
//! stateful step at its index but changes what it means (another window
//! size, type or key, other aggregates, another dedupe key), the old
//! snapshot would deserialize into the new step and be mis-read: windows
//! with the old boundaries fire, accumulators lack the new aggregates, and
//! offsets below its position are skipped as already counted. So each
//! snapshot carries a fingerprint of its step's definition, and one written
//! for another definition is not restored: the partition starts empty and
//! replays from its committed offset. Values without the header (written
//! before fingerprints existed) are restored as before.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use sluice_crds::{Step, StreamProcessorSpec};

use super::{StateError, StateKeys, StateStore};

const HEADER: &[u8] = b"sluice-fp1:";

/// 64-bit FNV-1a: stable across builds and versions (a snapshot outlives the
/// worker that wrote it), unlike the hashers of the standard library.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// What a stateful step's state means: for a window its geometry, key,
/// event time and aggregates (not `allowedLateness`, which only moves the
/// watermark, and not the step's name); for dedupe its key (not the TTL,
/// which entries carry themselves). `None` for stateless steps.
pub fn step_fingerprint(step: &Step) -> Option<u64> {
    let ms = |d: &Option<sluice_crds::Duration>| d.as_ref().map(|d| d.as_millis());
    let canonical = if let Some(w) = &step.window {
        serde_json::json!({
            "window": {
                "type": w.type_, "size": ms(&w.size), "slide": ms(&w.slide), "gap": ms(&w.gap), "count": w.count,
                "keyBy": w.key_by, "time": w.time.as_ref().map(|t| &t.field), "aggregate": w.aggregate,
            }
        })
    } else if let Some(d) = &step.dedupe {
        serde_json::json!({"dedupe": {"key": d.key}})
    } else {
        return None;
    };
    Some(fnv1a(crate::pipeline::window::key::canonical_json(&canonical).as_bytes()))
}

/// The fingerprint of every stateful step, by the index its snapshots use
/// (the compiled pipeline's: steps that set no kind are skipped there too).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepFingerprints(BTreeMap<usize, u64>);

impl StepFingerprints {
    pub fn of(spec: &StreamProcessorSpec) -> Self {
        let steps = spec.pipeline.iter().filter(|s| s.kind() != "none");
        Self(steps.enumerate().filter_map(|(i, s)| Some((i, step_fingerprint(s)?))).collect())
    }

    pub fn get(&self, step: usize) -> Option<u64> {
        self.0.get(&step).copied()
    }
}

/// A `StateStore` that adds the fingerprint header to the snapshots it
/// writes and restores only those of the current step definitions; every
/// other key and operation goes through unchanged.
pub struct FingerprintedStore {
    inner: Arc<dyn StateStore>,
    keys: StateKeys,
    prints: StepFingerprints,
}

impl FingerprintedStore {
    pub fn new(inner: Arc<dyn StateStore>, keys: StateKeys, prints: StepFingerprints) -> Self {
        Self { inner, keys, prints }
    }

    fn print_of(&self, key: &str) -> Option<u64> {
        let (_, step) = self.keys.parse_snapshot(key)?;
        self.prints.get(step)
    }
}

fn header(print: u64) -> Vec<u8> {
    let mut h = HEADER.to_vec();
    h.extend(format!("{print:016x}\n").bytes());
    h
}

/// (fingerprint, body) of a value with the header; `None` without one.
fn split(value: &[u8]) -> Option<(u64, &[u8])> {
    let rest = value.strip_prefix(HEADER)?;
    let hex = std::str::from_utf8(rest.get(..16)?).ok()?;
    let body = rest.get(16..)?.strip_prefix(b"\n")?;
    Some((u64::from_str_radix(hex, 16).ok()?, body))
}

impl StateStore for FingerprintedStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StateError>> {
        Box::pin(async move {
            let value = self.inner.get(key).await?;
            let (Some(want), Some(v)) = (self.print_of(key), value.as_deref()) else { return Ok(value) };
            match split(v) {
                Some((got, body)) if got == want => Ok(Some(body.to_vec())),
                Some((got, _)) => {
                    tracing::warn!(
                        key,
                        snapshot = format!("{got:016x}"),
                        step = format!("{want:016x}"),
                        "this snapshot was written by another definition of its step (the pipeline was edited); \
                         not restoring it: the partition's state starts empty and replays from the committed offset"
                    );
                    Ok(None)
                }
                // Written before snapshots carried fingerprints.
                None => Ok(value),
            }
        })
    }

    fn put_many<'a>(
        &'a self,
        entries: Vec<(String, Vec<u8>)>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), StateError>> {
        let entries = entries
            .into_iter()
            .map(|(k, v)| match self.print_of(&k) {
                Some(p) => {
                    let mut h = header(p);
                    h.extend(v);
                    (k, h)
                }
                None => (k, v),
            })
            .collect();
        self.inner.put_many(entries, ttl)
    }

    fn merge<'a>(&'a self, key: &'a str, delta: i64, ttl: Option<Duration>) -> BoxFuture<'a, Result<i64, StateError>> {
        self.inner.merge(key, delta, ttl)
    }

    fn expire<'a>(&'a self, key: &'a str, ttl: Duration) -> BoxFuture<'a, Result<bool, StateError>> {
        self.inner.expire(key, ttl)
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StateError>> {
        self.inner.delete(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::memory::MemoryStore;

    fn spec(pipeline: serde_json::Value) -> StreamProcessorSpec {
        serde_json::from_value(serde_json::json!({
            "source": {"redis": {"url": "redis://r", "stream": "s"}}, "sink": {"stdout": {}}, "pipeline": pipeline
        }))
        .expect("spec")
    }

    fn window(size: &str, lateness: &str) -> serde_json::Value {
        serde_json::json!({"window": {"type": "tumbling", "size": size, "keyBy": "msg.k",
            "time": {"field": "msg.ts", "allowedLateness": lateness}, "aggregate": {"count": {}}}})
    }

    fn store(pipeline: serde_json::Value, inner: &Arc<MemoryStore>) -> FingerprintedStore {
        let inner: Arc<dyn StateStore> = inner.clone();
        FingerprintedStore::new(inner, StateKeys::new("shop/orders"), StepFingerprints::of(&spec(pipeline)))
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(f)
    }

    #[test]
    fn only_stateful_steps_have_fingerprints_and_cosmetic_edits_keep_them() {
        let p = |v| StepFingerprints::of(&spec(v));
        let base = p(serde_json::json!([{"filter": "true"}, window("1m", "5s")]));
        assert_eq!((base.get(0), base.get(1).is_some()), (None, true));
        let renamed_and_later = p(serde_json::json!([{"filter": "false"}, {
            "name": "per-key", "window": {"type": "tumbling", "size": "60s", "keyBy": "msg.k",
            "time": {"field": "msg.ts", "allowedLateness": "30s"}, "aggregate": {"count": {}}}}]));
        assert_eq!(base, renamed_and_later, "name, lateness and how a duration is written do not change the state");
        assert_ne!(base, p(serde_json::json!([{"filter": "true"}, window("5m", "5s")])), "another size does");
        let dedupe = |key: &str, ttl: &str| p(serde_json::json!([{"dedupe": {"key": key, "ttl": ttl}}]));
        assert_eq!(dedupe("msg.id", "1m"), dedupe("msg.id", "1h"));
        assert_ne!(dedupe("msg.id", "1m"), dedupe("msg.ref", "1m"));
    }

    #[test]
    fn a_snapshot_of_another_step_definition_is_not_restored() {
        let redis_like = Arc::new(MemoryStore::new(100));
        let keys = StateKeys::new("shop/orders");
        let (snapshot, other) = (keys.snapshot(0, 1), "sluice:dedupe:{out}:x".to_string());
        let old = store(serde_json::json!([{"filter": "true"}, window("1m", "5s")]), &redis_like);
        run(old.put_many(vec![(snapshot.clone(), b"{\"w\":1}".to_vec()), (other.clone(), b"v".to_vec())], None))
            .expect("put");
        assert_eq!(run(old.get(&snapshot)).expect("get").as_deref(), Some(&b"{\"w\":1}"[..]), "same definition");
        assert_eq!(run(redis_like.get(&other)).expect("get").as_deref(), Some(&b"v"[..]), "not a snapshot: as is");

        let edited = store(serde_json::json!([{"filter": "true"}, window("5m", "5s")]), &redis_like);
        assert_eq!(run(edited.get(&snapshot)).expect("get"), None, "written for a 1m window, read by a 5m one");

        // Written before fingerprints: restored as before.
        run(redis_like.put(&snapshot, b"{\"w\":2}".to_vec(), None)).expect("put");
        assert_eq!(run(edited.get(&snapshot)).expect("get").as_deref(), Some(&b"{\"w\":2}"[..]));
    }
}

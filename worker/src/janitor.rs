//! The state janitor: a singleton task (see `leader`) that deletes the Redis
//! state snapshots no running pipeline can ever read again.
//!
//! ```text
//! every INTERVAL, while leading (Redis state only; memory state dies with its pod):
//!   SCAN MATCH sluice:<ns>/<name>:p*:step* COUNT 500
//!     └─ orphan(key, Layout)?  a step index that is not a stateful step of the
//!        │                     current pipeline (the pipeline was edited), or a
//!        │                     partition at or beyond the source's partition count
//!        └─ EVAL: UNLINK the key only if OBJECT IDLETIME >= min_idle
//!             ──> sluice_state_janitor_deleted_total{reason}
//! ```
//!
//! Snapshots are written with `state.ttl` as their expiry when the spec sets
//! one, so with a TTL orphans go away by themselves eventually; without one
//! nothing else ever deletes them.
//!
//! The idle guard is what makes this safe during a rolling update: pods of
//! the old and the new spec run side by side, and the leader may be either,
//! so a key that is an orphan for the leader's layout may be live for the
//! other's. A live snapshot is rewritten every `snapshotInterval`; only keys
//! nobody has written (or read) for `min_idle` are deleted, and the check and
//! the delete are one script, so a write in between cannot be lost.

use std::{collections::BTreeMap, time::Duration};

use redis::aio::ConnectionManager;
use sluice_crds::{StateBackend, StreamProcessorSpec};
use tokio_util::sync::CancellationToken;

use crate::{metrics::Metrics, pipeline::Pipeline, state::StateKeys};

/// How often the leader sweeps.
pub const INTERVAL: Duration = Duration::from_secs(300);
/// Keys asked for per SCAN call (a hint to Redis), and so per delete batch.
const SCAN_COUNT: usize = 500;
/// An orphan must have been idle this long (at least; see `min_idle`).
const MIN_IDLE_FLOOR: Duration = Duration::from_secs(15 * 60);
/// ...and this many snapshot intervals.
const MIN_IDLE_INTERVALS: u32 = 10;

/// What the current pipeline can read: the step indexes that hold state and
/// the source's partition count (`None` when it could not be looked up:
/// then no key is an orphan for its partition).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub stateful_steps: Vec<usize>,
    pub partitions: Option<i32>,
}

/// Why a key is an orphan; the metric's `reason` label (a fixed set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Orphan {
    /// Its step index is not a stateful step of the current pipeline.
    Step,
    /// Its partition is at or beyond the source's partition count.
    Partition,
}

impl Orphan {
    pub fn label(self) -> &'static str {
        match self {
            Orphan::Step => "step",
            Orphan::Partition => "partition",
        }
    }
}

/// Reasons of `STATE_JANITOR_DELETED`.
pub const REASONS: [&str; 2] = ["step", "partition"];

/// Whether `key` is a snapshot of this processor that no pipeline with
/// `layout` can read. Keys that are not this processor's snapshots (another
/// processor's, sink dedupe markers) are never orphans: they are not ours.
pub fn orphan(keys: &StateKeys, layout: &Layout, key: &str) -> Option<Orphan> {
    let (partition, step) = keys.parse_snapshot(key)?;
    if !layout.stateful_steps.contains(&step) {
        return Some(Orphan::Step);
    }
    if layout.partitions.is_some_and(|n| partition >= n) {
        return Some(Orphan::Partition);
    }
    None
}

/// How long an orphan must have been idle before it is deleted: longer than
/// any live snapshot goes unwritten (see the module docs).
pub fn min_idle(spec: &StreamProcessorSpec) -> Duration {
    let interval =
        spec.state.as_ref().and_then(|s| s.snapshot_interval.as_ref()).map_or(Duration::from_secs(30), |d| d.as_std());
    (interval * MIN_IDLE_INTERVALS).max(MIN_IDLE_FLOOR)
}

/// KEYS: one key. ARGV: the minimum idle time in seconds. Returns 1 when it
/// deleted the key. Check and delete in one script: a snapshot written in
/// between would otherwise be deleted although it is live.
const UNLINK_IF_IDLE: &str = r#"
local idle = redis.call('OBJECT', 'IDLETIME', KEYS[1])
if idle and idle >= tonumber(ARGV[1]) then
  return redis.call('UNLINK', KEYS[1])
end
return 0
"#;

/// What one sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Snapshot keys of this processor seen.
    pub scanned: u64,
    /// Deleted, by reason.
    pub deleted: BTreeMap<Orphan, u64>,
    /// Orphans kept because they were written or read within `min_idle`.
    pub kept_recent: u64,
}

impl Sweep {
    pub fn deleted_total(&self) -> u64 {
        self.deleted.values().sum()
    }
}

/// One pass over every snapshot key of the processor: SCAN (never KEYS),
/// then each batch's orphans deleted in one pipelined round trip.
pub async fn sweep(
    conn: &mut ConnectionManager,
    keys: &StateKeys,
    layout: &Layout,
    min_idle: Duration,
    metrics: Option<&Metrics>,
) -> Result<Sweep, redis::RedisError> {
    let script = redis::Script::new(UNLINK_IF_IDLE);
    let pattern = keys.snapshot_pattern();
    let mut report = Sweep::default();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(conn)
            .await?;
        let orphans: Vec<(String, Orphan)> = batch
            .into_iter()
            .filter_map(|k| {
                report.scanned += u64::from(keys.parse_snapshot(&k).is_some());
                let why = orphan(keys, layout, &k)?;
                Some((k, why))
            })
            .collect();
        if !orphans.is_empty() {
            let mut pipe = redis::pipe();
            // Loaded with every batch: a restarted server has forgotten it.
            pipe.load_script(&script).ignore();
            for (k, _) in &orphans {
                pipe.invoke_script(script.key(k).arg(min_idle.as_secs()));
            }
            let deleted: Vec<i64> = pipe.query_async(conn).await?;
            for ((key, why), n) in orphans.iter().zip(deleted) {
                if n > 0 {
                    tracing::debug!(key = %key, reason = why.label(), "deleted an orphaned state snapshot");
                    *report.deleted.entry(*why).or_default() += 1;
                    if let Some(m) = metrics {
                        m.janitor_deleted.with_label_values(&[why.label()]).inc();
                    }
                } else {
                    report.kept_recent += 1;
                }
            }
        }
        cursor = next;
        if cursor == 0 {
            return Ok(report);
        }
    }
}

/// The source's partition count: what a snapshot's partition must be below.
async fn source_partitions(spec: &StreamProcessorSpec) -> Result<i32, String> {
    let s = &spec.source;
    if let Some(g) = &s.generator {
        return Ok(g.partitions);
    }
    // Redis Streams and NATS sources are one partition (0).
    if s.redis.is_some() || s.nats.is_some() {
        return Ok(1);
    }
    let Some(k) = &s.kafka else { return Err("no source".into()) };
    let (brokers, auth, topic) = (k.brokers.clone(), k.auth.clone(), k.topic.clone());
    // rdkafka's metadata call blocks.
    tokio::task::spawn_blocking(move || -> Result<i32, String> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let env = |v: &str| std::env::var(v).ok();
        let consumer: BaseConsumer =
            crate::source::kafka::client_config(&brokers, auth.as_ref(), "SOURCE", "spec.source.kafka", &env)?
                .create()
                .map_err(|e| e.to_string())?;
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5)).map_err(|e| e.to_string())?;
        let t = md.topics().iter().find(|t| t.name() == topic).ok_or_else(|| format!("no topic {topic}"))?;
        if let Some(e) = t.error() {
            return Err(format!("topic {topic}: {e:?}"));
        }
        i32::try_from(t.partitions().len()).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// A sweep refused because the state Redis evicts by LFU: `OBJECT
/// IDLETIME`, which keeps a rolling update's live keys safe, is not tracked
/// under an LFU `maxmemory-policy`.
pub fn no_idle_times(e: &redis::RedisError) -> bool {
    e.to_string().contains("LFU")
}

/// The janitor task: sweeps every `INTERVAL` until `stop`. Returns at once
/// (waiting for `stop`) when the state is not in Redis.
pub async fn run(spec: &StreamProcessorSpec, processor: &str, metrics: &Metrics, stop: CancellationToken) {
    let Some(state) = spec.state.as_ref().filter(|s| s.backend == StateBackend::Redis) else {
        stop.cancelled().await;
        return;
    };
    let url = state.redis.as_ref().map(|r| r.url.as_str()).unwrap_or_default();
    let tls = state.redis.as_ref().and_then(|r| r.tls.as_ref());
    let env = |v: &str| std::env::var(v).ok();
    let conn = crate::source::redis::client_at(url, "STATE", tls, "spec.state.redis", &env)
        .and_then(|c| crate::source::redis::connect(c, Duration::from_secs(30)).map_err(|e| e.to_string()));
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "state janitor: cannot use spec.state.redis; orphaned snapshots stay until fixed");
            stop.cancelled().await;
            return;
        }
    };
    let stateful_steps = match Pipeline::compile(spec) {
        Ok(p) => p.stateful_steps(),
        Err(e) => {
            tracing::warn!(error = %e, "state janitor: the pipeline does not compile; not sweeping");
            stop.cancelled().await;
            return;
        }
    };
    let keys = StateKeys::new(processor);
    let min_idle = min_idle(spec);
    loop {
        let partitions = match source_partitions(spec).await {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(error = %e, "state janitor: cannot look up the source's partition count; \
                    this sweep keeps snapshots of every partition");
                None
            }
        };
        let layout = Layout { stateful_steps: stateful_steps.clone(), partitions };
        match sweep(&mut conn, &keys, &layout, min_idle, Some(metrics)).await {
            Ok(s) if s.deleted_total() > 0 => tracing::info!(scanned = s.scanned, deleted = s.deleted_total(),
                steps = s.deleted.get(&Orphan::Step).copied().unwrap_or(0),
                partitions = s.deleted.get(&Orphan::Partition).copied().unwrap_or(0),
                kept_recent = s.kept_recent, next_in = ?INTERVAL, "state janitor deleted orphaned snapshots"),
            Ok(s) => {
                tracing::debug!(scanned = s.scanned, kept_recent = s.kept_recent, "state janitor: nothing to delete")
            }
            // OBJECT IDLETIME, which keeps a rolling update's live keys
            // safe, does not exist under an LFU eviction policy.
            Err(e) if no_idle_times(&e) => {
                tracing::warn!(error = %e, "state janitor disabled: the state Redis evicts by LFU (maxmemory-policy), \
                    which keeps no idle times, and without them the janitor cannot tell a live snapshot from an orphan; \
                    orphaned snapshots stay (set state.ttl to expire them)");
                stop.cancelled().await;
                return;
            }
            Err(e) => tracing::warn!(error = %e, next_in = ?INTERVAL, "state janitor sweep failed; trying again later"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(steps: &[usize], partitions: Option<i32>) -> Layout {
        Layout { stateful_steps: steps.to_vec(), partitions }
    }

    #[test]
    fn snapshots_of_steps_the_pipeline_no_longer_has_are_orphans() {
        let k = StateKeys::new("shop/orders");
        let l = layout(&[1, 3], Some(4));
        assert_eq!(orphan(&k, &l, &k.snapshot(0, 1)), None);
        assert_eq!(orphan(&k, &l, &k.snapshot(2, 3)), None);
        assert_eq!(orphan(&k, &l, &k.snapshot(0, 2)), Some(Orphan::Step), "step 2 is a filter or map now");
        assert_eq!(orphan(&k, &l, &k.snapshot(0, 4)), Some(Orphan::Step), "the pipeline has fewer steps now");
        assert_eq!(orphan(&k, &layout(&[], Some(4)), &k.snapshot(0, 1)), Some(Orphan::Step), "no state at all");
    }

    #[test]
    fn snapshots_of_partitions_the_source_does_not_have_are_orphans() {
        let k = StateKeys::new("shop/orders");
        let l = layout(&[0], Some(4));
        assert_eq!(orphan(&k, &l, &k.snapshot(3, 0)), None);
        assert_eq!(orphan(&k, &l, &k.snapshot(4, 0)), Some(Orphan::Partition));
        assert_eq!(orphan(&k, &l, &k.snapshot(12, 0)), Some(Orphan::Partition));
        assert_eq!(orphan(&k, &layout(&[0], None), &k.snapshot(12, 0)), None, "partition count unknown: kept");
    }

    #[test]
    fn keys_that_are_not_this_processors_snapshots_are_never_orphans() {
        let k = StateKeys::new("shop/orders");
        let l = layout(&[], Some(1));
        for other in ["sluice:shop/orders-eu:p0:step9", "sluice:dedupe:{out}:abc", "sluice:shop/orders:p0:stepx", "x"] {
            assert_eq!(orphan(&k, &l, other), None, "{other}");
        }
    }

    #[test]
    fn orphans_must_be_idle_longer_than_any_live_snapshot_is_left_unwritten() {
        let spec = |v: serde_json::Value| -> StreamProcessorSpec { serde_json::from_value(v).expect("spec") };
        let base =
            serde_json::json!({"source": {"redis": {"url": "redis://r", "stream": "s"}}, "sink": {"stdout": {}}});
        assert_eq!(min_idle(&spec(base.clone())), MIN_IDLE_FLOOR);
        let mut slow = base;
        slow["state"] =
            serde_json::json!({"backend": "redis", "redis": {"url": "redis://r"}, "snapshotInterval": "5m"});
        assert_eq!(min_idle(&spec(slow)), Duration::from_secs(50 * 60));
    }
}

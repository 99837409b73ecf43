//! Dead-letter redrive: a singleton task (see `leader`) that replays the dead
//! letters into the processor's source once a user has fixed their cause and
//! asked for it with `spec.deadLetter.redrive.id`.
//!
//! ```text
//! redrive.id set, and not the id recorded on the Lease (sluice.io/redrive-done)
//!   open the dead-letter topic/stream with the redrive's own position
//!   (Kafka group sluice-redrive-<ns>-<name> | Redis group sluice-redrive |
//!    NATS durable sluice-redrive-<ns>-<name>), and its end as it is now
//!   loop: read a batch (never past that end)
//!         ─> strip the dead-letter headers, add sluice-redrive-id: <id>
//!         ─> publish to the source (same topic/stream/subject, key, payload)
//!         ─> commit / XACK / ack the batch (only after the publish)
//!   at the end: record <id> on the Lease annotation
//! ```
//!
//! At-least-once: a leader that stops mid-redrive leaves its position at the
//! last batch it published; the next leader sees the id is not done and goes
//! on from there (a batch published but not committed is published again).
//! Reading only up to the end that existed at the start is what makes a
//! redrive finish: records that fail again are dead-lettered after that end
//! and wait for the next redrive instead of looping.
//! The end is taken when a leader starts the redrive, so after a failover
//! mid-redrive, records that failed again in the meantime are sent once
//! more under the same id (once per failover: still bounded).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::future::BoxFuture;
use kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
};
use rdkafka::{
    Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer, StreamConsumer},
    message::{Headers, Message as _},
};
use redis::{Value, aio::ConnectionManager};
use sluice_crds::StreamProcessorSpec;
use tokio_util::sync::CancellationToken;

use crate::{
    deadletter::{
        DeadLetter, HEADER_ATTEMPT, HEADER_ERROR, HEADER_OFFSET, HEADER_PARTITION, HEADER_REASON, HEADER_SOURCE,
        HEADER_STEP,
    },
    message::{Message, Payload, now_ms},
    metrics::Metrics,
    sink::{Sink, SinkError, kafka::KafkaSink, nats::NatsSink, redis::RedisSink},
    source::{
        nats::HEADER_NATS_SEQ,
        redis::{HEADER_REDIS_ID, read_reply, stream_entries},
    },
};

/// The Lease annotation holding the last redrive id that finished.
pub const ANNOTATION_DONE: &str = "sluice.io/redrive-done";
/// Where the last finished redrive of Kafka dead letters ended, per
/// partition (JSON): the redrive group has no members, so the broker
/// expires its committed offsets (`offsets.retention.minutes`, 7 days by
/// default), and a later redrive must not start over from the beginning.
pub const ANNOTATION_KAFKA_END: &str = "sluice.io/redrive-kafka-end";
/// The header every republished record carries.
pub const HEADER_REDRIVE_ID: &str = "sluice-redrive-id";
/// The consumer group of a Redis dead-letter stream (the stream is the
/// processor's own, so the name needs no processor in it).
pub const REDIS_GROUP: &str = "sluice-redrive";
/// The consumer in `REDIS_GROUP`: one name for every leader, so that a new
/// leader sees the entries an old one read and did not acknowledge.
const REDIS_CONSUMER: &str = "leader";
/// Records per read, publish and commit.
const BATCH: usize = 500;
/// How long a read waits for records that the end says exist.
const READ_WAIT: Duration = Duration::from_secs(2);
/// How long a Kafka read may go without a record before the attempt fails.
const KAFKA_STALL: Duration = Duration::from_secs(60);
/// Retry delays after a failed attempt: from the first, doubling to the last.
const RETRY_FIRST: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// Headers the dead-letter path adds, and the ones a source adds when it
/// reads (stream ids, sequences): none of them is the record's own.
const NOT_THE_RECORDS: [&str; 10] = [
    HEADER_ERROR,
    HEADER_REASON,
    HEADER_STEP,
    HEADER_PARTITION,
    HEADER_OFFSET,
    HEADER_ATTEMPT,
    HEADER_SOURCE,
    HEADER_REDRIVE_ID,
    HEADER_REDIS_ID,
    HEADER_NATS_SEQ,
];

/// Why a redrive did not finish.
#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    /// The spec cannot be redriven as it is: waits for a spec change.
    #[error("{field}: {detail}")]
    Config { field: &'static str, detail: String },
    #[error("reading the dead letters from {target}: {detail}")]
    Read { target: String, detail: String },
    #[error("republishing to the source: {0}")]
    Write(#[from] SinkError),
    #[error("the worker Lease {lease}: {detail}")]
    Ledger { lease: String, detail: String },
}

impl RedriveError {
    /// Permanent errors wait for a spec change; the rest are retried.
    pub fn is_permanent(&self) -> bool {
        matches!(self, RedriveError::Config { .. } | RedriveError::Write(SinkError::Config { .. }))
    }
}

/// The record as it goes back to the source: its own key, payload and
/// headers, and the redrive's id.
pub fn redriven(mut m: Message, id: &str) -> Message {
    m.headers.retain(|(k, _)| !NOT_THE_RECORDS.contains(&k.as_str()));
    m.headers.push((HEADER_REDRIVE_ID.to_string(), id.as_bytes().to_vec()));
    m
}

/// The Kafka consumer group and NATS durable of a processor's redrives.
pub fn consumer_name(processor: &str) -> String {
    format!("sluice-redrive-{}", processor.replace('/', "-"))
}

/// The redrive `spec` asks for, if any.
pub fn requested(spec: &StreamProcessorSpec) -> Option<&str> {
    spec.dead_letter.as_ref()?.redrive.as_ref().map(|r| r.id.as_str())
}

// ----------------------------------------------------------------- ledger --

/// Where the last finished redrive id is kept, so that a restart does not
/// run it again.
pub trait RedriveLedger: Send + Sync {
    fn done(&self) -> BoxFuture<'_, Result<Option<String>, RedriveError>>;
    /// Where the last finished redrive ended ([`DeadLetterReader::position`]).
    fn position(&self) -> BoxFuture<'_, Result<Option<String>, RedriveError>>;
    fn record<'a>(&'a self, id: &'a str, position: Option<&'a str>) -> BoxFuture<'a, Result<(), RedriveError>>;
}

/// The annotation `sluice.io/redrive-done` on the worker's own Lease (the
/// worker Role already allows get and patch on it; the Lease manager's
/// own patches touch only its spec, so the annotation stays).
pub struct LeaseLedger {
    api: Api<DynamicObject>,
    name: String,
}

impl LeaseLedger {
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        let gvk = GroupVersionKind::gvk("coordination.k8s.io", "v1", "Lease");
        let api = Api::namespaced_with(client, namespace, &ApiResource::from_gvk(&gvk));
        Self { api, name: name.to_string() }
    }

    fn error(&self, e: impl std::fmt::Display) -> RedriveError {
        RedriveError::Ledger { lease: self.name.clone(), detail: e.to_string() }
    }
}

impl RedriveLedger for LeaseLedger {
    fn done(&self) -> BoxFuture<'_, Result<Option<String>, RedriveError>> {
        Box::pin(async move {
            let lease = self.api.get(&self.name).await.map_err(|e| self.error(e))?;
            Ok(lease.metadata.annotations.and_then(|mut a| a.remove(ANNOTATION_DONE)))
        })
    }

    fn position(&self) -> BoxFuture<'_, Result<Option<String>, RedriveError>> {
        Box::pin(async move {
            let lease = self.api.get(&self.name).await.map_err(|e| self.error(e))?;
            Ok(lease.metadata.annotations.and_then(|mut a| a.remove(ANNOTATION_KAFKA_END)))
        })
    }

    fn record<'a>(&'a self, id: &'a str, position: Option<&'a str>) -> BoxFuture<'a, Result<(), RedriveError>> {
        Box::pin(async move {
            let mut annotations = serde_json::json!({ ANNOTATION_DONE: id });
            if let Some(p) = position {
                annotations[ANNOTATION_KAFKA_END] = serde_json::json!(p);
            }
            let patch = serde_json::json!({"metadata": {"annotations": annotations}});
            self.api
                .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| self.error(e))?;
            Ok(())
        })
    }
}

/// A ledger in memory: for tests. (Done id, position.)
#[derive(Default)]
pub struct MemoryLedger(Mutex<(Option<String>, Option<String>)>);

impl RedriveLedger for MemoryLedger {
    fn done(&self) -> BoxFuture<'_, Result<Option<String>, RedriveError>> {
        let done = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).0.clone();
        Box::pin(async move { Ok(done) })
    }

    fn position(&self) -> BoxFuture<'_, Result<Option<String>, RedriveError>> {
        let position = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).1.clone();
        Box::pin(async move { Ok(position) })
    }

    fn record<'a>(&'a self, id: &'a str, position: Option<&'a str>) -> BoxFuture<'a, Result<(), RedriveError>> {
        let mut ledger = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        ledger.0 = Some(id.to_string());
        if let Some(p) = position {
            ledger.1 = Some(p.to_string());
        }
        Box::pin(async { Ok(()) })
    }
}

// ---------------------------------------------------------------- readers --

/// The dead letters, read with the redrive's own position up to the end
/// they had when opened.
pub trait DeadLetterReader: Send {
    /// The next records (at most `max`); empty once the end is reached.
    fn next(&mut self, max: usize) -> BoxFuture<'_, Result<Vec<Message>, RedriveError>>;
    /// Everything `next` returned has been republished: move the position
    /// past it.
    fn commit(&mut self) -> BoxFuture<'_, Result<(), RedriveError>>;
    /// Where a finished redrive leaves the dead letters, for the ledger to
    /// keep when the broker may forget it (Kafka); None where it does not.
    fn position(&self) -> Option<String> {
        None
    }
}

/// A Kafka dead-letter topic, every partition, in the group
/// `sluice-redrive-<ns>-<name>` (assigned, not subscribed: one reader, no
/// rebalances; the group only keeps the committed offsets).
pub struct KafkaDeadLetters {
    consumer: StreamConsumer,
    topic: String,
    /// Per partition, the end (exclusive) when opened.
    end: BTreeMap<i32, i64>,
    /// Partitions not yet read to their end.
    open: BTreeSet<i32>,
    /// Per partition, one past the last record returned (what `commit` commits).
    next: BTreeMap<i32, i64>,
    /// Per partition, what this redrive covers once finished: the end when
    /// opened, or a recorded end beyond it.
    covered: BTreeMap<i32, i64>,
}

impl KafkaDeadLetters {
    /// `floor`: per partition, where an earlier finished redrive ended (the
    /// ledger's record), so a group whose offsets the broker expired does
    /// not start over.
    pub fn open(spec: &StreamProcessorSpec, group: &str, floor: &BTreeMap<i32, i64>) -> Result<Self, RedriveError> {
        let field = "spec.deadLetter.kafka";
        let dl = spec
            .dead_letter
            .as_ref()
            .and_then(|d| d.kafka.as_ref())
            .ok_or(RedriveError::Config { field, detail: "no Kafka dead-letter topic".into() })?;
        let at = crate::sink::kafka::endpoint(dl, spec.source.kafka.as_ref(), "DEADLETTER", field)?;
        let env = |v: &str| std::env::var(v).ok();
        let read = |detail: String| RedriveError::Read { target: format!("kafka/{}", dl.topic), detail };
        let consumer: StreamConsumer =
            crate::source::kafka::client_config(&at.brokers, at.auth.as_ref(), at.place, field, &env)
                .map_err(|detail| RedriveError::Config { field, detail })?
                .set("group.id", group)
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("auto.offset.reset", "earliest")
                .create()
                .map_err(|e| RedriveError::Config { field, detail: format!("the Kafka client rejected it: {e}") })?;
        let topic = dl.topic.clone();
        // Metadata, watermarks and committed offsets are blocking calls.
        let (end, start, covered) = tokio::task::block_in_place(|| -> Result<_, RedriveError> {
            let timeout = Duration::from_secs(10);
            let md = consumer.fetch_metadata(Some(&topic), timeout).map_err(|e| read(e.to_string()))?;
            let mut partitions: Vec<i32> = Vec::new();
            for t in md.topics().iter().filter(|t| t.name() == topic) {
                match t.error() {
                    None => partitions.extend(t.partitions().iter().map(|p| p.id())),
                    // No topic: nothing was ever dead-lettered.
                    Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {}
                    // Anything else (no leader yet, ...) must not pass for "empty".
                    Some(e) => return Err(read(format!("metadata: {e:?}"))),
                }
            }
            let mut tpl = TopicPartitionList::new();
            let mut low_high = BTreeMap::new();
            for p in &partitions {
                let (low, high) = consumer.fetch_watermarks(&topic, *p, timeout).map_err(|e| read(e.to_string()))?;
                low_high.insert(*p, (low, high));
                tpl.add_partition(&topic, *p);
            }
            let committed = if partitions.is_empty() {
                TopicPartitionList::new()
            } else {
                consumer.committed_offsets(tpl, timeout).map_err(|e| read(e.to_string()))?
            };
            let mut start = BTreeMap::new();
            let mut end = BTreeMap::new();
            let mut covered = BTreeMap::new();
            for (p, (low, high)) in low_high {
                let recorded = floor.get(&p).copied().unwrap_or(low);
                let from = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o.max(low).max(recorded),
                    _ => low.max(recorded),
                };
                covered.insert(p, high.max(recorded));
                if from < high {
                    start.insert(p, from);
                    end.insert(p, high);
                }
            }
            Ok((end, start, covered))
        })?;
        let mut tpl = TopicPartitionList::new();
        for (p, from) in &start {
            tpl.add_partition_offset(&topic, *p, Offset::Offset(*from)).map_err(|e| read(e.to_string()))?;
        }
        if !start.is_empty() {
            consumer.assign(&tpl).map_err(|e| read(e.to_string()))?;
        }
        tracing::info!(topic = %topic, group, from = ?start, to = ?end, "redrive: reading the Kafka dead letters");
        Ok(Self { consumer, topic, open: end.keys().copied().collect(), end, next: BTreeMap::new(), covered })
    }

    /// Partitions whose fetch position passed the end without a record to
    /// show for it (compaction, transaction markers) are done too.
    fn close_passed(&mut self) {
        let Ok(positions) = self.consumer.position() else { return };
        let positions: Vec<(i32, i64)> = positions
            .elements_for_topic(&self.topic)
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect();
        for (p, end) in passed_ends(&self.open, &self.end, &positions) {
            self.open.remove(&p);
            let next = self.next.entry(p).or_insert(end);
            *next = (*next).max(end);
        }
    }
}

/// Open partitions whose fetch position passed their end, each with what
/// to commit for it: the end, never the position. A closed partition stays
/// assigned and its reads go on past the end (records dead-lettered since
/// the redrive started, read and dropped here): committing that position
/// would skip them for the next redrive.
fn passed_ends(open: &BTreeSet<i32>, end: &BTreeMap<i32, i64>, positions: &[(i32, i64)]) -> Vec<(i32, i64)> {
    positions
        .iter()
        .filter(|(p, _)| open.contains(p))
        .filter_map(|(p, o)| end.get(p).filter(|e| o >= *e).map(|e| (*p, *e)))
        .collect()
}

impl DeadLetterReader for KafkaDeadLetters {
    fn next(&mut self, max: usize) -> BoxFuture<'_, Result<Vec<Message>, RedriveError>> {
        Box::pin(async move {
            let mut batch = Vec::new();
            let mut idle = Duration::ZERO;
            while !self.open.is_empty() && batch.len() < max {
                let m = match tokio::time::timeout(READ_WAIT, self.consumer.recv()).await {
                    Ok(Ok(m)) => m,
                    Ok(Err(e)) => {
                        return Err(RedriveError::Read {
                            target: format!("kafka/{}", self.topic),
                            detail: e.to_string(),
                        });
                    }
                    Err(_idle) => {
                        self.close_passed();
                        if !batch.is_empty() {
                            break;
                        }
                        // Records the end says exist do not come (brokers
                        // unreachable): fail, so that the task logs it and
                        // retries from the committed position later.
                        idle += READ_WAIT;
                        if idle >= KAFKA_STALL && !self.open.is_empty() {
                            return Err(RedriveError::Read {
                                target: format!("kafka/{}", self.topic),
                                detail: format!(
                                    "no record for {idle:?} although partitions {:?} have not reached their end",
                                    self.open
                                ),
                            });
                        }
                        continue;
                    }
                };
                let (p, o) = (m.partition(), m.offset());
                let Some(end) = self.end.get(&p).copied() else { continue };
                if o >= end || !self.open.contains(&p) {
                    self.open.remove(&p);
                    continue;
                }
                self.next.insert(p, o + 1);
                if o + 1 >= end {
                    self.open.remove(&p);
                }
                let headers = m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                            .collect()
                    })
                    .unwrap_or_default();
                batch.push(Message {
                    key: m.key().map(<[u8]>::to_vec),
                    payload: Payload::from_bytes(m.payload().map(<[u8]>::to_vec).unwrap_or_default()),
                    headers,
                    partition: p,
                    offset: o,
                    timestamp: m.timestamp().to_millis().unwrap_or_else(now_ms),
                });
            }
            Ok(batch)
        })
    }

    fn position(&self) -> Option<String> {
        serde_json::to_string(&KafkaEnd { topic: self.topic.clone(), ends: self.covered.clone() }).ok()
    }

    fn commit(&mut self) -> BoxFuture<'_, Result<(), RedriveError>> {
        Box::pin(async move {
            if self.next.is_empty() {
                return Ok(());
            }
            let mut tpl = TopicPartitionList::new();
            for (p, o) in &self.next {
                tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*o)).map_err(|e| RedriveError::Read {
                    target: format!("kafka/{}", self.topic),
                    detail: e.to_string(),
                })?;
            }
            tokio::task::block_in_place(|| self.consumer.commit(&tpl, CommitMode::Sync)).map_err(|e| {
                RedriveError::Read { target: format!("kafka/{}", self.topic), detail: format!("commit: {e}") }
            })
        })
    }
}

/// A Redis dead-letter stream in the group `sluice-redrive`: first the
/// entries an earlier leader read and did not acknowledge, then new ones,
/// up to the last entry when opened. XACK after the republish.
pub struct RedisDeadLetters {
    conn: ConnectionManager,
    stream: String,
    /// The last entry id when opened; `None`: the stream was empty.
    end: Option<StreamId>,
    /// Reading this consumer's pending entries after this id; `None`: new ones.
    pending_after: Option<String>,
    done: bool,
    /// Entry ids `next` returned, acknowledged by `commit`.
    returned: Vec<String>,
    seq: i64,
}

/// A stream entry id, comparable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct StreamId(u64, u64);

impl StreamId {
    pub fn parse(id: &str) -> Option<Self> {
        let (ms, seq) = id.split_once('-')?;
        Some(Self(ms.parse().ok()?, seq.parse().ok()?))
    }
}

/// A dead letter entry as a message: `payload`, `key`, the other fields
/// as headers (as the Redis sink wrote them).
fn entry_message(fields: Vec<(String, Vec<u8>)>, offset: i64) -> Message {
    let mut m = Message::new(0, offset, Vec::new());
    let mut payload = Vec::new();
    for (k, v) in fields {
        match k.as_str() {
            "payload" => payload = v,
            "key" => m.key = Some(v),
            _ => m.headers.push((k, v)),
        }
    }
    m.payload = Payload::from_bytes(payload);
    m
}

/// An offset unique to the entry (its id's milliseconds and sequence in
/// one number): a republish to a NATS source derives its `Nats-Msg-Id`
/// from it, so two different dead letters must never share one.
fn entry_offset(id: &str) -> Option<i64> {
    let StreamId(ms, seq) = StreamId::parse(id)?;
    i64::try_from((ms << 12) | (seq & 0xfff)).ok()
}

impl RedisDeadLetters {
    pub async fn open(spec: &StreamProcessorSpec) -> Result<Self, RedriveError> {
        let field = "spec.deadLetter.redis";
        let dl = spec
            .dead_letter
            .as_ref()
            .and_then(|d| d.redis.as_ref())
            .ok_or(RedriveError::Config { field, detail: "no Redis dead-letter stream".into() })?;
        let env = |v: &str| std::env::var(v).ok();
        let client = crate::source::redis::client_at(&dl.url, "DEADLETTER", dl.tls.as_ref(), field, &env)
            .map_err(|detail| RedriveError::Config { field, detail })?;
        let read =
            |e: redis::RedisError| RedriveError::Read { target: format!("redis/{}", dl.stream), detail: e.to_string() };
        let mut conn = crate::source::redis::connect(client, Duration::from_secs(10)).map_err(read)?;
        let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&dl.stream)
            .arg(REDIS_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(read(e)),
        }
        let last: Value = redis::cmd("XREVRANGE")
            .arg(&dl.stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(read)?;
        let end = stream_entries(&last).first().and_then(|(id, _)| StreamId::parse(id));
        tracing::info!(stream = %dl.stream, group = REDIS_GROUP, ?end, "redrive: reading the Redis dead letters");
        Ok(Self {
            conn,
            stream: dl.stream.clone(),
            done: end.is_none(),
            end,
            pending_after: Some("0".into()),
            returned: Vec::new(),
            seq: 0,
        })
    }

    fn error(&self, e: redis::RedisError) -> RedriveError {
        RedriveError::Read { target: format!("redis/{}", self.stream), detail: e.to_string() }
    }
}

impl DeadLetterReader for RedisDeadLetters {
    fn next(&mut self, max: usize) -> BoxFuture<'_, Result<Vec<Message>, RedriveError>> {
        Box::pin(async move {
            let mut batch = Vec::new();
            while !self.done && batch.is_empty() {
                let from = self.pending_after.clone().unwrap_or_else(|| ">".into());
                let reply: Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(REDIS_GROUP)
                    .arg(REDIS_CONSUMER)
                    .arg("COUNT")
                    .arg(max)
                    .arg("STREAMS")
                    .arg(&self.stream)
                    .arg(&from)
                    .query_async(&mut self.conn)
                    .await
                    .map_err(|e| self.error(e))?;
                let read = read_reply(&reply);
                if read.is_empty() {
                    match self.pending_after {
                        // Every pending entry seen: now the new ones.
                        Some(_) => self.pending_after = None,
                        None => self.done = true,
                    }
                    continue;
                }
                for (id, fields) in read {
                    if self.pending_after.is_some() {
                        self.pending_after = Some(id.clone());
                    }
                    if StreamId::parse(&id) > self.end {
                        // Added after the redrive started: the next redrive's
                        // (read, so pending: it finds it there).
                        self.done = true;
                        break;
                    }
                    // An entry deleted while pending: nothing to send, only to acknowledge.
                    if let Some(fields) = fields {
                        self.seq += 1;
                        batch.push(entry_message(fields, entry_offset(&id).unwrap_or(self.seq)));
                    }
                    self.returned.push(id);
                }
            }
            Ok(batch)
        })
    }

    fn commit(&mut self) -> BoxFuture<'_, Result<(), RedriveError>> {
        Box::pin(async move {
            if self.returned.is_empty() {
                return Ok(());
            }
            let ids = std::mem::take(&mut self.returned);
            let acked: Result<i64, _> =
                redis::cmd("XACK").arg(&self.stream).arg(REDIS_GROUP).arg(&ids).query_async(&mut self.conn).await;
            if let Err(e) = acked {
                self.returned = ids;
                return Err(self.error(e));
            }
            Ok(())
        })
    }
}

/// A NATS dead-letter subject, through the durable pull consumer
/// `sluice-redrive-<ns>-<name>` on the stream that captures it, up to the
/// stream's last sequence when opened; each message acked after the
/// republish. Messages past that end are nak'd for the next redrive.
pub struct NatsDeadLetters {
    client: async_nats::Client,
    consumer: async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config>,
    subject: String,
    end: u64,
    done: bool,
    returned: Vec<async_nats::jetstream::Message>,
}

/// How long the server waits for the redrive's ack before redelivering: a
/// leader that died mid-batch holds its messages this long.
const NATS_ACK_WAIT: Duration = Duration::from_secs(30);

impl NatsDeadLetters {
    pub async fn open(spec: &StreamProcessorSpec, durable: &str) -> Result<Self, RedriveError> {
        use async_nats::jetstream::{self, consumer::pull};
        let field = "spec.deadLetter.nats";
        let dl = spec
            .dead_letter
            .as_ref()
            .and_then(|d| d.nats.as_ref())
            .ok_or(RedriveError::Config { field, detail: "no NATS dead-letter subject".into() })?;
        let read = |e: String| RedriveError::Read { target: format!("nats/{}", dl.subject), detail: e };
        let options =
            crate::source::nats::connect_options(dl.auth.as_ref(), "DEADLETTER", field, &|v| std::env::var(v).ok())
                .map_err(|detail| RedriveError::Config { field, detail })?;
        let client = options
            .name("sluice-redrive")
            .connect(&dl.servers)
            .await
            .map_err(|e| read(format!("cannot connect to {}: {e}", dl.servers.join(","))))?;
        let js = jetstream::new(client.clone());
        let name = js
            .stream_by_subject(dl.subject.clone())
            .await
            .map_err(|e| read(format!("no stream captures subject {}: {e}", dl.subject)))?;
        let stream = js.get_stream(&name).await.map_err(|e| read(format!("stream {name}: {e}")))?;
        let end = stream.cached_info().state.last_sequence;
        let config = pull::Config {
            durable_name: Some(durable.to_string()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: NATS_ACK_WAIT,
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            filter_subject: dl.subject.clone(),
            max_ack_pending: 10_000,
            ..Default::default()
        };
        let consumer = stream
            .get_or_create_consumer(durable, config)
            .await
            .map_err(|e| read(format!("durable consumer {durable}: {e}")))?;
        tracing::info!(stream = %name, subject = %dl.subject, durable, end, "redrive: reading the NATS dead letters");
        Ok(Self { client, consumer, subject: dl.subject.clone(), end, done: end == 0, returned: Vec::new() })
    }

    fn error(&self, e: impl std::fmt::Display) -> RedriveError {
        RedriveError::Read { target: format!("nats/{}", self.subject), detail: e.to_string() }
    }
}

/// A dead letter as the NATS sink wrote it: the key in `Sluice-Key`, the
/// other headers as they were; the offset is its dead-letter sequence (a
/// republish to a NATS source derives its `Nats-Msg-Id` from it).
fn nats_message(m: &async_nats::jetstream::Message, seq: u64) -> Message {
    let mut out = Message::new(0, i64::try_from(seq).unwrap_or(i64::MAX), m.payload.to_vec());
    if let Some(h) = &m.headers {
        for (name, values) in h.iter() {
            let name: &str = name.as_ref();
            if name.starts_with("Nats-") {
                continue;
            }
            let value = values.first().map(|v| v.as_str().as_bytes().to_vec()).unwrap_or_default();
            if name == crate::source::nats::HEADER_KEY {
                out.key = Some(value);
            } else {
                out.headers.push((name.to_string(), value));
            }
        }
    }
    out
}

impl DeadLetterReader for NatsDeadLetters {
    fn next(&mut self, max: usize) -> BoxFuture<'_, Result<Vec<Message>, RedriveError>> {
        Box::pin(async move {
            use futures::StreamExt;
            while !self.done {
                let mut fetched =
                    self.consumer.fetch().max_messages(max).messages().await.map_err(|e| self.error(e))?;
                let mut batch = Vec::new();
                let mut beyond = false;
                while let Some(m) = fetched.next().await {
                    let m = m.map_err(|e| self.error(e))?;
                    let seq = m.info().map_err(|e| self.error(e))?.stream_sequence;
                    if seq > self.end {
                        // The next redrive's: handed back (with a short
                        // delay, so it does not come straight back). Not the
                        // end of this one: a leader that stopped mid-batch
                        // may have left messages up to `end` unacked, which
                        // come back after NATS_ACK_WAIT.
                        beyond = true;
                        m.ack_with(async_nats::jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                            .await
                            .map_err(|e| self.error(e))?;
                        continue;
                    }
                    batch.push(nats_message(&m, seq));
                    self.returned.push(m);
                }
                if !batch.is_empty() {
                    return Ok(batch);
                }
                // Nothing up to `end` to fetch now: finished once everything
                // up to `end` is acked (the ack floor), or, with nothing past
                // `end` in the way, once nothing awaits an ack.
                let info = match self.consumer.info().await {
                    Ok(info) => info.clone(),
                    Err(e) => {
                        return Err(RedriveError::Read {
                            target: format!("nats/{}", self.subject),
                            detail: e.to_string(),
                        });
                    }
                };
                if info.ack_floor.stream_sequence >= self.end || (!beyond && info.num_ack_pending == 0) {
                    self.done = true;
                } else {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Ok(Vec::new())
        })
    }

    fn commit(&mut self) -> BoxFuture<'_, Result<(), RedriveError>> {
        Box::pin(async move {
            for m in std::mem::take(&mut self.returned) {
                m.ack().await.map_err(|e| self.error(e))?;
            }
            self.client.flush().await.map_err(|e| self.error(e))
        })
    }
}

// ---------------------------------------------------------------- the run --

/// The sink that writes into the processor's source: its topic, stream or
/// subject, with the source's own login.
pub async fn source_writer(spec: &StreamProcessorSpec) -> Result<Box<dyn Sink>, RedriveError> {
    let env = |v: &str| std::env::var(v).ok();
    let s = &spec.source;
    if let Some(k) = &s.kafka {
        let target = sink_spec(k, &["brokers", "topic", "auth"], serde_json::json!({}), "spec.source.kafka")?;
        return Ok(Box::new(KafkaSink::new(&target, Some(k), "SOURCE", "spec.source.kafka", &env)?));
    }
    if let Some(r) = &s.redis {
        let target =
            sink_spec(r, &["url", "stream", "passwordSecretRef", "tls"], serde_json::json!({}), "spec.source.redis")?;
        return Ok(Box::new(RedisSink::new(&target, "SOURCE", "spec.source.redis", &env)?));
    }
    if let Some(n) = &s.nats {
        let field = "spec.source.nats.filterSubject";
        let subject = n.filter_subject.clone().filter(|f| !f.split('.').any(|t| t == "*" || t == ">")).ok_or(
            RedriveError::Config {
                field,
                detail: "redrive publishes to one subject: set filterSubject to a subject without wildcards".into(),
            },
        )?;
        let target: sluice_crds::NatsSink =
            sink_spec(n, &["servers", "auth", "tls"], serde_json::json!({"subject": subject}), "spec.source.nats")?;
        // `NatsSink::new`'s future holds its `&dyn Fn` environment across
        // awaits, so it is not `Send`: run it to completion on this thread.
        let handle = tokio::runtime::Handle::current();
        let sink = tokio::task::block_in_place(|| {
            handle.block_on(NatsSink::new(&target, "SOURCE", "spec.source.nats", &|v| std::env::var(v).ok()))
        })?;
        return Ok(Box::new(sink));
    }
    Err(RedriveError::Config {
        field: "spec.deadLetter.redrive",
        detail: format!("a {} source cannot take records back; remove redrive", s.kind()),
    })
}

/// A sink spec for the source's own endpoint: the `fields` of the source
/// spec (address, login, TLS) and those of `extra`, nothing else (no key
/// expression, no trimming, no dedupe), so that whatever connection
/// settings a source gains, its redrive writer gains too.
fn sink_spec<S: serde::Serialize, T: serde::de::DeserializeOwned>(
    source: &S,
    fields: &[&str],
    extra: serde_json::Value,
    field: &'static str,
) -> Result<T, RedriveError> {
    let config = |detail: String| RedriveError::Config { field, detail };
    let serde_json::Value::Object(all) = serde_json::to_value(source).map_err(|e| config(e.to_string()))? else {
        return Err(config("not an object".into()));
    };
    let mut kept: serde_json::Map<String, serde_json::Value> =
        all.into_iter().filter(|(k, _)| fields.contains(&k.as_str())).collect();
    if let serde_json::Value::Object(extra) = extra {
        kept.extend(extra);
    }
    serde_json::from_value(serde_json::Value::Object(kept)).map_err(|e| config(format!("as a sink: {e}")))
}

/// The reader of the spec's dead-letter sink.
pub async fn dead_letter_reader(
    spec: &StreamProcessorSpec,
    processor: &str,
    floor: &BTreeMap<i32, i64>,
) -> Result<Box<dyn DeadLetterReader>, RedriveError> {
    let dl = spec.dead_letter.as_ref();
    if dl.is_some_and(|d| d.kafka.is_some()) {
        return Ok(Box::new(KafkaDeadLetters::open(spec, &consumer_name(processor), floor)?));
    }
    if dl.is_some_and(|d| d.redis.is_some()) {
        return Ok(Box::new(RedisDeadLetters::open(spec).await?));
    }
    if dl.is_some_and(|d| d.nats.is_some()) {
        return Ok(Box::new(NatsDeadLetters::open(spec, &consumer_name(processor)).await?));
    }
    Err(RedriveError::Config {
        field: "spec.deadLetter",
        detail:
            "redrive reads the dead letters back from kafka, nats or redis; a stdout dead-letter sink cannot be read"
                .into(),
    })
}

/// The dead-letter reason of a redriven record the source refused.
pub const REASON_REDRIVE_REJECTED: &str = "redrive_rejected";

/// Moves every dead letter `reader` has into `sink`, batch by batch,
/// committing each batch only after it was published. A record the source
/// refuses for what it is (too large, invalid) goes back to `dead_letters`
/// (reason `redrive_rejected`, the source's error), after this redrive's
/// end, so a later redrive can try it again; nothing is committed past it
/// before it is there. Returns how many were read.
pub async fn redrive(
    reader: &mut dyn DeadLetterReader,
    sink: &mut dyn Sink,
    dead_letters: &mut dyn Sink,
    id: &str,
    metrics: Option<&Metrics>,
) -> Result<u64, RedriveError> {
    let mut total = 0;
    loop {
        let batch = reader.next(BATCH).await?;
        if batch.is_empty() {
            return Ok(total);
        }
        let batch: Vec<Message> = batch.into_iter().map(|m| redriven(m, id)).collect();
        match sink.write(&batch).await {
            Ok(()) => {}
            Err(SinkError::Rejected { rejected, .. }) => {
                // Refused for what it is (too large, invalid): sending it again
                // now cannot help; it goes back among the dead letters.
                let refused: Vec<Message> = rejected
                    .iter()
                    .filter_map(|r| {
                        let m = batch.get(r.index)?;
                        tracing::warn!(redrive = id, partition = m.partition, offset = m.offset, error = %r.error,
                            "the source refused this redriven record; it goes back to the dead letters");
                        Some(
                            DeadLetter {
                                message: m.clone(),
                                reason: REASON_REDRIVE_REJECTED,
                                error: r.error.clone(),
                                step: "spec.deadLetter.redrive".into(),
                                attempt: 1,
                                ack: None,
                            }
                            .into_message(),
                        )
                    })
                    .collect();
                dead_letters.write(&refused).await?;
            }
            Err(e) => return Err(e.into()),
        }
        reader.commit().await?;
        total += batch.len() as u64;
        if let Some(m) = metrics {
            m.redriven.inc_by(batch.len() as u64);
        }
        tracing::debug!(redrive = id, records = batch.len(), total, "redrive: batch republished and committed");
    }
}

/// What a request for a redrive came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The ledger says this id already finished: nothing was read.
    AlreadyDone,
    /// Republished this many records, and recorded the id.
    Redriven(u64),
}

/// Where a finished redrive of Kafka dead letters ended: the topic, and
/// the end per partition (the ledger's `sluice.io/redrive-kafka-end`).
#[derive(serde::Serialize, serde::Deserialize)]
struct KafkaEnd {
    topic: String,
    ends: BTreeMap<i32, i64>,
}

/// Where the next Kafka redrive of `spec` starts at the earliest, from the
/// recorded `position`: the ends recorded for the same dead-letter topic.
/// A position of another topic (the spec named another since), or of
/// another broker, is no floor: offsets of one topic say nothing of
/// another's. A bare map (recorded before the topic was) is taken as the
/// current topic's, as it was then.
fn kafka_floor(spec: &StreamProcessorSpec, position: Option<&str>) -> BTreeMap<i32, i64> {
    let (Some(topic), Some(position)) =
        (spec.dead_letter.as_ref().and_then(|d| d.kafka.as_ref()).map(|k| &k.topic), position)
    else {
        return BTreeMap::new();
    };
    if let Ok(end) = serde_json::from_str::<KafkaEnd>(position) {
        return if &end.topic == topic { end.ends } else { BTreeMap::new() };
    }
    serde_json::from_str(position).unwrap_or_default()
}

/// One attempt at the redrive `spec` asks for: nothing if `ledger` has its
/// id, else read, republish, commit, and record the id.
pub async fn attempt(
    spec: &StreamProcessorSpec,
    processor: &str,
    id: &str,
    ledger: &dyn RedriveLedger,
    metrics: Option<&Metrics>,
) -> Result<Outcome, RedriveError> {
    if ledger.done().await?.as_deref() == Some(id) {
        return Ok(Outcome::AlreadyDone);
    }
    let floor = kafka_floor(spec, ledger.position().await?.as_deref());
    let mut reader = dead_letter_reader(spec, processor, &floor).await?;
    let mut sink = source_writer(spec).await?;
    let mut dead_letters =
        crate::deadletter::broker_sink(spec, &|v| std::env::var(v).ok()).await?.ok_or(RedriveError::Config {
            field: "spec.deadLetter",
            detail: "redrive needs a kafka, nats or redis dead-letter sink".into(),
        })?;
    let n = redrive(reader.as_mut(), sink.as_mut(), dead_letters.as_mut(), id, metrics).await?;
    ledger.record(id, reader.position().as_deref()).await?;
    Ok(Outcome::Redriven(n))
}

/// The redrive task: runs the requested redrive (if any, and not done) with
/// retries until it is done, then waits for `stop`. Without a ledger (a
/// local run without a Lease) it only says why it does nothing: it could
/// not remember that it was done, and would redo it on every start.
pub async fn run(
    spec: &StreamProcessorSpec,
    processor: &str,
    metrics: &Metrics,
    ledger: Option<Arc<dyn RedriveLedger>>,
    stop: CancellationToken,
) {
    let Some(id) = requested(spec) else {
        stop.cancelled().await;
        return;
    };
    let Some(ledger) = ledger else {
        tracing::warn!(
            redrive = id,
            "spec.deadLetter.redrive is set, but without a Lease (SLUICE_LEASE_NAME) \
            this worker cannot record it as done; not redriving (run it under the operator)"
        );
        stop.cancelled().await;
        return;
    };
    let mut delay = RETRY_FIRST;
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = attempt(spec, processor, id, ledger.as_ref(), Some(metrics)) => r,
        };
        match result {
            Ok(Outcome::AlreadyDone) => {
                tracing::info!(redrive = id, annotation = ANNOTATION_DONE, "redrive already done; nothing to do");
                break;
            }
            Ok(Outcome::Redriven(n)) => {
                tracing::info!(
                    redrive = id,
                    records = n,
                    annotation = ANNOTATION_DONE,
                    "redrive done: dead letters republished to the source; recorded on the Lease"
                );
                break;
            }
            Err(e) if e.is_permanent() => {
                tracing::warn!(redrive = id, error = %e, "redrive cannot run with this spec; fix it to try again");
                break;
            }
            Err(e) => {
                tracing::warn!(redrive = id, error = %e, retry_in = ?delay,
                    "redrive interrupted; retrying from the last committed position");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
    stop.cancelled().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dead letters in memory: all in one batch, then none.
    struct Letters {
        left: Vec<Message>,
        committed: bool,
    }

    impl DeadLetterReader for Letters {
        fn next(&mut self, _max: usize) -> BoxFuture<'_, Result<Vec<Message>, RedriveError>> {
            Box::pin(async move { Ok(std::mem::take(&mut self.left)) })
        }
        fn commit(&mut self) -> BoxFuture<'_, Result<(), RedriveError>> {
            Box::pin(async move {
                self.committed = true;
                Ok(())
            })
        }
    }

    /// Takes every record but the one at `refuse`, which it refuses; with
    /// `refuse` None it takes all, or fails them all when `down`.
    struct Source {
        refuse: Option<usize>,
        down: bool,
        got: Vec<Message>,
    }

    impl Sink for Source {
        fn write<'a>(&'a mut self, batch: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>> {
            Box::pin(async move {
                if self.down {
                    return Err(SinkError::Broker { kind: "test", target: "t".into(), detail: "down".into() });
                }
                for (i, m) in batch.iter().enumerate() {
                    if Some(i) != self.refuse {
                        self.got.push(m.clone());
                    }
                }
                match self.refuse {
                    Some(index) => Err(SinkError::Rejected {
                        kind: "test",
                        target: "in".into(),
                        rejected: vec![crate::sink::Rejection { index, error: "too large for in".into() }],
                        attempts: 1,
                    }),
                    None => Ok(()),
                }
            })
        }
        fn kind(&self) -> &'static str {
            "test"
        }
    }

    #[tokio::test]
    async fn a_record_the_source_refuses_goes_back_to_the_dead_letters_before_the_commit() {
        let letters = || (0..3).map(|i| Message::new(0, i, format!("{{\"n\":{i}}}").into_bytes())).collect();
        let mut reader = Letters { left: letters(), committed: false };
        let mut source = Source { refuse: Some(1), down: false, got: Vec::new() };
        let mut dead = Source { refuse: None, down: false, got: Vec::new() };
        let n = redrive(&mut reader, &mut source, &mut dead, "fix-1", None).await.expect("redrive");
        assert_eq!(n, 3);
        assert_eq!(source.got.iter().map(|m| m.offset).collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(dead.got.len(), 1, "the refused record is a dead letter again");
        let d = &dead.got[0];
        assert_eq!(d.header(HEADER_REASON), Some(REASON_REDRIVE_REJECTED.as_bytes()));
        assert_eq!(d.header(HEADER_ERROR), Some(b"too large for in".as_slice()));
        assert_eq!(d.header(HEADER_STEP), Some(b"spec.deadLetter.redrive".as_slice()));
        assert_eq!(d.payload.to_bytes(), br#"{"n":1}"#.to_vec());
        assert!(reader.committed);

        // The dead-letter sink down: nothing is committed past the refused record.
        let mut reader = Letters { left: letters(), committed: false };
        let mut source = Source { refuse: Some(1), down: false, got: Vec::new() };
        let mut dead = Source { refuse: None, down: true, got: Vec::new() };
        assert!(redrive(&mut reader, &mut source, &mut dead, "fix-1", None).await.is_err());
        assert!(!reader.committed, "not committed past a refused record that is nowhere yet");
    }

    #[test]
    fn a_recorded_kafka_end_is_a_floor_only_for_its_own_topic() {
        let spec = |dead_letter: serde_json::Value| -> StreamProcessorSpec {
            serde_json::from_value(serde_json::json!({
                "source": {"kafka": {"brokers": ["k:9092"], "topic": "in"}},
                "sink": {"stdout": {}},
                "deadLetter": dead_letter,
            }))
            .expect("spec")
        };
        let dlq = spec(serde_json::json!({"kafka": {"topic": "dlq"}, "redrive": {"id": "r2"}}));
        let recorded =
            serde_json::to_string(&KafkaEnd { topic: "dlq".into(), ends: BTreeMap::from([(0, 7), (1, 3)]) }).unwrap();
        assert_eq!(kafka_floor(&dlq, Some(&recorded)), BTreeMap::from([(0, 7), (1, 3)]));
        let moved = spec(serde_json::json!({"kafka": {"topic": "dlq-v2"}, "redrive": {"id": "r2"}}));
        assert!(kafka_floor(&moved, Some(&recorded)).is_empty(), "another topic's offsets are no floor");
        assert_eq!(kafka_floor(&dlq, Some(r#"{"0":5}"#)), BTreeMap::from([(0, 5)]), "the shape recorded before");
        assert!(kafka_floor(&dlq, None).is_empty());
        let redis = spec(serde_json::json!({"redis": {"url": "redis://r:6379", "stream": "dlq"}}));
        assert!(kafka_floor(&redis, Some(&recorded)).is_empty());
    }

    #[test]
    fn a_partition_past_its_end_is_committed_at_its_end_and_only_while_open() {
        let end = BTreeMap::from([(0, 100), (1, 50), (2, 70)]);
        let open = BTreeSet::from([0, 2]);
        // 0: open, passed its end (a transaction marker at 100): done at 100.
        // 1: closed earlier, its reads went on past the end over records
        //    dead-lettered since: not touched, so they stay for the next redrive.
        // 2: open, short of its end: still open.
        let positions = [(0, 101), (1, 64), (2, 69)];
        assert_eq!(passed_ends(&open, &end, &positions), vec![(0, 100)]);
    }

    #[test]
    fn a_redriven_record_keeps_its_own_headers_and_names_the_redrive() {
        let mut m = Message::new(3, 41, b"{\"a\":1}".to_vec());
        m.key = Some(b"k".to_vec());
        m.headers = [
            ("trace", "t1"),
            (HEADER_ERROR, "boom"),
            (HEADER_REASON, "expression"),
            (HEADER_STEP, "pipeline[1].map"),
            (HEADER_PARTITION, "3"),
            (HEADER_OFFSET, "41"),
            (HEADER_ATTEMPT, "1"),
            (HEADER_SOURCE, "kafka/in"),
            (HEADER_REDIS_ID, "1-0"),
            (HEADER_REDRIVE_ID, "an-older-one"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
        let r = redriven(m, "fix-1");
        assert_eq!(r.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(r.payload.to_bytes().as_ref(), b"{\"a\":1}");
        let names: Vec<(&str, &[u8])> = r.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
        assert_eq!(names, vec![("trace", &b"t1"[..]), (HEADER_REDRIVE_ID, &b"fix-1"[..])]);
    }

    #[test]
    fn names_derive_from_the_processor() {
        assert_eq!(consumer_name("shop/orders"), "sluice-redrive-shop-orders");
    }

    #[test]
    fn stream_ids_order_numerically() {
        let id = |s| StreamId::parse(s).expect("id");
        assert!(id("10-0") > id("9-5"));
        assert!(id("9-10") > id("9-9"));
        assert_eq!(StreamId::parse("x"), None);
        assert!(Some(id("1-0")) > None, "any id is past an empty stream's end");
    }

    #[test]
    fn a_generator_source_cannot_be_redriven_into() {
        let spec: StreamProcessorSpec = serde_json::from_value(serde_json::json!({
            "source": {"generator": {"template": {"id": "seq"}}},
            "sink": {"stdout": {}},
            "deadLetter": {"redis": {"url": "redis://r", "stream": "dlq"}, "redrive": {"id": "x"}}
        }))
        .expect("spec");
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let err = rt.block_on(source_writer(&spec)).err().expect("refused");
        assert!(err.is_permanent(), "{err}");
        assert!(err.to_string().starts_with("spec.deadLetter.redrive: a generator source"), "{err}");
    }
}

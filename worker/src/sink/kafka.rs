//! Kafka sink (and dead-letter sink): an idempotent producer with `acks=all`;
//! `write` enqueues the whole batch, then awaits every delivery report, so a
//! batch counts as delivered only once the broker has it.
//!
//! ```text
//! batch ──send_result (librdkafka batches by linger.ms/batch.size, compresses)──> broker
//!   └─ DeliveryFuture per message ──all Ok──> write returns Ok ──> offsets finish
//! ```
//!
//! A full local queue is backpressure: the sink waits for the reports it
//! already has in flight, then enqueues the rest. A failed report fails the
//! batch; the runtime retries it (at-least-once: messages of the batch that
//! did arrive are sent again).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures::future::BoxFuture;
use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer},
};
use serde_json::Value;
use sluice_crds::{Compression, KafkaAuth, KafkaSink as KafkaSinkSpec, KafkaSource as KafkaSourceSpec};

use super::{Rejection, Sink, SinkError};
use crate::{expr::Expression, message::Message, source::kafka::client_config};

/// Defaults the user's `properties` may override. `murmur2_random` is the
/// Java client's partitioner (librdkafka's own default hashes keys with
/// CRC32): a key lands on the partition Java producers, Kafka Streams and
/// Kafka Connect would choose for it, so outputs stay co-partitioned with
/// topics those write, and records a redrive writes back into a source
/// topic follow their key's earlier records.
const PRODUCER_DEFAULTS: [(&str, &str); 1] = [("partitioner", "murmur2_random")];

/// The librdkafka producer settings a sink always runs with (the user's
/// `properties` cannot weaken delivery).
fn producer_settings(compression: Compression) -> [(&'static str, &'static str); 5] {
    [
        ("enable.idempotence", "true"),
        ("acks", "all"),
        ("linger.ms", "5"),
        ("message.timeout.ms", "300000"),
        (
            "compression.type",
            match compression {
                Compression::None => "none",
                Compression::Gzip => "gzip",
                Compression::Snappy => "snappy",
                Compression::Lz4 => "lz4",
                Compression::Zstd => "zstd",
            },
        ),
    ]
}

pub struct KafkaSink {
    producer: FutureProducer,
    topic: String,
    key: Option<Expression>,
    /// Added to every record (the dead-letter sink names the source here).
    extra_headers: Vec<(String, Vec<u8>)>,
    /// Exactly-once: writes go into the open transaction, which the source's
    /// acker commits together with the consumed offsets.
    txn: Option<Arc<Transaction>>,
}

/// Exactly-once (Kafka to Kafka): one transactional producer shared by the
/// sink (which produces into the open transaction) and the source's acker
/// (which adds the consumed offsets with `send_offsets_to_transaction` and
/// commits). `transactional.id` is `sluice-<group>-<pod>`: a restarted
/// container (same pod) runs `init_transactions` under the same id, which
/// fences its predecessor and aborts the transaction it left open; a pod
/// replaced under a new name leaves that to the transaction timeout. Zombie
/// fencing across rebalances does not rest on the id: the offsets carry the
/// group's metadata (KIP-447), and a producer whose consumer generation is
/// stale cannot commit them.
///
/// ```text
/// sink.write: begin (if none open) ─ produce ─ await reports ─ note max source offset per partition
/// acker.commit(low-water marks): when every partition's mark is past what the
///     transaction holds ─ send_offsets_to_transaction ─ commit_transaction
/// any failure: abort, and refuse further writes: the run fails and the restarted
///     worker resumes from the last committed offsets (rewind)
/// revocation (inside the consumer's callback, once every partition drained):
///     commit now, the revoked partitions' offsets included, then forget them
/// ```
///
/// The commit on revocation is what keeps a live rebalance exactly-once
/// (as Kafka Streams commits on `onPartitionsRevoked`): left open, the
/// transaction would hold outputs whose offsets can no longer be committed
/// here, and the new owner, starting from the last committed offset, would
/// produce them again.
pub struct Transaction {
    producer: FutureProducer,
    pub transactional_id: String,
    state: Mutex<TxnState>,
    /// Held by a write for its whole produce, so that a commit from the
    /// revoke callback (another task) never commits records whose source
    /// offsets are not noted yet. Lock order: `writing`, then `state`.
    writing: tokio::sync::Mutex<()>,
    /// What the output topic accepts, read when the producer was made.
    limits: TopicLimits,
}

/// What an output topic accepts, from the broker (DescribeConfigs), for the
/// exactly-once sink. Inside a transaction librdkafka cannot drop one record
/// the broker refuses: the whole transaction must abort, the worker rewinds
/// by restarting, and meets the same record again, for ever. So the
/// transactional sink refuses such records itself before producing them
/// (they are dead-lettered like any refused record) and keeps librdkafka's
/// batches under the topic's limit. At-least-once sinks need none of this:
/// the broker's own refusal is dead-lettered there.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TopicLimits {
    /// The topic's `max.message.bytes` (the largest record batch it takes).
    pub max_message_bytes: Option<usize>,
    /// `cleanup.policy` includes compact: every record needs a key.
    pub compacted: bool,
}

/// The size of a record batch holding just this record, an upper bound:
/// the v2 batch header (61 bytes) and every varint at its longest, not
/// compressed. Under compression the broker checks the compressed batch,
/// so this can refuse a record that would have compressed under the limit;
/// it never lets one through that the broker refuses for its size.
pub fn single_record_batch_bytes(key: usize, value: usize, headers: &[(String, Vec<u8>)]) -> usize {
    const BATCH_HEADER: usize = 61;
    // length, attributes, timestamp delta, offset delta, key length, value length, header count
    const RECORD_FIXED: usize = 5 + 1 + 10 + 5 + 5 + 5 + 5;
    let headers: usize = headers.iter().map(|(k, v)| 5 + k.len() + 5 + v.len()).sum();
    BATCH_HEADER + RECORD_FIXED + key + value + headers
}

impl TopicLimits {
    /// Why the topic would refuse this record, if it would.
    pub fn refusal(&self, key: Option<&[u8]>, value: usize, headers: &[(String, Vec<u8>)]) -> Option<String> {
        if self.compacted && key.is_none() {
            return Some(
                "the topic is compacted (cleanup.policy=compact) and the record has no key; set spec.sink.kafka.key"
                    .into(),
            );
        }
        let limit = self.max_message_bytes?;
        let size = single_record_batch_bytes(key.map_or(0, <[u8]>::len), value, headers);
        (size > limit).then(|| {
            format!(
                "the record is too large for the topic: {size} bytes with its framing (uncompressed), over the topic's max.message.bytes of {limit}; refused before producing, as a broker refusal would abort the exactly-once transaction"
            )
        })
    }

    fn from_config(max_message_bytes: Option<&str>, cleanup_policy: Option<&str>) -> Self {
        Self {
            max_message_bytes: max_message_bytes.and_then(|v| v.trim().parse().ok()),
            compacted: cleanup_policy.is_some_and(|p| p.split(',').any(|p| p.trim() == "compact")),
        }
    }
}

/// Reads `topic`'s limits from the broker; unknown (the topic does not exist
/// yet, or the login may not describe it) gives the defaults, with a log line.
fn topic_limits(config: &rdkafka::ClientConfig, topic: &str) -> TopicLimits {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let lookup = || -> Result<TopicLimits, String> {
        let admin: AdminClient<rdkafka::client::DefaultClientContext> = config.create().map_err(|e| e.to_string())?;
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let specifier = ResourceSpecifier::Topic(topic);
        let results = tokio::runtime::Handle::current()
            .block_on(admin.describe_configs([&specifier], &opts))
            .map_err(|e| e.to_string())?;
        let resource = results.into_iter().next().ok_or("no answer")?.map_err(|e| e.to_string())?;
        let value = |name: &str| resource.get(name).and_then(|e| e.value.clone());
        Ok(TopicLimits::from_config(value("max.message.bytes").as_deref(), value("cleanup.policy").as_deref()))
    };
    match tokio::task::block_in_place(lookup) {
        Ok(limits) => {
            tracing::info!(topic, ?limits, "exactly-once: the output topic's limits");
            limits
        }
        Err(e) => {
            tracing::warn!(topic, error = %e,
                "exactly-once: could not read the output topic's limits; a record the broker refuses will abort transactions");
            TopicLimits::default()
        }
    }
}

#[derive(Default)]
struct TxnState {
    open: bool,
    /// Largest source offset per partition whose output is in the open transaction.
    produced: BTreeMap<i32, i64>,
    /// The runtime's low-water marks so far (it reports only the ones that moved).
    marks: BTreeMap<i32, i64>,
    /// The marks the last committed transaction carried.
    committed_marks: BTreeMap<i32, i64>,
    /// Revoked and not assigned again: their offsets are their new owner's
    /// to commit. Marks reported for them later (the runtime hears of the
    /// revocation after the callback) are ignored; committing them would
    /// move the new owner's offsets backwards.
    released: BTreeSet<i32>,
    failed: Option<String>,
}

impl TxnState {
    fn note_marks(&mut self, positions: &[(i32, i64)]) {
        for &(p, o) in positions {
            if !self.released.contains(&p) {
                self.marks.insert(p, o);
            }
        }
    }

    /// Partitions with outputs in the open transaction past their mark.
    fn uncovered(&self) -> Vec<i32> {
        self.produced.iter().filter(|(p, o)| self.marks.get(p).is_none_or(|m| m <= o)).map(|(p, _)| *p).collect()
    }

    /// What a revocation must do with the transaction, given every mark.
    fn on_revocation(&self) -> Revocation {
        let uncovered = self.uncovered();
        if !uncovered.is_empty() {
            Revocation::Abort { uncovered }
        } else if self.produced.is_empty() && !self.open && self.marks == self.committed_marks {
            Revocation::Nothing
        } else {
            Revocation::Commit
        }
    }

    /// The revoked partitions leave the transaction's bookkeeping.
    fn release(&mut self, revoked: &[i32]) {
        for p in revoked {
            self.marks.remove(p);
            self.produced.remove(p);
            self.committed_marks.remove(p);
            self.released.insert(*p);
        }
    }

    fn assign(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.released.remove(p);
        }
    }

    fn note_produced(&mut self, batch: &[Message]) {
        for m in batch {
            let e = self.produced.entry(m.partition).or_insert(m.offset);
            *e = (*e).max(m.offset);
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Revocation {
    /// Outputs or moved marks to commit, all covered.
    Commit,
    /// Nothing open and no mark moved since the last commit.
    Nothing,
    /// These partitions' outputs are past their finished offsets.
    Abort { uncovered: Vec<i32> },
}

/// How long a transaction may stay open before the broker aborts it.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);
const TXN_CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl Transaction {
    /// Creates the transactional producer and runs `init_transactions`
    /// (which fences an older producer with the same id).
    pub fn new(
        spec: &KafkaSinkSpec,
        source: Option<&KafkaSourceSpec>,
        transactional_id: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Arc<Self>, SinkError> {
        let field = "spec.sink.kafka";
        let at = endpoint(spec, source, "SINK", field)?;
        let mut config = client_config(&at.brokers, at.auth.as_ref(), at.place, field, env)
            .map_err(|detail| SinkError::Config { field, detail })?;
        for (k, v) in PRODUCER_DEFAULTS {
            config.set(k, v);
        }
        for (k, v) in &spec.properties {
            config.set(k, v);
        }
        for (k, v) in producer_settings(spec.compression) {
            config.set(k, v);
        }
        config
            .set("transactional.id", transactional_id)
            .set("transaction.timeout.ms", TRANSACTION_TIMEOUT.as_millis().to_string())
            .set("message.timeout.ms", TRANSACTION_TIMEOUT.as_millis().to_string());
        let limits = topic_limits(&config, &spec.topic);
        if let Some(limit) = limits.max_message_bytes
            && !spec.properties.contains_key("batch.size")
        {
            // librdkafka's default batch (1,000,000 bytes) could exceed a
            // smaller topic limit with records that each fit.
            config.set("batch.size", limit.clamp(1, 1_000_000).to_string());
        }
        let producer: FutureProducer = config.create().map_err(|e| SinkError::Config {
            field,
            detail: format!("the Kafka client rejected the transactional configuration: {e}"),
        })?;
        tokio::task::block_in_place(|| producer.init_transactions(TXN_CALL_TIMEOUT)).map_err(|e| {
            SinkError::Broker {
                kind: "kafka",
                target: spec.topic.clone(),
                detail: format!("init_transactions for {transactional_id}: {e}"),
            }
        })?;
        tracing::info!(transactional_id, topic = %spec.topic, "exactly-once: transactional producer ready");
        Ok(Arc::new(Self {
            producer,
            transactional_id: transactional_id.to_string(),
            state: Mutex::default(),
            writing: tokio::sync::Mutex::new(()),
            limits,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TxnState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Aborts the open transaction and refuses every later write: the run
    /// fails and the worker resumes from the committed offsets.
    pub fn abort(&self, why: String) {
        let _ = self.fail(why);
    }

    /// Aborts the open transaction and refuses every later write.
    fn fail(&self, why: String) -> String {
        let mut st = self.lock();
        if st.open {
            if let Err(e) = tokio::task::block_in_place(|| self.producer.abort_transaction(TXN_CALL_TIMEOUT)) {
                tracing::warn!(error = %e, "abort_transaction failed; the broker aborts it after the transaction timeout");
            }
            st.open = false;
        }
        tracing::error!(transactional_id = %self.transactional_id, error = %why,
            "exactly-once transaction aborted; the worker stops and resumes from the last committed offsets");
        st.failed.get_or_insert(why).clone()
    }

    fn begin(&self) -> Result<(), String> {
        let mut st = self.lock();
        if let Some(f) = &st.failed {
            return Err(format!(
                "an earlier transaction was aborted ({f}); restart to resume from the committed offsets"
            ));
        }
        if !st.open {
            self.producer.begin_transaction().map_err(|e| format!("begin_transaction: {e}"))?;
            st.open = true;
        }
        Ok(())
    }

    fn produced(&self, batch: &[Message]) {
        self.lock().note_produced(batch);
    }

    /// The acker's half: record the low-water marks; commit the transaction
    /// with them once they cover everything it holds.
    pub fn commit(
        &self,
        topic: &str,
        positions: &[(i32, i64)],
        group: &rdkafka::consumer::ConsumerGroupMetadata,
    ) -> Result<bool, String> {
        let mut st = self.lock();
        if let Some(f) = &st.failed {
            return Err(f.clone());
        }
        st.note_marks(positions);
        if !st.uncovered().is_empty() {
            return Ok(false);
        }
        match self.commit_locked(&mut st, topic, group) {
            Ok(()) => Ok(true),
            Err(e) => {
                drop(st);
                Err(self.fail(e))
            }
        }
    }

    /// Partitions (again) assigned to this worker: their marks count again.
    pub fn assign(&self, partitions: &[i32]) {
        self.lock().assign(partitions);
    }

    /// The revoke callback's half, called once the runtime has drained every
    /// partition (`Drain::All`) with `positions` for all of them: commits
    /// the open transaction with every partition's offsets, the revoked
    /// ones included, while they are still this worker's; then forgets the
    /// revoked partitions. If the marks still do not cover what the
    /// transaction holds (the drain ran out of time), the transaction is
    /// aborted instead: the run fails and the worker resumes from the
    /// committed offsets, which is what the new owner does too. Ok(false):
    /// nothing was open and no mark had moved.
    pub fn commit_on_revoke(
        &self,
        topic: &str,
        positions: &[(i32, i64)],
        revoked: &[i32],
        group: &rdkafka::consumer::ConsumerGroupMetadata,
    ) -> Result<bool, String> {
        // Called from a synchronous callback on a runtime thread: the write
        // in progress, if any, finishes on another thread meanwhile.
        let _writing = tokio::task::block_in_place(|| futures::executor::block_on(self.writing.lock()));
        let mut st = self.lock();
        if let Some(f) = &st.failed {
            return Err(f.clone());
        }
        st.note_marks(positions);
        let result = match st.on_revocation() {
            Revocation::Abort { uncovered } => Err(format!(
                "revocation of partitions {revoked:?}: partitions {uncovered:?} have outputs in the open transaction past their finished offsets, so it cannot commit before the partitions move"
            )),
            Revocation::Nothing => Ok(false),
            Revocation::Commit => self.commit_locked(&mut st, topic, group).map(|()| true),
        };
        st.release(revoked);
        result.map_err(|e| {
            drop(st);
            self.fail(e)
        })
    }

    /// Sends every mark with the open transaction (one is begun if none is,
    /// so that moved marks alone still commit) and commits it.
    fn commit_locked(
        &self,
        st: &mut TxnState,
        topic: &str,
        group: &rdkafka::consumer::ConsumerGroupMetadata,
    ) -> Result<(), String> {
        let mut tpl = rdkafka::TopicPartitionList::with_capacity(st.marks.len());
        for (p, o) in &st.marks {
            tpl.add_partition_offset(topic, *p, rdkafka::Offset::Offset(*o)).map_err(|e| e.to_string())?;
        }
        tokio::task::block_in_place(|| -> Result<(), String> {
            if !st.open {
                self.producer.begin_transaction().map_err(|e| format!("begin_transaction: {e}"))?;
                st.open = true;
            }
            self.producer
                .send_offsets_to_transaction(&tpl, group, TXN_CALL_TIMEOUT)
                .map_err(|e| format!("send_offsets_to_transaction: {e}"))?;
            self.producer.commit_transaction(TXN_CALL_TIMEOUT).map_err(|e| format!("commit_transaction: {e}"))
        })?;
        st.open = false;
        st.produced.clear();
        st.committed_marks = st.marks.clone();
        Ok(())
    }
}

impl KafkaSink {
    /// `place`: `SINK` or `DEADLETTER` (which secrets to read); `field`: the
    /// spec field for errors; `source`: the Kafka source, whose cluster and
    /// login the sink uses when it names no brokers ([`endpoint`]).
    pub fn new(
        spec: &KafkaSinkSpec,
        source: Option<&KafkaSourceSpec>,
        place: &'static str,
        field: &'static str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, SinkError> {
        let at = endpoint(spec, source, place, field)?;
        let brokers = at.brokers.clone();
        let mut config = client_config(&at.brokers, at.auth.as_ref(), at.place, field, env)
            .map_err(|detail| SinkError::Config { field, detail })?;
        for (k, v) in PRODUCER_DEFAULTS {
            config.set(k, v);
        }
        for (k, v) in &spec.properties {
            config.set(k, v);
        }
        for (k, v) in producer_settings(spec.compression) {
            config.set(k, v);
        }
        let producer: FutureProducer = config.create().map_err(|e| SinkError::Config {
            field,
            detail: format!("the Kafka client rejected the configuration: {e}"),
        })?;
        let key = spec
            .key
            .as_deref()
            .map(Expression::parse)
            .transpose()
            .map_err(|e| SinkError::Config { field, detail: format!("key: {e}") })?;
        tracing::info!(topic = %spec.topic, brokers = %brokers.join(","), compression = ?spec.compression, "Kafka producer ready");
        Ok(Self { producer, topic: spec.topic.clone(), key, extra_headers: Vec::new(), txn: None })
    }

    /// An exactly-once sink producing into `txn`'s transactions.
    pub fn transactional(spec: &KafkaSinkSpec, txn: Arc<Transaction>) -> Result<Self, SinkError> {
        let key = spec
            .key
            .as_deref()
            .map(Expression::parse)
            .transpose()
            .map_err(|e| SinkError::Config { field: "spec.sink.kafka", detail: format!("key: {e}") })?;
        Ok(Self {
            producer: txn.producer.clone(),
            topic: spec.topic.clone(),
            key,
            extra_headers: Vec::new(),
            txn: Some(txn),
        })
    }

    /// Adds a header to every record this sink writes.
    pub fn with_header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.extra_headers.push((name.to_string(), value.into()));
        self
    }

    /// The record key: the key expression's value (strings as is, anything
    /// else as JSON), else the message's own key.
    fn key_of(&self, m: &Message) -> Option<Vec<u8>> {
        let Some(expr) = &self.key else { return m.key.clone() };
        match expr.eval(m) {
            Ok(v) => Some(match v.as_ref() {
                Value::String(s) => s.as_bytes().to_vec(),
                Value::Null => return m.key.clone(),
                other => other.to_string().into_bytes(),
            }),
            Err(e) => {
                tracing::warn!(topic = %self.topic, partition = m.partition, offset = m.offset, error = %e,
                    "sink key expression failed; producing with the message's own key");
                m.key.clone()
            }
        }
    }

    fn error(&self, what: &str, e: &KafkaError) -> SinkError {
        SinkError::Broker { kind: "kafka", target: self.topic.clone(), detail: format!("{what}: {e}") }
    }

    async fn write_batch(&self, batch: &[Message]) -> Result<(), SinkError> {
        let Some(txn) = &self.txn else { return self.produce(batch).await };
        let aborted = |detail: String| SinkError::Aborted { kind: "kafka", target: self.topic.clone(), detail };
        // Until `produced` has noted the batch: see `Transaction::writing`.
        let _writing = txn.writing.lock().await;
        txn.begin().map_err(|e| aborted(txn.fail(e)))?;
        match self.produce(batch).await {
            Ok(()) => {
                txn.produced(batch);
                Ok(())
            }
            // Refused at enqueue: the rest of the batch is in the transaction,
            // and the refused records go to the dead-letter sink.
            Err(e @ SinkError::Rejected { .. }) => {
                txn.produced(batch);
                Err(e)
            }
            Err(e) => Err(aborted(txn.fail(e.to_string()))),
        }
    }

    async fn produce(&self, batch: &[Message]) -> Result<(), SinkError> {
        let mut reports: Vec<(usize, DeliveryFuture)> = Vec::with_capacity(batch.len());
        let mut rejected = Vec::new();
        for (index, m) in batch.iter().enumerate() {
            let payload = m.payload.to_bytes();
            let key = self.key_of(m);
            let mut headers = OwnedHeaders::new_with_capacity(m.headers.len() + self.extra_headers.len());
            for (k, v) in m.headers.iter().chain(&self.extra_headers) {
                headers = headers.insert(Header { key: k, value: Some(v) });
            }
            if let Some(error) =
                self.txn.as_ref().and_then(|t| t.limits.refusal(key.as_deref(), payload.len(), &m.headers))
            {
                rejected.push(Rejection { index, error });
                continue;
            }
            let mut record = FutureRecord::to(&self.topic).payload(payload.as_ref()).headers(headers);
            if let Some(k) = &key {
                record = record.key(k.as_slice());
            }
            if m.timestamp > 0 {
                record = record.timestamp(m.timestamp);
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(report) => {
                        reports.push((index, report));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // Backpressure: wait for what is in flight, then retry.
                        record = back;
                        if reports.is_empty() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        } else {
                            await_reports(self, &mut reports, &mut rejected).await?;
                        }
                    }
                    // Refused before it left: it never joined a transaction either.
                    Err((KafkaError::MessageProduction(code), _)) if refuses_the_record(code) => {
                        rejected.push(Rejection {
                            index,
                            error: format!("the producer refused the record ({} bytes): {code}", payload.len()),
                        });
                        break;
                    }
                    Err((e, _)) => return Err(self.error("enqueue", &e)),
                }
            }
        }
        await_reports(self, &mut reports, &mut rejected).await?;
        if rejected.is_empty() {
            Ok(())
        } else {
            Err(SinkError::Rejected { kind: "kafka", target: self.topic.clone(), rejected, attempts: 1 })
        }
    }
}

/// Where a Kafka sink connects and with whose credentials: its own brokers
/// and `auth`; or, naming no brokers, the source's cluster, with the
/// source's `auth` unless it has its own (the same cluster takes the same
/// login; the source's Secrets reach the worker as `SLUICE_SECRET_SOURCE_*`).
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub brokers: Vec<String>,
    pub auth: Option<KafkaAuth>,
    /// Whose secret variables `auth` reads: `SOURCE`, `SINK` or `DEADLETTER`.
    pub place: &'static str,
}

pub fn endpoint(
    spec: &KafkaSinkSpec,
    source: Option<&KafkaSourceSpec>,
    place: &'static str,
    field: &'static str,
) -> Result<Endpoint, SinkError> {
    match (&spec.brokers, source) {
        (Some(b), _) if !b.is_empty() => Ok(Endpoint { brokers: b.clone(), auth: spec.auth.clone(), place }),
        (_, Some(src)) => Ok(match &spec.auth {
            Some(auth) => Endpoint { brokers: src.brokers.clone(), auth: Some(auth.clone()), place },
            None => Endpoint { brokers: src.brokers.clone(), auth: src.auth.clone(), place: "SOURCE" },
        }),
        _ => Err(SinkError::Config {
            field,
            detail: "no brokers: set brokers (required unless the source is Kafka)".into(),
        }),
    }
}

/// Errors that are about the record itself, not the broker's health: the
/// same record sent again gets the same answer.
fn refuses_the_record(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTimestamp
            | RDKafkaErrorCode::PolicyViolation
            | RDKafkaErrorCode::MessageBatchTooLarge
    )
}

/// Awaits the delivery reports. A report refusing its record adds to
/// `rejected` (outside a transaction: inside one, librdkafka requires the
/// whole transaction to abort, so it fails the batch like any error);
/// anything else fails the batch.
async fn await_reports(
    sink: &KafkaSink,
    reports: &mut Vec<(usize, DeliveryFuture)>,
    rejected: &mut Vec<Rejection>,
) -> Result<(), SinkError> {
    let mut first_error = None;
    for (index, report) in reports.drain(..) {
        match report.await {
            Ok(Ok(_)) => {}
            Ok(Err((KafkaError::MessageProduction(code), _))) if sink.txn.is_none() && refuses_the_record(code) => {
                rejected.push(Rejection { index, error: format!("the broker refused the record: {code}") });
            }
            Ok(Err((e, _))) => {
                first_error.get_or_insert_with(|| sink.error("delivery", &e));
            }
            Err(_) => {
                first_error.get_or_insert_with(|| SinkError::Broker {
                    kind: "kafka",
                    target: sink.topic.clone(),
                    detail: "the producer dropped a delivery report".into(),
                });
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

impl Sink for KafkaSink {
    fn write<'a>(&'a mut self, batch: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(self.write_batch(batch))
    }

    fn kind(&self) -> &'static str {
        "kafka"
    }
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        // Every write awaited its reports, so this only flushes stragglers of
        // a failed batch; bounded so a dead broker cannot hold shutdown.
        if let Err(e) = self.producer.flush(Duration::from_secs(5)) {
            tracing::debug!(topic = %self.topic, error = %e, "Kafka producer flush at shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(auth: bool) -> KafkaSourceSpec {
        let mut v = serde_json::json!({"brokers": ["src:9093"], "topic": "in"});
        if auth {
            v["auth"] = serde_json::json!({"sasl": {"mechanism": "SCRAM-SHA-512", "secretRef": {"name": "src-user"}}});
        }
        serde_json::from_value(v).expect("source")
    }

    fn sink(v: serde_json::Value) -> KafkaSinkSpec {
        serde_json::from_value(v).expect("sink")
    }

    #[test]
    fn a_sink_without_brokers_uses_the_source_cluster_and_its_login() {
        let at = endpoint(&sink(serde_json::json!({"topic": "out"})), Some(&source(true)), "SINK", "spec.sink.kafka")
            .expect("endpoint");
        assert_eq!(at.brokers, vec!["src:9093".to_string()]);
        assert_eq!(at.auth, source(true).auth);
        assert_eq!(at.place, "SOURCE", "the source's Secrets, as the operator passes them");
    }

    #[test]
    fn a_sink_with_its_own_login_or_brokers_keeps_them() {
        let own_auth = serde_json::json!({"topic": "out",
            "auth": {"sasl": {"mechanism": "PLAIN", "secretRef": {"name": "sink-user"}}}});
        let at = endpoint(&sink(own_auth.clone()), Some(&source(true)), "SINK", "spec.sink.kafka").expect("endpoint");
        assert_eq!((at.brokers[0].as_str(), at.place), ("src:9093", "SINK"));
        assert_eq!(at.auth, sink(own_auth).auth);
        let own_brokers = sink(serde_json::json!({"topic": "out", "brokers": ["other:9092"]}));
        let at = endpoint(&own_brokers, Some(&source(true)), "DEADLETTER", "spec.deadLetter.kafka").expect("endpoint");
        assert_eq!((at.brokers[0].as_str(), at.auth.is_none(), at.place), ("other:9092", true, "DEADLETTER"));
        let err = endpoint(&sink(serde_json::json!({"topic": "out"})), None, "SINK", "spec.sink.kafka").unwrap_err();
        assert!(err.to_string().starts_with("spec.sink.kafka: no brokers"), "{err}");
    }

    #[test]
    fn a_revoked_partition_leaves_the_transaction_until_assigned_again() {
        let mut st = TxnState { open: true, ..Default::default() };
        st.note_produced(&[msg(0, 10), msg(1, 20)]);
        st.note_marks(&[(0, 11), (1, 21)]);
        assert_eq!(st.on_revocation(), Revocation::Commit);
        st.release(&[1]);
        assert_eq!(st.marks, BTreeMap::from([(0, 11)]), "its mark is no longer sent");
        assert!(!st.produced.contains_key(&1));
        // The runtime reports the revoked partition's position once more
        // before it hears of the revocation: its new owner's offset must
        // not be moved back to it.
        st.note_marks(&[(0, 12), (1, 21)]);
        assert_eq!(st.marks, BTreeMap::from([(0, 12)]));
        st.assign(&[1]);
        st.note_marks(&[(1, 40)]);
        assert_eq!(st.marks, BTreeMap::from([(0, 12), (1, 40)]), "assigned again, it counts again");
    }

    #[test]
    fn a_revocation_commits_only_what_the_marks_cover() {
        let mut st = TxnState { open: true, ..Default::default() };
        st.note_produced(&[msg(0, 10), msg(1, 20), msg(2, 5)]);
        st.note_marks(&[(0, 11), (1, 20), (2, 6)]);
        // Partition 1's output at offset 20 is in the transaction, but its
        // offset has not finished: committing would lose it on a replay.
        assert_eq!(st.on_revocation(), Revocation::Abort { uncovered: vec![1] });
        st.note_marks(&[(1, 21)]);
        assert_eq!(st.on_revocation(), Revocation::Commit);
        // After a commit: nothing open, marks as committed.
        st.open = false;
        st.produced.clear();
        st.committed_marks = st.marks.clone();
        assert_eq!(st.on_revocation(), Revocation::Nothing);
        // Marks alone moved (filtered messages): still worth a commit.
        st.note_marks(&[(2, 9)]);
        assert_eq!(st.on_revocation(), Revocation::Commit);
    }

    fn msg(partition: i32, offset: i64) -> Message {
        Message { partition, offset, ..Message::default() }
    }

    #[test]
    fn a_transactional_sink_refuses_what_the_topic_would() {
        let limits = TopicLimits::from_config(Some("1000"), Some("delete"));
        assert_eq!(limits, TopicLimits { max_message_bytes: Some(1000), compacted: false });
        let headers = vec![("trace".to_string(), vec![0u8; 20])];
        // 61 + 36 + key 10 + header 35 = 142 bytes besides the value: 858 of value fit, 859 do not.
        assert_eq!(single_record_batch_bytes(10, 858, &headers), 1000);
        assert_eq!(limits.refusal(Some(&[0; 10]), 858, &headers), None);
        let why = limits.refusal(Some(&[0; 10]), 859, &headers).expect("refused");
        assert!(why.contains("too large") && why.contains("max.message.bytes of 1000"), "{why}");

        let compacted = TopicLimits::from_config(None, Some("compact,delete"));
        assert!(compacted.compacted && compacted.max_message_bytes.is_none());
        assert!(compacted.refusal(None, 10, &[]).expect("refused").contains("spec.sink.kafka.key"));
        assert_eq!(compacted.refusal(Some(b"k"), 1 << 20, &[]), None, "no size limit known: the broker decides");
        assert_eq!(TopicLimits::default().refusal(None, 1 << 30, &[]), None);
        assert_eq!(TopicLimits::from_config(Some("x"), None).max_message_bytes, None);
    }

    #[test]
    fn delivery_settings_are_fixed() {
        let s: std::collections::BTreeMap<_, _> = producer_settings(Compression::Zstd).into_iter().collect();
        assert_eq!(s["enable.idempotence"], "true");
        assert_eq!(s["acks"], "all");
        assert_eq!(s["compression.type"], "zstd");
    }
}

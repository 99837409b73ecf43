//! Kafka source: a consumer-group member that yields batches and commits
//! only what the runtime says was delivered.
//!
//! ```text
//! StreamConsumer (cooperative-sticky, auto-commit off)
//!   ├─ main queue, polled by `next` ──> rebalance callbacks and client errors
//!   │    ├─ assign (pre_rebalance, before librdkafka fetches): split the
//!   │    │    partition's queue off and spawn its reader task
//!   │    ├─ revoke (pre_rebalance): drain the runtime's in-flight work
//!   │    │    (bounded), commit what is done synchronously, stop exactly
//!   │    │    those partitions' readers (their queues are dropped)
//!   │    └─ pending Assigned / Revoked events, returned before any message
//!   │         of the new assignment
//!   ├─ partition queue 0 ──> reader task 0 ─┐  chunks of up to one batch,
//!   ├─ partition queue 1 ──> reader task 1 ─┼─ one bounded channel ──> `next`
//!   ├─ partition queue N ──> reader task N ─┘  ──> SourceEvent::Batch (<= max)
//!   └─ KafkaAcker::commit(low-water marks) ──> async offset commit of the
//!         partitions still assigned (a revoked partition's new owner commits it)
//! ```
//!
//! Why a reader per partition: with one queue for all partitions, librdkafka
//! prefetches a backlogged partition into the same queue as every other, so
//! a message that arrives on a quiet partition waits behind the whole
//! prefetched backlog. Split, each partition has its own queue and its
//! reader takes turns with the others for the channel (tokio's bounded
//! channel serves waiting senders first come, first served), so a hot or
//! slow partition delays another by at most the channel's capacity. When the
//! channel is full the readers wait and librdkafka keeps buffering up to its
//! own per-partition limits (`queued.max.messages.kbytes`), then stops
//! fetching; nothing is dropped. A chunk of a partition that was revoked
//! (or revoked and assigned again) since it was read is discarded: it was
//! never handed to the runtime, and the partition's next owner resumes from
//! the last commit.
//!
//! Broker outages surface as consumer errors from the queues; they are
//! logged and the consumer keeps going (librdkafka reconnects by itself), so
//! a broker restart never ends the run. Credentials come from the
//! environment variables `sluice_crds::secrets::secret_envs` names
//! (`SLUICE_SECRET_<PLACE>_...`).

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::{
        Arc, Mutex, OnceLock, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{FutureExt, StreamExt, future::BoxFuture};
use rdkafka::{
    ClientConfig, ClientContext, Message as _, Offset, TopicPartitionList,
    config::RDKafkaLogLevel,
    consumer::{
        BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
        stream_consumer::StreamPartitionQueue,
    },
    error::{KafkaError, KafkaResult},
    message::{BorrowedMessage, Headers},
};
use sluice_crds::{KafkaAuth, KafkaSource as KafkaSourceSpec, SaslMechanism, StartFrom};
use tokio::{sync::mpsc, task::JoinHandle};

use super::{Acker, Drain, RevokeHook, Source, SourceError, SourceEvent};
use crate::{
    message::{Message, Payload, now_ms},
    sink::kafka::Transaction,
};

/// How long `next` waits for a first message before it looks at pending
/// rebalance events again.
const IDLE_TICK: Duration = Duration::from_millis(250);

/// How often an idle, unreachable consumer asks the brokers whether they answer.
const RECHECK: Duration = Duration::from_secs(2);

/// Most messages a partition reader hands over at once: what its queue
/// holds already, up to the batch size `next` was last asked for (so that a
/// batch is one partition's run, as the pool routes and the sink commits
/// best), at most this many.
const MAX_CHUNK: usize = 4096;

/// Chunks the readers' shared channel holds before they wait: how far a
/// busy partition can run ahead of another (`CHUNKS_AHEAD` batches).
const CHUNKS_AHEAD: usize = 4;

/// How long stopping a partition's reader may take (it is aborted; this is
/// only the wait for the runtime to drop it and its queue).
const READER_STOP: Duration = Duration::from_secs(5);

/// Builds a librdkafka client configuration for `brokers` with the auth the
/// spec names. `place` is the secret place (`SOURCE`, `SINK`, `DEADLETTER`):
/// the values are read from `SLUICE_SECRET_<place>_SASL_USERNAME` and
/// friends; `field` names the spec field in errors.
pub fn client_config(
    brokers: &[String],
    auth: Option<&KafkaAuth>,
    place: &str,
    field: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ClientConfig, String> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers.join(",")).set_log_level(RDKafkaLogLevel::Warning);
    let sasl = auth.and_then(|a| a.sasl.as_ref());
    let tls = auth.and_then(|a| a.tls.as_ref());
    let protocol = match (sasl.is_some(), tls.is_some()) {
        (false, false) => "plaintext",
        (false, true) => "ssl",
        (true, false) => "sasl_plaintext",
        (true, true) => "sasl_ssl",
    };
    config.set("security.protocol", protocol);
    let var = |what: &str| format!("SLUICE_SECRET_{place}_{what}");
    if let Some(sasl) = sasl {
        let mechanism = match sasl.mechanism {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        };
        let get = |what: &str| {
            env(&var(what)).ok_or_else(|| {
                format!("{field}.auth.sasl.secretRef: environment variable {} is not set; the operator sets it from the Secret", var(what))
            })
        };
        config
            .set("sasl.mechanism", mechanism)
            .set("sasl.username", get("SASL_USERNAME")?)
            .set("sasl.password", get("SASL_PASSWORD")?);
    }
    if let Some(tls) = tls {
        // A named CA or client certificate whose variable is missing is an
        // error, not a silent fallback to the system roots.
        let get = |what: &str, field_path: &str| {
            env(&var(what)).ok_or_else(|| {
                format!("{field}.auth.tls.{field_path}: environment variable {} is not set; the operator sets it from the Secret", var(what))
            })
        };
        if tls.ca_secret_ref.is_some() {
            config.set("ssl.ca.pem", get("TLS_CA", "caSecretRef")?);
        }
        if tls.client_cert_secret_name.is_some() {
            config
                .set("ssl.certificate.pem", get("TLS_CERT", "clientCertSecretName")?)
                .set("ssl.key.pem", get("TLS_KEY", "clientCertSecretName")?);
        }
    }
    Ok(config)
}

/// The spec field to fix when librdkafka reports `error`: the credentials
/// (a refused SASL login) or the TLS settings (a failed handshake, e.g. a
/// broker certificate the CA does not sign); `None` for other errors.
pub fn auth_field(error: &KafkaError, reason: &str) -> Option<&'static str> {
    use rdkafka::types::RDKafkaErrorCode as Code;
    match error.rdkafka_error_code() {
        Some(Code::Authentication | Code::SaslAuthenticationFailed) => Some("auth.sasl.secretRef"),
        Some(Code::SSL) => Some("auth.tls"),
        _ => refusal_field(reason),
    }
}

/// [`auth_field`] from librdkafka's text alone (an error reason or a log line).
pub fn refusal_field(text: &str) -> Option<&'static str> {
    if text.contains("SASL authentication error") || text.contains("SASL authentication failed") {
        Some("auth.sasl.secretRef")
    } else if text.contains("SSL handshake failed")
        || text.contains("certificate verify failed")
        // The broker ended the handshake with a TLS alert: with mutual TLS,
        // no client certificate or one its CA did not sign (42 bad
        // certificate, 48 unknown CA, 116 certificate required).
        || text.contains("SSL alert number")
    {
        Some("auth.tls")
    } else {
        None
    }
}

/// Rebalance callbacks turned into source events, and the current assignment.
pub struct GroupContext {
    topic: String,
    /// `bootstrap.servers`, for log lines.
    brokers: String,
    pending: Mutex<VecDeque<SourceEvent>>,
    assigned: Mutex<BTreeSet<i32>>,
    /// False after a consumer or client error until a message arrives or a
    /// metadata request succeeds; `/readyz` reads it.
    reachable: Arc<AtomicBool>,
    /// The runtime's drain-and-report callback, called on revocation.
    on_revoke: Mutex<Option<RevokeHook>>,
    /// Exactly-once: offsets go into this transaction, never committed directly.
    txn: OnceLock<Arc<Transaction>>,
    /// The consumer this context belongs to, to split partition queues off
    /// in the rebalance callback (which only gets the `BaseConsumer`).
    consumer: OnceLock<Weak<GroupConsumer>>,
    /// Where the partition readers send what they read.
    chunks: mpsc::Sender<Chunk>,
    /// The reader of each partition whose queue is split off.
    readers: Mutex<BTreeMap<i32, PartitionReader>>,
    /// Readers told to stop whose task may not have ended yet: a partition
    /// assigned again waits for its old reader first, so that two never
    /// share its queue.
    stopping: Mutex<Vec<(i32, JoinHandle<()>)>>,
    /// Numbers the readers; a chunk carries its reader's number.
    next_reader: AtomicU64,
    /// The batch size `next` was last asked for: the readers' chunk size.
    chunk_size: Arc<AtomicUsize>,
    /// Why a partition got no reader of its own, if one did not. There is
    /// no safe fallback (a queue once split is never forwarded to the main
    /// queue again, and a second split of a queue whose old handle still
    /// lives loses its wake-ups), so the run fails and the pod restarts.
    broken: Mutex<Option<String>>,
}

/// A message chunk from one partition's reader.
struct Chunk {
    partition: i32,
    /// The reader that read it (`None`: the consumer's main queue).
    reader: Option<u64>,
    messages: std::vec::IntoIter<Message>,
}

struct PartitionReader {
    id: u64,
    task: JoinHandle<()>,
}

impl GroupContext {
    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements().iter().filter(|e| e.topic() == self.topic).map(|e| e.partition()).collect()
    }

    fn push(&self, event: SourceEvent) {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).push_back(event);
    }

    fn has_pending(&self) -> bool {
        !self.pending.lock().unwrap_or_else(PoisonError::into_inner).is_empty()
    }

    fn pop(&self) -> Option<SourceEvent> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).pop_front()
    }

    /// Whether a chunk may still be handed out: its reader is the current
    /// one of its partition (not stopped by a revocation since it read it).
    fn current(&self, chunk: &Chunk) -> bool {
        chunk.reader.is_none_or(|id| {
            self.readers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&chunk.partition)
                .is_some_and(|r| r.id == id)
        })
    }

    /// Splits each partition's queue off the consumer's main queue and
    /// starts its reader. Called before librdkafka starts fetching them:
    /// once split, the partition's fetched messages never enter the main
    /// queue (librdkafka leaves an application-forwarded queue alone when it
    /// starts the fetch), so nothing of it is read out of order.
    fn start_readers(&self, partitions: &[i32]) {
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.break_source(format!("no async runtime in the rebalance callback for partitions {partitions:?}"));
            return;
        };
        for &p in partitions {
            if !self.await_stopped(p) {
                self.break_source(format!("the previous reader of partition {p} has not ended"));
                continue;
            }
            let Some(queue) = consumer.split_partition_queue(&self.topic, p) else {
                self.break_source(format!("cannot split the queue of partition {p} off"));
                continue;
            };
            let id = self.next_reader.fetch_add(1, Ordering::Relaxed);
            let task = runtime.spawn(read_partition(
                queue,
                p,
                id,
                self.chunks.clone(),
                self.chunk_size.clone(),
                self.reachable.clone(),
                self.topic.clone(),
            ));
            let old =
                self.readers.lock().unwrap_or_else(PoisonError::into_inner).insert(p, PartitionReader { id, task });
            if let Some(old) = old {
                // Assigned twice without a revocation in between: cannot
                // happen with librdkafka, but never leave two readers on one queue.
                old.task.abort();
                self.stopping.lock().unwrap_or_else(PoisonError::into_inner).push((p, old.task));
            }
        }
    }

    /// Stops the readers of revoked partitions; their queues are dropped
    /// with their tasks.
    fn stop_readers(&self, partitions: &[i32]) {
        let mut readers = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        let mut stopping = self.stopping.lock().unwrap_or_else(PoisonError::into_inner);
        stopping.retain(|(_, t)| !t.is_finished());
        for p in partitions {
            if let Some(r) = readers.remove(p) {
                r.task.abort();
                stopping.push((*p, r.task));
            }
        }
    }

    fn break_source(&self, why: String) {
        tracing::error!(topic = %self.topic, reason = %why, "a partition has no reader; stopping the source");
        self.broken.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(why);
    }

    /// Waits (bounded) until the stopped readers of `partition` have ended;
    /// false if they have not.
    fn await_stopped(&self, partition: i32) -> bool {
        let old: Vec<JoinHandle<()>> = {
            let mut stopping = self.stopping.lock().unwrap_or_else(PoisonError::into_inner);
            let (old, rest) = std::mem::take(&mut *stopping).into_iter().partition(|(p, _)| *p == partition);
            *stopping = rest;
            old.into_iter().map(|(_, t)| t).collect()
        };
        wait_until(|| old.iter().all(JoinHandle::is_finished), READER_STOP)
    }
}

/// Waits until `done`, at most `limit`, without stalling the tasks that
/// make it true: on a multi-thread runtime the thread's other tasks move to
/// another thread meanwhile (`block_in_place`, as the runtime's revoke hook
/// does). Elsewhere nothing else could run, so it does not wait.
fn wait_until(done: impl Fn() -> bool, limit: Duration) -> bool {
    if done() {
        return true;
    }
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if !multi_thread {
        return false;
    }
    let started = Instant::now();
    tokio::task::block_in_place(|| {
        while !done() && started.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    done()
}

/// One partition's reader: what its queue holds, in chunks, into the shared
/// channel. Ends when aborted (revocation, source dropped) or when the
/// source is gone.
async fn read_partition(
    queue: StreamPartitionQueue<GroupContext>,
    partition: i32,
    reader: u64,
    chunks: mpsc::Sender<Chunk>,
    chunk_size: Arc<AtomicUsize>,
    reachable: Arc<AtomicBool>,
    topic: String,
) {
    tracing::debug!(%topic, partition, reader, "partition reader started");
    let mut stream = queue.stream();
    loop {
        let mut messages = Vec::new();
        let mut next = stream.next().await;
        let limit = chunk_size.load(Ordering::Relaxed).clamp(1, MAX_CHUNK);
        while let Some(received) = next {
            match received {
                Ok(m) => {
                    messages.push(convert(&m));
                }
                Err(error) => {
                    if reachable.swap(false, Ordering::Relaxed) {
                        tracing::warn!(%topic, partition, %error, "Kafka consumer error; retrying in the background");
                    } else {
                        tracing::debug!(%topic, partition, %error, "Kafka consumer error");
                    }
                }
            }
            if messages.len() >= limit {
                break;
            }
            next = stream.next().now_or_never().flatten();
        }
        if messages.is_empty() {
            continue;
        }
        reachable.store(true, Ordering::Relaxed);
        let chunk = Chunk { partition, reader: Some(reader), messages: messages.into_iter() };
        if chunks.send(chunk).await.is_err() {
            return;
        }
    }
}

impl GroupContext {
    /// A synchronous commit from inside the revoke callback (librdkafka
    /// allows it there; the group waits for the callback to return).
    fn commit_now(&self, consumer: &BaseConsumer<Self>, points: &[(i32, i64)]) {
        let mut tpl = TopicPartitionList::with_capacity(points.len());
        for &(p, o) in points {
            if let Err(e) = tpl.add_partition_offset(&self.topic, p, Offset::Offset(o)) {
                tracing::warn!(topic = %self.topic, partition = p, offset = o, error = %e, "cannot commit on revocation");
            }
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => tracing::info!(topic = %self.topic, ?points, "committed on revocation"),
            Err(e) => tracing::warn!(topic = %self.topic, error = %e, ?points,
                "commit on revocation failed; the next owner redoes from the last commit"),
        }
    }

    /// Exactly-once: commits the open transaction from inside the revoke
    /// callback, with every partition's position (`Drain::All`), before the
    /// revoked partitions move (`Transaction::commit_on_revoke`). A failure
    /// has aborted the transaction; the sink's next write fails the run.
    fn commit_transaction_now(
        &self,
        consumer: &BaseConsumer<Self>,
        txn: &Transaction,
        points: &[(i32, i64)],
        revoked: &[i32],
    ) {
        let Some(group) = consumer.group_metadata() else {
            txn.abort(format!("revocation of partitions {revoked:?}: no consumer group metadata to commit with"));
            return;
        };
        match txn.commit_on_revoke(&self.topic, points, revoked, &group) {
            Ok(true) => tracing::info!(topic = %self.topic, ?revoked, ?points,
                "exactly-once: transaction committed on revocation"),
            Ok(false) => tracing::info!(topic = %self.topic, ?revoked,
                "exactly-once: nothing to commit on revocation"),
            Err(e) => tracing::error!(topic = %self.topic, ?revoked, error = %e,
                "exactly-once: could not commit on revocation; the transaction is aborted and the worker resumes from the committed offsets"),
        }
    }
}

impl ClientContext for GroupContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.reachable.store(false, Ordering::Relaxed);
        if let Some(field) = auth_field(&error, reason) {
            // librdkafka retries for ever (the Secret may be fixed meanwhile);
            // /readyz stays false until a message or metadata answer comes.
            tracing::error!(topic = %self.topic, brokers = %self.brokers, field = %format!("spec.source.kafka.{field}"), %error, reason,
                "Kafka login or TLS handshake failed: check spec.source.kafka.{field} and the Secret it names; retrying");
        } else {
            tracing::warn!(topic = %self.topic, brokers = %self.brokers, %error, reason, "Kafka consumer client error; librdkafka keeps reconnecting");
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Before the assign call: librdkafka starts fetching in it.
            self.start_readers(&self.partitions(tpl));
        }
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions = self.partitions(tpl);
            // Drain and commit what is done while the partitions are still
            // ours, so their next owner starts where we stopped.
            let hook = self.on_revoke.lock().unwrap_or_else(PoisonError::into_inner).clone();
            if !partitions.is_empty() {
                match (self.txn.get(), hook) {
                    (None, Some(hook)) => {
                        let points = hook(&partitions, Drain::Revoked);
                        if !points.is_empty() {
                            self.commit_now(consumer, &points);
                        }
                    }
                    (None, None) => {}
                    (Some(txn), hook) => {
                        let points = hook.map(|h| h(&partitions, Drain::All)).unwrap_or_default();
                        self.commit_transaction_now(consumer, txn, &points, &partitions);
                    }
                }
            }
            self.stop_readers(&partitions);
            {
                let mut a = self.assigned.lock().unwrap_or_else(PoisonError::into_inner);
                for p in &partitions {
                    a.remove(p);
                }
            }
            tracing::info!(topic = %self.topic, ?partitions, "Kafka revoked partitions; their new owner resumes from the last commit");
            if !partitions.is_empty() {
                self.push(SourceEvent::Revoked(partitions));
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions = self.partitions(tpl);
                if let Some(txn) = self.txn.get() {
                    txn.assign(&partitions);
                }
                self.assigned.lock().unwrap_or_else(PoisonError::into_inner).extend(partitions.iter().copied());
                tracing::info!(topic = %self.topic, ?partitions, "Kafka assigned partitions");
                if !partitions.is_empty() {
                    self.push(SourceEvent::Assigned(partitions));
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "Kafka rebalance failed; the group retries")
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(error) = result {
            tracing::warn!(topic = %self.topic, %error, partitions = offsets.count(),
                "Kafka offset commit failed; the next commit carries these positions");
        }
    }
}

type GroupConsumer = StreamConsumer<GroupContext>;

pub struct KafkaSource {
    consumer: Arc<GroupConsumer>,
    topic: String,
    /// What the partition readers read (bounded: `CHUNKS_AHEAD`).
    chunks: mpsc::Receiver<Chunk>,
    /// The chunk being handed out: taken from the channel only when the
    /// previous one is done, and given out only while no rebalance event is
    /// pending, so an assignment's event comes before its messages.
    stash: Option<Chunk>,
    /// A message from the main queue (of a partition whose queue could not
    /// be split off), for the batch being built.
    held: Option<Message>,
    /// Exactly-once: offsets are committed inside the sink's transactions.
    txn: Option<Arc<Transaction>>,
    /// When `check_reachable` last asked the brokers.
    last_check: Option<std::time::Instant>,
}

impl KafkaSource {
    /// Joins `group` and subscribes to the topic (the connection itself is
    /// made in the background).
    pub fn new(spec: &KafkaSourceSpec, group: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, SourceError> {
        let mut config = client_config(&spec.brokers, spec.auth.as_ref(), "SOURCE", "spec.source.kafka", env)
            .map_err(|detail| SourceError::Config { field: "spec.source.kafka.auth", detail })?;
        for (k, v) in &spec.properties {
            config.set(k, v);
        }
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set(
                "auto.offset.reset",
                match spec.start_from {
                    StartFrom::Earliest => "earliest",
                    StartFrom::Latest => "latest",
                },
            );
        if let Ok(pod) = pod_name() {
            config.set("client.id", format!("sluice-{pod}"));
        }
        let (chunks_tx, chunks) = mpsc::channel(CHUNKS_AHEAD);
        let context = GroupContext {
            topic: spec.topic.clone(),
            brokers: spec.brokers.join(","),
            pending: Mutex::default(),
            assigned: Mutex::default(),
            reachable: Arc::new(AtomicBool::new(true)),
            on_revoke: Mutex::default(),
            txn: OnceLock::new(),
            consumer: OnceLock::new(),
            chunks: chunks_tx,
            readers: Mutex::default(),
            stopping: Mutex::default(),
            broken: Mutex::default(),
            next_reader: AtomicU64::new(0),
            chunk_size: Arc::new(AtomicUsize::new(500)),
        };
        let consumer: GroupConsumer = config.create_with_context(context).map_err(|e| SourceError::Config {
            field: "spec.source.kafka",
            detail: format!("the Kafka client rejected the configuration: {e}"),
        })?;
        let consumer = Arc::new(consumer);
        // Set before the first poll, which is where the callbacks run.
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        consumer.subscribe(&[&spec.topic]).map_err(|e| SourceError::Broker {
            kind: "kafka",
            detail: format!("subscribe to topic {}: {e}", spec.topic),
        })?;
        tracing::info!(topic = %spec.topic, group, brokers = %spec.brokers.join(","), "Kafka consumer subscribed");
        Ok(Self { consumer, topic: spec.topic.clone(), chunks, stash: None, held: None, txn: None, last_check: None })
    }

    /// Exactly-once: the acker commits offsets with `send_offsets_to_transaction`
    /// in `txn` (shared with the Kafka sink) instead of committing them itself.
    pub fn set_transaction(&mut self, txn: Arc<Transaction>) {
        let _ = self.consumer.context().txn.set(txn.clone());
        self.txn = Some(txn);
    }

    /// Whether the last consumer call reached the brokers.
    pub fn reachable(&self) -> bool {
        self.consumer.context().reachable.load(Ordering::Relaxed)
    }
}

impl Drop for KafkaSource {
    /// Stops the partition readers and waits (bounded) until they are gone:
    /// each holds the consumer, which must close here, where the source
    /// ends (leaving the group and committing on revocation), not whenever
    /// the runtime drops the last reader.
    fn drop(&mut self) {
        let ctx = self.consumer.context();
        let partitions: Vec<i32> = ctx.readers.lock().unwrap_or_else(PoisonError::into_inner).keys().copied().collect();
        ctx.stop_readers(&partitions);
        let stopping = std::mem::take(&mut *ctx.stopping.lock().unwrap_or_else(PoisonError::into_inner));
        if !wait_until(|| stopping.iter().all(|(_, t)| t.is_finished()), READER_STOP) {
            tracing::warn!(topic = %self.topic, "partition readers still running; the consumer closes when the last one ends");
        }
    }
}

/// The pod's name: `POD_NAME` (the downward API), else the host name.
pub fn pod_name() -> Result<String, std::io::Error> {
    if let Ok(p) = std::env::var("POD_NAME")
        && !p.is_empty()
    {
        return Ok(p);
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string())
}

fn convert(m: &BorrowedMessage<'_>) -> Message {
    let headers = m
        .headers()
        .map(|hs| hs.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default())).collect())
        .unwrap_or_default();
    Message {
        key: m.key().map(<[u8]>::to_vec),
        payload: Payload::from_bytes(m.payload().map(<[u8]>::to_vec).unwrap_or_default()),
        headers,
        partition: m.partition(),
        offset: m.offset(),
        timestamp: m.timestamp().to_millis().unwrap_or_else(now_ms),
    }
}

impl KafkaSource {
    fn on_error(&self, error: &KafkaError) {
        let ctx = self.consumer.context();
        if ctx.reachable.swap(false, Ordering::Relaxed) {
            tracing::warn!(topic = %self.topic, %error, "Kafka consumer error; retrying in the background");
        } else {
            tracing::debug!(topic = %self.topic, %error, "Kafka consumer error");
        }
    }

    /// Idle and marked unreachable: ask the brokers for the topic's metadata
    /// (at most every `RECHECK`), so an idle topic's worker becomes ready
    /// again once the brokers answer, without waiting for a message.
    async fn check_reachable(&mut self) {
        if self.reachable() || self.last_check.is_some_and(|t| t.elapsed() < RECHECK) {
            return;
        }
        self.last_check = Some(std::time::Instant::now());
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        let answered = tokio::task::spawn_blocking(move || {
            consumer.fetch_metadata(Some(&topic), Duration::from_secs(2)).is_ok_and(|m| !m.brokers().is_empty())
        })
        .await
        .unwrap_or(false);
        if answered {
            tracing::info!(topic = %self.topic, "Kafka brokers answer again");
            self.consumer.context().reachable.store(true, Ordering::Relaxed);
        }
    }

    /// A reader that ended by itself panicked (they end only when stopped
    /// or when the source is gone): its partition would silently stop, so
    /// the run fails instead and the pod restarts.
    fn check_readers(&self) -> Result<(), SourceError> {
        if let Some(why) = self.consumer.context().broken.lock().unwrap_or_else(PoisonError::into_inner).clone() {
            return Err(SourceError::Broker { kind: "kafka", detail: why });
        }
        let mut readers = self.consumer.context().readers.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(partition) = readers.iter().find(|(_, r)| r.task.is_finished()).map(|(p, _)| *p) else {
            return Ok(());
        };
        let detail = match readers.remove(&partition).and_then(|r| r.task.now_or_never()) {
            Some(Err(e)) => e.to_string(),
            _ => "it ended".to_string(),
        };
        tracing::error!(topic = %self.topic, partition, %detail, "the partition's reader stopped; stopping the source");
        Err(SourceError::Broker { kind: "kafka", detail: format!("reader of partition {partition}: {detail}") })
    }

    /// What the main queue gave: a message of a partition whose queue is
    /// not split off (none, normally) is held for the batch; errors are logged.
    fn on_main(&mut self, received: KafkaResult<Message>) {
        match received {
            Ok(m) => {
                self.consumer.context().reachable.store(true, Ordering::Relaxed);
                self.held = Some(m);
            }
            Err(e) => self.on_error(&e),
        }
    }

    async fn next_batch(&mut self, max: usize) -> Result<SourceEvent, SourceError> {
        self.check_readers()?;
        self.consumer.context().chunk_size.store(max, Ordering::Relaxed);
        let mut batch: Vec<Message> = Vec::with_capacity(max.min(4096));
        loop {
            // The main queue first: rebalance callbacks and client errors
            // are served in this poll, so an event they queue is seen below,
            // before any message handed out after it.
            if self.held.is_none()
                && let Some(r) = self.consumer.recv().now_or_never()
            {
                self.on_main(r.map(|m| convert(&m)));
            }
            let ctx = self.consumer.context();
            if ctx.has_pending() {
                // A revocation served by the poll above may have taken
                // partitions whose messages are in this batch: they are
                // their next owner's now (it starts at the offset committed
                // on revoke). Handing them out would have the runtime track
                // and, under exactly-once, put into the open transaction a
                // partition whose offsets can no longer be committed.
                let assigned = ctx.assigned.lock().unwrap_or_else(PoisonError::into_inner);
                batch.retain(|m| assigned.contains(&m.partition));
            }
            if batch.is_empty() {
                if let Some(e) = ctx.pop() {
                    return Ok(e);
                }
            } else if ctx.has_pending() || batch.len() >= max {
                return Ok(SourceEvent::Batch(batch));
            }
            if let Some(m) = self.held.take() {
                batch.push(m);
                continue;
            }
            if let Some(chunk) = &mut self.stash {
                if ctx.current(chunk) {
                    batch.extend(chunk.messages.by_ref().take(max - batch.len()));
                } else {
                    tracing::debug!(topic = %self.topic, partition = chunk.partition, dropped = chunk.messages.len(),
                        "discarding messages read before their partition was revoked; its next owner reads them");
                    chunk.messages = Vec::new().into_iter();
                }
                if chunk.messages.as_slice().is_empty() {
                    self.stash = None;
                }
                continue;
            }
            if let Ok(chunk) = self.chunks.try_recv() {
                self.stash = Some(chunk);
                continue;
            }
            if !batch.is_empty() {
                return Ok(SourceEvent::Batch(batch));
            }
            let consumer = self.consumer.clone();
            tokio::select! {
                biased;
                r = async { consumer.recv().await.map(|m| convert(&m)) } => self.on_main(r),
                Some(chunk) = self.chunks.recv() => self.stash = Some(chunk),
                _ = tokio::time::sleep(IDLE_TICK) => {
                    self.check_reachable().await;
                    // A reader that died while nothing else arrives.
                    self.check_readers()?;
                }
            }
        }
    }
}

impl Source for KafkaSource {
    fn next(&mut self, max: usize) -> BoxFuture<'_, Result<SourceEvent, SourceError>> {
        Box::pin(self.next_batch(max.max(1)))
    }

    fn acker(&self) -> Arc<dyn Acker> {
        match &self.txn {
            Some(txn) => Arc::new(TransactionalAcker {
                consumer: self.consumer.clone(),
                topic: self.topic.clone(),
                txn: txn.clone(),
            }),
            None => Arc::new(KafkaAcker { consumer: self.consumer.clone(), topic: self.topic.clone() }),
        }
    }

    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn reachability(&self) -> Option<Arc<AtomicBool>> {
        Some(self.consumer.context().reachable.clone())
    }

    fn on_revoke(&mut self, hook: RevokeHook) {
        *self.consumer.context().on_revoke.lock().unwrap_or_else(PoisonError::into_inner) = Some(hook);
    }
}

/// Commits the runtime's low-water marks as the group's offsets.
pub struct KafkaAcker {
    consumer: Arc<GroupConsumer>,
    topic: String,
}

impl Acker for KafkaAcker {
    fn commit<'a>(&'a self, positions: &'a [(i32, i64)]) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let assigned = self.consumer.context().assigned.lock().unwrap_or_else(PoisonError::into_inner).clone();
            let mut tpl = TopicPartitionList::with_capacity(positions.len());
            for &(p, o) in positions {
                // A revoked partition belongs to someone else now: committing
                // our older position would move its offset backwards.
                if assigned.contains(&p) {
                    tpl.add_partition_offset(&self.topic, p, Offset::Offset(o)).map_err(|e| SourceError::Broker {
                        kind: "kafka",
                        detail: format!("offset {o} for partition {p}: {e}"),
                    })?;
                } else {
                    tracing::debug!(topic = %self.topic, partition = p, offset = o, "not committing a partition no longer assigned");
                }
            }
            if tpl.count() == 0 {
                return Ok(());
            }
            // Async: librdkafka sends it in order with the next ones and waits
            // for outstanding commits when the consumer closes.
            self.consumer.commit(&tpl, CommitMode::Async).map_err(|e| SourceError::Broker {
                kind: "kafka",
                detail: format!("commit offsets of topic {}: {e}", self.topic),
            })
        })
    }
}

/// Exactly-once: hands the low-water marks to the open transaction, which
/// commits them together with the outputs.
pub struct TransactionalAcker {
    consumer: Arc<GroupConsumer>,
    topic: String,
    txn: Arc<Transaction>,
}

/// How often exactly-once commits its transaction: Kafka Streams' default
/// `commit.interval.ms` under exactly-once. Each commit blocks the sink
/// stage for a round trip to the transaction coordinator and back; outputs
/// become visible to read_committed consumers this much later at most.
pub const TRANSACTION_COMMIT_INTERVAL: Duration = Duration::from_millis(100);

impl Acker for TransactionalAcker {
    fn commit_interval(&self) -> Duration {
        TRANSACTION_COMMIT_INTERVAL
    }

    fn commit<'a>(&'a self, positions: &'a [(i32, i64)]) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let group = self.consumer.group_metadata().ok_or_else(|| SourceError::Broker {
                kind: "kafka",
                detail: "no consumer group metadata for the transaction".into(),
            })?;
            // A revoked partition's offsets are its new owner's to commit.
            let assigned = self.consumer.context().assigned.lock().unwrap_or_else(PoisonError::into_inner).clone();
            let positions: Vec<(i32, i64)> = positions.iter().copied().filter(|(p, _)| assigned.contains(p)).collect();
            match self.txn.commit(&self.topic, &positions, &group) {
                Ok(committed) => {
                    tracing::debug!(topic = %self.topic, committed, ?positions, "exactly-once commit point");
                    Ok(())
                }
                Err(detail) => Err(SourceError::Broker { kind: "kafka", detail }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use sluice_crds::{CredentialsSecretRef, Sasl};

    use super::*;

    #[test]
    fn sasl_credentials_come_from_the_named_variables() {
        let auth = KafkaAuth {
            sasl: Some(Sasl {
                mechanism: SaslMechanism::ScramSha512,
                secret_ref: CredentialsSecretRef {
                    name: "u".into(),
                    username_key: "username".into(),
                    password_key: "password".into(),
                },
            }),
            tls: None,
        };
        let brokers = vec!["k:9092".to_string()];
        let err =
            client_config(&brokers, Some(&auth), "SOURCE", "spec.source.kafka", &|_| None).err().unwrap_or_default();
        assert!(err.contains("SLUICE_SECRET_SOURCE_SASL_USERNAME"), "{err}");
        let c = client_config(&brokers, Some(&auth), "SINK", "spec.sink.kafka", &|k| Some(format!("v-{k}")))
            .expect("config");
        assert_eq!(c.get("sasl.username"), Some("v-SLUICE_SECRET_SINK_SASL_USERNAME"));
        assert_eq!(c.get("security.protocol"), Some("sasl_plaintext"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
    }

    #[test]
    fn a_named_ca_must_be_there() {
        let auth = KafkaAuth {
            sasl: None,
            tls: Some(sluice_crds::Tls {
                ca_secret_ref: Some(sluice_crds::SecretKeyRef { name: "ca".into(), key: "ca.crt".into() }),
                client_cert_secret_name: None,
            }),
        };
        let brokers = vec!["k:9093".to_string()];
        let err =
            client_config(&brokers, Some(&auth), "SOURCE", "spec.source.kafka", &|_| None).err().unwrap_or_default();
        assert!(
            err.contains("spec.source.kafka.auth.tls.caSecretRef") && err.contains("SLUICE_SECRET_SOURCE_TLS_CA"),
            "{err}"
        );
        let c = client_config(&brokers, Some(&auth), "SOURCE", "spec.source.kafka", &|k| Some(format!("pem-{k}")))
            .expect("config");
        assert_eq!(c.get("security.protocol"), Some("ssl"));
        assert_eq!(c.get("ssl.ca.pem"), Some("pem-SLUICE_SECRET_SOURCE_TLS_CA"));
    }

    #[test]
    fn a_broker_refusing_the_client_certificate_names_the_tls_settings() {
        let text = "sasl_ssl://127.0.0.1:38747/bootstrap: Receive failed: error:0A000412:SSL routines::sslv3 alert bad certificate: SSL alert number 42 (after 0ms in state APIVERSION_QUERY)";
        assert_eq!(refusal_field(text), Some("auth.tls"));
        assert_eq!(refusal_field("Connect to ipv4#127.0.0.1:9093 failed: Connection refused"), None);
    }

    #[test]
    fn refusals_name_the_field_to_fix() {
        use rdkafka::types::RDKafkaErrorCode as Code;
        let sasl = "sasl_ssl://k:9093/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512";
        assert_eq!(auth_field(&KafkaError::Global(Code::Authentication), sasl), Some("auth.sasl.secretRef"));
        let tls =
            "ssl://k:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed";
        assert_eq!(auth_field(&KafkaError::Global(Code::BrokerTransportFailure), tls), Some("auth.tls"));
        assert_eq!(auth_field(&KafkaError::Global(Code::AllBrokersDown), "1/1 brokers are down"), None);
    }
}

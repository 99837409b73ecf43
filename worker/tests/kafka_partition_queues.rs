//! The Kafka source's per-partition readers against a real Apache Kafka
//! (sluice-tests' harness): a backlogged partition does not hold back the
//! messages of a quiet one, and partitions revoked mid-stream (a second
//! member joins the group) lose nothing.
//!
//! The properties are about order and completeness, never about how long
//! something took; waits poll with a generous deadline. Where a test
//! "processes" a batch it sleeps a little per batch: that is the simulated
//! cost of the work, which keeps the reader slower than the broker as a real
//! pipeline is, not a synchronisation.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use rdkafka::{
    ClientConfig,
    producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer},
};
use serde_json::json;
use sluice_crds::KafkaSource as KafkaSourceSpec;
use sluice_tests::brokers::Kafka;
use sluice_worker::{
    message::Message,
    pipeline::Pipeline,
    source::{Acker, RevokeHook, Source, SourceError, SourceEvent, kafka::KafkaSource},
};
use tokio_util::sync::CancellationToken;

mod common;
use common::{CollectSink, runtime, spec};

/// Deadline for a whole stream; generous for two shared cores.
const DEADLINE: Duration = Duration::from_secs(180);

fn source(kafka: &Kafka, topic: &str, group: &str) -> KafkaSource {
    let spec = KafkaSourceSpec {
        brokers: vec![kafka.bootstrap()],
        topic: topic.into(),
        group: Some(group.into()),
        start_from: sluice_crds::StartFrom::Earliest,
        auth: None,
        properties: BTreeMap::new(),
    };
    KafkaSource::new(&spec, group, &|_| None).expect("source")
}

fn producer(kafka: &Kafka) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer")
}

/// Produces `{"id": id}` for each `(partition, id)` and returns once the
/// broker acknowledged every one.
fn produce(producer: &ThreadedProducer<DefaultProducerContext>, topic: &str, records: &[(i32, u64)]) {
    for (partition, id) in records {
        let payload = serde_json::to_vec(&json!({"id": id})).expect("json");
        let mut record = BaseRecord::<[u8], [u8]>::to(topic).partition(*partition).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    producer.flush(Duration::from_secs(30)).expect("flush");
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
}

fn id(m: &Message) -> u64 {
    m.payload.json().ok().and_then(|v| v["id"].as_u64()).expect("payload has an id")
}

/// One partition holds a backlog; once the reader is into it, a few messages
/// arrive on another partition. With one queue for all partitions they would
/// wait behind everything librdkafka had prefetched of the backlog; with a
/// queue per partition they come out within a few chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlogged_partition_does_not_hold_back_a_quiet_one() {
    const BACKLOG: u64 = 100_000;
    const QUIET: u64 = 20;
    /// Backlog read before the quiet partition's messages are produced.
    const WARM: u64 = 2_000;
    const MAX: usize = 250;
    /// Simulated processing per batch (see the module doc).
    const WORK: Duration = Duration::from_millis(3);
    let kafka = Kafka::start();
    kafka.create_topic("in", 2).expect("topic");
    let producer = Arc::new(producer(&kafka));
    let backlog: Vec<(i32, u64)> = (0..BACKLOG).map(|id| (0, id)).collect();
    produce(&producer, "in", &backlog);
    let mut source = source(&kafka, "in", "fair");

    let started = Instant::now();
    let mut assigned = BTreeSet::new();
    let mut next_offset: BTreeMap<i32, i64> = BTreeMap::new();
    let (mut backlog_read, mut quiet_read) = (0u64, 0u64);
    // How much of the backlog had been read when the quiet partition's
    // messages started to be produced, and when the last of them was read.
    let mut produced_at: Option<u64> = None;
    let mut quiet_done_at: Option<u64> = None;
    let mut quiet_producer = None;
    while backlog_read < BACKLOG || quiet_read < QUIET {
        assert!(
            started.elapsed() < DEADLINE,
            "read {backlog_read} of {BACKLOG} backlog and {quiet_read} of {QUIET} quiet messages within {DEADLINE:?}"
        );
        if backlog_read >= WARM && quiet_producer.is_none() {
            produced_at = Some(backlog_read);
            let producer = producer.clone();
            quiet_producer = Some(tokio::task::spawn_blocking(move || {
                let quiet: Vec<(i32, u64)> = (0..QUIET).map(|i| (1, BACKLOG + i)).collect();
                produce(&producer, "in", &quiet);
            }));
        }
        let event = tokio::time::timeout(Duration::from_secs(1), source.next(MAX)).await;
        let Ok(event) = event else { continue };
        match event.expect("next") {
            SourceEvent::Assigned(ps) => assigned.extend(ps),
            SourceEvent::Revoked(ps) => panic!("partitions {ps:?} revoked from the only member"),
            SourceEvent::End => panic!("a Kafka source never ends"),
            SourceEvent::Batch(batch) => {
                assert!(batch.len() <= MAX, "a batch of {} for max {MAX}", batch.len());
                for m in &batch {
                    assert!(
                        assigned.contains(&m.partition),
                        "partition {} read before its Assigned event",
                        m.partition
                    );
                    let expected = next_offset.entry(m.partition).or_insert(m.offset);
                    assert_eq!(m.offset, *expected, "partition {}: offsets out of order or skipped", m.partition);
                    *expected += 1;
                    match m.partition {
                        0 => {
                            assert_eq!(id(m), backlog_read, "backlog out of order");
                            backlog_read += 1;
                        }
                        _ => {
                            quiet_read += 1;
                            if quiet_read == QUIET {
                                quiet_done_at = Some(backlog_read);
                            }
                        }
                    }
                }
                tokio::time::sleep(WORK).await;
            }
        }
    }
    if let Some(p) = quiet_producer {
        p.await.expect("quiet producer");
    }
    let produced_at = produced_at.expect("the quiet partition's messages were produced");
    let quiet_done_at = quiet_done_at.expect("every quiet message read");
    eprintln!(
        "quiet partition: produced from when {produced_at} of {BACKLOG} backlog messages were read, all {QUIET} read when {quiet_done_at} were ({} backlog messages in between); {:?} in all",
        quiet_done_at.saturating_sub(produced_at),
        started.elapsed()
    );
    assert!(
        quiet_done_at < BACKLOG / 2,
        "the quiet partition's messages came after {quiet_done_at} of {BACKLOG} backlog messages: held back behind the backlog"
    );
}

/// Simulated processing per batch of a group member (see the module doc):
/// with batches of 100, a member reads at most 2,000 messages a second, so
/// the backlog lasts well beyond a rebalance.
const WORK_PER_BATCH: Duration = Duration::from_millis(50);

/// Records the assignment events a source yields.
struct Recorded {
    inner: KafkaSource,
    events: Arc<Mutex<Vec<SourceEvent>>>,
}

impl Source for Recorded {
    fn next(&mut self, max: usize) -> BoxFuture<'_, Result<SourceEvent, SourceError>> {
        Box::pin(async move {
            let event = self.inner.next(max).await?;
            match &event {
                SourceEvent::Batch(_) => tokio::time::sleep(WORK_PER_BATCH).await,
                SourceEvent::Assigned(ps) => self.events.lock().expect("lock").push(SourceEvent::Assigned(ps.clone())),
                SourceEvent::Revoked(ps) => self.events.lock().expect("lock").push(SourceEvent::Revoked(ps.clone())),
                SourceEvent::End => {}
            }
            Ok(event)
        })
    }

    fn acker(&self) -> Arc<dyn Acker> {
        self.inner.acker()
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn on_revoke(&mut self, hook: RevokeHook) {
        self.inner.on_revoke(hook);
    }
}

struct Member {
    sink: CollectSink,
    events: Arc<Mutex<Vec<SourceEvent>>>,
    stop: CancellationToken,
    run: tokio::task::JoinHandle<sluice_worker::runtime::Summary>,
}

fn member(kafka: &Kafka, topic: &str, group: &str) -> Member {
    let sink = CollectSink::new();
    let events = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let source = Recorded { inner: source(kafka, topic, group), events: events.clone() };
    let pipeline = Pipeline::compile(&spec(json!({
        "source": {"kafka": {"brokers": [kafka.bootstrap()], "topic": topic}},
        "sink": {"stdout": {}},
        "pipeline": []
    })))
    .expect("pipeline");
    let mut runtime = runtime(2, None);
    runtime.batch_size = 100;
    let (out, stopped) = (sink.clone(), stop.clone());
    let run = tokio::spawn(async move {
        runtime
            .run(Box::new(source), pipeline, Box::new(out), Box::new(CollectSink::new()), stopped)
            .await
            .expect("run")
    });
    Member { sink, events, stop, run }
}

/// The partitions of the recorded events that `pick` selects.
fn partitions(events: &Mutex<Vec<SourceEvent>>, pick: impl Fn(&SourceEvent) -> bool) -> BTreeSet<i32> {
    let events = events.lock().expect("lock");
    let mut ps = BTreeSet::new();
    for e in events.iter().filter(|e| pick(e)) {
        if let SourceEvent::Assigned(p) | SourceEvent::Revoked(p) = e {
            ps.extend(p.iter().copied());
        }
    }
    ps
}

async fn ids(sink: &CollectSink) -> Vec<(i32, i64, u64)> {
    sink.got.lock().await.iter().map(|m| (m.partition, m.offset, id(m))).collect()
}

/// Two members of one group: B joins while A is busy with a backlog, the
/// group takes some of A's partitions away from it mid-stream (A's readers
/// of those partitions stop) and gives them to B. Every message is
/// delivered by one or the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_revoked_mid_stream_lose_nothing() {
    const PARTITIONS: i32 = 4;
    const N: u64 = 30_000;
    let kafka = Kafka::start();
    kafka.create_topic("moves", PARTITIONS).expect("topic");
    let records: Vec<(i32, u64)> = (0..N).map(|id| ((id % PARTITIONS as u64) as i32, id)).collect();
    produce(&producer(&kafka), "moves", &records);

    let a = member(&kafka, "moves", "movers");
    let deadline = Instant::now() + DEADLINE;
    while a.sink.got.lock().await.len() < 2_000 {
        assert!(Instant::now() < deadline, "A delivered too little within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let b = member(&kafka, "moves", "movers");
    loop {
        let (from_a, from_b) = (ids(&a.sink).await, ids(&b.sink).await);
        let seen: BTreeSet<u64> = from_a.iter().chain(&from_b).map(|r| r.2).collect();
        let revoked = partitions(&a.events, |e| matches!(e, SourceEvent::Revoked(_)));
        let given = partitions(&b.events, |e| matches!(e, SourceEvent::Assigned(_)));
        if !revoked.is_empty() && revoked.is_subset(&given) && seen.len() as u64 == N {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {N} ids delivered within {DEADLINE:?}; A's events: {:?}",
            seen.len(),
            a.events.lock().expect("lock")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.stop.cancel();
    b.stop.cancel();
    let (sa, sb) = (a.run.await.expect("A's run"), b.run.await.expect("B's run"));

    let revoked = partitions(&a.events, |e| matches!(e, SourceEvent::Revoked(_)));
    let (from_a, from_b) = (ids(&a.sink).await, ids(&b.sink).await);
    for p in &revoked {
        // Mid-stream: the partition still had messages when it moved.
        assert!(from_b.iter().any(|r| r.0 == *p), "partition {p} moved to B only after A had read all of it");
        // B starts at or before where A stopped: no gap.
        let a_last = from_a.iter().filter(|r| r.0 == *p).map(|r| r.1).max();
        let b_first = from_b.iter().filter(|r| r.0 == *p).map(|r| r.1).min();
        if let (Some(a_last), Some(b_first)) = (a_last, b_first) {
            assert!(b_first <= a_last + 1, "partition {p}: A stopped at {a_last}, B started at {b_first}: a gap");
        }
    }
    let mut seen = BTreeSet::new();
    let duplicates = from_a.iter().chain(&from_b).filter(|r| !seen.insert(r.2)).count();
    let missing: Vec<u64> = (0..N).filter(|i| !seen.contains(i)).take(10).collect();
    assert!(missing.is_empty(), "{} ids missing, e.g. {missing:?}", N as usize - seen.len());
    eprintln!(
        "revoked {revoked:?} from A mid-stream; A delivered {}, B {}, {duplicates} duplicates; commits A {:?}, B {:?}",
        from_a.len(),
        from_b.len(),
        sa.committed,
        sb.committed
    );
}

//! The leader's singleton tasks against real brokers (sluice-tests'
//! harness, servers on ephemeral ports): the state janitor on a real
//! redis-server, and dead-letter redrive on Kafka and Redis Streams.
//!
//! A missing broker binary fails the test with the command that installs
//! it; nothing is skipped.

mod common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::process::WorkerProcess;
use rdkafka::{
    Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};
use redis::AsyncCommands;
use serde_json::{Value, json};
use sluice_crds::StreamProcessorSpec;
use sluice_tests::brokers::{Kafka, KafkaRecord, Nats, Redis, RedisConfig};
use sluice_worker::{
    janitor::{self, Layout, Orphan},
    metrics::Metrics,
    redrive::{self, DeadLetterReader, MemoryLedger, Outcome, RedisDeadLetters},
    state::StateKeys,
};

/// Deadline for a worker to dead-letter its poison inputs; generous for two shared cores.
const DEADLINE: Duration = Duration::from_secs(180);
const PROCESSOR: &str = "shop/orders";
const DEAD_LETTER_HEADERS: [&str; 7] = [
    "sluice-error",
    "sluice-reason",
    "sluice-step",
    "sluice-partition",
    "sluice-offset",
    "sluice-attempt",
    "sluice-source",
];

async fn redis_conn(url: &str) -> redis::aio::ConnectionManager {
    let client = redis::Client::open(url).expect("redis url");
    redis::aio::ConnectionManager::new(client).await.expect("redis connection")
}

/// Snapshots of the current layout, of an old layout (a removed step, a
/// partition the source no longer has), another processor's and a sink's
/// dedupe marker: one sweep deletes exactly the orphans, counts them, and
/// a sweep with a long idle guard deletes nothing that was just written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_janitor_deletes_only_snapshots_no_pipeline_can_read() {
    let server = Redis::start();
    let mut conn = redis_conn(&server.url()).await;
    let keys = StateKeys::new("shop/orders");
    let live: Vec<String> = (0..4).flat_map(|p| [keys.snapshot(p, 1), keys.snapshot(p, 3)]).collect();
    let old_step: Vec<String> = (0..4).map(|p| keys.snapshot(p, 2)).collect();
    let old_partition: Vec<String> = (4..6).map(|p| keys.snapshot(p, 1)).collect();
    // More than one SCAN batch of keys that are none of ours.
    let others: Vec<String> = (0..1200)
        .map(|i| format!("sluice:shop/orders-eu:p{}:step2", i))
        .chain(["sluice:dedupe:{out}:abc".to_string(), "unrelated".to_string()])
        .collect();
    for k in live.iter().chain(&old_step).chain(&old_partition).chain(&others) {
        let _: () = conn.set(k, b"{}".as_slice()).await.expect("SET");
    }
    let layout = Layout { stateful_steps: vec![1, 3], partitions: Some(4) };

    // Just written: younger than the guard, so nothing goes (a rolling
    // update's other half may still be writing them).
    let guarded = janitor::sweep(&mut conn, &keys, &layout, Duration::from_secs(3600), None).await.expect("sweep");
    assert_eq!(guarded.deleted_total(), 0);
    assert_eq!(guarded.kept_recent, (old_step.len() + old_partition.len()) as u64);
    assert_eq!(guarded.scanned, (live.len() + old_step.len() + old_partition.len()) as u64);

    let metrics = Metrics::new(prometheus::Registry::new()).expect("metrics");
    let swept = janitor::sweep(&mut conn, &keys, &layout, Duration::ZERO, Some(&metrics)).await.expect("sweep");
    assert_eq!(swept.deleted.get(&Orphan::Step), Some(&(old_step.len() as u64)));
    assert_eq!(swept.deleted.get(&Orphan::Partition), Some(&(old_partition.len() as u64)));
    for k in old_step.iter().chain(&old_partition) {
        assert!(!conn.exists::<_, bool>(k).await.expect("EXISTS"), "{k} should be gone");
    }
    for k in live.iter().chain(&others) {
        assert!(conn.exists::<_, bool>(k).await.expect("EXISTS"), "{k} should be kept");
    }
    let text = metrics.render();
    assert!(text.contains(r#"sluice_state_janitor_deleted_total{reason="step"} 4"#), "{text}");
    assert!(text.contains(r#"sluice_state_janitor_deleted_total{reason="partition"} 2"#), "{text}");

    // Idempotent: a second sweep finds nothing.
    let again = janitor::sweep(&mut conn, &keys, &layout, Duration::ZERO, None).await.expect("sweep");
    assert_eq!((again.deleted_total(), again.scanned), (0, live.len() as u64));
}

/// Under an LFU eviction policy Redis keeps no idle times: the sweep fails
/// (deleting nothing) and says why, and the janitor turns itself off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_janitor_deletes_nothing_where_redis_keeps_no_idle_times() {
    let mut config = RedisConfig::default();
    config.directives.insert("maxmemory-policy".into(), "allkeys-lfu".into());
    let server = Redis::start_with(config).unwrap_or_else(|e| panic!("{e}"));
    let mut conn = redis_conn(&server.url()).await;
    let keys = StateKeys::new("shop/orders");
    let orphan = keys.snapshot(0, 2);
    let _: () = conn.set(&orphan, b"{}".as_slice()).await.expect("SET");
    let layout = Layout { stateful_steps: vec![1], partitions: Some(4) };
    let e = janitor::sweep(&mut conn, &keys, &layout, Duration::ZERO, None).await.expect_err("no idle times under LFU");
    assert!(janitor::no_idle_times(&e), "recognised as the LFU case: {e}");
    assert!(conn.exists::<_, bool>(&orphan).await.expect("EXISTS"), "nothing deleted");
}

// ----------------------------------------------------------------- redrive --

/// `n` good inputs and `poison` ones whose amount is not a number (the map
/// step fails on them, so they are dead-lettered), ids from `first`.
fn inputs(first: u64, n: u64, poison: u64) -> Vec<(Option<String>, Vec<u8>)> {
    (first..first + n + poison)
        .map(|id| {
            let amount = if id < first + n { json!(id) } else { json!("not a number") };
            let key = format!("k{}", id % 7);
            (Some(key.clone()), serde_json::to_vec(&json!({"id": id, "key": key, "amount": amount})).expect("json"))
        })
        .collect()
}

fn pipeline() -> Value {
    json!([{"map": {"set": {"double": "msg.amount * 2"}}}])
}

fn write_spec(dir: &Path, spec: &Value) -> PathBuf {
    let path = dir.join("spec.json");
    std::fs::write(&path, serde_json::to_vec_pretty(spec).expect("spec json")).expect("write spec");
    path
}

/// Runs the worker binary on `spec` until `done()` says the dead letters
/// are out, then stops it with SIGTERM.
fn run_worker_until(spec: &Value, dir: &Path, what: &str, mut done: impl FnMut() -> bool) {
    let path = write_spec(dir, spec);
    let mut worker =
        WorkerProcess::start(&path, dir.join("worker.log"), "redrive-test", &[("LOG_LEVEL", "info,rdkafka=warn")]);
    let start = Instant::now();
    while !done() {
        worker.assert_running();
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}; the worker's log:\n{}",
            worker.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = worker.terminate();
    assert!(status.success(), "worker exited with {status}:\n{}", worker.log_tail());
}

fn with_redrive(spec: &Value, id: &str) -> StreamProcessorSpec {
    let mut s = spec.clone();
    s["deadLetter"]["redrive"] = json!({"id": id});
    serde_json::from_value(s).expect("spec")
}

fn redriven_with<'a>(records: &'a [KafkaRecord], id: &str) -> Vec<&'a KafkaRecord> {
    records.iter().filter(|r| r.header(redrive::HEADER_REDRIVE_ID) == Some(id)).collect()
}

/// The committed offsets of the redrive's group on `topic`.
async fn delete_group(kafka: &Kafka, group: &str) {
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", kafka.bootstrap()).create().expect("admin client");
    let results = admin.delete_groups(&[group], &rdkafka::admin::AdminOptions::new()).await.expect("delete group");
    for r in results {
        r.unwrap_or_else(|(g, e)| panic!("delete group {g}: {e}"));
    }
}

fn committed(kafka: &Kafka, group: &str, topic: &str) -> Vec<Offset> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("group.id", group)
        .create()
        .expect("client");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let c = consumer.committed_offsets(tpl, Duration::from_secs(10)).expect("committed offsets");
    c.elements().iter().map(|e| e.offset()).collect()
}

/// Poison inputs are dead-lettered by the real worker; redrive `fix-1`
/// puts them back into the source topic with their key and payload, the
/// redrive header and none of the dead-letter headers, and leaves the
/// redrive group at the dead-letter topic's end. The same id again does
/// nothing. They fail again (the pipeline was not fixed), and with two new
/// poison inputs, `fix-2` redrives exactly those 8 and no earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_dead_letters_go_back_to_the_source_once_per_redrive_id() {
    let kafka = Kafka::start();
    for (t, p) in [("in", 2), ("out", 2), ("dlq", 1)] {
        kafka.create_topic(t, p).expect("topic");
    }
    kafka.produce("in", inputs(0, 20, 6)).expect("produce");
    let spec = json!({
        "source": {"kafka": {"brokers": [kafka.bootstrap()], "topic": "in", "group": "orders", "startFrom": "earliest"}},
        "pipeline": pipeline(),
        "sink": {"kafka": {"topic": "out"}},
        "deadLetter": {"kafka": {"topic": "dlq"}}
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let dead_letters = |n: usize| {
        kafka.read_topic("dlq", "read_uncommitted", Duration::from_secs(2), |r| r.len() >= n).expect("read dlq").len()
    };
    run_worker_until(&spec, dir.path(), "6 dead letters", || dead_letters(6) >= 6);
    let dead = kafka.read_topic("dlq", "read_uncommitted", DEADLINE, |r| r.len() >= 6).expect("read dlq");

    let metrics = Metrics::new(prometheus::Registry::new()).expect("metrics");
    let ledger = MemoryLedger::default();
    let started = Instant::now();
    let outcome = redrive::attempt(&with_redrive(&spec, "fix-1"), PROCESSOR, "fix-1", &ledger, Some(&metrics))
        .await
        .expect("redrive");
    assert_eq!(outcome, Outcome::Redriven(6), "in {:?}", started.elapsed());
    let input = kafka.read_topic("in", "read_uncommitted", DEADLINE, |r| r.len() >= 32).expect("read in");
    let back = redriven_with(&input, "fix-1");
    assert_eq!(back.len(), 6, "{input:#?}");
    for r in &back {
        for h in DEAD_LETTER_HEADERS {
            assert_eq!(r.header(h), None, "{h} stays behind: {r:?}");
        }
        assert!(
            dead.iter().any(|d| d.payload == r.payload && d.key == r.key),
            "redriven with its own key and payload: {r:?}"
        );
    }
    let group = redrive::consumer_name(PROCESSOR);
    assert_eq!(committed(&kafka, &group, "dlq"), vec![Offset::Offset(6)], "the redrive group is at the end");
    assert!(metrics.render().contains("sluice_dead_letters_redriven_total 6"));

    // The same id: nothing read, nothing sent.
    let again =
        redrive::attempt(&with_redrive(&spec, "fix-1"), PROCESSOR, "fix-1", &ledger, None).await.expect("redrive");
    assert_eq!(again, Outcome::AlreadyDone);

    // The broker forgets the redrive group's offsets (it has no members, so
    // they expire after offsets.retention.minutes): the end recorded with
    // fix-1 keeps the next redrive from starting over.
    delete_group(&kafka, &group).await;
    assert_eq!(committed(&kafka, &group, "dlq"), vec![Offset::Invalid], "the group's offsets are gone");

    // Still broken: the 6 fail again, 2 new poison inputs too.
    kafka.produce("in", inputs(100, 0, 2)).expect("produce");
    run_worker_until(&spec, dir.path(), "14 dead letters", || dead_letters(14) >= 14);
    let outcome =
        redrive::attempt(&with_redrive(&spec, "fix-2"), PROCESSOR, "fix-2", &ledger, None).await.expect("redrive");
    assert_eq!(outcome, Outcome::Redriven(8), "only what was dead-lettered since fix-1");
    let input = kafka.read_topic("in", "read_uncommitted", DEADLINE, |r| r.len() >= 42).expect("read in");
    assert_eq!((redriven_with(&input, "fix-1").len(), redriven_with(&input, "fix-2").len(), input.len()), (6, 8, 42));
    assert_eq!(committed(&kafka, &group, "dlq"), vec![Offset::Offset(14)]);
}

type Entry = (String, Vec<(String, Vec<u8>)>);

async fn entries(conn: &mut redis::aio::ConnectionManager, stream: &str) -> Vec<Entry> {
    let reply: redis::streams::StreamRangeReply = conn.xrange_all(stream).await.expect("XRANGE");
    reply
        .ids
        .into_iter()
        .map(|e| {
            let fields = e
                .map
                .iter()
                .filter_map(|(k, v)| redis::from_redis_value_ref::<Vec<u8>>(v).ok().map(|b| (k.clone(), b)))
                .collect();
            (e.id, fields)
        })
        .collect()
}

fn field<'a>(e: &'a Entry, name: &str) -> Option<&'a [u8]> {
    e.1.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
}

async fn xlen(conn: &mut redis::aio::ConnectionManager, stream: &str) -> usize {
    conn.xlen(stream).await.expect("XLEN")
}

/// The same on Redis Streams, and a leader that stops mid-redrive: one
/// batch republished and acknowledged, the next one read but never
/// republished; the next attempt sends exactly the rest, and the
/// `sluice-redrive` group ends with nothing pending and no lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dead_letters_go_back_to_the_source_once_per_redrive_id() {
    let server = Redis::start();
    let mut conn = redis_conn(&server.url()).await;
    for (key, payload) in inputs(0, 10, 4) {
        let _: String = conn
            .xadd("in", "*", &[("key", key.unwrap_or_default().into_bytes()), ("payload", payload)])
            .await
            .expect("XADD");
    }
    let spec = json!({
        "source": {"redis": {"url": server.url(), "stream": "in", "group": "orders", "startFrom": "earliest"}},
        "pipeline": pipeline(),
        "sink": {"redis": {"url": server.url(), "stream": "out"}},
        "deadLetter": {"redis": {"url": server.url(), "stream": "dlq"}}
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let url = server.url();
    let dead_letters = move |n: usize| {
        let client = redis::Client::open(url.as_str()).expect("url");
        let mut c = client.get_connection().expect("connection");
        redis::cmd("XLEN").arg("dlq").query::<usize>(&mut c).unwrap_or(0) >= n
    };
    run_worker_until(&spec, dir.path(), "4 dead letters", || dead_letters(4));
    let dead = entries(&mut conn, "dlq").await;
    assert_eq!(dead.len(), 4);

    // A leader that republishes one, reads the next and dies.
    let fix1 = with_redrive(&spec, "fix-1");
    let mut reader = RedisDeadLetters::open(&fix1).await.expect("reader");
    let mut sink = redrive::source_writer(&fix1).await.expect("writer");
    let first: Vec<_> =
        reader.next(1).await.expect("read").into_iter().map(|m| redrive::redriven(m, "fix-1")).collect();
    assert_eq!(first.len(), 1);
    sink.write(&first).await.expect("republish");
    reader.commit().await.expect("XACK");
    assert_eq!(reader.next(1).await.expect("read").len(), 1);
    drop(reader);

    let ledger = MemoryLedger::default();
    let outcome = redrive::attempt(&fix1, PROCESSOR, "fix-1", &ledger, None).await.expect("redrive");
    assert_eq!(outcome, Outcome::Redriven(3), "the rest, the one read but not republished included");
    let input = entries(&mut conn, "in").await;
    let back: Vec<&Entry> = input.iter().filter(|e| field(e, redrive::HEADER_REDRIVE_ID) == Some(b"fix-1")).collect();
    assert_eq!(back.len(), 4, "each dead letter once: {input:#?}");
    for e in &back {
        for h in DEAD_LETTER_HEADERS.iter().chain(&["redis-id"]) {
            assert_eq!(field(e, h), None, "{h} stays behind: {e:?}");
        }
        assert!(dead.iter().any(|d| field(d, "payload") == field(e, "payload") && field(d, "key") == field(e, "key")));
    }
    let groups: Vec<redis::Value> =
        redis::cmd("XINFO").arg("GROUPS").arg("dlq").query_async(&mut conn).await.expect("XINFO");
    let info = format!("{groups:?}");
    assert!(info.contains("sluice-redrive"), "{info}");
    let pending: redis::streams::StreamPendingReply =
        conn.xpending("dlq", redrive::REDIS_GROUP).await.expect("XPENDING");
    assert_eq!(pending.count(), 0, "everything acknowledged");

    assert_eq!(
        redrive::attempt(&fix1, PROCESSOR, "fix-1", &ledger, None).await.expect("redrive"),
        Outcome::AlreadyDone
    );

    // The 4 fail again, and 2 new poison inputs.
    for (key, payload) in inputs(100, 0, 2) {
        let _: String = conn
            .xadd("in", "*", &[("key", key.unwrap_or_default().into_bytes()), ("payload", payload)])
            .await
            .expect("XADD");
    }
    run_worker_until(&spec, dir.path(), "10 dead letters", || dead_letters(10));
    let fix2 = with_redrive(&spec, "fix-2");
    assert_eq!(
        redrive::attempt(&fix2, PROCESSOR, "fix-2", &ledger, None).await.expect("redrive"),
        Outcome::Redriven(6)
    );
    let input = entries(&mut conn, "in").await;
    let count = |id: &[u8]| input.iter().filter(|e| field(e, redrive::HEADER_REDRIVE_ID) == Some(id)).count();
    assert_eq!((count(b"fix-1"), count(b"fix-2"), input.len()), (4, 6, 26));
    assert_eq!(xlen(&mut conn, "dlq").await, 10);
}

async fn js(nats: &Nats) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect to nats"))
}

async fn publish(js: &async_nats::jetstream::Context, records: Vec<(Option<String>, Vec<u8>)>) {
    for (key, payload) in records {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Sluice-Key", key.unwrap_or_default().as_str());
        js.publish_with_headers("in", headers, payload.into()).await.expect("publish").await.expect("publish ack");
    }
}

/// (payload, headers) of every message of a stream.
async fn stream_messages(js: &async_nats::jetstream::Context, name: &str) -> Vec<(Vec<u8>, Vec<(String, String)>)> {
    use futures::StreamExt;
    let stream = js.get_stream(name).await.expect("stream");
    let total = stream.get_info().await.expect("info").state.messages as usize;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("reader consumer");
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        let mut batch = consumer.fetch().max_messages(10_000).messages().await.expect("fetch");
        while let Some(Ok(m)) = batch.next().await {
            let headers = m
                .headers
                .as_ref()
                .map(|h| {
                    h.iter()
                        .map(|(k, v)| (k.to_string(), v.first().map(|v| v.to_string()).unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default();
            out.push((m.payload.to_vec(), headers));
        }
    }
    out
}

/// The same on NATS JetStream: the dead letters come back to the source's
/// subject through the durable `sluice-redrive-<ns>-<name>`, which ends
/// with nothing pending and nothing awaiting an ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_dead_letters_go_back_to_the_source_once_per_redrive_id() {
    let nats = Nats::start();
    let js = js(&nats).await;
    for (name, subject) in [("IN", "in"), ("OUT", "out"), ("DLQ", "dlq")] {
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            ..Default::default()
        })
        .await
        .expect("create stream");
    }
    publish(&js, inputs(0, 10, 4)).await;
    let spec = json!({
        "source": {"nats": {"servers": [nats.url()], "stream": "IN", "consumer": "orders", "filterSubject": "in",
                            "startFrom": "earliest"}},
        "pipeline": pipeline(),
        "sink": {"nats": {"servers": [nats.url()], "subject": "out"}},
        "deadLetter": {"nats": {"servers": [nats.url()], "subject": "dlq"}}
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let handle = tokio::runtime::Handle::current();
    let dead_letters = |n: u64| {
        let js = js.clone();
        tokio::task::block_in_place(|| {
            handle.block_on(async move {
                let mut s = js.get_stream("DLQ").await.expect("stream");
                s.info().await.expect("info").state.messages >= n
            })
        })
    };
    run_worker_until(&spec, dir.path(), "4 dead letters", || dead_letters(4));
    let dead = stream_messages(&js, "DLQ").await;
    assert_eq!(dead.len(), 4);

    let ledger = MemoryLedger::default();
    let fix1 = with_redrive(&spec, "fix-1");
    assert_eq!(
        redrive::attempt(&fix1, PROCESSOR, "fix-1", &ledger, None).await.expect("redrive"),
        Outcome::Redriven(4)
    );
    let header = |h: &[(String, String)], name: &str| h.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let input = stream_messages(&js, "IN").await;
    let back: Vec<_> =
        input.iter().filter(|(_, h)| header(h, redrive::HEADER_REDRIVE_ID).as_deref() == Some("fix-1")).collect();
    assert_eq!(back.len(), 4, "{input:#?}");
    for (payload, headers) in &back {
        for h in DEAD_LETTER_HEADERS {
            assert_eq!(header(headers, h), None, "{h} stays behind: {headers:?}");
        }
        assert!(
            dead.iter().any(|(p, h)| p == payload && header(h, "Sluice-Key") == header(headers, "Sluice-Key")),
            "redriven with its own key and payload"
        );
    }
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream("DLQ")
        .await
        .expect("stream")
        .get_consumer(&redrive::consumer_name(PROCESSOR))
        .await
        .expect("the redrive's durable");
    let info = consumer.info().await.expect("consumer info");
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));
    assert_eq!(
        redrive::attempt(&fix1, PROCESSOR, "fix-1", &ledger, None).await.expect("redrive"),
        Outcome::AlreadyDone
    );

    publish(&js, inputs(100, 0, 2)).await;
    run_worker_until(&spec, dir.path(), "10 dead letters", || dead_letters(10));
    let fix2 = with_redrive(&spec, "fix-2");
    assert_eq!(
        redrive::attempt(&fix2, PROCESSOR, "fix-2", &ledger, None).await.expect("redrive"),
        Outcome::Redriven(6)
    );
    let input = stream_messages(&js, "IN").await;
    let count =
        |id: &str| input.iter().filter(|(_, h)| header(h, redrive::HEADER_REDRIVE_ID).as_deref() == Some(id)).count();
    assert_eq!((count("fix-1"), count("fix-2"), input.len()), (4, 6, 26));
}

// ------------------------------------------------------ snapshot fingerprints --

/// The worker binary with a window over a Kafka source and Redis state: its
/// snapshots carry their step's fingerprint; a restart with the same spec
/// restores them, one with another window size does not (it says so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_of_an_edited_step_are_not_restored() {
    let kafka = Kafka::start();
    for t in ["in", "out"] {
        kafka.create_topic(t, 1).expect("topic");
    }
    let records: Vec<(Option<String>, Vec<u8>)> = (0..5)
        .map(|i| (Some("k".to_string()), serde_json::to_vec(&json!({"key": "k", "ts": 1_000 + i})).expect("json")))
        .collect();
    kafka.produce("in", records).expect("produce");
    let server = Redis::start();
    let mut conn = redis_conn(&server.url()).await;
    let spec = |size: &str| {
        json!({
            "source": {"kafka": {"brokers": [kafka.bootstrap()], "topic": "in", "group": "windows", "startFrom": "earliest"}},
            "pipeline": [{"window": {"type": "tumbling", "size": size, "keyBy": "msg.key", "time": {"field": "msg.ts"},
                                     "aggregate": {"count": {}}}}],
            "sink": {"kafka": {"topic": "out"}},
            "state": {"backend": "redis", "redis": {"url": server.url()}, "snapshotInterval": "1s"}
        })
    };
    // A bare spec is processor default/local.
    let key = StateKeys::new("default/local").snapshot(0, 0);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_spec(dir.path(), &spec("1h"));
    let run = |log: &str| {
        WorkerProcess::start(&path, dir.path().join(log), "state-test", &[("LOG_LEVEL", "info,rdkafka=warn")])
    };

    let mut first = run("first.log");
    let start = Instant::now();
    while !conn.exists::<_, bool>(&key).await.expect("EXISTS") {
        first.assert_running();
        assert!(start.elapsed() < DEADLINE, "no snapshot within {DEADLINE:?}:\n{}", first.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(first.terminate().success(), "{}", first.log_tail());
    let value: Vec<u8> = conn.get(&key).await.expect("GET");
    assert!(value.starts_with(b"sluice-fp1:"), "{}", String::from_utf8_lossy(&value));

    let wait_for = |w: &mut WorkerProcess, text: &str| {
        let start = Instant::now();
        while !w.log_text().contains(text) {
            w.assert_running();
            assert!(start.elapsed() < DEADLINE, "no `{text}` within {DEADLINE:?}:\n{}", w.log_tail());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let mut same = run("same.log");
    wait_for(&mut same, "partition state restored");
    assert!(same.terminate().success(), "{}", same.log_tail());
    assert!(!same.log_text().contains("another definition"), "{}", same.log_tail());

    write_spec(dir.path(), &spec("2h"));
    let mut edited = run("edited.log");
    wait_for(&mut edited, "written by another definition of its step");
    assert!(edited.terminate().success(), "{}", edited.log_tail());
    assert!(!edited.log_text().contains("partition state restored"), "{}", edited.log_tail());
}

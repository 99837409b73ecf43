//! The Kafka source and sink against a real Apache Kafka (sluice-tests'
//! harness), driven through the real `sluice-worker` binary: end to end with
//! per-key order, kill -9 and restart, poison messages in a dead-letter
//! topic, and a broker restart mid-stream.
//!
//! Every wait polls the output topic with a deadline; assertions are about
//! which messages arrived (by id), never about how long it took.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Value, json};
use sluice_tests::brokers::{Kafka, KafkaRecord};

const KEYS: u64 = 64;
/// Deadline for a whole stream to arrive; generous for two shared cores.
const STREAM_DEADLINE: Duration = Duration::from_secs(300);

mod common;
use common::process::WorkerProcess as Worker;

impl Worker {
    /// A worker as pod `connectors-test`.
    fn start_kafka(spec: &Path, log: PathBuf) -> Worker {
        Worker::start_as(spec, log, "connectors-test")
    }

    /// A worker with its own pod name (client id), as each pod of a Deployment has.
    fn start_as(spec: &Path, log: PathBuf, pod: &str) -> Worker {
        Worker::start(spec, log, pod, &[("LOG_LEVEL", "info,rdkafka=warn")])
    }
}

fn write_spec(dir: &Path, spec: &Value) -> PathBuf {
    let path = dir.join("spec.json");
    std::fs::write(&path, serde_json::to_vec_pretty(spec).expect("spec json")).expect("write spec");
    path
}

fn spec(kafka: &Kafka, input: &str, output: &str, dlq: &str, group: &str) -> Value {
    json!({
        "source": {"kafka": {"brokers": [kafka.bootstrap()], "topic": input, "group": group, "startFrom": "earliest"}},
        "pipeline": [
            {"filter": "msg.type != 'ignore'"},
            {"map": {"set": {"double": "msg.amount * 2"}}}
        ],
        "sink": {"kafka": {"topic": output, "key": "msg.key", "compression": "lz4"}},
        "deadLetter": {"kafka": {"topic": dlq}},
        "workers": 2,
        "batchSize": 500
    })
}

/// `n` JSON records: id, key `k<id % KEYS>`, seq within the key.
fn inputs(n: u64) -> Vec<(Option<String>, Vec<u8>)> {
    (0..n)
        .map(|id| {
            let key = format!("k{}", id % KEYS);
            let payload = json!({"id": id, "key": key, "seq": id / KEYS, "type": "order", "amount": id % 1000});
            (Some(key), serde_json::to_vec(&payload).expect("json"))
        })
        .collect()
}

fn ids(records: &[KafkaRecord]) -> HashSet<u64> {
    records
        .iter()
        .filter_map(|r| serde_json::from_slice::<Value>(&r.payload).ok())
        .filter_map(|v| v["id"].as_u64())
        .collect()
}

/// Waits until `topic` holds at least `want` distinct ids (or the deadline),
/// checking that the worker still runs; returns what it read.
fn wait_for_ids(kafka: &Kafka, topic: &str, want: usize, worker: &mut Worker) -> Vec<KafkaRecord> {
    wait_for_ids_in(kafka, topic, "read_uncommitted", want, worker)
}

fn wait_for_ids_in(kafka: &Kafka, topic: &str, isolation: &str, want: usize, worker: &mut Worker) -> Vec<KafkaRecord> {
    let deadline = std::time::Instant::now() + STREAM_DEADLINE;
    loop {
        worker.assert_running();
        let mut seen = HashSet::new();
        let mut parsed = 0;
        let records = kafka
            .read_topic(topic, isolation, Duration::from_secs(10), |r| {
                seen.extend(ids(&r[parsed..]));
                parsed = r.len();
                seen.len() >= want
            })
            .expect("read output");
        let got = seen.len();
        eprintln!("{topic}: {got} of {want} ids so far");
        if got >= want {
            return records;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "{topic}: only {got} of {want} ids within {STREAM_DEADLINE:?}; the worker's log:\n{}",
                worker.log_tail()
            );
        }
    }
}

/// Every id of `0..n` present; per key, the first occurrences of `seq` come
/// in increasing order. Returns the number of duplicates.
fn check_output(records: &[KafkaRecord], n: u64) -> usize {
    let mut seen: HashSet<u64> = HashSet::new();
    let mut duplicates = 0;
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    let mut by_partition: BTreeMap<i32, Vec<&KafkaRecord>> = BTreeMap::new();
    for r in records {
        by_partition.entry(r.partition).or_default().push(r);
    }
    for rs in by_partition.values_mut() {
        rs.sort_by_key(|r| r.offset);
        for r in rs.iter() {
            let v: Value = serde_json::from_slice(&r.payload).expect("output is JSON");
            let id = v["id"].as_u64().expect("id");
            let key = v["key"].as_str().expect("key").to_string();
            assert_eq!(r.key.as_deref(), Some(key.as_bytes()), "the sink key comes from msg.key");
            assert_eq!(v["double"].as_u64(), Some(v["amount"].as_u64().expect("amount") * 2), "map ran");
            if !seen.insert(id) {
                duplicates += 1;
                continue;
            }
            let seq = v["seq"].as_u64().expect("seq");
            if let Some(prev) = last_seq.insert(key.clone(), seq) {
                assert!(seq > prev, "key {key}: seq {seq} after {prev} (order broken)");
            }
        }
    }
    let missing: Vec<u64> = (0..n).filter(|id| !seen.contains(id)).take(20).collect();
    assert!(missing.is_empty(), "{} of {n} ids missing, e.g. {missing:?}", n as usize - seen.len());
    duplicates
}

#[test]
fn hundred_thousand_messages_end_to_end_in_key_order() {
    let kafka = Kafka::start();
    kafka.create_topic("in", 4).expect("topic");
    kafka.create_topic("out", 4).expect("topic");
    kafka.create_topic("dlq", 1).expect("topic");
    const N: u64 = 100_000;
    assert_eq!(kafka.produce("in", inputs(N)).expect("produce") as u64, N);

    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(dir.path(), &spec(&kafka, "in", "out", "dlq", "e2e"));
    let mut worker = Worker::start_kafka(&spec, dir.path().join("worker.log"));
    let records = wait_for_ids(&kafka, "out", N as usize, &mut worker);
    let duplicates = check_output(&records, N);
    eprintln!("end to end: {N} in, {} out, {duplicates} duplicates", records.len());
    assert_eq!(duplicates, 0, "a clean run delivers each message once");
    for r in &records {
        let key = r.key.as_deref().expect("keyed");
        assert_eq!(
            r.partition,
            java_partition(key, 4),
            "key {:?} is on the partition a Java producer would choose (murmur2)",
            String::from_utf8_lossy(key)
        );
    }
}

/// The partition Kafka's Java producer chooses for `key`:
/// `toPositive(Utils.murmur2(key)) % partitions`.
fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// Kafka's `Utils.murmur2`, written out here to check the sink against it.
fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, b) in rest.iter().enumerate().rev() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

#[test]
fn murmur2_matches_kafkas_own_vectors() {
    // From Kafka's Java client (Utils.murmur2), run with jshell on kafka-clients 4.4.0.
    for (key, hash) in [("21", -973_932_308), ("foobar", -790_332_482), ("abc", 479_470_107), ("k1", 1_684_045_097)] {
        assert_eq!(murmur2(key.as_bytes()), hash, "{key}");
    }
    assert_eq!(murmur2(b"a-little-bit-long-string"), -985_981_536);
    assert_eq!((java_partition(b"k0", 4), java_partition(b"foobar", 4)), (1, 2));
}

#[test]
fn kill_9_mid_stream_then_restart_delivers_everything() {
    let kafka = Kafka::start();
    kafka.create_topic("in", 4).expect("topic");
    kafka.create_topic("out", 4).expect("topic");
    kafka.create_topic("dlq", 1).expect("topic");
    const N: u64 = 100_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(dir.path(), &spec(&kafka, "in", "out", "dlq", "crash"));
    let all = inputs(N);
    std::thread::scope(|scope| {
        // Input keeps arriving while the worker is killed and restarted.
        let producer = scope.spawn(|| {
            for chunk in all.chunks(5_000) {
                kafka.produce("in", chunk.iter().cloned()).expect("produce");
            }
        });
        let mut first = Worker::start_kafka(&spec, dir.path().join("worker-1.log"));
        let before = wait_for_ids(&kafka, "out", 20_000, &mut first);
        first.kill9();
        let at_kill =
            ids(&kafka.read_topic("out", "read_uncommitted", Duration::from_secs(3), |_| false).expect("read"));
        let mut second = Worker::start_kafka(&spec, dir.path().join("worker-2.log"));
        let records = wait_for_ids(&kafka, "out", N as usize, &mut second);
        producer.join().expect("producer thread");
        let duplicates = check_output(&records, N);
        eprintln!(
            "kill -9: killed once {} ids were seen out; {} out at the kill; {} records out in all, {duplicates} duplicates (redelivered after the last commit)",
            ids(&before).len(),
            at_kill.len(),
            records.len()
        );
        assert!((at_kill.len() as u64) < N, "the kill came before the end of the stream");
    });
}

/// Two workers of one group, as two pods of a Deployment: the second joins
/// mid-stream (partitions move to it), then the first is stopped with
/// SIGTERM mid-stream (its partitions move back). Nothing is lost; the
/// duplicates (work redone after a handover) are counted.
#[test]
fn two_workers_in_one_group_hand_partitions_over_without_loss() {
    let kafka = Kafka::start();
    kafka.create_topic("in", 8).expect("topic");
    kafka.create_topic("out", 8).expect("topic");
    kafka.create_topic("dlq", 1).expect("topic");
    const N: u64 = 100_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(dir.path(), &spec(&kafka, "in", "out", "dlq", "pair"));
    let all = inputs(N);
    std::thread::scope(|scope| {
        // A backlog: both handovers happen while the workers are busy.
        let producer = scope.spawn(|| {
            for chunk in all.chunks(10_000) {
                kafka.produce("in", chunk.iter().cloned()).expect("produce");
            }
        });
        let mut a = Worker::start_as(&spec, dir.path().join("worker-a.log"), "worker-a");
        wait_for_ids(&kafka, "out", 10_000, &mut a);
        let mut b = Worker::start_as(&spec, dir.path().join("worker-b.log"), "worker-b");
        let joined = std::time::Instant::now();
        // The group moves some of A's partitions to B (a join takes a few seconds).
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(dir.path().join("worker-b.log"))
            .unwrap_or_default()
            .contains("partitions assigned")
        {
            b.assert_running();
            assert!(std::time::Instant::now() < deadline, "worker B never got partitions from A:\n{}", b.log_tail());
            std::thread::sleep(Duration::from_millis(200));
        }
        wait_for_ids(&kafka, "out", 50_000, &mut b);
        a.assert_running();
        let status = a.terminate();
        assert!(status.success(), "worker A exited with {status} after SIGTERM; its log:\n{}", a.log_tail());
        let a_log = std::fs::read_to_string(dir.path().join("worker-a.log")).unwrap_or_default();
        assert!(a_log.contains("partitions revoked"), "worker A never gave partitions to B:\n{}", a.log_tail());
        assert!(
            a_log.contains("revocation: in-flight work drained"),
            "worker A let partitions go without draining them:\n{}",
            a.log_tail()
        );
        let records = wait_for_ids(&kafka, "out", N as usize, &mut b);
        producer.join().expect("producer thread");
        let duplicates = check_output(&records, N);
        eprintln!(
            "two workers: B joined after 10,000 ids ({:?} to 50,000), A stopped by SIGTERM; {} records out, {duplicates} duplicates",
            joined.elapsed(),
            records.len()
        );
        // Each handover drains and commits before the partitions move, so
        // only what a worker fetched but had not finished when the drain
        // deadline passed can be redone: at most its in-flight window
        // (pool queues of 2 workers x 4 batches x 500, plus a batch in
        // hand), for each of the two handovers.
        assert!(duplicates <= 2 * 5_000, "{duplicates} duplicates: more than two in-flight windows");
    });
}

#[test]
fn poison_messages_go_to_the_dead_letter_topic_with_headers() {
    let kafka = Kafka::start();
    kafka.create_topic("in", 2).expect("topic");
    kafka.create_topic("out", 2).expect("topic");
    kafka.create_topic("dlq", 1).expect("topic");
    let mut records = inputs(1000);
    for i in 0..10 {
        records.push((Some(format!("bad{i}")), format!("{{not json {i}").into_bytes()));
        let expr_error = json!({"id": 1_000_000 + i, "key": "k0", "type": "order", "amount": "not a number"});
        records.push((Some("k0".into()), serde_json::to_vec(&expr_error).expect("json")));
        let ignored = json!({"id": 2_000_000 + i, "key": "k1", "type": "ignore", "amount": 1});
        records.push((Some("k1".into()), serde_json::to_vec(&ignored).expect("json")));
    }
    kafka.produce("in", records).expect("produce");

    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(dir.path(), &spec(&kafka, "in", "out", "dlq", "poison"));
    let mut worker = Worker::start_kafka(&spec, dir.path().join("worker.log"));
    let out = wait_for_ids(&kafka, "out", 1000, &mut worker);
    let dead =
        kafka.read_topic("dlq", "read_uncommitted", STREAM_DEADLINE, |r| r.len() >= 20).expect("read dead letters");
    worker.assert_running();
    check_output(&out, 1000);
    let out_ids = ids(&out);
    assert!(out_ids.iter().all(|id| *id < 1000), "no poison or ignored message in the output");

    // Where each input is, to check the partition and offset headers.
    let input = kafka.read_topic("in", "read_uncommitted", STREAM_DEADLINE, |r| r.len() >= 1030).expect("read input");
    let position: HashMap<&[u8], (i32, i64)> =
        input.iter().map(|r| (r.payload.as_slice(), (r.partition, r.offset))).collect();
    assert_eq!(dead.len(), 20, "10 bad payloads and 10 expression errors: {dead:#?}");
    let mut reasons = BTreeMap::new();
    for d in &dead {
        for h in ["sluice-error", "sluice-step", "sluice-partition", "sluice-offset", "sluice-attempt", "sluice-source"]
        {
            assert!(d.header(h).is_some_and(|v| !v.is_empty()), "dead letter without {h}: {d:?}");
        }
        assert_eq!(d.header("sluice-source"), Some("kafka/in"));
        let (p, o) = position[d.payload.as_slice()];
        assert_eq!(d.header("sluice-partition"), Some(p.to_string().as_str()));
        assert_eq!(d.header("sluice-offset"), Some(o.to_string().as_str()));
        *reasons.entry(d.header("sluice-reason").unwrap_or_default().to_string()).or_insert(0) += 1;
        eprintln!("dead letter: step={:?} error={:?}", d.header("sluice-step"), d.header("sluice-error"));
    }
    assert_eq!(reasons.values().sum::<i32>(), 20);
    assert_eq!(reasons.get("bad_payload"), Some(&10), "{reasons:?}");
}

/// Hex that does not compress, `len` characters.
fn incompressible(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from_digit((x % 16) as u32, 16).unwrap_or('0')
        })
        .collect()
}

#[test]
fn records_the_broker_refuses_are_dead_lettered_and_the_rest_flows() {
    let kafka = Kafka::start();
    kafka.create_topic("in", 4).expect("topic");
    // The output topic takes record batches up to 100 kB.
    kafka.create_topic_with("out", 4, &[("max.message.bytes", "100000")]).expect("topic");
    kafka.create_topic("dlq", 1).expect("topic");
    const N: u64 = 20_000;
    // Every 1000th id (from 500) is 150 kB, which the producer accepts and the
    // broker refuses; every 1000th id (from 900) is 300 kB, over the
    // producer's own limit (message.max.bytes below), refused before it leaves.
    let big = |id: u64| match id % 1000 {
        500 => Some(150_000),
        900 => Some(300_000),
        _ => None,
    };
    let records: Vec<_> = (0..N)
        .map(|id| {
            let key = format!("k{}", id % KEYS);
            let mut v = json!({"id": id, "key": key, "seq": id / KEYS, "type": "order", "amount": id % 1000});
            if let Some(len) = big(id) {
                v["pad"] = json!(incompressible(id, len));
            }
            (Some(key), serde_json::to_vec(&v).expect("json"))
        })
        .collect();
    kafka.produce("in", records).expect("produce");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = spec(&kafka, "in", "out", "dlq", "refused");
    s["sink"]["kafka"]["properties"] = json!({"message.max.bytes": "200000", "batch.size": "50000"});
    s["deadLetter"]["maxRetries"] = json!(1);
    let spec = write_spec(dir.path(), &s);
    let mut worker = Worker::start_kafka(&spec, dir.path().join("worker.log"));
    let refused: HashSet<u64> = (0..N).filter(|id| big(*id).is_some()).collect();
    let out = wait_for_ids(&kafka, "out", (N as usize) - refused.len(), &mut worker);
    let dead = kafka
        .read_topic("dlq", "read_uncommitted", STREAM_DEADLINE, |r| ids(r).len() >= refused.len())
        .expect("read dead letters");
    worker.assert_running();

    let out_ids = ids(&out);
    assert!(out_ids.is_disjoint(&refused), "no refused record in the output");
    let missing: Vec<u64> = (0..N).filter(|id| !refused.contains(id) && !out_ids.contains(id)).take(10).collect();
    assert!(missing.is_empty(), "records that should have flowed are missing: {missing:?}");
    assert_eq!(ids(&dead), refused, "exactly the refused records are in the dead-letter topic");
    for d in &dead {
        assert_eq!(d.header("sluice-reason"), Some("sink_rejected"), "{:?}", d.header("sluice-error"));
        assert_eq!(d.header("sluice-step"), Some("spec.sink.kafka"));
        assert_eq!(d.header("sluice-attempt"), Some("2"), "the first attempt and maxRetries = 1");
        assert_eq!(d.header("sluice-source"), Some("kafka/in"));
        let error = d.header("sluice-error").unwrap_or_default();
        assert!(error.to_lowercase().contains("too large"), "the error says why: {error}");
        let v: Value = serde_json::from_slice(&d.payload).expect("dead letter payload is the output record");
        assert_eq!(v["double"].as_u64(), Some(v["amount"].as_u64().expect("amount") * 2), "as it left the pipeline");
    }
    let errors: BTreeMap<String, usize> = dead.iter().fold(BTreeMap::new(), |mut m, d| {
        *m.entry(d.header("sluice-error").unwrap_or_default().to_string()).or_insert(0) += 1;
        m
    });
    eprintln!("refused records dead-lettered: {errors:?}");
}

#[test]
fn broker_restart_mid_stream_recovers_by_itself() {
    let mut kafka = Kafka::start();
    kafka.create_topic("in", 4).expect("topic");
    kafka.create_topic("out", 4).expect("topic");
    kafka.create_topic("dlq", 1).expect("topic");
    const N: u64 = 50_000;
    kafka.produce("in", inputs(N)).expect("produce");

    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(dir.path(), &spec(&kafka, "in", "out", "dlq", "restart"));
    let mut worker = Worker::start_kafka(&spec, dir.path().join("worker.log"));
    let before = wait_for_ids(&kafka, "out", 10_000, &mut worker);
    kafka.restart().expect("broker restart");
    eprintln!("broker restarted after {} ids were out", ids(&before).len());
    let records = wait_for_ids(&kafka, "out", N as usize, &mut worker);
    let duplicates = check_output(&records, N);
    eprintln!("broker restart: {} records out, {duplicates} duplicates", records.len());
}

#[test]
fn exactly_once_kill_9_mid_transaction_read_committed_sees_each_input_once() {
    let kafka = Kafka::start();
    kafka.create_topic("in", 4).expect("topic");
    kafka.create_topic("out", 4).expect("topic");
    kafka.create_topic("dlq", 1).expect("topic");
    const N: u64 = 50_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = spec(&kafka, "in", "out", "dlq", "eos");
    s["delivery"] = json!("exactlyOnce");
    // The killed member's partitions move after its session times out.
    s["source"]["kafka"]["properties"] = json!({"session.timeout.ms": "6000"});
    let spec = write_spec(dir.path(), &s);
    let all = inputs(N);
    std::thread::scope(|scope| {
        let producer = scope.spawn(|| {
            for chunk in all.chunks(5_000) {
                kafka.produce("in", chunk.iter().cloned()).expect("produce");
            }
        });
        // The same POD_NAME, so the same transactional.id: the restarted
        // worker fences the killed one and aborts its open transaction.
        let mut first = Worker::start_kafka(&spec, dir.path().join("worker-1.log"));
        wait_for_ids_in(&kafka, "out", "read_committed", 10_000, &mut first);
        // Kill while a transaction holds records that read_committed does not see yet.
        let deadline = std::time::Instant::now() + STREAM_DEADLINE;
        loop {
            first.assert_running();
            let read =
                |isolation| kafka.read_topic("out", isolation, Duration::from_secs(2), |_| false).expect("read").len();
            let (committed, all) = (read("read_committed"), read("read_uncommitted"));
            if all > committed {
                first.kill9();
                eprintln!("killed while read_uncommitted was {} records ahead of read_committed", all - committed);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never saw an open transaction");
        }
        let mut second = Worker::start_kafka(&spec, dir.path().join("worker-2.log"));
        let committed = wait_for_ids_in(&kafka, "out", "read_committed", N as usize, &mut second);
        producer.join().expect("producer thread");
        let duplicates = check_output(&committed, N);
        let uncommitted =
            kafka.read_topic("out", "read_uncommitted", Duration::from_secs(5), |_| false).expect("read uncommitted");
        eprintln!(
            "exactly-once: read_committed sees {} records for {N} inputs ({duplicates} duplicates); read_uncommitted sees {} (aborted records of the killed transaction included)",
            committed.len(),
            uncommitted.len()
        );
        assert_eq!(duplicates, 0, "read_committed sees every input exactly once");
        assert_eq!(committed.len() as u64, N);
    });
}

/// Exactly-once across live rebalances, as the operator's scaling causes
/// them: worker B (its own pod, so its own transactional.id) joins while A
/// is busy and takes some of A's partitions, then A leaves by SIGTERM and B
/// takes the rest. Each revocation commits the open transaction before its
/// partitions move, so a read_committed consumer sees every input exactly
/// once, and the group's offsets end where the outputs do.
///
/// A commit that meets the group's generation changing under it
/// (ILLEGAL_GENERATION) aborts the transaction, and the worker exits to
/// resume from the committed offsets; its Deployment starts it again. The
/// test does what the Deployment does (same pod name, so the same
/// transactional.id, which fences) and counts those restarts; any other
/// exit fails it.
#[test]
fn exactly_once_across_live_rebalances_read_committed_sees_each_input_once() {
    let kafka = Kafka::start();
    kafka.create_topic("in", 8).expect("topic");
    kafka.create_topic("out", 8).expect("topic");
    kafka.create_topic("dlq", 1).expect("topic");
    const N: u64 = 60_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = spec(&kafka, "in", "out", "dlq", "eos-pair");
    s["delivery"] = json!("exactlyOnce");
    let spec = write_spec(dir.path(), &s);
    let all = inputs(N);
    let log = |pod: &str| dir.path().join(format!("{pod}.log"));
    let restarts = std::cell::Cell::new(0);
    // As a Deployment: start again a worker that exited on an aborted transaction.
    let keep_running = |w: &mut Worker, pod: &str| {
        if let Ok(Some(status)) = w.child.try_wait() {
            let text = w.log_text();
            assert!(
                text.lines().last().is_some_and(|l| l.contains("worker failed"))
                    && text.contains("exactly-once transaction aborted"),
                "{pod} exited with {status}, not on an aborted transaction:\n{}",
                w.log_tail()
            );
            eprintln!("{pod} exited on an aborted transaction; started again, as its Deployment would");
            restarts.set(restarts.get() + 1);
            *w = Worker::start_as(&spec, log(pod), pod);
        }
    };
    std::thread::scope(|scope| {
        let producer = scope.spawn(|| {
            for chunk in all.chunks(5_000) {
                kafka.produce("in", chunk.iter().cloned()).expect("produce");
            }
        });
        let mut a = Worker::start_as(&spec, log("worker-a"), "worker-a");
        wait_for_ids_in(&kafka, "out", "read_committed", 10_000, &mut a);
        let mut b = Worker::start_as(&spec, log("worker-b"), "worker-b");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !b.log_text().contains("partitions assigned") {
            keep_running(&mut a, "worker-a");
            keep_running(&mut b, "worker-b");
            assert!(std::time::Instant::now() < deadline, "worker B never got partitions from A:\n{}", b.log_tail());
            std::thread::sleep(Duration::from_millis(200));
        }
        let deadline = std::time::Instant::now() + STREAM_DEADLINE;
        while ids(&kafka.read_topic("out", "read_committed", Duration::from_secs(2), |_| false).expect("read")).len()
            < 30_000
        {
            keep_running(&mut a, "worker-a");
            keep_running(&mut b, "worker-b");
            assert!(std::time::Instant::now() < deadline, "30,000 ids never came out:\n{}", b.log_tail());
        }
        keep_running(&mut a, "worker-a");
        let status = a.terminate();
        assert!(status.success(), "worker A exited with {status} after SIGTERM; its log:\n{}", a.log_tail());
        let a_log = a.log_text();
        assert!(a_log.contains("partitions revoked"), "worker A never gave partitions to B:\n{}", a.log_tail());
        // Committed there, or already committed by the sink stage while the
        // revocation waited for every partition to drain.
        assert!(
            a_log.contains("exactly-once: transaction committed on revocation")
                || a_log.contains("exactly-once: nothing to commit on revocation"),
            "worker A let partitions go without settling its transaction:\n{}",
            a.log_tail()
        );
        let deadline = std::time::Instant::now() + STREAM_DEADLINE;
        while ids(&kafka.read_topic("out", "read_committed", Duration::from_secs(2), |_| false).expect("read")).len()
            < N as usize
        {
            keep_running(&mut b, "worker-b");
            assert!(std::time::Instant::now() < deadline, "not every id came out:\n{}", b.log_tail());
        }
        producer.join().expect("producer thread");
        keep_running(&mut b, "worker-b");
        // The whole topic: a duplicate can come after the last new id.
        let committed =
            kafka.read_topic("out", "read_committed", Duration::from_secs(5), |_| false).expect("read committed");
        let duplicates = check_output(&committed, N);
        eprintln!(
            "exactly-once across two rebalances: read_committed sees {} records for {N} inputs ({duplicates} duplicates); {} restarts on an aborted transaction",
            committed.len(),
            restarts.get()
        );
        assert_eq!(duplicates, 0, "read_committed sees every input exactly once");
        assert_eq!(committed.len() as u64, N);
        // And the group's offsets are where the outputs are: a revoked
        // partition's old position, committed again by its previous owner,
        // would make the next worker redo what is already out.
        let status = b.terminate();
        assert!(status.success(), "worker B exited with {status} after SIGTERM; its log:\n{}", b.log_tail());
        let lag = group_lag(&s);
        assert_eq!(lag.total, 0, "the group's committed offsets lag the input: {:?}", lag.per_partition);
    });
}

/// The lag of the spec's consumer group, as the operator's probe sees it.
fn group_lag(spec: &Value) -> sluice_worker::probe::Lag {
    use sluice_worker::probe::{Credentials, LagProbe, ProbeOptions, ProcessorRef, SourceProbe};
    let source: sluice_crds::Source = serde_json::from_value(spec["source"].clone()).expect("source spec");
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let options = ProbeOptions { timeout: Duration::from_secs(10) };
        SourceProbe::new(&source, &ProcessorRef::new("default", "local"), Credentials::default(), options)
            .expect("probe")
            .probe()
            .await
            .expect("lag")
    })
}

/// Under exactly-once a record the broker refuses would abort the whole
/// transaction (librdkafka allows nothing else), and the restarted worker
/// would meet it again: a crash loop on one record. The transactional sink
/// reads the topic's limit and refuses such records before producing them.
#[test]
fn exactly_once_dead_letters_records_too_large_for_the_topic_without_aborting() {
    let kafka = Kafka::start();
    kafka.create_topic("in", 4).expect("topic");
    kafka.create_topic_with("out", 4, &[("max.message.bytes", "100000")]).expect("topic");
    kafka.create_topic("dlq", 1).expect("topic");
    const N: u64 = 20_000;
    // Every 1000th id (from 500) is 150 kB: under the producer's limit
    // (1 MB), over the topic's, so only the broker would refuse it.
    let big = |id: u64| id % 1000 == 500;
    let records: Vec<_> = (0..N)
        .map(|id| {
            let key = format!("k{}", id % KEYS);
            let mut v = json!({"id": id, "key": key, "seq": id / KEYS, "type": "order", "amount": id % 1000});
            if big(id) {
                v["pad"] = json!(incompressible(id, 150_000));
            }
            (Some(key), serde_json::to_vec(&v).expect("json"))
        })
        .collect();
    kafka.produce("in", records).expect("produce");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = spec(&kafka, "in", "out", "dlq", "eos-refused");
    s["delivery"] = json!("exactlyOnce");
    s["deadLetter"]["maxRetries"] = json!(1);
    let spec = write_spec(dir.path(), &s);
    let mut worker = Worker::start_kafka(&spec, dir.path().join("worker.log"));
    let refused: HashSet<u64> = (0..N).filter(|id| big(*id)).collect();
    let out = wait_for_ids_in(&kafka, "out", "read_committed", (N as usize) - refused.len(), &mut worker);
    let dead = kafka
        .read_topic("dlq", "read_uncommitted", STREAM_DEADLINE, |r| ids(r).len() >= refused.len())
        .expect("read dead letters");
    worker.assert_running();

    let out_ids = ids(&out);
    assert_eq!(out.len(), out_ids.len(), "read_committed sees each record once");
    assert!(out_ids.is_disjoint(&refused), "no refused record in the output");
    assert_eq!(out_ids.len() as u64, N - refused.len() as u64, "every other record is in the output");
    assert_eq!(ids(&dead), refused, "exactly the refused records are in the dead-letter topic");
    for d in &dead {
        assert_eq!(d.header("sluice-reason"), Some("sink_rejected"), "{:?}", d.header("sluice-error"));
        let error = d.header("sluice-error").unwrap_or_default();
        assert!(error.contains("max.message.bytes of 100000"), "the error names the topic's limit: {error}");
    }
    let log = std::fs::read_to_string(dir.path().join("worker.log")).expect("worker log");
    assert!(!log.contains("transaction aborted"), "no transaction was aborted:\n{log}");
}

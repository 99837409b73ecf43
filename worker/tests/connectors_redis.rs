//! The Redis Streams source and sink against a real redis-server, driven
//! through the real `sluice-worker` binary: end to end with per-key order,
//! kill -9 with the dead consumer's entries claimed by another pod
//! (XAUTOCLAIM), poison messages in a dead-letter stream, and a server
//! restart mid-stream; and, in process, the source's replay of a read whose
//! reply was lost.
//!
//! Every wait polls the output stream with a deadline; assertions are about
//! which messages arrived (by id), never about how long it took.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use redis::Commands;
use serde_json::{Value, json};
use sluice_tests::brokers::{Redis, RedisConfig};

const KEYS: u64 = 64;
const STREAM_DEADLINE: Duration = Duration::from_secs(300);

mod common;
use common::process::WorkerProcess as Worker;

impl Worker {
    /// A worker whose `/readyz` is at `http`.
    fn start_on(spec: &Path, log: PathBuf, pod: &str, http: &str) -> Worker {
        Worker::start(spec, log, pod, &[("SLUICE_HTTP_ADDR", http)])
    }
}

fn write_spec(dir: &Path, spec: &Value) -> PathBuf {
    let path = dir.join("spec.json");
    std::fs::write(&path, serde_json::to_vec_pretty(spec).expect("spec json")).expect("write spec");
    path
}

fn spec(redis: &Redis, group: &str, claim_idle: Option<&str>) -> Value {
    let mut source = json!({"url": redis.url(), "stream": "in", "group": group, "startFrom": "earliest"});
    if let Some(idle) = claim_idle {
        source["claimIdle"] = json!(idle);
    }
    json!({
        "source": {"redis": source},
        "pipeline": [
            {"filter": "msg.type != 'ignore'"},
            {"map": {"set": {"double": "msg.amount * 2"}}}
        ],
        "sink": {"redis": {"url": redis.url(), "stream": "out"}},
        "deadLetter": {"redis": {"url": redis.url(), "stream": "dlq"}},
        "workers": 2,
        "batchSize": 500
    })
}

fn conn(redis: &Redis) -> redis::Connection {
    redis::Client::open(redis.url()).expect("client").get_connection().expect("connect to redis")
}

/// XREADGROUP of new entries as `consumer` (all of them without `count`),
/// outside any source: the server has them pending for that consumer, whose
/// source never saw the reply.
fn read_as(c: &mut redis::Connection, group: &str, consumer: &str, count: Option<usize>) {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP").arg(group).arg(consumer);
    if let Some(n) = count {
        cmd.arg("COUNT").arg(n);
    }
    let _: redis::Value = cmd.arg("STREAMS").arg("in").arg(">").query(c).expect("XREADGROUP");
}

fn payload(id: u64) -> Vec<u8> {
    let key = format!("k{}", id % KEYS);
    serde_json::to_vec(&json!({"id": id, "key": key, "seq": id / KEYS, "type": "order", "amount": id % 1000}))
        .expect("json")
}

/// XADDs ids `range` to `in`, pipelined.
fn produce(redis: &Redis, range: std::ops::Range<u64>) {
    let mut c = conn(redis);
    let ids: Vec<u64> = range.collect();
    for chunk in ids.chunks(1000) {
        let mut pipe = redis::pipe();
        for &id in chunk {
            pipe.cmd("XADD")
                .arg("in")
                .arg("*")
                .arg("payload")
                .arg(payload(id))
                .arg("key")
                .arg(format!("k{}", id % KEYS))
                .ignore();
        }
        pipe.query::<()>(&mut c).expect("XADD");
    }
}

/// One entry read back: id and fields.
type Entry = (String, HashMap<String, Vec<u8>>);

fn read_stream(redis: &Redis, stream: &str) -> Vec<Entry> {
    let mut c = conn(redis);
    let mut out = Vec::new();
    let mut from = "-".to_string();
    loop {
        let reply: redis::streams::StreamRangeReply = c.xrange_count(stream, &from, "+", 10_000).expect("XRANGE");
        let n = reply.ids.len();
        for e in reply.ids {
            let fields = e
                .map
                .iter()
                .filter_map(|(k, v)| redis::from_redis_value_ref::<Vec<u8>>(v).ok().map(|b| (k.clone(), b)))
                .collect();
            from = format!("({}", e.id);
            out.push((e.id, fields));
        }
        if n < 10_000 {
            return out;
        }
    }
}

fn ids(entries: &[Entry]) -> HashSet<u64> {
    entries
        .iter()
        .filter_map(|(_, f)| f.get("payload"))
        .filter_map(|p| serde_json::from_slice::<Value>(p).ok())
        .filter_map(|v| v["id"].as_u64())
        .collect()
}

/// Polls `stream` until it holds `want` distinct ids; the worker must keep running.
fn wait_for_ids(redis: &Redis, stream: &str, want: usize, worker: &mut Worker) -> Vec<Entry> {
    let deadline = Instant::now() + STREAM_DEADLINE;
    let mut poll = Duration::from_millis(50);
    loop {
        worker.assert_running();
        let entries = read_stream(redis, stream);
        let got = ids(&entries).len();
        if got >= want {
            return entries;
        }
        if Instant::now() > deadline {
            panic!(
                "{stream}: only {got} of {want} ids within {STREAM_DEADLINE:?}; the worker's log:\n{}",
                worker.log_tail()
            );
        }
        // Polling the output by events would need a reader group; a short,
        // growing pause between full reads keeps the load down.
        std::thread::sleep(poll);
        poll = (poll * 2).min(Duration::from_secs(1));
    }
}

/// Every id of `0..n` present; per key, first occurrences of `seq` in
/// increasing order. Returns the number of duplicates.
fn check_output(entries: &[Entry], n: u64) -> usize {
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    for (_, f) in entries {
        let v: Value = serde_json::from_slice(&f["payload"]).expect("output is JSON");
        let id = v["id"].as_u64().expect("id");
        let key = v["key"].as_str().expect("key").to_string();
        assert_eq!(f.get("key").map(Vec::as_slice), Some(key.as_bytes()), "the key travels");
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
    let missing: Vec<u64> = (0..n).filter(|id| !seen.contains(id)).take(20).collect();
    assert!(missing.is_empty(), "{} of {n} ids missing, e.g. {missing:?}", n as usize - seen.len());
    duplicates
}

fn pending(redis: &Redis, group: &str) -> u64 {
    let reply: redis::streams::StreamPendingReply = conn(redis).xpending("in", group).expect("XPENDING");
    reply.count() as u64
}

/// Polls until the group has nothing pending (everything XACKed).
fn wait_until_acked(redis: &Redis, group: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = pending(redis, group);
        if p == 0 || Instant::now() > deadline {
            return p;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn hundred_thousand_messages_end_to_end_in_key_order() {
    let redis = Redis::start();
    const N: u64 = 100_000;
    produce(&redis, 0..N);
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(dir.path(), &spec(&redis, "e2e", None));
    let mut worker = Worker::start(&spec, dir.path().join("worker.log"), "pod-a", &[]);
    let entries = wait_for_ids(&redis, "out", N as usize, &mut worker);
    let duplicates = check_output(&entries, N);
    assert_eq!(wait_until_acked(&redis, "e2e"), 0, "every entry XACKed after delivery");
    eprintln!("end to end: {N} in, {} out, {duplicates} duplicates", entries.len());
    assert_eq!(duplicates, 0, "a clean run delivers each message once");
}

#[test]
fn kill_9_then_another_pod_claims_the_dead_consumers_entries() {
    let redis = Redis::start();
    const N: u64 = 100_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(dir.path(), &spec(&redis, "crash", Some("2s")));
    std::thread::scope(|scope| {
        let producer = scope.spawn(|| {
            for start in (0..N).step_by(1_000) {
                produce(&redis, start..start + 1_000);
            }
        });
        let mut first = Worker::start(&spec, dir.path().join("worker-1.log"), "pod-a", &[]);
        // Kill while pod-a holds read but unacknowledged entries (cheap
        // XLEN/XPENDING polls, so the window is not missed).
        let mut c = conn(&redis);
        let deadline = Instant::now() + STREAM_DEADLINE;
        loop {
            first.assert_running();
            let out: u64 = c.xlen("out").expect("XLEN");
            if out >= 5_000 && pending(&redis, "crash") > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "pod-a never held pending entries:\n{}", first.log_tail());
            std::thread::sleep(Duration::from_millis(1));
        }
        first.kill9();
        let at_kill = ids(&read_stream(&redis, "out")).len();
        let stranded = pending(&redis, "crash");
        // A different pod: pod-a's pending entries come back only by XAUTOCLAIM.
        let mut second = Worker::start(&spec, dir.path().join("worker-2.log"), "pod-b", &[]);
        let entries = wait_for_ids(&redis, "out", N as usize, &mut second);
        producer.join().expect("producer thread");
        let duplicates = check_output_unordered(&entries, N);
        assert_eq!(wait_until_acked(&redis, "crash"), 0, "nothing stays pending");
        eprintln!(
            "kill -9: {at_kill} ids out at the kill, {stranded} entries pending on the dead consumer; {} out in all, {duplicates} duplicates",
            entries.len()
        );
        assert!(stranded > 0, "the kill left entries pending on pod-a, which pod-b claimed");
    });
}

/// Claimed entries come back after newer ones: order is not kept across a
/// crash, only completeness.
fn check_output_unordered(entries: &[Entry], n: u64) -> usize {
    let all = ids(entries);
    let missing: Vec<u64> = (0..n).filter(|id| !all.contains(id)).take(20).collect();
    assert!(missing.is_empty(), "{} of {n} ids missing, e.g. {missing:?}", n as usize - all.len());
    entries.len() - all.len()
}

/// A second pod joins the group mid-stream: both read their share (the
/// group hands each entry to one consumer), nothing is lost and, with no
/// pod failing, nothing is delivered twice.
#[test]
fn a_second_pod_joins_mid_stream_takes_a_share_and_nothing_is_lost() {
    let redis = Redis::start();
    const N: u64 = 100_000;
    produce(&redis, 0..N / 2);
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(dir.path(), &spec(&redis, "join", None));
    let mut a = Worker::start(&spec, dir.path().join("worker-a.log"), "pod-a", &[]);
    let before = wait_for_len(&redis, "out", 10_000, &mut a);
    let http = format!("127.0.0.1:{}", sluice_tests::brokers::free_port());
    let mut b = Worker::start_on(&spec, dir.path().join("worker-b.log"), "pod-b", &http);
    common::wait_for_readyz(&http, 200, &mut b);
    // The second half arrives while both read.
    produce(&redis, N / 2..N);
    let entries = wait_for_ids(&redis, "out", N as usize, &mut a);
    b.assert_running();
    let duplicates = check_output_unordered(&entries, N);
    assert_eq!(wait_until_acked(&redis, "join"), 0, "nothing stays pending");
    let by_b = common::metric(&http, "sluice_messages_consumed_total");
    eprintln!("join: pod-b joined after {before} outputs and read {by_b} of {N}; {duplicates} duplicates");
    assert!(before < N as usize, "pod-b joined after the last output: it tested nothing");
    assert!(by_b > 0, "pod-b read a share");
    assert_eq!(duplicates, 0, "a pod joining redelivers nothing");
}

#[test]
fn poison_messages_go_to_the_dead_letter_stream_with_fields() {
    let redis = Redis::start();
    produce(&redis, 0..1000);
    let mut c = conn(&redis);
    let mut bad_ids = BTreeMap::new();
    for i in 0..10 {
        let id: String = c.xadd("in", "*", &[("payload", format!("{{not json {i}"))]).expect("XADD");
        bad_ids.insert(id, "bad_payload");
        let expr = json!({"id": 1_000_000 + i, "key": "k0", "type": "order", "amount": "not a number"}).to_string();
        let id: String = c.xadd("in", "*", &[("payload", expr)]).expect("XADD");
        bad_ids.insert(id, "expression");
        let ignored = json!({"id": 2_000_000 + i, "key": "k1", "type": "ignore", "amount": 1}).to_string();
        let _: String = c.xadd("in", "*", &[("payload", ignored)]).expect("XADD");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(dir.path(), &spec(&redis, "poison", None));
    let mut worker = Worker::start(&spec, dir.path().join("worker.log"), "pod-a", &[]);
    let out = wait_for_ids(&redis, "out", 1000, &mut worker);
    check_output(&out, 1000);
    assert!(ids(&out).iter().all(|id| *id < 1000), "no poison or ignored message in the output");
    let deadline = Instant::now() + STREAM_DEADLINE;
    let dead = loop {
        let dead = read_stream(&redis, "dlq");
        if dead.len() >= 20 || Instant::now() > deadline {
            break dead;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(dead.len(), 20, "10 bad payloads and 10 expression errors");
    let text =
        |f: &HashMap<String, Vec<u8>>, k: &str| String::from_utf8_lossy(f.get(k).map_or(&[][..], |v| v)).into_owned();
    for (_, f) in &dead {
        for h in [
            "sluice-error",
            "sluice-step",
            "sluice-partition",
            "sluice-offset",
            "sluice-attempt",
            "sluice-source",
            "redis-id",
        ] {
            assert!(!text(f, h).is_empty(), "dead letter without {h}: {f:?}");
        }
        assert_eq!(text(f, "sluice-source"), "redis/in");
        let source_id = text(f, "redis-id");
        assert_eq!(bad_ids.get(&source_id).copied(), Some(text(f, "sluice-reason").as_str()), "{f:?}");
    }
    assert_eq!(wait_until_acked(&redis, "poison"), 0, "dead-lettered and filtered entries are XACKed too");
}

#[test]
fn server_restart_mid_stream_recovers_by_itself() {
    let mut config = RedisConfig::default();
    config.directives.insert("appendonly".into(), "yes".into());
    config.directives.insert("appendfsync".into(), "always".into());
    let mut redis = Redis::start_with(config).expect("redis with AOF");
    // Enough that the worker is still busy when the restart comes (it
    // outputs tens of thousands a second; a restart after the last output
    // would test nothing), and the restart comes at the 10,000th output.
    const N: u64 = 100_000;
    produce(&redis, 0..N);
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(dir.path(), &spec(&redis, "restart", None));
    let mut worker = Worker::start(&spec, dir.path().join("worker.log"), "pod-a", &[]);
    let before = wait_for_len(&redis, "out", 10_000, &mut worker);
    redis.restart().expect("redis restart");
    let entries = wait_for_ids(&redis, "out", N as usize, &mut worker);
    let duplicates = check_output(&entries, N);
    assert_eq!(wait_until_acked(&redis, "restart"), 0);
    assert!(before < N as usize, "the restart came after the last output ({before} of {N}): it tested nothing");
    eprintln!("server restart after {before} outputs: {} out, {duplicates} duplicates", entries.len());
}

/// Polls XLEN of `stream` closely until it reaches `want`; returns the length seen.
fn wait_for_len(redis: &Redis, stream: &str, want: usize, worker: &mut Worker) -> usize {
    let deadline = Instant::now() + STREAM_DEADLINE;
    let mut c = conn(redis);
    loop {
        worker.assert_running();
        let len: usize = redis::cmd("XLEN").arg(stream).query(&mut c).expect("XLEN");
        if len >= want {
            return len;
        }
        assert!(
            Instant::now() < deadline,
            "{stream}: only {len} of {want} within {STREAM_DEADLINE:?}; the worker's log:\n{}",
            worker.log_tail()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn sink_outage_retries_behind_the_breaker_and_readiness_follows() {
    let source = Redis::start();
    let mut sink = Redis::start_with(RedisConfig {
        directives: [("appendonly", "yes"), ("appendfsync", "always"), ("protected-mode", "no"), ("daemonize", "no")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    })
    .expect("sink redis");
    const N: u64 = 20_000;
    produce(&source, 0..N / 2);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = spec(&source, "outage", None);
    s["sink"]["redis"]["url"] = json!(sink.url());
    s["deadLetter"] =
        json!({"redis": {"url": source.url(), "stream": "dlq"}, "backoff": {"initial": "50ms", "max": "500ms"}});
    let spec = write_spec(dir.path(), &s);
    let http = format!("127.0.0.1:{}", sluice_tests::brokers::free_port());
    let mut worker = Worker::start_on(&spec, dir.path().join("worker.log"), "pod-a", &http);
    wait_for_ids(&sink, "out", (N / 2) as usize, &mut worker);
    common::wait_for_readyz(&http, 200, &mut worker);
    sink.stop();
    produce(&source, N / 2..N);
    common::wait_for_readyz(&http, 503, &mut worker);
    sink.restart().expect("sink redis restart");
    common::wait_for_readyz(&http, 200, &mut worker);
    let entries = wait_for_ids(&sink, "out", N as usize, &mut worker);
    let duplicates = check_output_unordered(&entries, N);
    assert_eq!(wait_until_acked(&source, "outage"), 0);
    eprintln!("sink outage: not ready while down, ready after; {} out, {duplicates} duplicates", entries.len());
}

#[test]
fn source_outage_turns_readiness_false_until_the_server_answers_again() {
    let mut source = Redis::start_with(RedisConfig {
        directives: [("appendonly", "yes"), ("appendfsync", "always"), ("protected-mode", "no"), ("daemonize", "no")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    })
    .expect("source redis");
    let sink = Redis::start();
    const N: u64 = 20_000;
    produce(&source, 0..N / 2);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = spec(&source, "source-outage", None);
    s["sink"]["redis"]["url"] = json!(sink.url());
    s["deadLetter"] = json!({"redis": {"url": sink.url(), "stream": "dlq"}});
    let spec = write_spec(dir.path(), &s);
    let http = format!("127.0.0.1:{}", sluice_tests::brokers::free_port());
    let mut worker = Worker::start_on(&spec, dir.path().join("worker.log"), "pod-a", &http);
    wait_for_ids(&sink, "out", (N / 2) as usize, &mut worker);
    common::wait_for_readyz(&http, 200, &mut worker);
    source.stop();
    common::wait_for_readyz(&http, 503, &mut worker);
    source.restart().expect("source redis restart");
    common::wait_for_readyz(&http, 200, &mut worker);
    produce(&source, N / 2..N);
    let entries = wait_for_ids(&sink, "out", N as usize, &mut worker);
    let duplicates = check_output_unordered(&entries, N);
    assert_eq!(wait_until_acked(&source, "source-outage"), 0);
    eprintln!("source outage: not ready while down, ready after; {} out, {duplicates} duplicates", entries.len());
}

/// A read the server ran but whose reply the source never got (the
/// connection dropped in between, as in a server restart) leaves its entries
/// in this consumer's pending list, where `XREADGROUP >` never returns them:
/// after a failed read the source replays that list, minus what it has in flight.
#[test]
fn entries_of_a_read_whose_reply_was_lost_are_replayed_after_the_reconnect() {
    use sluice_worker::source::{Source, SourceEvent, redis::RedisSource};
    let redis = Redis::start();
    produce(&redis, 0..10);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let spec: sluice_crds::RedisSource =
            serde_json::from_value(json!({"url": redis.url(), "stream": "in", "startFrom": "earliest"})).expect("spec");
        let mut source = RedisSource::new(&spec, "lost", "pod-a", &|_| None).expect("source");
        let ids_of = |e: SourceEvent| match e {
            SourceEvent::Batch(b) => {
                b.iter().filter_map(|m| m.payload.json().ok().and_then(|v| v["id"].as_u64())).collect::<Vec<_>>()
            }
            _ => Vec::new(),
        };
        let mut got = ids_of(source.next(3).await.expect("first read"));
        assert_eq!(got, vec![0, 1, 2]);
        // The read whose reply is lost: the server hands ids 3..6 to pod-a...
        let mut c = conn(&redis);
        read_as(&mut c, "lost", "pod-a", Some(3));
        // ...and the source's connection drops before it sees them.
        let _: redis::Value = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .arg("SKIPME")
            .arg("yes")
            .query(&mut c)
            .expect("CLIENT KILL");
        let deadline = Instant::now() + Duration::from_secs(30);
        while got.len() < 10 && Instant::now() < deadline {
            let next = tokio::time::timeout(Duration::from_secs(5), source.next(100)).await;
            if let Ok(event) = next {
                got.extend(ids_of(event.expect("the source retries by itself")));
            }
        }
        got.sort_unstable();
        assert_eq!(
            got,
            (0..10).collect::<Vec<_>>(),
            "ids 3..6 replayed from pod-a's pending list, 0..3 (in flight) not again"
        );
    });
}

/// An entry deleted from the stream (XDEL, or a producer's MAXLEN trim)
/// while pending for a consumer comes back from the replay of its pending
/// list as an id without fields. The source acknowledges it and goes on:
/// before, it was skipped and stayed pending for good (lag the operator
/// counted), and a page holding only deleted entries ended the replay, so
/// the live entries pending behind it were never delivered.
#[test]
fn pending_entries_deleted_from_the_stream_are_acknowledged_and_do_not_end_the_replay() {
    use sluice_worker::source::{Source, SourceEvent, redis::RedisSource};
    let redis = Redis::start();
    produce(&redis, 0..20);
    let mut c = conn(&redis);
    let _: () = redis::cmd("XGROUP").arg("CREATE").arg("in").arg("deleted").arg("0").query(&mut c).expect("XGROUP");
    // A pod-a before a restart read ids 0..10 and finished none of them...
    read_as(&mut c, "deleted", "pod-a", Some(10));
    // ...and ids 0, 1 (a whole first page of the replay below) and 5 are
    // deleted from the stream meanwhile.
    let stream_ids: HashMap<u64, String> = read_stream(&redis, "in")
        .into_iter()
        .map(|(sid, f)| {
            let v: Value = serde_json::from_slice(&f["payload"]).expect("json");
            (v["id"].as_u64().expect("id"), sid)
        })
        .collect();
    let deleted = [0u64, 1, 5];
    let gone: Vec<&String> = deleted.iter().map(|id| &stream_ids[id]).collect();
    let n: i64 = c.xdel("in", &gone).expect("XDEL");
    assert_eq!(n, 3);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let got = rt.block_on(async {
        let spec: sluice_crds::RedisSource =
            serde_json::from_value(json!({"url": redis.url(), "stream": "in", "startFrom": "earliest"})).expect("spec");
        let mut source = RedisSource::new(&spec, "deleted", "pod-a", &|_| None).expect("source");
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while got.len() < 17 && Instant::now() < deadline {
            if let Ok(event) = tokio::time::timeout(Duration::from_secs(5), source.next(2)).await
                && let SourceEvent::Batch(b) = event.expect("read")
            {
                got.extend(b.iter().filter_map(|m| m.payload.json().ok().and_then(|v| v["id"].as_u64())));
            }
        }
        got
    });
    let want: Vec<u64> = (0..20).filter(|id| !deleted.contains(id)).collect();
    assert_eq!(got, want, "the replay went past the deleted entries, in order, then on to new ones");
    // Everything handed out is pending until the pipeline acknowledges it;
    // the deleted ones are not pending any more.
    assert_eq!(pending(&redis, "deleted"), 17, "the 3 deleted entries were acknowledged by the replay");
}

/// What a stopping source hands back is what the server has pending for
/// it, not only what it handed out: a read that shutdown cancelled after
/// the server ran it leaves entries pending for this consumer that the
/// pipeline never saw, and those must not wait out claimIdle either.
#[test]
fn release_hands_back_pending_entries_the_source_never_handed_out() {
    use sluice_worker::source::{Source, SourceEvent, redis::RedisSource};
    let redis = Redis::start();
    produce(&redis, 0..10);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let spec: sluice_crds::RedisSource = serde_json::from_value(
            json!({"url": redis.url(), "stream": "in", "startFrom": "earliest", "claimIdle": "10m"}),
        )
        .expect("spec");
        let mut source = RedisSource::new(&spec, "release", "pod-a", &|_| None).expect("source");
        match source.next(4).await.expect("first read") {
            SourceEvent::Batch(b) => assert_eq!(b.len(), 4, "ids 0..4 handed out"),
            other => panic!("expected a batch, got {other:?}"),
        }
        // The cancelled read: the server hands ids 4..10 to pod-a, whose
        // source never sees the reply.
        read_as(&mut conn(&redis), "release", "pod-a", None);
        source.release().await;
    });
    // Every one of the ten, not only the four handed out, is now idle for
    // longer than any claimIdle: another pod's next XAUTOCLAIM takes them.
    let day_ms = 86_400_000u64;
    let reply: redis::Value = redis::cmd("XPENDING")
        .arg("in")
        .arg("release")
        .arg("IDLE")
        .arg(day_ms - 60_000)
        .arg("-")
        .arg("+")
        .arg(100)
        .query(&mut conn(&redis))
        .expect("XPENDING IDLE");
    let handed_back = match reply {
        redis::Value::Array(rows) => rows.len(),
        other => panic!("XPENDING replied {other:?}"),
    };
    assert_eq!(handed_back, 10, "all ten pending entries of pod-a handed back");
}

#[test]
fn sink_dedupe_writes_each_output_once_across_redeliveries_and_a_server_restart() {
    use sluice_worker::{message::Message, sink::Sink};
    let mut config = RedisConfig::default();
    config.directives.insert("appendonly".into(), "yes".into());
    config.directives.insert("appendfsync".into(), "always".into());
    let mut redis = Redis::start_with(config).unwrap_or_else(|e| panic!("{e}"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let spec: sluice_crds::RedisSink = serde_json::from_value(
        json!({"url": redis.url(), "stream": "out", "maxLen": 100_000, "dedupe": {"window": "10m"}}),
    )
    .expect("sink spec");
    let _guard = rt.enter();
    let mut sink =
        sluice_worker::sink::redis::RedisSink::new(&spec, "SINK", "spec.sink.redis", &|_| None).expect("sink");
    let batch: Vec<Message> = (0..2_000i64).map(|o| Message::new((o % 4) as i32, o, payload(o as u64))).collect();
    rt.block_on(sink.write(&batch)).expect("first write");
    // The same inputs delivered again (a crash before the ack, a rebalance):
    // nothing new, also after a server restart (the script is loaded again).
    rt.block_on(sink.write(&batch[500..1500])).expect("redelivery");
    redis.restart().expect("restart redis");
    let again = loop {
        match rt.block_on(sink.write(&batch)) {
            Ok(()) => break true,
            Err(e) => {
                eprintln!("write while the server comes back: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    assert!(again);
    let entries = read_stream(&redis, "out");
    assert_eq!(entries.len(), 2_000, "each output once");
    assert_eq!(ids(&entries).len(), 2_000);
    // Two different outputs of one input (a window's results) are both kept.
    let mut other = batch[7].clone();
    other.payload = sluice_worker::message::Payload::from_bytes(payload(1_000_007));
    rt.block_on(sink.write(std::slice::from_ref(&other))).expect("a second output of input 7");
    assert_eq!(read_stream(&redis, "out").len(), 2_001);
    // Without dedupe the same redelivery is written twice: the test above can fail.
    let plain: sluice_crds::RedisSink =
        serde_json::from_value(json!({"url": redis.url(), "stream": "plain"})).expect("sink spec");
    let mut plain =
        sluice_worker::sink::redis::RedisSink::new(&plain, "SINK", "spec.sink.redis", &|_| None).expect("sink");
    rt.block_on(plain.write(&batch[..100])).expect("write");
    rt.block_on(plain.write(&batch[..100])).expect("write again");
    assert_eq!(read_stream(&redis, "plain").len(), 200);
}

/// Sum of the `count` of every window result in stream `name`.
fn window_count_sum(redis: &Redis, name: &str) -> u64 {
    read_stream(redis, name)
        .iter()
        .filter_map(|(_, f)| f.get("payload"))
        .filter_map(|p| serde_json::from_slice::<Value>(p).ok())
        .filter_map(|v| v["count"].as_u64())
        .sum()
}

/// Two pods in one group, windows that hold entries (pending, unacked) for
/// longer than claimIdle: each pod keeps its held entries' idle time low,
/// so the other pod's XAUTOCLAIM does not take them and count them twice.
#[test]
fn entries_held_by_a_window_longer_than_claim_idle_are_not_claimed_by_another_pod() {
    let redis = Redis::start();
    const N: u64 = 4_000;
    produce(&redis, 0..N);
    let dir = tempfile::tempdir().expect("tempdir");
    // claimIdle 4s: the keeper re-claims every second, so a pod stalled
    // for 3 s on a loaded machine still keeps its entries; the windows hold
    // them twice as long as claimIdle.
    let mut s = spec(&redis, "windows", Some("4s"));
    s["pipeline"] =
        json!([{"window": {"type": "session", "gap": "8s", "keyBy": "msg.key", "aggregate": {"count": {}}}}]);
    s["batchSize"] = json!(100);
    let spec = write_spec(dir.path(), &s);
    let mut a = Worker::start(&spec, dir.path().join("worker-a.log"), "pod-a", &[]);
    let mut b = Worker::start(&spec, dir.path().join("worker-b.log"), "pod-b", &[]);
    let deadline = Instant::now() + STREAM_DEADLINE;
    let counted = loop {
        a.assert_running();
        b.assert_running();
        let counted = window_count_sum(&redis, "out");
        if counted >= N && pending(&redis, "windows") == 0 {
            break counted;
        }
        assert!(
            Instant::now() < deadline,
            "{counted} of {N} counted; pod-a's log:\n{}\npod-b's log:\n{}",
            a.log_tail(),
            b.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_secs(5));
    let again = window_count_sum(&redis, "out");
    let claimed =
        [&a, &b].iter().map(|w| w.log_text().matches("claimed entries idle past claimIdle").count()).sum::<usize>();
    eprintln!(
        "windows over Redis with claimIdle 4s, two pods: {counted} then {again} counted for {N} inputs; {claimed} claims"
    );
    assert_eq!((counted, again), (N, N), "every entry counted once: none claimed by the other pod while held");
}

/// A pod stopped while an open window holds its entries (SIGTERM, as a
/// rollout or a scale-down does) hands them back: claimed to itself as long
/// idle, so the next pod's first XAUTOCLAIM takes them at once instead of
/// after claimIdle (10 minutes here, far past the test's deadline).
#[test]
fn entries_a_stopping_pod_holds_are_handed_back_at_once() {
    let redis = Redis::start();
    const N: u64 = 2_000;
    produce(&redis, 0..N);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut held = spec(&redis, "handback", Some("10m"));
    held["pipeline"] =
        json!([{"window": {"type": "session", "gap": "1h", "keyBy": "msg.key", "aggregate": {"count": {}}}}]);
    let held_spec = write_spec(dir.path(), &held);
    let mut a = Worker::start(&held_spec, dir.path().join("worker-a.log"), "pod-a", &[]);
    let deadline = Instant::now() + STREAM_DEADLINE;
    // XPENDING before pod A made the group is an error: nothing held yet.
    let held_by_a = || -> u64 {
        let reply: redis::RedisResult<redis::streams::StreamPendingReply> = conn(&redis).xpending("in", "handback");
        reply.map_or(0, |r| r.count() as u64)
    };
    while held_by_a() < N {
        a.assert_running();
        assert!(Instant::now() < deadline, "pod A never held all {N}:\n{}", a.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = a.terminate();
    assert!(status.success(), "pod A exited with {status} after SIGTERM:\n{}", a.log_tail());
    assert!(a.log_text().contains("handed back the entries this worker took"), "no hand-back:\n{}", a.log_tail());

    // Another pod of the group, without the window: it claims them all.
    let mut plain = held.clone();
    plain["pipeline"] = json!([]);
    let plain_dir = dir.path().join("b");
    std::fs::create_dir_all(&plain_dir).expect("dir");
    let plain_spec = write_spec(&plain_dir, &plain);
    let mut b = Worker::start(&plain_spec, dir.path().join("worker-b.log"), "pod-b", &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        b.assert_running();
        let got = ids(&read_stream(&redis, "out")).len() as u64;
        if got >= N {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pod B has {got} of {N} after 60 s: the held entries were not handed back (claimIdle is 10 min)\n{}",
            b.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(wait_until_acked(&redis, "handback"), 0, "pod B acknowledged every entry");
    eprintln!("hand-back: pod A held {N} in an open window; pod B claimed and delivered all of them");
}

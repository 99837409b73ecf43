//! Connector benchmark (figures, not assertions): per broker, the same
//! backlog drained twice from the same input by two consumer groups, side by
//! side in one process run:
//!
//! - **worker**: the full runtime (source -> pool -> pipeline -> sink -> acker)
//!   with the seeds' workload: parse JSON, drop `type == "ignore"`, add a
//!   field, keep state per message id (`dedupe`), produce, ack;
//! - **bare**: a read-write-ack loop with the same source, sink and batch
//!   size and nothing in between (the broker-bound ceiling).
//!
//! Run it in release mode and read the printed table:
//! `cargo test --release -p sluice-worker --test connectors_bench -- --nocapture --test-threads=1`
//! (`SLUICE_BENCH_N` sets the backlog, default 200000).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use serde_json::json;
use sluice_crds::{KafkaSink as KafkaSinkSpec, KafkaSource as KafkaSourceSpec, StreamProcessorSpec};
use sluice_tests::brokers::{Kafka, Nats, Redis};
use sluice_worker::{
    message::Message,
    metrics::Metrics,
    pipeline::Pipeline,
    pool::PoolConfig,
    runtime::Runtime,
    sink::{
        Sink, SinkError,
        kafka::{KafkaSink, Transaction},
        nats::NatsSink,
        redis::RedisSink,
    },
    source::{
        Acker, RevokeHook, Source, SourceError, SourceEvent, kafka::KafkaSource, nats::NatsSource, redis::RedisSource,
    },
};
use tokio_util::sync::CancellationToken;

const BATCH: usize = 500;
const WORKERS: usize = 2;
/// How long a drained worker may take to return once cancelled.
const SHUTDOWN: Duration = Duration::from_secs(30);

/// Logs with `RUST_LOG` (e.g. `RUST_LOG=info,sluice_worker=debug`); silent without it.
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn n() -> u64 {
    std::env::var("SLUICE_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000)
}

/// How long one drain may take before the bench stops it and says how far
/// it got (a drain that never reaches its target would otherwise wait forever).
fn deadline(n: u64) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(2 * n)
}

fn payload(id: u64) -> Vec<u8> {
    let t = ["a", "b", "c", "ignore"][(id % 4) as usize];
    serde_json::to_vec(&json!({"id": id, "type": t, "amount": id % 100, "note": "a typical small order event"}))
        .expect("json")
}

/// Outputs the workload produces for `n` inputs: ids 0..n, every one with
/// `id % 4 == 3` is ignored, none is a duplicate and none fails a step (the
/// dead-letter sink stops the drain if one does).
fn expected(n: u64) -> u64 {
    n - n / 4
}

/// CPU seconds (user + system) of this process so far: the worker or loop
/// and its broker client's threads, not the broker.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat (utime, stime), counted from after the comm field.
    (ticks(11) + ticks(12)) / 100.0
}

/// Wall and CPU time from the first message read to the last output
/// written: group joins, connection set-up and shutdown are not throughput.
#[derive(Default)]
struct Clock {
    start: OnceLock<(Instant, f64)>,
    end: OnceLock<(Instant, f64)>,
}

impl Clock {
    fn start(&self) {
        self.start.get_or_init(|| (Instant::now(), cpu_seconds()));
    }

    fn stop(&self) {
        self.end.get_or_init(|| (Instant::now(), cpu_seconds()));
    }

    fn figures(&self, inputs: u64) -> Figures {
        let (t0, c0) = *self.start.get().expect("no message was read");
        let (t1, c1) = *self.end.get().expect("the drain never reached its target");
        Figures { inputs, seconds: (t1 - t0).as_secs_f64(), cpu: c1 - c0 }
    }
}

#[derive(Debug)]
struct Figures {
    /// Input messages drained (the worker writes 3/4 of them, the bare loop all).
    inputs: u64,
    seconds: f64,
    cpu: f64,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.inputs as f64 / self.seconds
    }

    fn cpu_us(&self) -> f64 {
        self.cpu * 1e6 / self.inputs as f64
    }
}

fn header() {
    println!("| broker | variant | inputs | s | msg/s | CPU µs/msg | ratio |\n|---|---|---:|---:|---:|---:|---|");
}

/// One table row; `vs` names the reference the ratio is taken against.
fn row(broker: &str, variant: &str, f: &Figures, vs: Option<(&str, &Figures)>) {
    let ratio = vs.map_or(String::new(), |(name, r)| format!("{:.0}% of {name}", 100.0 * f.rate() / r.rate()));
    println!(
        "| {broker} | {variant} | {} | {:.2} | {:.0} | {:.1} | {ratio} |",
        f.inputs,
        f.seconds,
        f.rate(),
        f.cpu_us()
    );
}

/// Starts the clock at the first batch read.
struct Timed {
    inner: Box<dyn Source>,
    clock: Arc<Clock>,
}

impl Source for Timed {
    fn next(&mut self, max: usize) -> BoxFuture<'_, Result<SourceEvent, SourceError>> {
        Box::pin(async move {
            let event = self.inner.next(max).await?;
            if matches!(event, SourceEvent::Batch(_)) {
                self.clock.start();
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

    fn reachability(&self) -> Option<Arc<AtomicBool>> {
        self.inner.reachability()
    }

    fn on_revoke(&mut self, hook: RevokeHook) {
        self.inner.on_revoke(hook);
    }
}

/// Counts delivered messages; at the target, stops the clock and cancels `done`.
struct Counting {
    inner: Box<dyn Sink>,
    count: Arc<AtomicU64>,
    target: u64,
    clock: Arc<Clock>,
    done: CancellationToken,
}

impl Sink for Counting {
    fn write<'a>(&'a mut self, batch: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            self.inner.write(batch).await?;
            let n = self.count.fetch_add(batch.len() as u64, Ordering::Relaxed) + batch.len() as u64;
            if n >= self.target && !self.done.is_cancelled() {
                self.clock.stop();
                self.done.cancel();
            }
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

/// The workload dead-letters nothing: a dead letter means the bench is
/// broken (its outputs would never reach the target), so the first one
/// stops the drain and is reported.
struct DeadLetters {
    first: Arc<Mutex<Option<String>>>,
    done: CancellationToken,
}

impl Sink for DeadLetters {
    fn write<'a>(&'a mut self, batch: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>> {
        if let Some(m) = batch.first() {
            let h = |name| m.header(name).map(String::from_utf8_lossy).unwrap_or_default().into_owned();
            let what = format!(
                "{} dead letters, first at partition {} offset {}: step {}: {}",
                batch.len(),
                m.partition,
                h(sluice_worker::deadletter::HEADER_OFFSET),
                h(sluice_worker::deadletter::HEADER_STEP),
                h(sluice_worker::deadletter::HEADER_ERROR),
            );
            self.first.lock().expect("lock").get_or_insert(what);
            self.done.cancel();
        }
        Box::pin(async { Ok(()) })
    }

    fn kind(&self) -> &'static str {
        "bench-dead-letters"
    }
}

fn workload() -> Pipeline {
    // CEL has no implicit int -> double conversion: `msg.amount * 0.92` with
    // an integer amount fails every message (no_such_overload), so the
    // conversion is explicit, as in the engine bench.
    let spec: StreamProcessorSpec = serde_json::from_value(json!({
        "source": {"generator": {"template": {"a": "seq"}}},
        "pipeline": [
            {"filter": "msg.type != 'ignore'"},
            {"map": {"set": {"amount_eur": "double(msg.amount) * 0.92"}}},
            {"dedupe": {"key": "msg.id", "ttl": "10m"}}
        ],
        "sink": {"stdout": {}}
    }))
    .expect("spec");
    Pipeline::compile(&spec).expect("pipeline")
}

/// Drains `n` inputs through the full runtime; panics with how far it got
/// if it does not finish within `deadline(n)` or does not shut down after.
async fn run_worker(source: Box<dyn Source>, sink: Box<dyn Sink>, n: u64) -> Figures {
    let target = expected(n);
    let done = CancellationToken::new();
    let clock = Arc::new(Clock::default());
    let count = Arc::new(AtomicU64::new(0));
    let dead = Arc::new(Mutex::new(None));
    let counting = Counting { inner: sink, count: count.clone(), target, clock: clock.clone(), done: done.clone() };
    let dead_letters = DeadLetters { first: dead.clone(), done: done.clone() };
    let runtime = Runtime {
        pool: PoolConfig { workers: WORKERS, queue_batches: 4, tick: Duration::from_millis(100), snapshots: None },
        batch_size: BATCH,
        sink_attempts: 5,
        metrics: Metrics::new(prometheus::Registry::new()).expect("metrics"),
        ready: Arc::new(AtomicBool::new(false)),
    };
    let source = Box::new(Timed { inner: source, clock: clock.clone() });
    let run = runtime.run(source, workload(), Box::new(counting), Box::new(dead_letters), done.clone());
    tokio::pin!(run);
    let limit = deadline(n);
    let summary = tokio::select! {
        r = &mut run => r.expect("worker run"),
        _ = tokio::time::sleep(limit) => {
            let reached = done.is_cancelled();
            done.cancel();
            let returned = tokio::time::timeout(SHUTDOWN, &mut run).await.is_ok();
            panic!(
                "worker drain: {} of {target} outputs after {limit:?} (target {}); after cancel the runtime {}",
                count.load(Ordering::Relaxed),
                if reached { "reached, but run did not return" } else { "not reached" },
                if returned { "returned" } else { "did not return within 30 s" },
            );
        }
    };
    if let Some(first) = dead.lock().expect("lock").take() {
        panic!("the workload dead-lettered messages, so its outputs cannot reach the target: {first}");
    }
    let (end, _) = *clock.end.get().expect("target reached");
    eprintln!(
        "worker: {} consumed, {} delivered, run returned {:.2} s after the last output (drain, commit, consumer close)",
        summary.consumed,
        summary.delivered,
        end.elapsed().as_secs_f64()
    );
    clock.figures(n)
}

/// Read a batch, write it, ack it: nothing in between.
async fn run_bare(mut source: Box<dyn Source>, mut sink: Box<dyn Sink>, n: u64) -> Figures {
    let acker = source.acker();
    let clock = Clock::default();
    let mut moved = 0;
    let work = async {
        while moved < n {
            let SourceEvent::Batch(batch) = source.next(BATCH).await.expect("read") else { continue };
            clock.start();
            sink.write(&batch).await.expect("write");
            let mut next: BTreeMap<i32, i64> = BTreeMap::new();
            for m in &batch {
                next.insert(m.partition, m.offset + 1);
            }
            acker.commit(&next.into_iter().collect::<Vec<_>>()).await.expect("ack");
            moved += batch.len() as u64;
        }
        clock.stop();
    };
    let limit = deadline(n);
    if tokio::time::timeout(limit, work).await.is_err() {
        panic!("bare loop: {moved} of {n} inputs after {limit:?}");
    }
    clock.figures(moved)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_worker_against_a_bare_loop() {
    init_tracing();
    let kafka = Kafka::start();
    let n = n();
    for t in ["in", "out-worker", "out-eos", "out-bare"] {
        kafka.create_topic(t, 4).expect("topic");
    }
    kafka.produce("in", (0..n).map(|i| (Some(format!("k{}", i % 64)), payload(i)))).expect("seed");
    let source = |group: &str| {
        let spec = KafkaSourceSpec {
            brokers: vec![kafka.bootstrap()],
            topic: "in".into(),
            group: Some(group.into()),
            start_from: sluice_crds::StartFrom::Earliest,
            auth: None,
            properties: BTreeMap::new(),
        };
        KafkaSource::new(&spec, group, &|_| None).expect("source")
    };
    let sink_spec = |topic: &str| KafkaSinkSpec {
        brokers: Some(vec![kafka.bootstrap()]),
        topic: topic.into(),
        key: None,
        compression: sluice_crds::Compression::Lz4,
        auth: None,
        properties: BTreeMap::new(),
    };
    let sink = |topic: &str| {
        Box::new(KafkaSink::new(&sink_spec(topic), None, "SINK", "spec.sink.kafka", &|_| None).expect("sink"))
            as Box<dyn Sink>
    };
    let worker = run_worker(Box::new(source("bench-worker")), sink("out-worker"), n).await;
    // Exactly-once as the worker binary wires it (worker/src/main.rs): one
    // transactional producer shared by the sink and the source's acker.
    let eos = {
        let txn = Transaction::new(&sink_spec("out-eos"), None, "sluice-bench-eos", &|_| None).expect("transaction");
        let mut source = source("bench-eos");
        source.set_transaction(txn.clone());
        let sink = KafkaSink::transactional(&sink_spec("out-eos"), txn).expect("transactional sink");
        run_worker(Box::new(source), Box::new(sink), n).await
    };
    let bare = run_bare(Box::new(source("bench-bare")), sink("out-bare"), n).await;
    header();
    row("Kafka", "worker, at-least-once", &worker, Some(("bare", &bare)));
    row("Kafka", "worker, exactly-once", &eos, Some(("at-least-once", &worker)));
    row("Kafka", "bare loop", &bare, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_worker_against_a_bare_loop() {
    init_tracing();
    let redis = Redis::start();
    let n = n();
    let mut c =
        redis::Client::open(redis.url()).expect("client").get_multiplexed_async_connection().await.expect("conn");
    for start in (0..n).step_by(5_000) {
        let mut pipe = redis::pipe();
        for i in start..(start + 5_000).min(n) {
            pipe.cmd("XADD").arg("in").arg("*").arg("payload").arg(payload(i)).ignore();
        }
        pipe.query_async::<()>(&mut c).await.expect("seed");
    }
    let source = |group: &str| {
        let spec: sluice_crds::RedisSource =
            serde_json::from_value(json!({"url": redis.url(), "stream": "in", "startFrom": "earliest"})).expect("spec");
        Box::new(RedisSource::new(&spec, group, "bench", &|_| None).expect("source")) as Box<dyn Source>
    };
    let sink = |stream: &str| {
        let spec: sluice_crds::RedisSink =
            serde_json::from_value(json!({"url": redis.url(), "stream": stream})).expect("spec");
        Box::new(RedisSink::new(&spec, "SINK", "spec.sink.redis", &|_| None).expect("sink")) as Box<dyn Sink>
    };
    let worker = run_worker(source("bench-worker"), sink("out-worker"), n).await;
    let bare = run_bare(source("bench-bare"), sink("out-bare"), n).await;
    header();
    row("Redis Streams", "worker, at-least-once", &worker, Some(("bare", &bare)));
    row("Redis Streams", "bare loop", &bare, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_worker_against_a_bare_loop() {
    init_tracing();
    use async_nats::jetstream;
    let nats = Nats::start();
    let n = n();
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    for (name, subject) in [("IN", "in"), ("OUTW", "out.worker"), ("OUTB", "out.bare")] {
        js.create_stream(jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            ..Default::default()
        })
        .await
        .expect("stream");
    }
    let mut acks = Vec::new();
    for i in 0..n {
        acks.push(js.publish("in", payload(i).into()).await.expect("publish"));
        if acks.len() >= 2000 {
            for a in acks.drain(..) {
                a.await.expect("ack");
            }
        }
    }
    for a in acks {
        a.await.expect("ack");
    }
    let source = |durable: String| {
        let url = nats.url();
        async move {
            let spec: sluice_crds::NatsSource =
                serde_json::from_value(json!({"servers": [url], "stream": "IN", "startFrom": "earliest"}))
                    .expect("spec");
            Box::new(NatsSource::new(&spec, &durable, &|_| None).await.expect("source")) as Box<dyn Source>
        }
    };
    let sink = |subject: &'static str| {
        let url = nats.url();
        async move {
            let spec: sluice_crds::NatsSink =
                serde_json::from_value(json!({"servers": [url], "subject": subject})).expect("spec");
            Box::new(NatsSink::new(&spec, "SINK", "spec.sink.nats", &|_| None).await.expect("sink")) as Box<dyn Sink>
        }
    };
    let worker = run_worker(source("bench-worker".into()).await, sink("out.worker").await, n).await;
    let bare = run_bare(source("bench-bare".into()).await, sink("out.bare").await, n).await;
    header();
    row("NATS JetStream", "worker, at-least-once", &worker, Some(("bare", &bare)));
    row("NATS JetStream", "bare loop", &bare, None);
}

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
        Arc,
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
    sink::{Sink, SinkError, kafka::KafkaSink, nats::NatsSink, null::LogSink, redis::RedisSink},
    source::{Source, SourceEvent, kafka::KafkaSource, nats::NatsSource, redis::RedisSource},
};
use tokio_util::sync::CancellationToken;

const BATCH: usize = 500;
const WORKERS: usize = 2;

fn n() -> u64 {
    std::env::var("SLUICE_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000)
}

fn payload(id: u64) -> Vec<u8> {
    let t = ["a", "b", "c", "ignore"][(id % 4) as usize];
    serde_json::to_vec(&json!({"id": id, "type": t, "amount": id % 100, "note": "a typical small order event"}))
        .expect("json")
}

/// Outputs the workload produces for `n` inputs (every fourth is ignored).
fn expected(n: u64) -> u64 {
    n - n / 4
}

/// CPU seconds (user + system) of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat (utime, stime), counted from after the comm field.
    (ticks(11) + ticks(12)) / 100.0
}

#[derive(Debug)]
struct Figures {
    messages: u64,
    seconds: f64,
    cpu: f64,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds
    }
}

fn report(broker: &str, worker: &Figures, bare: &Figures) {
    println!(
        "| {broker} | worker | {} | {:.0} | {:.2} |\n| {broker} | bare loop | {} | {:.0} | {:.2} |\n| {broker} | worker / bare | | {:.0}% | |",
        worker.messages,
        worker.rate(),
        worker.cpu * 1e6 / worker.messages as f64,
        bare.messages,
        bare.rate(),
        bare.cpu * 1e6 / bare.messages as f64,
        100.0 * worker.rate() / bare.rate(),
    );
}

/// Counts delivered messages; cancels `done` at the target.
struct Counting {
    inner: Box<dyn Sink>,
    count: Arc<AtomicU64>,
    target: u64,
    done: CancellationToken,
    finished_at: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Sink for Counting {
    fn write<'a>(&'a mut self, batch: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            self.inner.write(batch).await?;
            let n = self.count.fetch_add(batch.len() as u64, Ordering::Relaxed) + batch.len() as u64;
            if n >= self.target && !self.done.is_cancelled() {
                *self.finished_at.lock().expect("lock") = Some(Instant::now());
                self.done.cancel();
            }
            Ok(())
        })
    }
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

fn workload() -> Pipeline {
    let spec: StreamProcessorSpec = serde_json::from_value(json!({
        "source": {"generator": {"template": {"a": "seq"}}},
        "pipeline": [
            {"filter": "msg.type != 'ignore'"},
            {"map": {"set": {"amount_eur": "msg.amount * 0.92"}}},
            {"dedupe": {"key": "msg.id", "ttl": "10m"}}
        ],
        "sink": {"stdout": {}}
    }))
    .expect("spec");
    Pipeline::compile(&spec).expect("pipeline")
}

async fn run_worker(source: Box<dyn Source>, sink: Box<dyn Sink>, target: u64) -> Figures {
    let done = CancellationToken::new();
    let finished_at = Arc::new(std::sync::Mutex::new(None));
    let counting =
        Counting { inner: sink, count: Arc::default(), target, done: done.clone(), finished_at: finished_at.clone() };
    let runtime = Runtime {
        pool: PoolConfig { workers: WORKERS, queue_batches: 4, tick: Duration::from_millis(100), snapshots: None },
        batch_size: BATCH,
        sink_attempts: 5,
        metrics: Metrics::new(prometheus::Registry::new()).expect("metrics"),
        ready: Arc::new(AtomicBool::new(false)),
    };
    let (start, cpu) = (Instant::now(), cpu_seconds());
    runtime.run(source, workload(), Box::new(counting), Box::new(LogSink), done).await.expect("worker run");
    let end = finished_at.lock().expect("lock").unwrap_or_else(Instant::now);
    Figures { messages: target, seconds: (end - start).as_secs_f64(), cpu: cpu_seconds() - cpu }
}

/// Read a batch, write it, ack it: nothing in between.
async fn run_bare(mut source: Box<dyn Source>, mut sink: Box<dyn Sink>, n: u64) -> Figures {
    let acker = source.acker();
    let (start, cpu) = (Instant::now(), cpu_seconds());
    let mut moved = 0;
    while moved < n {
        let SourceEvent::Batch(batch) = source.next(BATCH).await.expect("read") else { continue };
        sink.write(&batch).await.expect("write");
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        for m in &batch {
            next.insert(m.partition, m.offset + 1);
        }
        acker.commit(&next.into_iter().collect::<Vec<_>>()).await.expect("ack");
        moved += batch.len() as u64;
    }
    Figures { messages: moved, seconds: start.elapsed().as_secs_f64(), cpu: cpu_seconds() - cpu }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_worker_against_a_bare_loop() {
    let kafka = Kafka::start();
    let n = n();
    for t in ["in", "out-worker", "out-bare"] {
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
        Box::new(KafkaSource::new(&spec, group, &|_| None).expect("source")) as Box<dyn Source>
    };
    let sink = |topic: &str| {
        let spec = KafkaSinkSpec {
            brokers: Some(vec![kafka.bootstrap()]),
            topic: topic.into(),
            key: None,
            compression: sluice_crds::Compression::Lz4,
            auth: None,
            properties: BTreeMap::new(),
        };
        Box::new(KafkaSink::new(&spec, None, "SINK", "spec.sink.kafka", &|_| None).expect("sink")) as Box<dyn Sink>
    };
    let worker = run_worker(source("bench-worker"), sink("out-worker"), expected(n)).await;
    let bare = run_bare(source("bench-bare"), sink("out-bare"), n).await;
    report("Kafka", &worker, &bare);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_worker_against_a_bare_loop() {
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
    let worker = run_worker(source("bench-worker"), sink("out-worker"), expected(n)).await;
    let bare = run_bare(source("bench-bare"), sink("out-bare"), n).await;
    report("Redis Streams", &worker, &bare);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_worker_against_a_bare_loop() {
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
    let worker = run_worker(source("bench-worker".into()).await, sink("out.worker").await, expected(n)).await;
    let bare = run_bare(source("bench-bare".into()).await, sink("out.bare").await, n).await;
    report("NATS JetStream", &worker, &bare);
}

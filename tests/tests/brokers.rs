//! Smoke test of the broker harness (src/brokers.rs): each server starts, is
//! usable with the client the worker uses, keeps its data across a restart
//! (where it has data to keep), and leaves no process and no temp dir after
//! it is dropped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use sluice_tests::brokers::{Kafka, Nats, Redis, RedisConfig};

/// What a dropped server must not leave behind.
struct Leftovers {
    pid: u32,
    dir: PathBuf,
}

impl Leftovers {
    fn of(pid: Option<u32>, dir: &Path) -> Self {
        Self { pid: pid.expect("the server runs"), dir: dir.to_path_buf() }
    }

    fn assert_gone(self) {
        assert!(!Path::new(&format!("/proc/{}", self.pid)).exists(), "process {} still exists after drop", self.pid);
        assert!(!self.dir.exists(), "{} still exists after drop", self.dir.display());
    }
}

fn kafka_watermarks(bootstrap: &str, topic: &str, partition: i32) -> (i64, i64) {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("kafka consumer");
    consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)).expect("watermarks")
}

#[test]
fn kafka_starts_serves_restarts_and_is_gone_after_drop() {
    let started = Instant::now();
    let mut kafka = Kafka::start();
    eprintln!("kafka started in {:?}", started.elapsed());
    kafka.create_topic("smoke", 3).expect("create topic");

    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("enable.idempotence", "true")
        .create()
        .expect("kafka producer");
    for i in 0..5 {
        let payload = format!("message {i}");
        producer
            .send(BaseRecord::<(), _>::to("smoke").partition(2).payload(&payload))
            .map_err(|(e, _)| e)
            .expect("enqueue");
    }
    producer.flush(Duration::from_secs(10)).expect("flush");
    drop(producer);
    assert_eq!(kafka_watermarks(&kafka.bootstrap(), "smoke", 2), (0, 5));

    let restarted = Instant::now();
    kafka.restart().expect("restart");
    eprintln!("kafka restarted in {:?}", restarted.elapsed());
    assert_eq!(kafka_watermarks(&kafka.bootstrap(), "smoke", 2), (0, 5), "data kept across a restart");

    let leftovers = Leftovers::of(kafka.pid(), kafka.dir());
    drop(kafka);
    leftovers.assert_gone();
}

#[tokio::test]
async fn nats_jetstream_starts_serves_restarts_and_is_gone_after_drop() {
    let mut nats = Nats::start();
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "SMOKE".into(),
        subjects: vec!["smoke.>".into()],
        ..Default::default()
    })
    .await
    .expect("create stream");
    for i in 0..3 {
        js.publish("smoke.a", format!("m{i}").into()).await.expect("publish").await.expect("ack");
    }
    let mut stream = js.get_stream("SMOKE").await.expect("stream");
    assert_eq!(stream.info().await.expect("info").state.messages, 3);

    nats.restart().expect("restart");
    let client = async_nats::connect(nats.url()).await.expect("connect after restart");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("SMOKE").await.expect("stream after restart");
    assert_eq!(stream.info().await.expect("info").state.messages, 3, "file store kept across a restart");

    let leftovers = Leftovers::of(nats.pid(), nats.dir());
    drop(nats);
    leftovers.assert_gone();
}

#[tokio::test]
async fn redis_starts_serves_and_is_gone_after_drop() {
    let redis = Redis::start();
    let client = redis::Client::open(redis.url()).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
    for i in 0..4 {
        let _: String =
            redis::cmd("XADD").arg("smoke").arg("*").arg("n").arg(i).query_async(&mut conn).await.expect("XADD");
    }
    let len: u64 = redis::cmd("XLEN").arg("smoke").query_async(&mut conn).await.expect("XLEN");
    assert_eq!(len, 4);
    let leftovers = Leftovers::of(redis.pid(), redis.dir());
    drop(redis);
    leftovers.assert_gone();
}

#[tokio::test]
async fn redis_with_appendonly_keeps_data_across_a_restart() {
    let mut config = RedisConfig::default();
    config.directives.insert("appendonly".into(), "yes".into());
    config.directives.insert("appendfsync".into(), "always".into());
    let mut redis = Redis::start_with(config).expect("start redis");
    let client = redis::Client::open(redis.url()).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
    let _: String = redis::cmd("XADD").arg("kept").arg("*").arg("n").arg(1).query_async(&mut conn).await.expect("XADD");
    drop(conn);

    redis.restart().expect("restart");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect after restart");
    let len: u64 = redis::cmd("XLEN").arg("kept").query_async(&mut conn).await.expect("XLEN");
    assert_eq!(len, 1);
}

#[test]
fn a_panicking_test_leaves_no_server_behind() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let redis = Redis::start();
        tx.send((redis.pid(), redis.dir().to_path_buf())).expect("send");
        panic!("the test fails while its server runs");
    });
    assert!(result.is_err());
    let (pid, dir) = rx.recv().expect("the server started");
    Leftovers::of(pid, &dir).assert_gone();
}

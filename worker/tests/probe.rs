//! The lag probes against real brokers (sluice-tests' harness) with prepared
//! backlogs: every number is exact. Also: the probe never joins the group,
//! and an unreachable broker is an error within the probe's timeout.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::StreamExt;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sluice_crds::{KafkaSource, NatsSource, RedisSource, Source, StartFrom};
use sluice_tests::brokers::{Kafka, Nats, Redis};
use sluice_worker::probe::{
    Credentials, Lag, LagProbe, PartitionLag, ProbeError, ProbeOptions, ProcessorRef, SourceProbe,
};

const TIMEOUT: Duration = Duration::from_secs(3);

fn shop_orders() -> ProcessorRef {
    ProcessorRef::new("shop", "orders")
}

async fn probe(source: Source) -> Result<Lag, ProbeError> {
    let options = ProbeOptions { timeout: TIMEOUT };
    SourceProbe::new(&source, &shop_orders(), Credentials::default(), options)?.probe().await
}

fn partition(partition: i32, position: Option<i64>, end: i64, lag: u64) -> PartitionLag {
    PartitionLag { partition, position, end, lag }
}

// ------------------------------------------------------------------ kafka --

fn kafka_source(kafka: &Kafka, topic: &str, group: Option<&str>, start_from: StartFrom) -> Source {
    Source {
        kafka: Some(KafkaSource {
            brokers: vec![kafka.bootstrap()],
            topic: topic.into(),
            group: group.map(Into::into),
            start_from,
            auth: None,
            properties: BTreeMap::new(),
        }),
        ..Default::default()
    }
}

/// `counts[p]` messages into partition `p`.
fn produce(kafka: &Kafka, topic: &str, counts: &[usize]) {
    let producer: ThreadedProducer<DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", kafka.bootstrap()).create().expect("producer");
    for (p, &count) in counts.iter().enumerate() {
        for i in 0..count {
            let payload = format!("{{\"n\":{i}}}");
            producer
                .send(BaseRecord::<(), _>::to(topic).partition(p as i32).payload(&payload))
                .map_err(|(e, _)| e)
                .expect("enqueue");
        }
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

/// Commits offsets for `group` the way a standalone consumer does, without
/// joining it.
fn commit(kafka: &Kafka, group: &str, topic: &str, offsets: &[(i32, i64)]) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for &(p, offset) in offsets {
        tpl.add_partition_offset(topic, p, Offset::Offset(offset)).expect("offset");
    }
    consumer.commit(&tpl, CommitMode::Sync).expect("commit");
}

fn group_members(kafka: &Kafka, group: &str) -> usize {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", kafka.bootstrap()).create().expect("consumer");
    let groups = consumer.fetch_group_list(Some(group), Duration::from_secs(10)).expect("group list");
    groups.groups().iter().map(|g| g.members().len()).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_lag_is_high_watermark_minus_committed_offset() {
    let mut kafka = Kafka::start();
    kafka.create_topic("orders", 3).expect("create topic");
    produce(&kafka, "orders", &[10, 20, 30]);
    commit(&kafka, "shop.committed", "orders", &[(0, 4), (1, 20)]);

    // Partition 2 has no commit: all of it for earliest, none for latest.
    let earliest = probe(kafka_source(&kafka, "orders", Some("shop.committed"), StartFrom::Earliest)).await;
    assert_eq!(
        earliest.expect("probe"),
        Lag {
            partitions: 3,
            total: 6 + 30,
            per_partition: vec![
                partition(0, Some(4), 10, 6),
                partition(1, Some(20), 20, 0),
                partition(2, None, 30, 30)
            ],
        }
    );
    let latest = probe(kafka_source(&kafka, "orders", Some("shop.committed"), StartFrom::Latest)).await;
    assert_eq!(
        latest.expect("probe"),
        Lag {
            partitions: 3,
            total: 6,
            per_partition: vec![partition(0, Some(4), 10, 6), partition(1, Some(20), 20, 0), partition(2, None, 30, 0)],
        }
    );
    assert_eq!(group_members(&kafka, "shop.committed"), 0, "the probe must not join the group");

    // The default group, shop.orders, never committed.
    let earliest = probe(kafka_source(&kafka, "orders", None, StartFrom::Earliest)).await.expect("probe");
    assert_eq!(
        earliest,
        Lag {
            partitions: 3,
            total: 60,
            per_partition: vec![partition(0, None, 10, 10), partition(1, None, 20, 20), partition(2, None, 30, 30)],
        }
    );
    let latest = probe(kafka_source(&kafka, "orders", None, StartFrom::Latest)).await.expect("probe");
    assert_eq!((latest.partitions, latest.total), (3, 0));

    // Retention deleted what the group had not read: it resumes at the low
    // watermark, so only high - low is left (5, not 10 - 2).
    kafka.create_topic("trimmed", 1).expect("create topic");
    produce(&kafka, "trimmed", &[10]);
    commit(&kafka, "shop.slow", "trimmed", &[(0, 2)]);
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", kafka.bootstrap()).create().expect("admin");
    let mut before = TopicPartitionList::new();
    before.add_partition_offset("trimmed", 0, Offset::Offset(5)).expect("offset");
    admin.delete_records(&before, &AdminOptions::new()).await.expect("delete records");
    let trimmed = probe(kafka_source(&kafka, "trimmed", Some("shop.slow"), StartFrom::Earliest)).await;
    assert_eq!(
        trimmed.expect("probe"),
        Lag { partitions: 1, total: 5, per_partition: vec![partition(0, Some(2), 10, 5)] }
    );

    let missing = probe(kafka_source(&kafka, "no-such-topic", None, StartFrom::Earliest)).await;
    let err = missing.expect_err("missing topic");
    assert!(matches!(err, ProbeError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("no-such-topic") && err.to_string().contains("spec.source.kafka.topic"), "{err}");

    // One probe kept across a broker restart: an error while the broker is
    // down, the same numbers once it is back.
    let source = kafka_source(&kafka, "orders", Some("shop.committed"), StartFrom::Earliest);
    let kept = SourceProbe::new(&source, &shop_orders(), Credentials::default(), ProbeOptions { timeout: TIMEOUT })
        .expect("probe");
    assert_eq!(kept.probe().await.expect("probe").total, 36);
    kafka.stop();
    let started = Instant::now();
    let down = kept.probe().await.expect_err("broker down");
    assert!(started.elapsed() < TIMEOUT + Duration::from_secs(2), "took {:?}", started.elapsed());
    assert!(down.is_transient(), "{down}");
    kafka.restart().expect("restart");
    let again = recover(&kept).await;
    assert_eq!(again.total, 36);
}

/// The first probes after a broker restart may still see the old
/// connection fail; the probe recovers by itself within a few polls.
async fn recover(probe: &SourceProbe) -> Lag {
    let mut last = None;
    for _ in 0..10 {
        match probe.probe().await {
            Ok(lag) => return lag,
            Err(e) => last = Some(e),
        }
    }
    panic!("the probe did not recover after the broker restart: {last:?}");
}

// ------------------------------------------------------------------- nats --

fn nats_source(
    nats: &Nats,
    stream: &str,
    consumer: Option<&str>,
    filter: Option<&str>,
    start_from: StartFrom,
) -> Source {
    Source {
        nats: Some(NatsSource {
            servers: vec![nats.url()],
            stream: stream.into(),
            consumer: consumer.map(Into::into),
            filter_subject: filter.map(Into::into),
            start_from,
            ack_wait: None,
            max_deliver: None,
            auth: None,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn nats_lag_is_pending_plus_ack_pending_of_the_durable() {
    let mut nats = Nats::start();
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await
        .expect("stream");
    for i in 0..10 {
        js.publish("orders.new", format!("{i}").into()).await.expect("publish").await.expect("stored");
    }
    // The default durable, shop-orders: 6 delivered, the first 4 acked.
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(pull::Config { durable_name: Some("shop-orders".into()), ..Default::default() })
        .await
        .expect("consumer");
    let mut batch = consumer.fetch().max_messages(6).messages().await.expect("fetch");
    let mut delivered = Vec::new();
    while let Some(message) = batch.next().await {
        delivered.push(message.expect("message"));
    }
    assert_eq!(delivered.len(), 6);
    for message in &delivered[..4] {
        message.double_ack_with(AckKind::Ack).await.expect("ack");
    }

    let lag = probe(nats_source(&nats, "ORDERS", None, None, StartFrom::Earliest)).await.expect("probe");
    // 4 never delivered + 2 delivered and not acked; ack floor at sequence 4 of 10.
    assert_eq!(lag, Lag { partitions: 1, total: 6, per_partition: vec![partition(0, Some(4), 10, 6)] });

    // No durable yet: the whole stream for earliest, nothing for latest.
    let none = probe(nats_source(&nats, "ORDERS", Some("not-yet"), None, StartFrom::Earliest)).await.expect("probe");
    assert_eq!(none, Lag { partitions: 1, total: 10, per_partition: vec![partition(0, None, 10, 10)] });
    let none = probe(nats_source(&nats, "ORDERS", Some("not-yet"), None, StartFrom::Latest)).await.expect("probe");
    assert_eq!(none.total, 0);

    // ... and only the subjects the filter matches.
    js.create_stream(jetstream::stream::Config {
        name: "EVENTS".into(),
        subjects: vec!["events.>".into()],
        ..Default::default()
    })
    .await
    .expect("stream");
    for (subject, count) in [("events.eu", 3), ("events.us", 7)] {
        for i in 0..count {
            js.publish(subject, format!("{i}").into()).await.expect("publish").await.expect("stored");
        }
    }
    let eu = probe(nats_source(&nats, "EVENTS", None, Some("events.eu"), StartFrom::Earliest)).await.expect("probe");
    assert_eq!(eu, Lag { partitions: 1, total: 3, per_partition: vec![partition(0, None, 10, 3)] });

    let missing = probe(nats_source(&nats, "NOPE", None, None, StartFrom::Earliest)).await.expect_err("no stream");
    assert!(matches!(missing, ProbeError::NotFound { .. }), "{missing}");

    // A probe kept across a server restart reconnects; the file store kept the durable.
    let source = nats_source(&nats, "ORDERS", None, None, StartFrom::Earliest);
    let kept = SourceProbe::new(&source, &shop_orders(), Credentials::default(), ProbeOptions { timeout: TIMEOUT })
        .expect("probe");
    assert_eq!(kept.probe().await.expect("probe").total, 6);
    drop(delivered);
    nats.restart().expect("restart");
    assert_eq!(recover(&kept).await.total, 6);
}

// ------------------------------------------------------------------ redis --

fn redis_source(redis: &Redis, stream: &str, group: Option<&str>, start_from: StartFrom) -> Source {
    Source {
        redis: Some(RedisSource {
            url: redis.url(),
            stream: stream.into(),
            group: group.map(Into::into),
            start_from,
            claim_idle: None,
            password_secret_ref: None,
            tls: None,
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn redis_lag_is_xinfo_groups_lag_plus_pending() {
    let redis = Redis::start();
    let client = redis::Client::open(redis.url()).expect("client");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
    let mut ids = Vec::new();
    for i in 0..10 {
        let id: String =
            redis::cmd("XADD").arg("orders").arg("*").arg("n").arg(i).query_async(&mut conn).await.expect("XADD");
        ids.push(id);
    }
    // The default group, shop.orders: 6 read by one consumer, the first 4 acked.
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("orders")
        .arg("shop.orders")
        .arg("0")
        .query_async(&mut conn)
        .await
        .expect("XGROUP CREATE");
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("shop.orders")
        .arg("pod-a")
        .arg("COUNT")
        .arg(6)
        .arg("STREAMS")
        .arg("orders")
        .arg(">")
        .query_async(&mut conn)
        .await
        .expect("XREADGROUP");
    let acked: i64 =
        redis::cmd("XACK").arg("orders").arg("shop.orders").arg(&ids[..4]).query_async(&mut conn).await.expect("XACK");
    assert_eq!(acked, 4);

    let lag = probe(redis_source(&redis, "orders", None, StartFrom::Earliest)).await.expect("probe");
    // 4 never read + 2 read and not acked; entries-read 6 of 10 added.
    assert_eq!(lag, Lag { partitions: 1, total: 6, per_partition: vec![partition(0, Some(6), 10, 6)] });
    let members: redis::Value = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg("orders")
        .arg("shop.orders")
        .query_async(&mut conn)
        .await
        .expect("XINFO");
    assert!(matches!(&members, redis::Value::Array(c) if c.len() == 1), "only pod-a, no probe consumer: {members:?}");

    // No group yet: the whole stream for earliest, nothing for latest.
    let none = probe(redis_source(&redis, "orders", Some("not-yet"), StartFrom::Earliest)).await.expect("probe");
    assert_eq!(none, Lag { partitions: 1, total: 10, per_partition: vec![partition(0, None, 10, 10)] });
    let none = probe(redis_source(&redis, "orders", Some("not-yet"), StartFrom::Latest)).await.expect("probe");
    assert_eq!(none.total, 0);

    // A group created at the end ($) lags by what came after it. Redis 7.0
    // reports no lag for it (entries-read unknown): the probe counts.
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("orders")
        .arg("tail")
        .arg("$")
        .query_async(&mut conn)
        .await
        .expect("XGROUP CREATE $");
    for i in 0..5 {
        let _: String =
            redis::cmd("XADD").arg("orders").arg("*").arg("n").arg(i).query_async(&mut conn).await.expect("XADD");
    }
    let tail = probe(redis_source(&redis, "orders", Some("tail"), StartFrom::Earliest)).await.expect("probe");
    assert_eq!(tail, Lag { partitions: 1, total: 5, per_partition: vec![partition(0, None, 15, 5)] });

    let missing = probe(redis_source(&redis, "nope", None, StartFrom::Earliest)).await.expect_err("no stream");
    assert!(matches!(missing, ProbeError::NotFound { .. }), "{missing}");
}

// ------------------------------------------------------------ unreachable --

/// A port nothing listens on, and one that accepts connections (the kernel
/// completes the handshake) but never answers: the two ways a broker is gone.
fn dead_ports() -> (u16, TcpListener) {
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    (closed, silent)
}

async fn assert_unreachable(source: Source, broker: &str, endpoint: &str) {
    let started = Instant::now();
    let err = probe(source).await.expect_err("an unreachable broker is an error");
    let took = started.elapsed();
    assert!(took < TIMEOUT + Duration::from_secs(2), "{broker} at {endpoint}: took {took:?} (timeout {TIMEOUT:?})");
    assert!(
        matches!(err, ProbeError::Unreachable { .. } | ProbeError::Timeout { .. }) && err.is_transient(),
        "{broker} at {endpoint}: {err:?}"
    );
    let message = err.to_string();
    assert!(message.contains(broker) && message.contains(endpoint), "{message}");
    eprintln!("{broker} at {endpoint}: {took:?}: {message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_broker_is_an_error_within_the_timeout() {
    let (closed, silent) = dead_ports();
    let silent = silent.local_addr().expect("addr").port();
    for port in [closed, silent] {
        let endpoint = format!("127.0.0.1:{port}");
        let kafka = KafkaSource {
            brokers: vec![endpoint.clone()],
            topic: "orders".into(),
            group: None,
            start_from: StartFrom::Earliest,
            auth: None,
            properties: BTreeMap::new(),
        };
        let nats = NatsSource {
            servers: vec![format!("nats://{endpoint}")],
            stream: "ORDERS".into(),
            consumer: None,
            filter_subject: None,
            start_from: StartFrom::Earliest,
            ack_wait: None,
            max_deliver: None,
            auth: None,
        };
        let redis = RedisSource {
            url: format!("redis://{endpoint}"),
            stream: "orders".into(),
            group: None,
            start_from: StartFrom::Earliest,
            claim_idle: None,
            password_secret_ref: None,
            tls: None,
        };
        let (k, n, r) = tokio::join!(
            assert_unreachable(Source { kafka: Some(kafka), ..Default::default() }, "Kafka", &endpoint),
            assert_unreachable(Source { nats: Some(nats), ..Default::default() }, "NATS", &endpoint),
            assert_unreachable(Source { redis: Some(redis), ..Default::default() }, "Redis", &endpoint),
        );
        let ((), (), ()) = (k, n, r);
    }
}

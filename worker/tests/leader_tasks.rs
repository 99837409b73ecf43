//! The leader's singleton tasks against real brokers (sluice-tests'
//! harness, servers on ephemeral ports): the state janitor on a real
//! redis-server, and dead-letter redrive on Kafka and Redis Streams.
//!
//! A missing broker binary fails the test with the command that installs
//! it; nothing is skipped.

use std::time::Duration;

use redis::AsyncCommands;
use sluice_tests::brokers::Redis;
use sluice_worker::{
    janitor::{self, Layout, Orphan},
    metrics::Metrics,
    state::StateKeys,
};

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

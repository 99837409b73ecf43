//! Redis-backed state against a real redis-server, started here on an
//! free port in a temp dir with persistence off. A missing
//! redis-server fails the test with the install command; it never skips.

mod common;

use std::{
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use common::*;
use redis::AsyncCommands;
use serde_json::json;
use sluice_worker::{
    pipeline::Pipeline,
    pool::Snapshots,
    sink::null::NullSink,
    source::SourceEvent,
    state::{StateKeys, StateStore, redis::RedisStore},
};
use tokio_util::sync::CancellationToken;

struct RedisServer {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_redis() -> RedisServer {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = sluice_tests::brokers::free_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("redis-server could not be started ({e}); install it with: apt-get install -y redis-server")
        });
    let url = format!("redis://127.0.0.1:{port}");
    let server = RedisServer { child, url, _dir: dir };
    let client = redis::Client::open(server.url.as_str()).expect("redis url");
    for _ in 0..200 {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await
            && redis::cmd("PING").query_async::<String>(&mut c).await.is_ok()
        {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("redis-server on port {port} did not answer PING within 5s");
}

#[tokio::test]
async fn store_gets_puts_merges_and_expires_with_ttls() {
    let server = start_redis().await;
    let store = RedisStore::connect(&server.url).await.unwrap();
    store
        .put_many(vec![("a".into(), b"1".to_vec()), ("b".into(), b"2".to_vec())], Some(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(store.get("a").await.unwrap(), Some(b"1".to_vec()));
    assert_eq!(store.get("missing").await.unwrap(), None);
    let mut c = redis::Client::open(server.url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let ttl: i64 = c.pttl("b").await.unwrap();
    assert!(ttl > 50_000 && ttl <= 60_000, "pipelined writes carry the TTL: {ttl}");
    assert_eq!(store.merge("n", 5, Some(Duration::from_secs(10))).await.unwrap(), 5);
    assert_eq!(store.merge("n", -2, None).await.unwrap(), 3);
    assert!(matches!(
        store.merge("a", 1, None).await,
        Ok(2) // "1" is an integer to Redis
    ));
    store.put("s", b"text".to_vec(), None).await.unwrap();
    assert!(store.merge("s", 1, None).await.is_err(), "merging into a non-integer is an error, not a panic");
    assert!(store.expire("s", Duration::from_millis(1)).await.unwrap());
    assert!(!store.expire("nope", Duration::from_secs(1)).await.unwrap());
    store.delete("a").await.unwrap();
    assert_eq!(store.get("a").await.unwrap(), None);
}

/// Windows of a partition survive a move: pod A snapshots partition 1 when it
/// is revoked; pod B restores it on assignment and emits complete windows.
#[tokio::test]
async fn window_state_moves_with_its_partition() {
    let server = start_redis().await;
    let store: Arc<dyn StateStore> = Arc::new(RedisStore::connect(&server.url).await.unwrap());
    let snapshots = Snapshots {
        store: store.clone(),
        keys: StateKeys::new("shop/orders"),
        interval: Duration::from_secs(3600),
        ttl: Some(Duration::from_secs(600)),
    };
    let spec = spec(json!({
        "source": {"generator": {"template": {"a": "seq"}}}, "sink": {"stdout": {}},
        "pipeline": [{"window": {"type": "tumbling", "size": "100ms", "keyBy": "msg.k",
            "time": {"field": "msg.ts", "allowedLateness": "1s"}, "aggregate": {"count": {}, "sum": "msg.v"}}}]
    }));
    let ev = |p: i32, o: i64, ts: i64, v: i64| json_msg(p, o, json!({"ts": ts, "k": "x", "v": v}));

    // Pod A: partitions 0 and 1, three events each in [0,100); then 1 moves away.
    let a = ScriptedSource::new(vec![
        SourceEvent::Assigned(vec![0, 1]),
        SourceEvent::Batch(vec![ev(0, 0, 10, 1), ev(1, 0, 10, 10), ev(1, 1, 20, 20), ev(0, 1, 30, 2)]),
        SourceEvent::Revoked(vec![1]),
    ]);
    let a_acker = a.acker.clone();
    let stop = CancellationToken::new();
    let sink_a = CollectSink::new();
    let rt = runtime(2, Some(snapshots.clone()));
    let pipeline = Pipeline::compile(&spec).unwrap();
    let run_a = tokio::spawn({
        let (sink, stop) = (sink_a.clone(), stop.clone());
        async move { rt.run(Box::new(a), pipeline, Box::new(sink), Box::new(NullSink::default()), stop).await }
    });
    // The scripted source ends after its script; End would flush, so wait for the snapshot instead.
    let key = snapshots.keys.snapshot(1, 0);
    for _ in 0..400 {
        if store.get(&key).await.unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(store.get(&key).await.unwrap().is_some(), "revoke snapshots the partition under {key}");
    stop.cancel();
    run_a.await.unwrap().unwrap();

    // Pod B: gets partition 1, restores it, sees one more event, input ends.
    // The commit for partition 1 stayed below the open window's first offset,
    // so pod B sees offsets 0 and 1 again: the restored windows hold them already.
    assert_eq!(
        a_acker.committed.lock().unwrap().get(&1).copied().unwrap_or(0),
        0,
        "partition 1's window never fired on pod A: nothing of it is committed"
    );
    let b = ScriptedSource::new(vec![
        SourceEvent::Assigned(vec![1]),
        SourceEvent::Batch(vec![ev(1, 0, 10, 10), ev(1, 1, 20, 20), ev(1, 2, 50, 300)]),
    ]);
    let sink_b = CollectSink::new();
    runtime(3, Some(snapshots))
        .run(
            Box::new(b),
            Pipeline::compile(&spec).unwrap(),
            Box::new(sink_b.clone()),
            Box::new(NullSink::default()),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(
        sink_b.payloads().await,
        vec![json!({"key": "x", "start": 0, "end": 100, "count": 3, "sum": 330})],
        "the window holds the events seen before the move"
    );
}

/// With snapshots, a window that never closes does not hold the commit point:
/// it follows the last snapshot, which holds the window's events.
#[tokio::test]
async fn commits_follow_snapshots_past_open_windows() {
    let server = start_redis().await;
    let store: Arc<dyn StateStore> = Arc::new(RedisStore::connect(&server.url).await.unwrap());
    let snapshots = Snapshots {
        store: store.clone(),
        keys: StateKeys::new("shop/rare"),
        interval: Duration::from_millis(100),
        ttl: None,
    };
    let spec = spec(json!({
        "source": {"generator": {"template": {"a": "seq"}}}, "sink": {"stdout": {}},
        "pipeline": [{"window": {"type": "count", "count": 100, "keyBy": "msg.k", "aggregate": {"count": {}}}}]
    }));
    let batch = (0..5).map(|i| json_msg(0, i, json!({"k": "rare"}))).collect();
    let mut source = ScriptedSource::new(vec![SourceEvent::Assigned(vec![0]), SourceEvent::Batch(batch)]);
    source.hang = true;
    let acker = source.acker.clone();
    let stop = CancellationToken::new();
    let rt = runtime(1, Some(snapshots.clone()));
    let run = tokio::spawn({
        let stop = stop.clone();
        let p = Pipeline::compile(&spec).unwrap();
        async move { rt.run(Box::new(source), p, Box::new(CollectSink::new()), Box::new(NullSink::default()), stop).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while acker.committed.lock().unwrap().get(&0) != Some(&5) {
        assert!(std::time::Instant::now() < deadline, "commit never passed the open window: {:?}", acker.committed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    run.await.unwrap().unwrap();
    assert!(store.get(&snapshots.keys.snapshot(0, 0)).await.unwrap().is_some());
}

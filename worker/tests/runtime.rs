//! The runtime's guarantees: commit only after delivery, backpressure that
//! pauses the source, bad input dead-lettered without stopping the flow.

mod common;

use std::{sync::atomic::Ordering, time::Duration};

use common::*;
use serde_json::json;
use sluice_worker::{pipeline::Pipeline, sink::null::NullSink, source::SourceEvent};
use tokio_util::sync::CancellationToken;

fn filter_spec() -> sluice_crds::StreamProcessorSpec {
    spec(json!({
        "source": {"generator": {"template": {"a": "seq"}}},
        "sink": {"stdout": {}},
        "pipeline": [{"filter": "msg.n % 2 == 0"}]
    }))
}

#[tokio::test(start_paused = true)]
async fn offsets_are_committed_only_after_the_sink_delivered() {
    let batch: Vec<_> = (0..10).map(|i| json_msg(0, i, json!({"n": i}))).collect();
    let source = ScriptedSource::new(vec![SourceEvent::Assigned(vec![0]), SourceEvent::Batch(batch)]);
    let acker = source.acker.clone();
    let (sink, gate) = CollectSink::gated();
    let rt = runtime(2, None);
    let run = tokio::spawn({
        let sink = sink.clone();
        async move {
            rt.run(
                Box::new(source),
                Pipeline::compile(&filter_spec()).unwrap(),
                Box::new(sink),
                Box::new(NullSink::default()),
                CancellationToken::new(),
            )
            .await
        }
    });
    // Everything is stuck in the gated sink: idle time passes, nothing is committed.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(acker.committed.lock().unwrap().is_empty(), "nothing delivered, nothing committed");
    gate.add_permits(1000);
    let summary = run.await.unwrap().unwrap();
    assert_eq!(summary.consumed, 10);
    assert_eq!(summary.delivered, 5);
    assert_eq!(acker.committed.lock().unwrap().get(&0), Some(&10), "filtered offsets count as finished too");
}

#[tokio::test(start_paused = true)]
async fn a_full_pool_pauses_the_source_and_loses_nothing() {
    let mut source = ScriptedSource::new(vec![SourceEvent::Assigned(vec![0])]);
    let mut next = 0i64;
    source.endless = Some(Box::new(move |max| {
        let b = (0..max as i64).map(|i| json_msg(0, next + i, json!({"n": next + i}))).collect();
        next += max as i64;
        b
    }));
    let fetched = source.fetched.clone();
    let acker = source.acker.clone();
    let (sink, gate) = CollectSink::gated();
    let stop = CancellationToken::new();
    let rt = runtime(1, None);
    let rt_ready = rt.ready.clone();
    let run = tokio::spawn({
        let (sink, stop) = (sink.clone(), stop.clone());
        async move {
            rt.run(
                Box::new(source),
                Pipeline::compile(&filter_spec()).unwrap(),
                Box::new(sink),
                Box::new(NullSink::default()),
                stop,
            )
            .await
        }
    });
    let ready = rt_ready.clone();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(ready.load(Ordering::SeqCst), "backpressure alone is not a stall");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!ready.load(Ordering::SeqCst), "a pool that takes no work for 30s is reported not ready");
    let stalled = fetched.load(Ordering::SeqCst);
    assert!(stalled <= 8, "the source must pause when every hop is full, fetched {stalled} batches");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(fetched.load(Ordering::SeqCst), stalled, "still paused, not buffering");
    // Release the sink, let it run a bit, then stop and drain.
    gate.add_permits(100_000);
    while sink.got.lock().await.len() < 200 {
        tokio::task::yield_now().await;
    }
    stop.cancel();
    let summary = run.await.unwrap().unwrap();
    let got = sink.payloads().await;
    let evens: Vec<i64> = got.iter().map(|v| v["n"].as_i64().unwrap()).collect();
    assert_eq!(summary.delivered as usize, evens.len());
    assert!(evens.windows(2).all(|w| w[1] == w[0] + 2), "in order, none lost");
    let committed = *acker.committed.lock().unwrap().get(&0).unwrap();
    assert_eq!(committed as u64, summary.consumed, "drained: every consumed offset finished and committed");
}

#[tokio::test]
async fn bad_input_goes_to_the_dead_letter_sink_and_the_rest_flows() {
    let mut batch = Vec::new();
    for i in 0..1000i64 {
        let m = match i % 10 {
            3 => sluice_worker::message::Message::new(0, i, b"{broken".to_vec()),
            5 => json_msg(0, i, json!({"amount": "a string"})),
            7 => json_msg(0, i, json!({"other": 1})),
            _ => json_msg(0, i, json!({"amount": i})),
        };
        batch.push(m);
    }
    let source = ScriptedSource::new(vec![SourceEvent::Assigned(vec![0]), SourceEvent::Batch(batch)]);
    let acker = source.acker.clone();
    let sink = CollectSink::new();
    let dead = CollectSink::new();
    let rt = runtime(2, None);
    let metrics = rt.metrics.clone();
    let p = Pipeline::compile(&spec(json!({
        "source": {"generator": {"template": {"a": "seq"}}}, "sink": {"stdout": {}},
        "pipeline": [{"filter": "msg.amount >= 0"}, {"map": {"set": {"double": "msg.amount * 2"}}}]
    })))
    .unwrap();
    let summary = rt
        .run(Box::new(source), p, Box::new(sink.clone()), Box::new(dead.clone()), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(summary.delivered, 700);
    assert_eq!(summary.dead_lettered, 300);
    assert_eq!(acker.committed.lock().unwrap().get(&0), Some(&1000));
    let dead = dead.got.lock().await;
    let bad_payload = dead.iter().filter(|m| m.header("sluice-reason") == Some(b"bad_payload")).count();
    assert_eq!(bad_payload, 100);
    assert!(dead.iter().all(|m| m.header("sluice-step") == Some(b"pipeline[0].filter")));
    assert!(dead.iter().all(|m| m.header("sluice-error").is_some_and(|e| !e.is_empty())));
    let text = metrics.render();
    assert!(text.contains("sluice_messages_dead_lettered_total{reason=\"bad_payload\"} 100"), "{text}");
    assert!(text.contains("sluice_messages_dead_lettered_total{reason=\"expression\"} 200"), "{text}");
    assert!(text.contains("sluice_messages_processed_total{outcome=\"delivered\"} 700"), "{text}");
}

#[tokio::test]
async fn end_of_input_flushes_windows_in_order() {
    let events: Vec<_> = [(5, "b"), (1, "a"), (12, "a"), (3, "b"), (25, "a")]
        .iter()
        .enumerate()
        .map(|(i, (ts, k))| json_msg(0, i as i64, json!({"ts": ts, "k": k})))
        .collect();
    let source = ScriptedSource::new(vec![SourceEvent::Assigned(vec![0]), SourceEvent::Batch(events)]);
    let sink = CollectSink::new();
    let p = Pipeline::compile(&spec(json!({
        "source": {"generator": {"template": {"a": "seq"}}}, "sink": {"stdout": {}},
        "pipeline": [{"window": {"type": "tumbling", "size": "10ms", "keyBy": "msg.k", "time": {"field": "msg.ts", "allowedLateness": "100ms"}, "aggregate": {"count": {}}}}]
    })))
    .unwrap();
    runtime(3, None)
        .run(Box::new(source), p, Box::new(sink.clone()), Box::new(NullSink::default()), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        sink.payloads().await,
        vec![
            json!({"key": "a", "start": 0, "end": 10, "count": 1}),
            json!({"key": "b", "start": 0, "end": 10, "count": 2}),
            json!({"key": "a", "start": 10, "end": 20, "count": 1}),
            json!({"key": "a", "start": 20, "end": 30, "count": 1}),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_across_a_pool_of_four() {
    let mut batches = vec![SourceEvent::Assigned(vec![0, 1])];
    let mut offsets = [0i64; 2];
    for b in 0..50 {
        let mut batch = Vec::new();
        for i in 0..100 {
            let p = (b + i) % 2;
            let key = format!("key{}", (i * 7 + b) % 13);
            let o = offsets[p as usize];
            offsets[p as usize] += 1;
            batch.push(json_msg(p, o, json!({"key": key, "seq": b * 100 + i})).with_key(key));
        }
        batches.push(SourceEvent::Batch(batch));
    }
    let source = ScriptedSource::new(batches);
    let acker = source.acker.clone();
    let sink = CollectSink::new();
    runtime(4, None)
        .run(
            Box::new(source),
            Pipeline::compile(&filter_spec_all()).unwrap(),
            Box::new(sink.clone()),
            Box::new(NullSink::default()),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    let got = sink.payloads().await;
    assert_eq!(got.len(), 5000);
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    for v in got {
        let (k, s) = (v["key"].as_str().unwrap().to_string(), v["seq"].as_i64().unwrap());
        if let Some(prev) = last.insert(k.clone(), s) {
            assert!(s > prev, "key {k}: {s} after {prev}");
        }
    }
    let committed = acker.committed.lock().unwrap().clone();
    assert_eq!(committed.get(&0), Some(&offsets[0]));
    assert_eq!(committed.get(&1), Some(&offsets[1]));
}

fn filter_spec_all() -> sluice_crds::StreamProcessorSpec {
    spec(json!({
        "source": {"generator": {"template": {"a": "seq"}}},
        "sink": {"stdout": {}},
        "pipeline": [{"filter": "msg.seq >= 0"}]
    }))
}

#[tokio::test(start_paused = true)]
async fn open_windows_hold_their_offsets_back_from_commit() {
    let events: Vec<_> = [(1, 5), (2, 6), (15, 7), (25, 8)]
        .iter()
        .enumerate()
        .map(|(i, (ts, v))| json_msg(0, i as i64, json!({"ts": ts, "v": v})))
        .collect();
    let mut source = ScriptedSource::new(vec![SourceEvent::Assigned(vec![0]), SourceEvent::Batch(events)]);
    source.hang = true;
    let acker = source.acker.clone();
    let sink = CollectSink::new();
    let stop = CancellationToken::new();
    let p = Pipeline::compile(&spec(json!({
        "source": {"generator": {"template": {"a": "seq"}}}, "sink": {"stdout": {}},
        "pipeline": [{"window": {"type": "tumbling", "size": "10ms", "time": {"field": "msg.ts"}, "aggregate": {"sum": "msg.v"}}}]
    })))
    .unwrap();
    let run = tokio::spawn({
        let (sink, stop) = (sink.clone(), stop.clone());
        async move { runtime(2, None).run(Box::new(source), p, Box::new(sink), Box::new(NullSink::default()), stop).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.payloads().await.len(), 2, "[0,10) and [10,20) fired");
    assert_eq!(
        acker.committed.lock().unwrap().get(&0),
        Some(&3),
        "offset 3 sits in the open window [20,30): not delivered, not committed"
    );
    stop.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(acker.committed.lock().unwrap().get(&0), Some(&3), "a restart replays the open window");
}

#[tokio::test]
async fn a_partition_that_comes_back_is_tracked_from_where_it_resumes() {
    let first: Vec<_> = (0..5).map(|i| json_msg(0, i, json!({"n": i}))).collect();
    let again: Vec<_> = (2..8).map(|i| json_msg(0, i, json!({"n": i}))).collect();
    let source = ScriptedSource::new(vec![
        SourceEvent::Assigned(vec![0]),
        SourceEvent::Batch(first),
        SourceEvent::Revoked(vec![0]),
        SourceEvent::Assigned(vec![0]),
        SourceEvent::Batch(again),
    ]);
    let acker = source.acker.clone();
    let sink = CollectSink::new();
    runtime(1, None)
        .run(
            Box::new(source),
            Pipeline::compile(&filter_spec_all_n()).unwrap(),
            Box::new(sink.clone()),
            Box::new(NullSink::default()),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(acker.committed.lock().unwrap().get(&0), Some(&8));
    assert_eq!(sink.payloads().await.len(), 11, "redelivered messages are processed again (at-least-once)");
}

fn filter_spec_all_n() -> sluice_crds::StreamProcessorSpec {
    spec(json!({
        "source": {"generator": {"template": {"a": "seq"}}},
        "sink": {"stdout": {}},
        "pipeline": [{"filter": "msg.n >= 0"}]
    }))
}

/// Records the size of each write; each write waits for a permit.
struct SizedWrites {
    sizes: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    gate: std::sync::Arc<tokio::sync::Semaphore>,
}

impl sluice_worker::sink::Sink for SizedWrites {
    fn write<'a>(
        &'a mut self,
        batch: &'a [sluice_worker::message::Message],
    ) -> futures::future::BoxFuture<'a, Result<(), sluice_worker::sink::SinkError>> {
        Box::pin(async move {
            if let Ok(p) = self.gate.acquire().await {
                p.forget();
            }
            self.sizes.lock().unwrap().push(batch.len());
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        "sized"
    }
}

#[tokio::test(start_paused = true)]
async fn outputs_queued_behind_a_slow_write_share_the_next_write_and_commit() {
    let mut events = vec![SourceEvent::Assigned(vec![0])];
    for b in 0..8 {
        events.push(SourceEvent::Batch((0..10).map(|i| json_msg(0, b * 10 + i, json!({"n": b * 10 + i}))).collect()));
    }
    let source = ScriptedSource::new(events);
    let acker = source.acker.clone();
    let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let sink = SizedWrites { sizes: sizes.clone(), gate: gate.clone() };
    let mut rt = runtime(1, None);
    rt.pool.queue_batches = 4;
    let run = tokio::spawn(async move {
        let p = Pipeline::compile(&filter_spec_all_n()).unwrap();
        rt.run(Box::new(source), p, Box::new(sink), Box::new(NullSink::default()), CancellationToken::new()).await
    });
    // The first write waits; meanwhile the pool fills the queue to the sink stage.
    tokio::time::sleep(Duration::from_secs(1)).await;
    gate.add_permits(1000);
    let summary = run.await.unwrap().unwrap();
    let sizes = sizes.lock().unwrap().clone();
    assert_eq!(summary.delivered, 80);
    assert_eq!(sizes.iter().sum::<usize>(), 80, "{sizes:?}");
    // Under exactly-once each write and commit is a transaction: one per
    // pool batch of 10 would be 8 of them.
    assert!(
        sizes.len() < 8 && sizes.iter().any(|s| *s > 10),
        "pool batches of 10 queued behind a write share the next one: {sizes:?}"
    );
    assert_eq!(acker.committed.lock().unwrap().get(&0), Some(&80));
}

/// Drops the first commit it is given (as a Kafka commit lost to a
/// rebalance in progress is: reported to the log only), keeps the rest.
#[derive(Default)]
struct LossyAcker {
    calls: std::sync::Mutex<usize>,
    kept: std::sync::Mutex<std::collections::BTreeMap<i32, i64>>,
}

impl sluice_worker::source::Acker for LossyAcker {
    fn commit<'a>(
        &'a self,
        positions: &'a [(i32, i64)],
    ) -> futures::future::BoxFuture<'a, Result<(), sluice_worker::source::SourceError>> {
        Box::pin(async move {
            let mut calls = self.calls.lock().unwrap();
            *calls += 1;
            if *calls > 1 {
                self.kept.lock().unwrap().extend(positions.iter().copied());
            }
            Ok(())
        })
    }
}

/// A live source: a script, then nothing new, for ever.
struct IdleAfter {
    events: std::collections::VecDeque<SourceEvent>,
    acker: std::sync::Arc<dyn sluice_worker::source::Acker>,
}

impl sluice_worker::source::Source for IdleAfter {
    fn next(
        &mut self,
        _max: usize,
    ) -> futures::future::BoxFuture<'_, Result<SourceEvent, sluice_worker::source::SourceError>> {
        Box::pin(async move {
            match self.events.pop_front() {
                Some(e) => Ok(e),
                None => futures::future::pending().await,
            }
        })
    }
    fn acker(&self) -> std::sync::Arc<dyn sluice_worker::source::Acker> {
        self.acker.clone()
    }
    fn kind(&self) -> &'static str {
        "idle-after"
    }
}

#[tokio::test(start_paused = true)]
async fn a_lost_last_commit_is_made_again_once_the_input_goes_quiet() {
    let batch: Vec<_> = (0..10).map(|i| json_msg(0, i, json!({"n": i}))).collect();
    let acker = std::sync::Arc::new(LossyAcker::default());
    let source = IdleAfter {
        events: vec![SourceEvent::Assigned(vec![0]), SourceEvent::Batch(batch)].into(),
        acker: acker.clone(),
    };
    let stop = CancellationToken::new();
    let rt = runtime(2, None);
    let run = tokio::spawn({
        let stop = stop.clone();
        async move {
            rt.run(
                Box::new(source),
                Pipeline::compile(&filter_spec()).unwrap(),
                Box::new(CollectSink::new()),
                Box::new(NullSink::default()),
                stop,
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(*acker.calls.lock().unwrap(), 1, "one commit after the batch, and it was lost");
    assert!(acker.kept.lock().unwrap().is_empty());
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(acker.kept.lock().unwrap().get(&0), Some(&10), "committed again while idle");
    let calls = *acker.calls.lock().unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(*acker.calls.lock().unwrap(), calls, "a quiet worker stops re-committing after a few tries");
    stop.cancel();
    run.await.unwrap().unwrap();
}

/// Refuses every record whose `big` field is true, as a broker refuses a
/// record over its size limit; keeps the rest.
struct RefusingSink {
    inner: CollectSink,
}

impl sluice_worker::sink::Sink for RefusingSink {
    fn write<'a>(
        &'a mut self,
        batch: &'a [sluice_worker::message::Message],
    ) -> futures::future::BoxFuture<'a, Result<(), sluice_worker::sink::SinkError>> {
        Box::pin(async move {
            let big = |m: &sluice_worker::message::Message| m.payload.json().is_ok_and(|v| v["big"] == json!(true));
            let rejected: Vec<_> = batch
                .iter()
                .enumerate()
                .filter(|(_, m)| big(m))
                .map(|(index, _)| sluice_worker::sink::Rejection {
                    index,
                    error: "Broker: Message size too large".into(),
                })
                .collect();
            let ok: Vec<_> = batch.iter().filter(|m| !big(m)).cloned().collect();
            self.inner.got.lock().await.extend(ok);
            if rejected.is_empty() {
                Ok(())
            } else {
                Err(sluice_worker::sink::SinkError::Rejected {
                    kind: "kafka",
                    target: "out".into(),
                    rejected,
                    attempts: 1,
                })
            }
        })
    }

    fn kind(&self) -> &'static str {
        "kafka"
    }
}

#[tokio::test(start_paused = true)]
async fn records_the_sink_refuses_are_dead_lettered_after_max_retries_and_nothing_behind_them_stalls() {
    let batch: Vec<_> = (0..200i64).map(|i| json_msg(0, i, json!({"n": i, "big": i % 50 == 7}))).collect();
    let source = ScriptedSource::new(vec![SourceEvent::Assigned(vec![0]), SourceEvent::Batch(batch)]);
    let acker = source.acker.clone();
    let out = CollectSink::new();
    let dead = CollectSink::new();
    let rt = runtime(2, None);
    let metrics = rt.metrics.clone();
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let backoff = sluice_worker::retry::Backoff::with_seed(Duration::from_millis(10), Duration::from_millis(100), 3);
    let sink = sluice_worker::retry::RetryingSink::new(
        Box::new(RefusingSink { inner: out.clone() }),
        backoff,
        healthy.clone(),
        2,
    );
    let p = Pipeline::compile(&spec(json!({
        "source": {"generator": {"template": {"a": "seq"}}}, "sink": {"stdout": {}}, "pipeline": []
    })))
    .unwrap();
    let summary =
        rt.run(Box::new(source), p, Box::new(sink), Box::new(dead.clone()), CancellationToken::new()).await.unwrap();
    assert_eq!(summary.delivered, 196);
    assert_eq!(summary.dead_lettered, 4);
    assert_eq!(out.got.lock().await.len(), 196);
    assert_eq!(acker.committed.lock().unwrap().get(&0), Some(&200), "the refused offsets are finished too");
    let dead = dead.got.lock().await;
    let offsets: Vec<i64> = dead.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, vec![7, 57, 107, 157]);
    for m in dead.iter() {
        assert_eq!(m.header("sluice-reason"), Some(&b"sink_rejected"[..]));
        assert_eq!(m.header("sluice-step"), Some(&b"spec.sink.kafka"[..]));
        assert_eq!(m.header("sluice-attempt"), Some(&b"3"[..]), "the first attempt and maxRetries = 2");
        assert_eq!(m.header("sluice-error"), Some(&b"Broker: Message size too large"[..]));
        assert_eq!(m.header("sluice-offset").map(|o| o.to_vec()), Some(m.offset.to_string().into_bytes()));
    }
    assert!(healthy.load(Ordering::SeqCst), "refusals are not an outage: ready throughout");
    let text = metrics.render();
    assert!(text.contains("sluice_messages_dead_lettered_total{reason=\"sink_rejected\"} 4"), "{text}");
}

/// When a commit came and what it carried.
type Commit = (tokio::time::Instant, Vec<(i32, i64)>);

/// An acker that asks for commits at most every `interval` (as the
/// exactly-once acker does) and records when each came.
struct SpacedAcker {
    interval: Duration,
    commits: std::sync::Mutex<Vec<Commit>>,
}

impl sluice_worker::source::Acker for SpacedAcker {
    fn commit<'a>(
        &'a self,
        positions: &'a [(i32, i64)],
    ) -> futures::future::BoxFuture<'a, Result<(), sluice_worker::source::SourceError>> {
        Box::pin(async move {
            self.commits.lock().unwrap().push((tokio::time::Instant::now(), positions.to_vec()));
            Ok(())
        })
    }

    fn commit_interval(&self) -> Duration {
        self.interval
    }
}

/// Each write takes 10 ms.
struct TenMsWrites;

impl sluice_worker::sink::Sink for TenMsWrites {
    fn write<'a>(
        &'a mut self,
        _batch: &'a [sluice_worker::message::Message],
    ) -> futures::future::BoxFuture<'a, Result<(), sluice_worker::sink::SinkError>> {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok(())
        })
    }
    fn kind(&self) -> &'static str {
        "ten-ms"
    }
}

#[tokio::test(start_paused = true)]
async fn an_acker_with_a_commit_interval_gets_commits_that_far_apart_and_the_last_positions_without_waiting_for_idle() {
    let mut events = vec![SourceEvent::Assigned(vec![0])];
    for b in 0..40 {
        events.push(SourceEvent::Batch((0..10).map(|i| json_msg(0, b * 10 + i, json!({"n": b * 10 + i}))).collect()));
    }
    let interval = Duration::from_millis(100);
    let acker = std::sync::Arc::new(SpacedAcker { interval, commits: Default::default() });
    let source = IdleAfter { events: events.into(), acker: acker.clone() };
    let (stop, started) = (CancellationToken::new(), tokio::time::Instant::now());
    let rt = runtime(1, None);
    let run = tokio::spawn({
        let stop = stop.clone();
        async move {
            let p = Pipeline::compile(&filter_spec_all_n()).unwrap();
            rt.run(Box::new(source), p, Box::new(TenMsWrites), Box::new(NullSink::default()), stop).await
        }
    });
    // 40 batches at 10 ms a write at most: well under a second, then quiet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let commits = acker.commits.lock().unwrap().clone();
    stop.cancel();
    run.await.unwrap().unwrap();
    let last = commits.last().expect("a commit");
    assert_eq!(last.1, vec![(0, 400)], "the last position is committed: {commits:?}");
    for pair in commits.windows(2) {
        assert!(pair[1].0 - pair[0].0 >= interval, "commits closer than the interval: {commits:?}");
    }
    assert!(commits.len() < 20, "{} commits for at most 40 writes: the interval gathers them", commits.len());
    // Not left for the idle re-commit (5 s): due when the interval ends.
    assert!(last.0 - started < Duration::from_secs(1), "the last commit waited: {:?}", last.0 - started);
}

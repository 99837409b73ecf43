//! Test helpers shared by the worker's integration suites.
#![allow(dead_code)]

pub mod process;

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::future::BoxFuture;
use sluice_crds::StreamProcessorSpec;
use sluice_worker::{
    message::Message,
    metrics::Metrics,
    pool::{PoolConfig, Snapshots},
    runtime::Runtime,
    sink::{Sink, SinkError},
    source::{Acker, MemoryAcker, Source, SourceError, SourceEvent},
};
use tokio::sync::{Mutex, Semaphore};

/// A source that plays a script, then (optionally) repeats a generator forever.
pub struct ScriptedSource {
    pub events: VecDeque<SourceEvent>,
    pub endless: Option<Box<dyn FnMut(usize) -> Vec<Message> + Send>>,
    pub fetched: Arc<AtomicUsize>,
    pub acker: Arc<MemoryAcker>,
    /// After the script: wait forever (a live source with nothing new) instead of ending.
    pub hang: bool,
}

impl ScriptedSource {
    pub fn new(events: Vec<SourceEvent>) -> Self {
        Self {
            events: events.into(),
            endless: None,
            fetched: Arc::new(AtomicUsize::new(0)),
            acker: Arc::new(MemoryAcker::default()),
            hang: false,
        }
    }
}

impl Source for ScriptedSource {
    fn next(&mut self, max: usize) -> BoxFuture<'_, Result<SourceEvent, SourceError>> {
        Box::pin(async move {
            self.fetched.fetch_add(1, Ordering::SeqCst);
            if let Some(e) = self.events.pop_front() {
                return Ok(e);
            }
            if self.hang {
                futures::future::pending::<()>().await;
            }
            match &mut self.endless {
                Some(f) => Ok(SourceEvent::Batch(f(max))),
                None => Ok(SourceEvent::End),
            }
        })
    }

    fn acker(&self) -> Arc<dyn Acker> {
        self.acker.clone()
    }

    fn kind(&self) -> &'static str {
        "scripted"
    }
}

/// A sink that keeps what it got; each write waits for a permit when gated.
#[derive(Clone)]
pub struct CollectSink {
    pub got: Arc<Mutex<Vec<Message>>>,
    pub gate: Option<Arc<Semaphore>>,
}

impl CollectSink {
    pub fn new() -> Self {
        Self { got: Arc::new(Mutex::new(Vec::new())), gate: None }
    }

    pub fn gated() -> (Self, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        (Self { got: Arc::new(Mutex::new(Vec::new())), gate: Some(gate.clone()) }, gate)
    }

    pub async fn payloads(&self) -> Vec<serde_json::Value> {
        self.got.lock().await.iter().map(|m| m.payload.json().cloned().unwrap_or(serde_json::Value::Null)).collect()
    }
}

impl Sink for CollectSink {
    fn write<'a>(&'a mut self, batch: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            if let Some(g) = &self.gate {
                match g.acquire().await {
                    Ok(p) => p.forget(),
                    Err(_) => return Ok(()),
                }
            }
            self.got.lock().await.extend(batch.iter().cloned());
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        "collect"
    }
}

pub fn spec(v: serde_json::Value) -> StreamProcessorSpec {
    serde_json::from_value(v).expect("test spec")
}

pub fn runtime(workers: usize, snapshots: Option<Snapshots>) -> Runtime {
    Runtime {
        pool: PoolConfig { workers, queue_batches: 1, tick: Duration::from_millis(100), snapshots },
        batch_size: 10,
        sink_attempts: 3,
        metrics: Metrics::new(prometheus::Registry::new()).expect("metrics"),
        ready: Arc::new(AtomicBool::new(false)),
    }
}

pub fn json_msg(partition: i32, offset: i64, v: serde_json::Value) -> Message {
    Message::new(partition, offset, serde_json::to_vec(&v).expect("json"))
}

/// GET `path` from a worker's HTTP address: the status and the body; `None`
/// when it does not answer.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
    Some((status, body))
}

/// A counter's value on a worker's `/metrics` (0 when the series is absent).
pub fn metric(addr: &str, name: &str) -> u64 {
    let (_, body) = http_get(addr, "/metrics").unwrap_or_else(|| panic!("{addr}/metrics does not answer"));
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse::<f64>().ok()))
        .map_or(0, |v| v as u64)
}

/// Polls `addr/readyz` until it answers `code`; the worker must keep running.
pub fn wait_for_readyz(addr: &str, code: u16, worker: &mut process::WorkerProcess) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        worker.assert_running();
        if http_get(addr, "/readyz").map(|(status, _)| status) == Some(code) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never answered {code}; the worker's log:\n{}",
            worker.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

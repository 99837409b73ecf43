//! Engine throughput, one core: generator -> pipeline -> null sink.
//!
//! ```text
//! cargo run --release -p sluice-worker --bin sluice-bench-engine -- [messages]
//! ```
//!
//! Messages are generated first (not timed) as JSON bytes, as a broker would
//! hand them over, then each variant runs on one thread:
//!
//! - `parse only`: serde_json parse of every payload (the floor for any JSON step);
//! - `no steps`: the pipeline with no steps (routing, outputs, accounting);
//! - `filter + keyed tumbling count`: the target workload, 100k keys, memory
//!   state; event time is the sequence number (1 message per ms), so a 10m
//!   window holds 600k messages, about 6 per key;
//! - `naive CEL`: the same work with every expression evaluated by converting
//!   the whole payload and meta into CEL values per message;
//! - `runtime`: the full async path (source task, pool task, sink stage,
//!   offset tracking) on a current-thread runtime, i.e. one core.

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use serde_json::json;
use sluice_crds::{GeneratorSource, StreamProcessorSpec};
use sluice_worker::{
    expr::Expression,
    message::Message,
    metrics::Metrics,
    pipeline::{
        Output, Pipeline, Tally,
        window::{Kind, PartitionWindows, aggregate::Inputs, key::WindowKey, parse_time},
    },
    pool::PoolConfig,
    runtime::Runtime,
    sink::null::NullSink,
    source::{Source, SourceError, SourceEvent},
};

const FILTER: &str = "msg.type != 'ignore' && msg.amount > 0";

fn spec(steps: serde_json::Value) -> StreamProcessorSpec {
    serde_json::from_value(json!({
        "source": {"generator": {"template": {"a": "seq"}}},
        "sink": {"stdout": {}},
        "pipeline": steps,
    }))
    .expect("bench spec")
}

fn workload() -> serde_json::Value {
    json!([
        {"filter": FILTER},
        {"window": {"type": "tumbling", "size": "10m", "keyBy": "msg.customer",
                    "time": {"field": "msg.ts"}, "aggregate": {"count": {}}}}
    ])
}

fn messages(n: usize) -> Vec<Message> {
    let g: GeneratorSource = serde_json::from_value(json!({
        "seed": 7, "keys": 100000, "partitions": 1,
        "template": {"id": "uuid", "customer": "key", "country": "choice(de|fr|us|jp)",
                     "amount": "int(1,500)", "type": "choice(order|order|order|ignore)", "ts": "seq"}
    }))
    .expect("generator spec");
    let mut f = sluice_worker::source::generator::MessageFactory::new(&g).expect("template");
    (0..n).map(|_| f.next_message(0)).collect()
}

/// Wall time and this thread's CPU time: on a shared machine the thread is
/// descheduled part of the time, so CPU time is what "per core" means.
struct Timer {
    wall: Instant,
    cpu: Duration,
}

#[derive(Clone, Copy)]
struct Took {
    wall: Duration,
    cpu: Duration,
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
}

impl Timer {
    fn start() -> Self {
        Self { wall: Instant::now(), cpu: thread_cpu() }
    }

    fn elapsed(&self) -> Took {
        Took { wall: self.wall.elapsed(), cpu: thread_cpu().saturating_sub(self.cpu) }
    }
}

/// Prints msg/s per core (CPU time) and by the wall clock; returns the former.
fn report(name: &str, n: usize, took: Took, baseline: Option<f64>) -> f64 {
    let cpu = took.cpu.max(Duration::from_nanos(1));
    let rate = n as f64 / cpu.as_secs_f64();
    let wall = n as f64 / took.wall.as_secs_f64();
    let ns = cpu.as_nanos() as f64 / n as f64;
    match baseline {
        Some(b) => println!(
            "{name:<34} {rate:>12.0} msg/s/core  {ns:>6.0} ns/msg  {:>5.2}x of target  (wall: {wall:>10.0} msg/s)",
            rate / b
        ),
        None => println!("{name:<34} {rate:>12.0} msg/s/core  {ns:>6.0} ns/msg"),
    }
    rate
}

fn run_pipeline(p: &mut Pipeline, msgs: Vec<Message>) -> (Took, Tally) {
    let mut out: Vec<Output> = Vec::with_capacity(1024);
    let mut tally = Tally::default();
    let t = Timer::start();
    for chunk in msgs.chunks(500) {
        for m in chunk {
            p.process(m.clone(), 0, &mut out, &mut tally);
        }
        out.clear();
    }
    (t.elapsed(), tally)
}

fn clone_cost(msgs: &[Message]) -> Took {
    let t = Timer::start();
    let mut bytes = 0;
    for m in msgs {
        let c = m.clone();
        bytes += c.offset as usize & 1;
    }
    std::hint::black_box(bytes);
    t.elapsed()
}

/// The same work as the target workload, every expression evaluated by the
/// naive whole-payload conversion.
fn naive(msgs: &[Message]) -> Took {
    let filter = Expression::parse(FILTER).expect("filter");
    let key = Expression::parse("msg.customer").expect("key");
    let time = Expression::parse("msg.ts").expect("time");
    let mut w = PartitionWindows::new(Kind::Tumbling { size: 600_000 }, 0);
    let mut fired = Vec::new();
    let t = Timer::start();
    for m in msgs {
        let m = m.clone();
        if filter.eval_naive(&m).ok() != Some(serde_json::Value::Bool(true)) {
            continue;
        }
        let (Ok(k), Ok(ts)) = (key.eval_naive(&m), time.eval_naive(&m)) else { continue };
        let Some(ts) = parse_time(&ts) else { continue };
        w.add(&WindowKey::from_json(&k), ts, &Inputs::default(), &mut fired);
        fired.clear();
    }
    t.elapsed()
}

struct Prebuilt(Vec<Vec<Message>>, bool);

impl Source for Prebuilt {
    fn next(&mut self, _max: usize) -> futures::future::BoxFuture<'_, Result<SourceEvent, SourceError>> {
        Box::pin(async move {
            if !self.1 {
                self.1 = true;
                return Ok(SourceEvent::Assigned(vec![0]));
            }
            Ok(self.0.pop().map_or(SourceEvent::End, SourceEvent::Batch))
        })
    }
    fn acker(&self) -> Arc<dyn sluice_worker::source::Acker> {
        Arc::new(sluice_worker::source::MemoryAcker::default())
    }
    fn kind(&self) -> &'static str {
        "prebuilt"
    }
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    // `workload` as a second argument runs the target workload alone (for perf).
    let only_workload = std::env::args().nth(2).is_some_and(|a| a == "workload");
    eprintln!("generating {n} messages (not timed)...");
    let msgs = messages(n);
    let target = 1_000_000.0;
    println!("engine, one core, {n} messages, 100k keys, payload ~{} bytes", msgs[0].payload.to_bytes().len());
    if only_workload {
        let mut p = Pipeline::compile(&spec(workload())).expect("workload");
        let (took, _) = run_pipeline(&mut p, msgs);
        report("filter + keyed tumbling count", n, took, Some(target));
        return;
    }
    let clone = clone_cost(&msgs);
    report("clone message (harness cost)", n, clone, None);

    let t = Timer::start();
    let mut ok = 0usize;
    for m in &msgs {
        ok += usize::from(serde_json::from_slice::<serde_json::Value>(&m.payload.to_bytes()).is_ok());
    }
    std::hint::black_box(ok);
    report("parse only (serde_json::Value)", n, t.elapsed(), Some(target));

    let (took, _) = run_pipeline(&mut Pipeline::compile(&spec(json!([]))).expect("empty"), msgs.clone());
    report("no steps", n, took, Some(target));

    let (took, _) =
        run_pipeline(&mut Pipeline::compile(&spec(json!([{"filter": FILTER}]))).expect("filter"), msgs.clone());
    report("filter (fast path)", n, took, Some(target));

    let mut p = Pipeline::compile(&spec(workload())).expect("workload");
    let (took, tally) = run_pipeline(&mut p, msgs.clone());
    let engine = report("filter + keyed tumbling count", n, took, Some(target));
    eprintln!(
        "  (filtered {}, windowed {}, windows emitted {})",
        tally.filtered, tally.windowed, tally.windows_emitted
    );

    let took = naive(&msgs);
    let slow = report("same, naive CEL (whole payload)", n, took, Some(target));
    println!("fast path speed-up over naive CEL: {:.1}x", engine / slow);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let batches: Vec<Vec<Message>> = msgs.chunks(500).rev().map(<[Message]>::to_vec).collect();
    let took = rt.block_on(async {
        let runtime = Runtime {
            pool: PoolConfig { workers: 1, queue_batches: 4, tick: Duration::from_millis(100), snapshots: None },
            batch_size: 500,
            sink_attempts: 1,
            metrics: Metrics::new(prometheus::Registry::new()).expect("metrics"),
            ready: Arc::new(AtomicBool::new(false)),
        };
        let t = Timer::start();
        let p = Pipeline::compile(&spec(workload())).expect("workload");
        let r = runtime
            .run(
                Box::new(Prebuilt(batches, false)),
                p,
                Box::new(NullSink::default()),
                Box::new(NullSink::default()),
                tokio_util::sync::CancellationToken::new(),
            )
            .await;
        if let Err(e) = r {
            eprintln!("runtime failed: {e}");
        }
        t.elapsed()
    });
    report("runtime: source->pool->null sink", n, took, Some(target));
}

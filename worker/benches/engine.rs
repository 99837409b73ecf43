//! Criterion benches for the engine's hot paths:
//!
//! ```text
//! cargo bench -p sluice-worker --bench engine
//! ```
//!
//! - `cel_filter/*`: one filter expression on a parsed payload: the direct
//!   evaluator, the CEL interpreter fed only the fields it reads, and the
//!   naive whole-payload conversion;
//! - `map`: a map step (CEL string function + arithmetic) including the
//!   payload parse and the edit;
//! - `tumbling_count_100k_keys`: a keyed tumbling count window step over
//!   100k keys (parse, key, event time, state update, firing).

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;
use sluice_worker::{
    expr::Expression,
    message::Message,
    pipeline::{Output, Pipeline, Tally},
    source::generator::MessageFactory,
};

fn messages(n: usize) -> Vec<Message> {
    let g = serde_json::from_value(json!({
        "seed": 7, "keys": 100000, "partitions": 1,
        "template": {"id": "uuid", "customer": "key", "country": "choice(de|fr|us|jp)",
                     "amount": "int(1,500)", "type": "choice(order|order|order|ignore)", "ts": "seq"}
    }))
    .expect("generator spec");
    let mut f = MessageFactory::new(&g).expect("template");
    (0..n).map(|_| f.next_message(0)).collect()
}

fn pipeline(steps: serde_json::Value) -> Pipeline {
    let spec = serde_json::from_value(json!({
        "source": {"generator": {"template": {"a": "seq"}}}, "sink": {"stdout": {}}, "pipeline": steps
    }))
    .expect("spec");
    Pipeline::compile(&spec).expect("pipeline")
}

fn cel_filter(c: &mut Criterion) {
    let msgs = messages(1024);
    for m in &msgs {
        let _ = m.payload.json();
    }
    let e = Expression::parse("msg.type != 'ignore' && msg.amount > 0").expect("expr");
    let mut g = c.benchmark_group("cel_filter");
    g.throughput(Throughput::Elements(msgs.len() as u64));
    g.bench_function("fast_path", |b| b.iter(|| msgs.iter().filter(|m| e.eval_bool(m).unwrap_or(false)).count()));
    g.bench_function("cel_only_fields_read", |b| {
        b.iter(|| msgs.iter().filter(|m| e.eval_cel(m.payload.json().ok(), m).is_ok_and(|v| v == true)).count())
    });
    g.bench_function("cel_whole_payload", |b| {
        b.iter(|| msgs.iter().filter(|m| e.eval_naive(m).is_ok_and(|v| v == true)).count())
    });
    g.finish();
}

fn run(p: &mut Pipeline, msgs: Vec<Message>) -> usize {
    let mut out: Vec<Output> = Vec::with_capacity(msgs.len() + 16);
    let mut tally = Tally::default();
    for m in msgs {
        p.process(m, 0, &mut out, &mut tally);
    }
    out.len()
}

fn map(c: &mut Criterion) {
    let msgs = messages(1024);
    let mut p = pipeline(json!([{"map": {
        "set": {"country": "msg.country.upperAscii()", "amountEur": "double(msg.amount) * 0.92"},
        "drop": ["type"]}}]));
    let mut g = c.benchmark_group("map");
    g.throughput(Throughput::Elements(msgs.len() as u64));
    g.bench_function("set_two_drop_one", |b| {
        b.iter_batched(|| msgs.clone(), |m| run(&mut p, m), BatchSize::LargeInput)
    });
    g.finish();
}

fn tumbling(c: &mut Criterion) {
    let msgs = messages(200_000);
    let mut p = pipeline(json!([{"window": {"type": "tumbling", "size": "10m", "keyBy": "msg.customer",
        "time": {"field": "msg.ts"}, "aggregate": {"count": {}}}}]));
    let mut g = c.benchmark_group("tumbling_count_100k_keys");
    g.sample_size(10);
    g.throughput(Throughput::Elements(msgs.len() as u64));
    g.bench_function("memory_state", |b| b.iter_batched(|| msgs.clone(), |m| run(&mut p, m), BatchSize::LargeInput));
    g.finish();
}

criterion_group!(benches, cel_filter, map, tumbling);
criterion_main!(benches);

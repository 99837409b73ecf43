//! The pipeline end to end, and what bad input does to it.

use serde_json::json;

use super::*;

fn spec(pipeline: serde_json::Value) -> StreamProcessorSpec {
    serde_json::from_value(json!({
        "source": {"generator": {"template": {"a": "seq"}}},
        "sink": {"stdout": {}},
        "pipeline": pipeline,
    }))
    .unwrap()
}

fn msg(offset: i64, payload: &str) -> Message {
    Message::new(0, offset, payload.as_bytes().to_vec())
}

#[test]
fn filter_map_and_window_account_for_every_offset() {
    let mut p = Pipeline::compile(&spec(json!([
        {"filter": "msg.type != 'ignore' && msg.amount > 0"},
        {"map": {"set": {"country": "msg.country.upperAscii()"}, "drop": ["type"]}},
        {"window": {"type": "count", "count": 2, "keyBy": "msg.country", "aggregate": {"count": {}, "sum": "msg.amount"}}}
    ])))
    .unwrap();
    assert!(p.is_stateful());
    let mut out = Vec::new();
    let mut tally = Tally::default();
    let inputs = [
        r#"{"type":"order","amount":5,"country":"de"}"#,
        r#"{"type":"ignore","amount":5,"country":"de"}"#,
        r#"{"type":"order","amount":7,"country":"de"}"#,
        r#"{"type":"order","amount":1,"country":"fr"}"#,
    ];
    for (i, text) in inputs.iter().enumerate() {
        p.process(msg(i as i64, text), 0, &mut out, &mut tally);
    }
    p.flush(0, &mut out, &mut tally);
    let acked: Vec<i64> = out
        .iter()
        .filter_map(|o| match o {
            Output::Done(a) => Some(a.offset),
            Output::Deliver(_, Some(a)) => Some(a.offset),
            _ => None,
        })
        .collect();
    assert_eq!(acked, vec![0, 1, 2, 3]);
    let records: Vec<serde_json::Value> = out
        .iter()
        .filter_map(|o| match o {
            Output::Deliver(m, None) => Some(m.payload.json().unwrap().clone()),
            _ => None,
        })
        .collect();
    assert_eq!(records, vec![json!({"key": "DE", "count": 2, "sum": 12}), json!({"key": "FR", "count": 1, "sum": 1})]);
    assert_eq!((tally.filtered, tally.windowed, tally.windows_emitted), (1, 3, 2));
}

#[test]
fn bad_input_is_dead_lettered_with_error_and_step_and_the_rest_flows() {
    let mut p = Pipeline::compile(&spec(json!([
        {"filter": "msg.amount > 0"},
        {"name": "enrich", "map": {"set": {"eur": "double(msg.amount) * 0.92"}}},
        {"window": {"type": "tumbling", "size": "10s", "time": {"field": "msg.ts"}, "aggregate": {"count": {}}}}
    ])))
    .unwrap();
    let inputs = [
        (r#"{"amount": 1, "ts": 1}"#, None),
        ("{not json", Some(("bad_payload", "pipeline[0].filter"))),
        (r#"{"ts": 2}"#, Some(("expression", "pipeline[0].filter"))),
        (r#"{"amount": "x", "ts": 2}"#, Some(("expression", "pipeline[0].filter"))),
        (r#"[1, 2]"#, Some(("expression", "pipeline[0].filter"))),
        (r#"{"amount": 2, "ts": "later"}"#, Some(("event_time", "pipeline[2].window"))),
        (r#"{"amount": 3, "ts": 20000}"#, None),
        (r#"{"amount": 4, "ts": 5}"#, Some(("late", "pipeline[2].window"))),
        (r#"{"amount": 5, "ts": 20001}"#, None),
    ];
    let mut out = Vec::new();
    let mut tally = Tally::default();
    for (i, (text, _)) in inputs.iter().enumerate() {
        p.process(msg(i as i64, text), 0, &mut out, &mut tally);
    }
    let mut dead = Vec::new();
    for o in &out {
        if let Output::DeadLetter(d) = o {
            dead.push((d.ack.unwrap().offset, d.reason, d.step.clone(), d.error.clone()));
        }
    }
    let want: Vec<(i64, &str, String)> =
        inputs.iter().enumerate().filter_map(|(i, (_, w))| w.map(|(r, s)| (i as i64, r, s.to_string()))).collect();
    assert_eq!(dead.iter().map(|d| (d.0, d.1, d.2.clone())).collect::<Vec<_>>(), want);
    assert!(dead.iter().all(|d| !d.3.is_empty()));
    assert_eq!(tally.dead_letters(), 6);
    assert_eq!(tally.late, 1);
    assert_eq!(tally.windows_emitted, 1, "[0,10s) fired with the good events only");
    let dl = out
        .into_iter()
        .find_map(|o| match o {
            Output::DeadLetter(d) => Some(d.into_message()),
            _ => None,
        })
        .unwrap();
    assert_eq!(dl.header(crate::deadletter::HEADER_STEP), Some(&b"pipeline[0].filter"[..]));
    assert_eq!(dl.header(crate::deadletter::HEADER_OFFSET), Some(&b"1"[..]));
    assert_eq!(dl.header(crate::deadletter::HEADER_PARTITION), Some(&b"0"[..]));
    assert_eq!(dl.header(crate::deadletter::HEADER_REASON), Some(&b"bad_payload"[..]));
    assert_eq!(&*dl.payload.to_bytes(), b"{not json", "the original bytes go to the dead letter");
}

#[test]
fn a_pass_through_pipeline_never_parses_the_payload() {
    let mut p = Pipeline::compile(&spec(json!([{"filter": "meta.partition == 0"}]))).unwrap();
    let mut out = Vec::new();
    p.process(msg(0, "{not json at all"), 0, &mut out, &mut Tally::default());
    match &out[0] {
        Output::Deliver(m, _) => assert!(!m.payload.is_parsed()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn projection_only_when_nothing_else_reads_the_payload() {
    let p = Pipeline::compile(&spec(json!([
        {"filter": "msg.type != 'x'"},
        {"window": {"type": "count", "count": 2, "keyBy": "msg.k", "aggregate": {"sum": "msg.v"}}}
    ])))
    .unwrap();
    assert_eq!(p.projection(), Some(&["type".to_string(), "k".to_string(), "v".to_string()][..]));
    let with_map = Pipeline::compile(&spec(json!([{"filter": "msg.a > 1"}, {"map": {"drop": ["b"]}}]))).unwrap();
    assert_eq!(with_map.projection(), None);
    let whole = Pipeline::compile(&spec(json!([{"filter": "size(msg) > 1"}]))).unwrap();
    assert_eq!(whole.projection(), None);
}

#[test]
fn processing_time_windows_fire_on_the_clock() {
    let mut p = Pipeline::compile(&spec(json!([
        {"window": {"type": "tumbling", "size": "1s", "aggregate": {"count": {}}}}
    ])))
    .unwrap();
    let mut out = Vec::new();
    let mut tally = Tally::default();
    p.process(msg(0, "{}"), 500, &mut out, &mut tally);
    p.process(msg(1, "{}"), 700, &mut out, &mut tally);
    p.tick(999, &mut out, &mut tally);
    assert_eq!(tally.windows_emitted, 0);
    p.tick(1000, &mut out, &mut tally);
    let records: Vec<serde_json::Value> = out
        .iter()
        .filter_map(|o| match o {
            Output::Deliver(m, None) => Some(m.payload.json().unwrap().clone()),
            _ => None,
        })
        .collect();
    assert_eq!(records, vec![json!({"key": null, "start": 0, "end": 1000, "count": 2})]);
    assert!(!msg(2, "{}").payload.is_parsed());
}

#[test]
fn dedupe_state_is_stateful_and_snapshotted_like_windows() {
    let mut p = Pipeline::compile(&spec(json!([{"dedupe": {"key": "msg.id", "ttl": "1h"}}]))).unwrap();
    let mut out = Vec::new();
    let mut tally = Tally::default();
    assert!(p.stateful_partitions().is_empty());
    for (offset, partition) in [(0, 3), (1, 5), (2, 3)] {
        let m = Message::new(partition, offset, format!(r#"{{"id":{offset}}}"#).into_bytes());
        p.process(m, 0, &mut out, &mut tally);
    }
    // The periodic snapshot saves every partition this list names: a
    // dedupe-only pipeline's ids were saved only when a partition was revoked.
    assert_eq!(p.stateful_partitions(), vec![3, 5]);
    let snaps = p.snapshot(3);
    assert_eq!(snaps.len(), 1, "the dedupe step's ids for partition 3");
    let mut restored = Pipeline::compile(&spec(json!([{"dedupe": {"key": "msg.id", "ttl": "1h"}}]))).unwrap();
    restored.restore(3, snaps[0].0, &snaps[0].1).unwrap();
    let mut again = Vec::new();
    restored.process(Message::new(3, 7, br#"{"id":2}"#.to_vec()), 0, &mut again, &mut tally);
    assert!(!again.iter().any(|o| matches!(o, Output::Deliver(..))), "a restored id is a duplicate: {again:?}");
}

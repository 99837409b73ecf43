//! The window semantics of DESIGN.md, as examples and as properties checked
//! against naive models that recompute everything from the accepted events.
#![allow(clippy::type_complexity)] // the models use plain tuples on purpose

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

fn key(k: u8) -> WindowKey {
    WindowKey::Str(key::KeyStr::new(&format!("k{k}")))
}

fn inputs(v: i64) -> Inputs {
    Inputs { sum: Some(json!(v)), first: Some(json!(v)), last: Some(json!(v)), ..Default::default() }
}

const WANTED: Wanted = Wanted {
    count: true,
    sum: true,
    first: true,
    last: true,
    min: false,
    max: false,
    avg: false,
    distinct_count: false,
};

/// (key, start, end, count, sum, first, last)
type Row = (WindowKey, Option<i64>, Option<i64>, u64, i64, i64, i64);

fn row(f: &Fired) -> Row {
    let v = f.to_json(&WANTED);
    (
        f.key.clone(),
        f.start,
        f.end,
        f.acc.count,
        v["sum"].as_i64().unwrap(),
        v["first"].as_i64().unwrap(),
        v["last"].as_i64().unwrap(),
    )
}

/// Run events (key, ts, value) through the real operator: emitted rows in
/// order, and how many events were late.
fn run(kind: Kind, lateness: i64, events: &[(u8, i64, i64)]) -> (Vec<Row>, usize) {
    let mut w = PartitionWindows::new(kind, lateness);
    let mut out = Vec::new();
    let mut late = 0;
    for (k, ts, v) in events {
        if w.add(&key(*k), *ts, &inputs(*v), &mut out) == Admit::Late {
            late += 1;
        }
    }
    w.flush(&mut out);
    (out.iter().map(row).collect(), late)
}

fn ts_list(kind: Kind, lateness: i64, events: &[(u8, i64)]) -> Vec<(String, Option<i64>, Option<i64>, u64)> {
    let ev: Vec<(u8, i64, i64)> = events.iter().map(|(k, t)| (*k, *t, 1)).collect();
    run(kind, lateness, &ev)
        .0
        .into_iter()
        .map(|r| (serde_json::to_string(&r.0.to_json()).unwrap(), r.1, r.2, r.3))
        .collect()
}

// ------------------------------------------------------------ examples --

#[test]
fn tumbling_fires_when_the_watermark_reaches_the_end() {
    let mut w = PartitionWindows::new(Kind::Tumbling { size: 10 }, 2);
    let mut out = Vec::new();
    assert_eq!(w.add(&key(0), 3, &inputs(1), &mut out), Admit::Accepted);
    assert_eq!(w.add(&key(0), 11, &inputs(1), &mut out), Admit::Accepted);
    assert!(out.is_empty(), "watermark 9 < end 10");
    assert_eq!(w.add(&key(0), 12, &inputs(1), &mut out), Admit::Accepted);
    assert_eq!(out.len(), 1, "watermark 10 >= end 10");
    assert_eq!((out[0].start, out[0].end, out[0].acc.count), (Some(0), Some(10), 1));
    assert_eq!(w.add(&key(0), 9, &inputs(1), &mut out), Admit::Late);
    assert_eq!(w.watermark(), Some(10), "late events never move the watermark");
}

#[test]
fn tumbling_ts_equal_to_end_goes_to_the_next_window() {
    let rows = ts_list(Kind::Tumbling { size: 10 }, 0, &[(0, 0), (0, 10), (0, 19), (0, 20)]);
    assert_eq!(
        rows,
        vec![
            ("\"k0\"".into(), Some(0), Some(10), 1),
            ("\"k0\"".into(), Some(10), Some(20), 2),
            ("\"k0\"".into(), Some(20), Some(30), 1)
        ]
    );
}

#[test]
fn emission_order_is_end_start_key() {
    let rows = ts_list(Kind::Sliding { size: 10, slide: 5 }, 100, &[(1, 7), (0, 7), (2, 1)]);
    let order: Vec<(Option<i64>, Option<i64>, String)> = rows.into_iter().map(|r| (r.2, r.1, r.0)).collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted);
    assert_eq!(order.len(), 6, "(-5,5) k2; (0,10) k0 k1 k2; (5,15) k0 k1: {order:?}");
}

#[test]
fn sliding_late_only_if_all_windows_fired() {
    let mut w = PartitionWindows::new(Kind::Sliding { size: 10, slide: 5 }, 0);
    let mut out = Vec::new();
    w.add(&key(0), 15, &inputs(1), &mut out); // wm 15: [0,10) and [5,15) fired (empty)
    assert_eq!(w.add(&key(0), 12, &inputs(5), &mut out), Admit::Accepted, "[10,20) is open");
    assert_eq!(w.add(&key(0), 9, &inputs(1), &mut out), Admit::Late, "[0,10) and [5,15) fired");
    w.flush(&mut out);
    let rows: Vec<Row> = out.iter().map(row).collect();
    assert_eq!(rows[0].1, Some(10));
    assert_eq!((rows[0].3, rows[0].4), (2, 6), "12 joined only the open window");
}

#[test]
fn sessions_bridge_merge_and_extend_backwards() {
    let gap = 10;
    let rows = ts_list(Kind::Session { gap }, 100, &[(0, 0), (0, 18), (0, 9)]);
    assert_eq!(rows, vec![("\"k0\"".into(), Some(0), Some(28), 3)], "9 bridges [0,10) and [18,28)");
    let rows = ts_list(Kind::Session { gap }, 100, &[(0, 0), (0, 25), (0, 12), (0, 5)]);
    assert_eq!(
        rows,
        vec![("\"k0\"".into(), Some(0), Some(22), 3), ("\"k0\"".into(), Some(25), Some(35), 1)],
        "5 merges [0,10) and [12,22); 25 stays apart (13 >= gap)"
    );
    let rows = ts_list(Kind::Session { gap }, 100, &[(0, 20), (0, 15)]);
    assert_eq!(rows, vec![("\"k0\"".into(), Some(15), Some(30), 2)], "extended backwards");
    let rows = ts_list(Kind::Session { gap }, 100, &[(0, 0), (0, 10)]);
    assert_eq!(rows.len(), 2, "exactly gap apart starts a new session");
}

#[test]
fn session_late_rules() {
    let mut w = PartitionWindows::new(Kind::Session { gap: 10 }, 0);
    let mut out = Vec::new();
    w.add(&key(0), 0, &inputs(1), &mut out);
    w.add(&key(0), 30, &inputs(1), &mut out); // wm 30 fires [0,10)
    assert_eq!(out.len(), 1);
    assert_eq!(w.add(&key(0), 20, &inputs(1), &mut out), Admit::Late, "wm 30 >= 20 + 10");
    assert_eq!(w.add(&key(0), 21, &inputs(1), &mut out), Admit::Accepted, "joins [30,40)");
    assert_eq!(w.add(&key(1), 5, &inputs(1), &mut out), Admit::Late, "wm >= 5 + gap");
    let mut w = PartitionWindows::new(Kind::Session { gap: 10 }, 100);
    w.add(&key(0), 0, &inputs(1), &mut out);
    w.add(&key(0), 200, &inputs(1), &mut out); // wm 100 fires [0,10) of k0
    assert_eq!(w.add(&key(0), 5, &inputs(1), &mut out), Admit::Late, "before the end of k0's last fired session");
    assert_eq!(w.add(&key(1), 95, &inputs(1), &mut out), Admit::Accepted, "k1 has fired nothing; wm 100 < 105");
}

#[test]
fn session_keys_are_forgotten_once_late_by_the_gap_rule() {
    let mut w = PartitionWindows::new(Kind::Session { gap: 10 }, 0);
    let mut out = Vec::new();
    for k in 0..50u8 {
        w.add(&key(k), i64::from(k), &inputs(1), &mut out);
    }
    w.add(&key(200), 1000, &inputs(1), &mut out);
    assert_eq!(out.len(), 50);
    let Store::Session(s) = &w.store else { panic!() };
    assert_eq!(s.keys(), 1, "only the open key is remembered");
    assert_eq!(w.add(&key(3), 5, &inputs(1), &mut out), Admit::Late, "still late after forgetting");
}

#[test]
fn count_windows_emit_at_n_and_flush_partials() {
    let rows = ts_list(Kind::Count { n: 2 }, 0, &[(1, 0), (0, 0), (1, 0), (0, 0), (0, 0), (1, 0)]);
    assert_eq!(
        rows,
        vec![
            ("\"k1\"".into(), None, None, 2),
            ("\"k0\"".into(), None, None, 2),
            ("\"k0\"".into(), None, None, 1),
            ("\"k1\"".into(), None, None, 1)
        ]
    );
}

#[test]
fn snapshots_round_trip() {
    for kind in [
        Kind::Tumbling { size: 10 },
        Kind::Sliding { size: 10, slide: 5 },
        Kind::Session { gap: 5 },
        Kind::Count { n: 3 },
    ] {
        let events: Vec<(u8, i64, i64)> = (0..20).map(|i| ((i % 3) as u8, (i * 7) % 40, i)).collect();
        let (half, rest) = events.split_at(10);
        let mut w = PartitionWindows::new(kind, 15);
        let mut out = Vec::new();
        for (k, ts, v) in half {
            w.add(&key(*k), *ts, &inputs(*v), &mut out);
        }
        let snap = w.snapshot().unwrap();
        let mut restored = PartitionWindows::restore(kind, 15, &snap).unwrap();
        let mut out2 = out.clone();
        for (k, ts, v) in rest {
            w.add(&key(*k), *ts, &inputs(*v), &mut out);
            restored.add(&key(*k), *ts, &inputs(*v), &mut out2);
        }
        w.flush(&mut out);
        restored.flush(&mut out2);
        assert_eq!(out, out2, "{kind:?}");
    }
}

#[test]
fn event_times_parse_from_numbers_and_rfc3339() {
    assert_eq!(parse_time(&json!(1_700_000_000_123i64)), Some(1_700_000_000_123));
    assert_eq!(parse_time(&json!(1.9)), Some(1));
    assert_eq!(parse_time(&json!("1970-01-01T00:00:01.234567Z")), Some(1234), "sub-ms truncated");
    assert_eq!(parse_time(&json!("2023-11-14T22:13:20+01:00")), Some(1_699_996_400_000));
    assert_eq!(parse_time(&json!("yesterday")), None);
    assert_eq!(parse_time(&json!(true)), None);
    assert_eq!(parse_time(&json!(1e300)), None);
}

// ------------------------------------------------------ naive models --

/// Accepted events are kept whole; windows are recomputed from them.
struct Model {
    kind: Kind,
    lateness: i64,
    max_ts: Option<i64>,
    /// (key, ts, seq, value, windows it joined: (start, end))
    events: Vec<(u8, i64, u64, i64, Vec<(i64, i64)>)>,
    emitted: Vec<(u8, i64, i64)>,
    last_fired_end: BTreeMap<u8, i64>,
    out: Vec<Row>,
    seq: u64,
    late: usize,
}

impl Model {
    fn wm(&self) -> Option<i64> {
        self.max_ts.map(|m| m - self.lateness)
    }

    fn rowof(k: u8, start: Option<i64>, end: Option<i64>, evs: &[(i64, u64, i64)]) -> Row {
        let first = evs.iter().min_by_key(|e| (e.0, e.1)).unwrap().2;
        let last = evs.iter().max_by_key(|e| (e.0, e.1)).unwrap().2;
        (key(k), start, end, evs.len() as u64, evs.iter().map(|e| e.2).sum(), first, last)
    }

    /// Sessions of one key from its remaining events: sort, split where a step >= gap.
    fn sessions(&self, gap: i64) -> Vec<(u8, i64, i64, Vec<(i64, u64, i64)>)> {
        let mut by_key: BTreeMap<u8, Vec<(i64, u64, i64)>> = BTreeMap::new();
        for (k, ts, seq, v, _) in &self.events {
            by_key.entry(*k).or_default().push((*ts, *seq, *v));
        }
        let mut all = Vec::new();
        for (k, mut evs) in by_key {
            evs.sort();
            let mut cur: Vec<(i64, u64, i64)> = Vec::new();
            for e in evs {
                if let Some(prev) = cur.last()
                    && e.0 - prev.0 >= gap
                {
                    let c = std::mem::take(&mut cur);
                    all.push((k, c[0].0, c.last().unwrap().0 + gap, c));
                }
                cur.push(e);
            }
            if !cur.is_empty() {
                all.push((k, cur[0].0, cur.last().unwrap().0 + gap, cur));
            }
        }
        all
    }

    fn windows_of(&self, ts: i64) -> Vec<(i64, i64)> {
        match self.kind {
            Kind::Tumbling { size } => {
                let mut s = ts - ts.rem_euclid(size);
                // deliberately not div_euclid: walk down to the aligned start
                while s > ts {
                    s -= size;
                }
                vec![(s, s + size)]
            }
            Kind::Sliding { size, slide } => {
                let mut v = Vec::new();
                let mut k = (ts - size - slide).div_euclid(slide);
                while k * slide <= ts {
                    if k * slide <= ts && ts < k * slide + size {
                        v.push((k * slide, k * slide + size));
                    }
                    k += 1;
                }
                v
            }
            _ => vec![],
        }
    }

    fn add(&mut self, k: u8, ts: i64, v: i64) {
        let wm = self.wm();
        match self.kind {
            Kind::Count { n } => {
                self.events.push((k, ts, self.seq, v, vec![]));
                self.seq += 1;
                let mine: Vec<(i64, u64, i64)> =
                    self.events.iter().filter(|e| e.0 == k).map(|e| (e.1, e.2, e.3)).collect();
                if mine.len() as u64 == n {
                    self.out.push(Self::rowof(k, None, None, &mine));
                    self.events.retain(|e| e.0 != k);
                }
                return;
            }
            Kind::Session { gap } => {
                let late = wm.is_some_and(|wm| wm >= ts + gap) || self.last_fired_end.get(&k).is_some_and(|e| ts < *e);
                if late {
                    self.late += 1;
                    return;
                }
                self.events.push((k, ts, self.seq, v, vec![]));
            }
            _ => {
                let open: Vec<(i64, i64)> =
                    self.windows_of(ts).into_iter().filter(|w| wm.is_none_or(|wm| w.1 > wm)).collect();
                if open.is_empty() {
                    self.late += 1;
                    return;
                }
                self.events.push((k, ts, self.seq, v, open));
            }
        }
        self.seq += 1;
        self.max_ts = Some(self.max_ts.map_or(ts, |m| m.max(ts)));
        self.fire(self.wm());
    }

    /// Emit every window with end <= wm (all with `None`), sorted by (end, start, key).
    fn fire(&mut self, wm: Option<i64>) {
        let due = |end: i64| wm.is_none_or(|wm| end <= wm);
        let mut fired: Vec<(i64, i64, u8, Vec<(i64, u64, i64)>)> = Vec::new();
        match self.kind {
            Kind::Count { .. } => {
                let mut by_key: BTreeMap<u8, Vec<(i64, u64, i64)>> = BTreeMap::new();
                for e in self.events.drain(..) {
                    by_key.entry(e.0).or_default().push((e.1, e.2, e.3));
                }
                for (k, evs) in by_key {
                    self.out.push(Self::rowof(k, None, None, &evs));
                }
                return;
            }
            Kind::Session { gap } => {
                for (k, start, end, evs) in self.sessions(gap) {
                    if due(end) {
                        fired.push((end, start, k, evs));
                    }
                }
                let gone: Vec<(u8, i64)> = fired.iter().flat_map(|f| f.3.iter().map(move |e| (f.2, e.0))).collect();
                self.events.retain(|e| !gone.contains(&(e.0, e.1)));
                for f in &fired {
                    let e = self.last_fired_end.entry(f.2).or_insert(f.0);
                    *e = (*e).max(f.0);
                }
            }
            _ => {
                let mut windows: BTreeMap<(i64, i64, u8), Vec<(i64, u64, i64)>> = BTreeMap::new();
                for (k, ts, seq, v, joined) in &self.events {
                    for (s, e) in joined {
                        if due(*e) && !self.emitted.contains(&(*k, *s, *e)) {
                            windows.entry((*e, *s, *k)).or_default().push((*ts, *seq, *v));
                        }
                    }
                }
                for ((e, s, k), evs) in windows {
                    self.emitted.push((k, s, e));
                    fired.push((e, s, k, evs));
                }
            }
        }
        fired.sort_by_key(|f| (f.0, f.1, f.2));
        for (e, s, k, evs) in fired {
            self.out.push(Self::rowof(k, Some(s), Some(e), &evs));
        }
    }

    fn run(kind: Kind, lateness: i64, events: &[(u8, i64, i64)]) -> (Vec<Row>, usize) {
        let mut m = Model {
            kind,
            lateness,
            max_ts: None,
            events: vec![],
            emitted: vec![],
            last_fired_end: BTreeMap::new(),
            out: vec![],
            seq: 0,
            late: 0,
        };
        for (k, ts, v) in events {
            m.add(*k, *ts, *v);
        }
        m.fire(None);
        (m.out, m.late)
    }
}

fn events() -> impl Strategy<Value = Vec<(u8, i64, i64)>> {
    prop::collection::vec((0u8..3, -20i64..120, -5i64..50), 0..40)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Open windows hold back exactly the oldest offset they contain; every
    /// hold is released once everything has fired.
    #[test]
    fn held_offset_is_the_oldest_in_an_open_window(size in 1i64..30, lateness in 0i64..25, ev in events(), kind in 0u8..4) {
        let kind = match kind {
            0 => Kind::Tumbling { size },
            1 => Kind::Sliding { size, slide: (size / 2).max(1) },
            2 => Kind::Session { gap: size },
            _ => Kind::Count { n: 3 },
        };
        let mut w = PartitionWindows::new(kind, lateness);
        let mut out = Vec::new();
        // (offset, windows or key it is in) for accepted events
        let mut open: Vec<(i64, u8, Vec<(i64, i64)>)> = Vec::new();
        for (i, (k, ts, v)) in ev.iter().enumerate() {
            let before = out.len();
            let inputs = Inputs { offset: Some(i as i64), ..inputs(*v) };
            if w.add(&key(*k), *ts, &inputs, &mut out) == Admit::Accepted {
                open.push((i as i64, *k, vec![]));
            }
            prop_assert!(out[before..].iter().all(|f| f.acc.first_offset.is_some()));
            if let Kind::Tumbling { size } = kind {
                let wm = w.watermark();
                let held = ev.iter().enumerate()
                    .filter(|(i, _)| open.iter().any(|o| o.0 == *i as i64))
                    .filter(|(_, (_, ts, _))| wm.is_none_or(|wm| tumbling::assign(*ts, size).1 > wm))
                    .map(|(i, _)| i as i64)
                    .min();
                prop_assert_eq!(w.held(), held);
            } else if let Some(h) = w.held() {
                prop_assert!(open.iter().any(|o| o.0 == h), "held {} is an accepted offset", h);
            }
        }
        w.flush(&mut out);
        prop_assert_eq!(w.held(), None);
        let mut replay = Vec::new();
        let last = ev.len() as i64 - 1;
        if last >= 0 && !open.is_empty() {
            let inputs = Inputs { offset: Some(open[0].0), ..inputs(1) };
            prop_assert_eq!(w.add(&key(0), 0, &inputs, &mut replay), Admit::Replayed, "offsets already taken in are not added twice");
        }
    }

    #[test]
    fn tumbling_matches_the_model(size in 1i64..30, lateness in 0i64..25, ev in events()) {
        let kind = Kind::Tumbling { size };
        prop_assert_eq!(run(kind, lateness, &ev), Model::run(kind, lateness, &ev));
    }

    #[test]
    fn sliding_matches_the_model(size in 1i64..30, slide_frac in 1i64..=30, lateness in 0i64..25, ev in events()) {
        let slide = (slide_frac % size).max(1);
        let kind = Kind::Sliding { size, slide };
        prop_assert_eq!(run(kind, lateness, &ev), Model::run(kind, lateness, &ev));
    }

    #[test]
    fn session_matches_the_model(gap in 1i64..25, lateness in 0i64..25, ev in events()) {
        let kind = Kind::Session { gap };
        prop_assert_eq!(run(kind, lateness, &ev), Model::run(kind, lateness, &ev));
    }

    #[test]
    fn count_matches_the_model(n in 1u64..5, ev in events()) {
        let kind = Kind::Count { n };
        prop_assert_eq!(run(kind, 0, &ev), Model::run(kind, 0, &ev));
    }

    /// Every accepted event is counted exactly once per window it joined.
    #[test]
    fn tumbling_conserves_events(size in 1i64..30, lateness in 0i64..25, ev in events()) {
        let (rows, late) = run(Kind::Tumbling { size }, lateness, &ev);
        prop_assert_eq!(rows.iter().map(|r| r.3 as usize).sum::<usize>() + late, ev.len());
    }
}

#[test]
fn step_reads_key_time_and_aggregates_from_messages() {
    let spec: sluice_crds::Window = serde_json::from_value(json!({
        "type": "tumbling", "size": "10s", "keyBy": "msg.country",
        "time": {"field": "msg.ts", "allowedLateness": "1s"},
        "aggregate": {"count": {}, "sum": "msg.amount", "distinctCount": "msg.user"}
    }))
    .unwrap();
    let mut step = WindowStep::compile(&spec, &crate::expr::environment()).unwrap();
    let mut out = Vec::new();
    let offset = std::cell::Cell::new(0);
    let m = |ts: i64, c: &str, amount: Value, user: &str| {
        offset.set(offset.get() + 1);
        Message::new(
            0,
            offset.get(),
            serde_json::to_vec(&json!({"ts": ts, "country": c, "amount": amount, "user": user})).unwrap(),
        )
    };
    step.process(&m(1000, "DE", json!(5), "a"), 0, &mut out).unwrap();
    step.process(&m(2000, "DE", json!(7), "b"), 0, &mut out).unwrap();
    step.process(&m(3000, "FR", json!(1), "a"), 0, &mut out).unwrap();
    let err = step.process(&m(3000, "FR", json!("x"), "a"), 0, &mut out).unwrap_err();
    assert_eq!(err.reason(), "aggregate");
    step.process(&m(11_000, "DE", json!(1), "a"), 0, &mut out).unwrap();
    assert_eq!(out.len(), 2, "watermark 10s fired [0,10s)");
    assert_eq!(
        out[0].to_json(step.wanted()),
        json!({"key": "DE", "start": 0, "end": 10000, "count": 2, "sum": 12, "distinctCount": 2})
    );
    let err = step.process(&m(500, "DE", json!(1), "a"), 0, &mut out).unwrap_err();
    assert_eq!(err.reason(), "late");
    let bad = Message::new(0, 99, br#"{"ts": "soon", "country": "DE", "amount": 1, "user": "a"}"#.to_vec());
    assert_eq!(step.process(&bad, 0, &mut out).unwrap_err().reason(), "event_time");
}

//! Aggregates, computed incrementally per window.
//!
//! Only the aggregates the spec names are kept. `sum` is exact: integers add
//! up as integers (i128 inside), and the result is an integer when every input
//! was one; `avg` is always a float; `first`/`last` pick by event time, ties
//! by arrival; `distinctCount` compares JSON values.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

use super::key::canonical_json;

/// Which aggregates to compute (from the spec's `aggregate`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    pub count: bool,
    pub sum: bool,
    pub min: bool,
    pub max: bool,
    pub avg: bool,
    pub first: bool,
    pub last: bool,
    pub distinct_count: bool,
}

/// One event's inputs to the aggregates (each the value of its expression).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Inputs {
    /// The event's source offset: the window holds it back from commit
    /// until the window's result is emitted.
    pub offset: Option<i64>,
    pub sum: Option<Value>,
    pub min: Option<Value>,
    pub max: Option<Value>,
    pub avg: Option<Value>,
    pub first: Option<Value>,
    pub last: Option<Value>,
    pub distinct: Option<Value>,
}

/// An input an aggregate cannot take (a string given to `sum`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("aggregate {aggregate} needs a number, got {got}")]
pub struct AggregateError {
    pub aggregate: &'static str,
    pub got: String,
}

impl Inputs {
    fn has_values(&self) -> bool {
        self.sum.is_some()
            || self.min.is_some()
            || self.max.is_some()
            || self.avg.is_some()
            || self.first.is_some()
            || self.last.is_some()
            || self.distinct.is_some()
    }

    /// Reject what an aggregate cannot add before any window is touched, so
    /// a bad event leaves no partial trace in state.
    pub fn check(&self) -> Result<(), AggregateError> {
        for (name, v) in [("sum", &self.sum), ("avg", &self.avg)] {
            if let Some(v) = v
                && !v.is_number()
            {
                return Err(AggregateError { aggregate: name, got: crate::expr::type_name(v) });
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Sum {
    int: i128,
    float: f64,
    any_float: bool,
}

impl Sum {
    fn add(&mut self, n: &Number) {
        match (n.as_i64(), n.as_u64()) {
            (Some(i), _) if !n.is_f64() => self.int += i128::from(i),
            (None, Some(u)) if !n.is_f64() => self.int += i128::from(u),
            _ => {
                self.float += n.as_f64().unwrap_or(0.0);
                self.any_float = true;
            }
        }
    }

    fn merge(&mut self, o: &Sum) {
        self.int += o.int;
        self.float += o.float;
        self.any_float |= o.any_float;
    }

    fn total(&self) -> f64 {
        self.int as f64 + self.float
    }

    fn to_json(&self) -> Value {
        if !self.any_float {
            if let Ok(i) = i64::try_from(self.int) {
                return Value::from(i);
            }
            if let Ok(u) = u64::try_from(self.int) {
                return Value::from(u);
            }
        }
        Number::from_f64(self.total()).map_or(Value::Null, Value::Number)
    }
}

/// A value with the event time and arrival it came with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Stamped {
    ts: i64,
    seq: u64,
    value: Value,
}

/// The running aggregates of one window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Accumulator {
    pub count: u64,
    /// The smallest source offset in this window (offsets of a partition
    /// arrive in increasing order, so it is the first event's).
    #[serde(default)]
    pub first_offset: Option<i64>,
    #[serde(default)]
    values: Option<Box<Values>>,
}

impl Accumulator {
    /// Add one event (already `check`ed), at event time `ts`, arrival `seq`.
    pub fn add(&mut self, inputs: &Inputs, ts: i64, seq: u64) {
        self.count += 1;
        if let Some(o) = inputs.offset {
            self.first_offset = Some(self.first_offset.map_or(o, |f| f.min(o)));
        }
        if inputs.has_values() {
            self.values.get_or_insert_with(Box::default).add(inputs, ts, seq);
        }
    }

    /// Fold another window's aggregates in (sessions that merge).
    pub fn merge(&mut self, o: Accumulator) {
        self.count += o.count;
        self.first_offset = match (self.first_offset, o.first_offset) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match (&mut self.values, o.values) {
            (Some(a), Some(b)) => a.merge(*b),
            (a @ None, b) => *a = b,
            _ => {}
        }
    }

    /// The named aggregates, into the emitted record.
    pub fn write(&self, wanted: &Wanted, out: &mut serde_json::Map<String, Value>) {
        if wanted.count {
            out.insert("count".into(), Value::from(self.count));
        }
        match &self.values {
            Some(v) => v.write(self.count, wanted, out),
            None => Values::default().write(self.count, wanted, out),
        }
    }
}

/// The aggregates that take a value, boxed apart from the count: a
/// count-only window over 100k keys then costs 32 bytes a key, not 300,
/// which keeps the state in cache.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Values {
    sum: Option<Sum>,
    min: Option<Value>,
    max: Option<Value>,
    avg: Option<Sum>,
    first: Option<Stamped>,
    last: Option<Stamped>,
    distinct: Option<HashSet<String>>,
}

impl Values {
    fn add(&mut self, inputs: &Inputs, ts: i64, seq: u64) {
        if let Some(Value::Number(n)) = &inputs.sum {
            self.sum.get_or_insert_with(Sum::default).add(n);
        }
        if let Some(Value::Number(n)) = &inputs.avg {
            self.avg.get_or_insert_with(Sum::default).add(n);
        }
        if let Some(v) = &inputs.min
            && self.min.as_ref().is_none_or(|m| json_cmp(v, m).is_lt())
        {
            self.min = Some(v.clone());
        }
        if let Some(v) = &inputs.max
            && self.max.as_ref().is_none_or(|m| json_cmp(v, m).is_gt())
        {
            self.max = Some(v.clone());
        }
        if let Some(v) = &inputs.first
            && self.first.as_ref().is_none_or(|f| (ts, seq) < (f.ts, f.seq))
        {
            self.first = Some(Stamped { ts, seq, value: v.clone() });
        }
        if let Some(v) = &inputs.last
            && self.last.as_ref().is_none_or(|l| (ts, seq) > (l.ts, l.seq))
        {
            self.last = Some(Stamped { ts, seq, value: v.clone() });
        }
        if let Some(v) = &inputs.distinct {
            let text = match v {
                Value::String(s) => format!("s{s}"),
                other => canonical_json(other),
            };
            self.distinct.get_or_insert_with(HashSet::new).insert(text);
        }
    }

    fn merge(&mut self, o: Values) {
        match (&mut self.sum, o.sum) {
            (Some(a), Some(b)) => a.merge(&b),
            (a @ None, b) => *a = b,
            _ => {}
        }
        match (&mut self.avg, o.avg) {
            (Some(a), Some(b)) => a.merge(&b),
            (a @ None, b) => *a = b,
            _ => {}
        }
        if let Some(v) = o.min
            && self.min.as_ref().is_none_or(|m| json_cmp(&v, m).is_lt())
        {
            self.min = Some(v);
        }
        if let Some(v) = o.max
            && self.max.as_ref().is_none_or(|m| json_cmp(&v, m).is_gt())
        {
            self.max = Some(v);
        }
        if let Some(f) = o.first
            && self.first.as_ref().is_none_or(|s| (f.ts, f.seq) < (s.ts, s.seq))
        {
            self.first = Some(f);
        }
        if let Some(l) = o.last
            && self.last.as_ref().is_none_or(|s| (l.ts, l.seq) > (s.ts, s.seq))
        {
            self.last = Some(l);
        }
        if let Some(d) = o.distinct {
            self.distinct.get_or_insert_with(HashSet::new).extend(d);
        }
    }

    fn write(&self, count: u64, wanted: &Wanted, out: &mut serde_json::Map<String, Value>) {
        if wanted.sum {
            out.insert("sum".into(), self.sum.as_ref().map_or(Value::from(0), Sum::to_json));
        }
        if wanted.min {
            out.insert("min".into(), self.min.clone().unwrap_or(Value::Null));
        }
        if wanted.max {
            out.insert("max".into(), self.max.clone().unwrap_or(Value::Null));
        }
        if wanted.avg {
            let avg = self.avg.as_ref().filter(|_| count > 0).map(|s| s.total() / count as f64);
            out.insert("avg".into(), avg.and_then(Number::from_f64).map_or(Value::Null, Value::Number));
        }
        if wanted.first {
            out.insert("first".into(), self.first.as_ref().map_or(Value::Null, |s| s.value.clone()));
        }
        if wanted.last {
            out.insert("last".into(), self.last.as_ref().map_or(Value::Null, |s| s.value.clone()));
        }
        if wanted.distinct_count {
            out.insert("distinctCount".into(), Value::from(self.distinct.as_ref().map_or(0, HashSet::len)));
        }
    }
}

/// The first offsets of open windows, as a multiset: its minimum is the
/// oldest source position a partition's windows still need.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Held(std::collections::BTreeMap<i64, u32>);

impl Held {
    pub fn insert(&mut self, offset: Option<i64>) {
        if let Some(o) = offset {
            *self.0.entry(o).or_default() += 1;
        }
    }

    pub fn remove(&mut self, offset: Option<i64>) {
        if let Some(o) = offset
            && let std::collections::btree_map::Entry::Occupied(mut e) = self.0.entry(o)
        {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    pub fn min(&self) -> Option<i64> {
        self.0.keys().next().copied()
    }
}

/// A total order on JSON values for min/max: by type, then by value.
pub fn json_cmp(a: &Value, b: &Value) -> std::cmp::Ordering {
    use super::key::WindowKey;
    WindowKey::from_json(a).cmp(&WindowKey::from_json(b))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn all() -> Wanted {
        Wanted {
            count: true,
            sum: true,
            min: true,
            max: true,
            avg: true,
            first: true,
            last: true,
            distinct_count: true,
        }
    }

    fn inputs(v: Value) -> Inputs {
        Inputs {
            offset: None,
            sum: Some(v.clone()),
            min: Some(v.clone()),
            max: Some(v.clone()),
            avg: Some(v.clone()),
            first: Some(v.clone()),
            last: Some(v.clone()),
            distinct: Some(v),
        }
    }

    fn render(acc: &Accumulator, w: &Wanted) -> Value {
        let mut m = serde_json::Map::new();
        acc.write(w, &mut m);
        Value::Object(m)
    }

    #[test]
    fn integer_sums_stay_integers_and_avg_is_a_float() {
        let mut acc = Accumulator::default();
        for (i, (v, ts)) in [(3, 20), (1, 10), (2, 10), (3, 30)].into_iter().enumerate() {
            acc.add(&inputs(json!(v)), ts, i as u64);
        }
        assert_eq!(
            render(&acc, &all()),
            json!({"count": 4, "sum": 9, "min": 1, "max": 3, "avg": 2.25, "first": 1, "last": 3, "distinctCount": 3})
        );
    }

    #[test]
    fn a_float_input_makes_the_sum_a_float() {
        let mut acc = Accumulator::default();
        acc.add(&inputs(json!(1)), 0, 0);
        acc.add(&inputs(json!(0.5)), 0, 1);
        assert_eq!(render(&acc, &Wanted { sum: true, ..Default::default() }), json!({"sum": 1.5}));
    }

    #[test]
    fn huge_integer_sums_are_exact() {
        let mut acc = Accumulator::default();
        acc.add(&inputs(json!(i64::MAX)), 0, 0);
        acc.add(&inputs(json!(1)), 0, 1);
        assert_eq!(render(&acc, &Wanted { sum: true, ..Default::default() }), json!({"sum": 9223372036854775808u64}));
    }

    #[test]
    fn first_and_last_follow_event_time_then_arrival() {
        let mut acc = Accumulator::default();
        acc.add(&inputs(json!("b")), 5, 0);
        acc.add(&inputs(json!("a")), 5, 1);
        acc.add(&inputs(json!("c")), 7, 2);
        acc.add(&inputs(json!("d")), 7, 3);
        let w = Wanted { first: true, last: true, ..Default::default() };
        assert_eq!(render(&acc, &w), json!({"first": "b", "last": "d"}));
    }

    #[test]
    fn distinct_count_compares_json_values() {
        let mut acc = Accumulator::default();
        for (i, v) in [json!(1), json!(1.0), json!("1"), json!(1), json!({"a": 1, "b": 2}), json!({"b": 2, "a": 1})]
            .into_iter()
            .enumerate()
        {
            acc.add(&Inputs { distinct: Some(v), ..Default::default() }, 0, i as u64);
        }
        assert_eq!(render(&acc, &Wanted { distinct_count: true, ..Default::default() }), json!({"distinctCount": 4}));
    }

    #[test]
    fn non_numbers_are_rejected_before_they_count() {
        let i = Inputs { sum: Some(json!("x")), ..Default::default() };
        assert_eq!(i.check().unwrap_err().aggregate, "sum");
    }
}

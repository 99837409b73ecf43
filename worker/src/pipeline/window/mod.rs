//! The `window` step: keyed windows with aggregates, per source partition.
//!
//! ```text
//! message ─eval keyBy, time, aggregate inputs─> PartitionWindows (one per partition)
//!                                                 │ late? ──> dead letter (reason "late")
//!                                                 │ add to the window(s) of its type
//!                                                 │ watermark = max event time − allowedLateness
//!                                                 └ fire windows with end <= watermark
//!                                                   in (end, start, key) order ──> records
//! ```
//!
//! State is per partition (Kafka Streams' model): a partition's events reach
//! one pool task in order, so its watermark is exact, and a partition that
//! moves to another pod takes its windows along through a snapshot. Time is
//! epoch milliseconds; windows are half-open `[start, end)`.
//!
//! Emitted record (the payload of each result):
//!
//! ```json
//! {"key": "DE", "start": 1700000000000, "end": 1700000010000,
//!  "count": 42, "sum": 1234, "min": 1, "max": 99, "avg": 29.38,
//!  "first": 5, "last": 17, "distinctCount": 12}
//! ```
//!
//! `key` is the value of `keyBy` (`null` without it); `start`/`end` are
//! absent for count windows; only the named aggregates appear.

pub mod aggregate;
mod aligned;
mod count;
pub mod key;
pub mod session;
pub mod sliding;
pub mod tumbling;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_crds::{Window, WindowType};

use self::{
    aggregate::{Accumulator, AggregateError, Held, Inputs, Wanted},
    aligned::AlignedWindows,
    count::CountWindows,
    key::WindowKey,
    session::SessionWindows,
};
use crate::{
    expr::{CompileError, EvalError, Expression},
    message::Message,
};

/// Event times beyond this many ms from the epoch (about year 33658) are
/// rejected: keeps window arithmetic far from overflow.
pub const MAX_EVENT_TIME: i64 = 1_000_000_000_000_000;

/// One window's result.
#[derive(Clone, Debug, PartialEq)]
pub struct Fired {
    pub key: WindowKey,
    pub start: Option<i64>,
    pub end: Option<i64>,
    pub acc: Accumulator,
}

impl Fired {
    /// The emitted record; see the module docs for its shape.
    pub fn to_json(&self, wanted: &Wanted) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("key".into(), self.key.to_json());
        if let (Some(start), Some(end)) = (self.start, self.end) {
            m.insert("start".into(), Value::from(start));
            m.insert("end".into(), Value::from(end));
        }
        self.acc.write(wanted, &mut m);
        Value::Object(m)
    }
}

/// The window geometry, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Tumbling { size: i64 },
    Sliding { size: i64, slide: i64 },
    Session { gap: i64 },
    Count { n: u64 },
}

/// Whether an event entered a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Accepted,
    Late,
    /// Already in the windows: an offset below the restored snapshot's
    /// position, redelivered after a restart.
    Replayed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Store {
    Aligned(AlignedWindows),
    Session(SessionWindows),
    Count(CountWindows),
}

/// The windows and watermark of one partition: the pure core, driven by
/// (key, event time, inputs), so that it can be tested against a model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartitionWindows {
    #[serde(skip, default = "default_kind")]
    kind: Kind,
    #[serde(skip)]
    lateness: i64,
    max_ts: Option<i64>,
    seq: u64,
    store: Store,
    /// First offsets of the open windows (commit must not pass the smallest).
    #[serde(default)]
    held: Held,
    /// One past the last source offset taken in: after a restore, smaller
    /// offsets are already in the windows.
    #[serde(default)]
    next_offset: Option<i64>,
}

fn default_kind() -> Kind {
    Kind::Count { n: 1 }
}

impl PartitionWindows {
    pub fn new(kind: Kind, lateness: i64) -> Self {
        let store = match kind {
            Kind::Tumbling { .. } | Kind::Sliding { .. } => Store::Aligned(AlignedWindows::default()),
            Kind::Session { .. } => Store::Session(SessionWindows::default()),
            Kind::Count { .. } => Store::Count(CountWindows::default()),
        };
        Self { kind, lateness, max_ts: None, seq: 0, store, held: Held::default(), next_offset: None }
    }

    /// Restore from a snapshot taken by `snapshot` with the same spec.
    pub fn restore(kind: Kind, lateness: i64, bytes: &[u8]) -> Result<Self, serde_json::Error> {
        let mut w: Self = serde_json::from_slice(bytes)?;
        w.kind = kind;
        w.lateness = lateness;
        Ok(w)
    }

    pub fn snapshot(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// max event time − allowedLateness; `None` before the first event.
    pub fn watermark(&self) -> Option<i64> {
        self.max_ts.map(|m| m.saturating_sub(self.lateness))
    }

    /// The oldest source offset the open windows still need: commits stay below it.
    pub fn held(&self) -> Option<i64> {
        self.held.min()
    }

    /// One past the last offset taken in (the snapshot's position).
    pub fn next_offset(&self) -> Option<i64> {
        self.next_offset
    }

    /// One event. Fired windows are appended to `out`.
    pub fn add(&mut self, key: &WindowKey, ts: i64, inputs: &Inputs, out: &mut Vec<Fired>) -> Admit {
        if let Some(o) = inputs.offset
            && self.next_offset.is_some_and(|n| o < n)
        {
            return Admit::Replayed;
        }
        let before = out.len();
        let admit = self.admit(key, ts, inputs, out);
        if admit == Admit::Accepted
            && let Some(o) = inputs.offset
        {
            self.next_offset = Some(o + 1);
        }
        self.release(before, out);
        admit
    }

    /// Fired windows no longer hold their offsets back.
    fn release(&mut self, from: usize, out: &[Fired]) {
        for f in &out[from..] {
            self.held.remove(f.acc.first_offset);
        }
    }

    fn admit(&mut self, key: &WindowKey, ts: i64, inputs: &Inputs, out: &mut Vec<Fired>) -> Admit {
        let wm = self.watermark();
        let seq = self.seq;
        match (self.kind, &mut self.store) {
            (Kind::Tumbling { size }, Store::Aligned(w)) => {
                if tumbling::is_late(ts, size, wm) {
                    return Admit::Late;
                }
                let (start, end) = tumbling::assign(ts, size);
                w.add(start, end, key, inputs, ts, seq, &mut self.held);
            }
            (Kind::Sliding { size, slide }, Store::Aligned(w)) => {
                if sliding::is_late(ts, size, slide, wm) {
                    return Admit::Late;
                }
                for (start, end) in sliding::assign(ts, size, slide) {
                    if wm.is_none_or(|wm| end > wm) {
                        w.add(start, end, key, inputs, ts, seq, &mut self.held);
                    }
                }
            }
            (Kind::Session { gap }, Store::Session(s)) => {
                if s.is_late(gap, key, ts, wm) {
                    return Admit::Late;
                }
                s.add(gap, key, inputs, ts, seq, &mut self.held);
            }
            (Kind::Count { n }, Store::Count(c)) => c.add(n, key, inputs, ts, seq, &mut self.held, out),
            // Built together in `new`; a restored snapshot of another kind starts empty.
            _ => {
                *self = Self::new(self.kind, self.lateness);
                return self.admit(key, ts, inputs, out);
            }
        }
        self.seq += 1;
        if !matches!(self.kind, Kind::Count { .. }) {
            self.max_ts = Some(self.max_ts.map_or(ts, |m| m.max(ts)));
            if let Some(wm) = self.watermark() {
                self.fire(wm, out);
            }
        }
        Admit::Accepted
    }

    /// Processing time: the clock moves the watermark even without events.
    pub fn advance(&mut self, now: i64, out: &mut Vec<Fired>) {
        if matches!(self.kind, Kind::Count { .. }) {
            return;
        }
        if self.max_ts.is_none_or(|m| now > m) {
            self.max_ts = Some(now);
        }
        if let Some(wm) = self.watermark() {
            let before = out.len();
            self.fire(wm, out);
            self.release(before, out);
        }
    }

    fn fire(&mut self, wm: i64, out: &mut Vec<Fired>) {
        match (&mut self.store, self.kind) {
            (Store::Aligned(w), _) => w.fire(wm, out),
            (Store::Session(s), Kind::Session { gap }) => s.fire(gap, wm, out),
            _ => {}
        }
    }

    /// End of input: every open window, partial ones too, in (end, start, key) order.
    pub fn flush(&mut self, out: &mut Vec<Fired>) {
        let before = out.len();
        match &mut self.store {
            Store::Aligned(w) => w.flush(out),
            Store::Session(s) => s.flush(out),
            Store::Count(c) => c.flush(out),
        }
        self.release(before, out);
    }

    /// Open (window, key) pairs.
    pub fn len(&self) -> usize {
        match &self.store {
            Store::Aligned(w) => w.len(),
            Store::Session(s) => s.len(),
            Store::Count(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a message did not enter a window.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
    #[error("event time {got} is neither epoch milliseconds nor an RFC 3339 timestamp")]
    EventTime { got: String },
    #[error("event at {ts} arrived after its window closed (watermark {watermark})")]
    Late { ts: i64, watermark: i64 },
}

impl WindowError {
    pub fn reason(&self) -> &'static str {
        match self {
            WindowError::Eval(e) => e.reason(),
            WindowError::Aggregate(_) => "aggregate",
            WindowError::EventTime { .. } => "event_time",
            WindowError::Late { .. } => "late",
        }
    }
}

/// The compiled `window` step: expressions plus per-partition windows.
#[derive(Clone, Debug)]
pub struct WindowStep {
    kind: Kind,
    lateness: i64,
    key_by: Option<Expression>,
    time: Option<Expression>,
    wanted: Wanted,
    inputs: Arc<[(usize, Expression)]>,
    partitions: foldhash::HashMap<i32, PartitionWindows>,
}

/// Slots in `Inputs`, in `Aggregates::expressions` order.
fn slot<'i>(inputs: &'i mut Inputs, name: &str) -> Option<&'i mut Option<Value>> {
    Some(match name {
        "sum" => &mut inputs.sum,
        "min" => &mut inputs.min,
        "max" => &mut inputs.max,
        "avg" => &mut inputs.avg,
        "first" => &mut inputs.first,
        "last" => &mut inputs.last,
        "distinctCount" => &mut inputs.distinct,
        _ => return None,
    })
}

const SLOTS: [&str; 7] = ["sum", "min", "max", "avg", "first", "last", "distinctCount"];

impl WindowStep {
    pub fn compile(w: &Window, env: &Arc<cel::Env>) -> Result<Self, CompileError> {
        let ms = |d: &Option<sluice_crds::Duration>| {
            d.as_ref().map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        };
        let kind = match w.type_ {
            WindowType::Tumbling => Kind::Tumbling { size: ms(&w.size).max(1) },
            WindowType::Sliding => {
                let size = ms(&w.size).max(1);
                Kind::Sliding { size, slide: ms(&w.slide).clamp(1, size) }
            }
            WindowType::Session => Kind::Session { gap: ms(&w.gap).max(1) },
            WindowType::Count => Kind::Count { n: w.count.map_or(1, |c| u64::try_from(c).unwrap_or(1).max(1)) },
        };
        let a = &w.aggregate;
        let wanted = Wanted {
            count: a.count.is_some(),
            sum: a.sum.is_some(),
            min: a.min.is_some(),
            max: a.max.is_some(),
            avg: a.avg.is_some(),
            first: a.first.is_some(),
            last: a.last.is_some(),
            distinct_count: a.distinct_count.is_some(),
        };
        let mut inputs = Vec::new();
        for (name, src) in a.expressions() {
            if let Some(i) = SLOTS.iter().position(|s| *s == name) {
                inputs.push((i, Expression::compile(src, env)?));
            }
        }
        Ok(Self {
            kind,
            lateness: w.time.as_ref().map_or(0, |t| ms(&t.allowed_lateness)),
            key_by: w.key_by.as_deref().map(|k| Expression::compile(k, env)).transpose()?,
            time: w.time.as_ref().map(|t| Expression::compile(&t.field, env)).transpose()?,
            wanted,
            inputs: inputs.into(),
            partitions: Default::default(),
        })
    }

    pub fn expressions(&self) -> Vec<&Expression> {
        self.key_by.iter().chain(self.time.iter()).chain(self.inputs.iter().map(|(_, e)| e)).collect()
    }

    pub fn wanted(&self) -> &Wanted {
        &self.wanted
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn lateness(&self) -> i64 {
        self.lateness
    }

    /// Event time from the `time` expression, or `now` (processing time).
    fn event_time(&self, msg: &Message, now: i64) -> Result<i64, WindowError> {
        let Some(expr) = &self.time else { return Ok(now) };
        let v = expr.eval(msg)?;
        parse_time(&v).ok_or_else(|| WindowError::EventTime { got: v.to_string() })
    }

    /// Put one message into its partition's windows; fired windows go to `out`.
    pub fn process(&mut self, msg: &Message, now: i64, out: &mut Vec<Fired>) -> Result<(), WindowError> {
        let key = match &self.key_by {
            Some(e) => WindowKey::from_json(e.eval(msg)?.as_ref()),
            None => WindowKey::Null,
        };
        let ts = match self.kind {
            Kind::Count { .. } => now,
            _ => self.event_time(msg, now)?,
        };
        let mut inputs = Inputs { offset: (msg.offset >= 0).then_some(msg.offset), ..Inputs::default() };
        for (i, expr) in self.inputs.iter() {
            let v = expr.eval(msg)?.into_owned();
            if let Some(s) = slot(&mut inputs, SLOTS[*i]) {
                *s = Some(v);
            }
        }
        inputs.check()?;
        let (kind, lateness) = (self.kind, self.lateness);
        let windows = self.partitions.entry(msg.partition).or_insert_with(|| PartitionWindows::new(kind, lateness));
        match windows.add(&key, ts, &inputs, out) {
            Admit::Accepted | Admit::Replayed => Ok(()),
            Admit::Late => Err(WindowError::Late { ts, watermark: windows.watermark().unwrap_or(i64::MIN) }),
        }
    }

    /// Processing-time windows fire on the clock.
    pub fn tick(&mut self, now: i64, out: &mut Vec<Fired>) {
        if self.time.is_none() {
            for w in self.partitions.values_mut() {
                w.advance(now, out);
            }
        }
    }

    /// End of input: every partition's open windows, partition by partition.
    pub fn flush(&mut self, out: &mut Vec<(i32, Fired)>) {
        let mut ids: Vec<i32> = self.partitions.keys().copied().collect();
        ids.sort_unstable();
        for p in ids {
            if let Some(w) = self.partitions.get_mut(&p) {
                let mut fired = Vec::new();
                w.flush(&mut fired);
                out.extend(fired.into_iter().map(|f| (p, f)));
            }
        }
    }

    pub fn state_keys(&self) -> usize {
        self.partitions.values().map(PartitionWindows::len).sum()
    }

    /// Per partition: the oldest offset its open windows hold, and one past
    /// the newest offset taken in.
    pub fn positions(&self) -> impl Iterator<Item = (i32, Option<i64>, Option<i64>)> + '_ {
        self.partitions.iter().map(|(p, w)| (*p, w.held(), w.next_offset()))
    }

    /// A partition's windows for a snapshot.
    pub fn snapshot(&self, partition: i32) -> Option<Result<Vec<u8>, serde_json::Error>> {
        self.partitions.get(&partition).map(PartitionWindows::snapshot)
    }

    pub fn partitions(&self) -> Vec<i32> {
        self.partitions.keys().copied().collect()
    }

    /// Install a restored partition (on assignment).
    pub fn restore(&mut self, partition: i32, bytes: &[u8]) -> Result<(), serde_json::Error> {
        let w = PartitionWindows::restore(self.kind, self.lateness, bytes)?;
        self.partitions.insert(partition, w);
        Ok(())
    }

    /// Forget a partition (revoked: another pod owns it now).
    pub fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }
}

/// Epoch milliseconds from a number or an RFC 3339 string (sub-ms truncated).
pub fn parse_time(v: &Value) -> Option<i64> {
    let ms = match v {
        Value::Number(n) => match n.as_i64() {
            Some(i) if !n.is_f64() => i,
            _ => {
                let f = n.as_f64()?;
                if !f.is_finite() || f.abs() > MAX_EVENT_TIME as f64 {
                    return None;
                }
                f.trunc() as i64
            }
        },
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s).ok()?.timestamp_millis(),
        _ => return None,
    };
    (ms.abs() <= MAX_EVENT_TIME).then_some(ms)
}

#[cfg(test)]
mod tests;

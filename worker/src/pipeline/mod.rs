//! The pipeline: steps compiled once from the spec, run per message.
//!
//! ```text
//! Message ─> filter ─> map ─> dedupe ─> window ─> (records) ─> later steps ─> Output::Deliver
//!              │        │       │          │
//!              │        │       │          └ absorbed ─> Output::Done (nothing to deliver)
//!              │        │       └ duplicate ─> Output::Done
//!              │        └ error ─> Output::DeadLetter (error, step, partition, offset)
//!              └ false ─> Output::Done
//! ```
//!
//! Every input yields exactly one output that carries its `AckId` (Deliver,
//! DeadLetter or Done), so the delivery tracker can account for every
//! offset. Records a window emits carry none: their inputs were accounted
//! for when they entered the window.

pub mod dedupe;
pub mod filter;
pub mod map;
pub mod window;

use std::{collections::BTreeMap, sync::Arc};

use sluice_crds::StreamProcessorSpec;

use self::{dedupe::DedupeStep, filter::FilterStep, map::MapStep, window::WindowStep};
use crate::{
    deadletter::DeadLetter,
    expr::CompileError,
    message::{AckId, Message, Payload},
};

/// What became of a message (or of a record a window emitted).
#[derive(Debug)]
pub enum Output {
    /// Send to the sink; acknowledge `ack` once delivered.
    Deliver(Message, Option<AckId>),
    DeadLetter(DeadLetter),
    /// Nothing to send (filtered, duplicate, absorbed by a window).
    Done(AckId),
}

/// Per-batch tallies, added to the Prometheus counters once per batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub delivered: u64,
    pub filtered: u64,
    pub duplicates: u64,
    pub windowed: u64,
    pub windows_emitted: u64,
    pub late: u64,
    /// (reason, count)
    pub dead_lettered: Vec<(&'static str, u64)>,
}

impl Tally {
    fn dead_letter(&mut self, reason: &'static str) {
        match self.dead_lettered.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => self.dead_lettered.push((reason, 1)),
        }
    }

    pub fn dead_letters(&self) -> u64 {
        self.dead_lettered.iter().map(|(_, n)| n).sum()
    }
}

/// What a step decided for one message.
enum Next {
    Continue,
    Stop,
    Fired(Vec<window::Fired>),
    Fail(&'static str, String),
}

#[derive(Clone, Debug)]
enum StepKind {
    Filter(FilterStep),
    Map(MapStep),
    Dedupe(DedupeStep),
    Window(WindowStep),
}

#[derive(Clone, Debug)]
struct Step {
    name: Arc<str>,
    kind: StepKind,
}

fn projection(steps: &[Step]) -> Option<Arc<[String]>> {
    let mut fields: Vec<String> = Vec::new();
    for s in steps {
        let exprs = match &s.kind {
            StepKind::Map(_) => return None,
            StepKind::Filter(f) => f.expressions(),
            StepKind::Dedupe(d) => d.expressions(),
            StepKind::Window(w) => w.expressions(),
        };
        for e in exprs {
            for f in e.payload_fields()? {
                if !fields.contains(f) {
                    fields.push(f.clone());
                }
            }
        }
    }
    (!fields.is_empty()).then(|| fields.into())
}

/// A user expression at a step does not compile.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct PipelineError {
    pub step: String,
    pub source: CompileError,
}

/// The compiled steps of one processor. Each pool task owns a clone (the
/// compiled expressions are shared; the state is the task's own).
#[derive(Clone, Debug)]
pub struct Pipeline {
    steps: Vec<Step>,
    /// Top-level payload fields any step reads, when that is all that is
    /// ever read (no map, no whole-payload expression): the payload is then
    /// parsed for these fields only.
    projection: Option<Arc<[String]>>,
}

impl Pipeline {
    pub fn compile(spec: &StreamProcessorSpec) -> Result<Self, PipelineError> {
        let env = crate::expr::environment();
        let max_keys =
            spec.state.as_ref().and_then(|s| s.max_keys).and_then(|m| usize::try_from(m).ok()).unwrap_or(1_000_000);
        let mut steps = Vec::new();
        for (i, s) in spec.pipeline.iter().enumerate() {
            let name: Arc<str> = s.name.clone().unwrap_or_else(|| format!("pipeline[{i}].{}", s.kind())).into();
            let err = |source| PipelineError { step: name.to_string(), source };
            let kind = if let Some(f) = &s.filter {
                StepKind::Filter(FilterStep::compile(f, &env).map_err(err)?)
            } else if let Some(m) = &s.map {
                StepKind::Map(MapStep::compile(m, &env).map_err(err)?)
            } else if let Some(d) = &s.dedupe {
                StepKind::Dedupe(DedupeStep::compile(d, max_keys, &env).map_err(err)?)
            } else if let Some(w) = &s.window {
                StepKind::Window(WindowStep::compile(w, &env).map_err(err)?)
            } else {
                continue;
            };
            steps.push(Step { name, kind });
        }
        let projection = projection(&steps);
        Ok(Self { steps, projection })
    }

    /// Payload fields parsed per message, if the pipeline allows projection.
    pub fn projection(&self) -> Option<&[String]> {
        self.projection.as_deref()
    }

    /// Whether any step keeps per-partition state: then a partition's
    /// messages must all reach the same pool task.
    pub fn is_stateful(&self) -> bool {
        self.steps.iter().any(|s| matches!(s.kind, StepKind::Dedupe(_) | StepKind::Window(_)))
    }

    /// Run one source message through every step.
    pub fn process(&mut self, mut msg: Message, now: i64, out: &mut Vec<Output>, tally: &mut Tally) {
        if let Some(fields) = &self.projection {
            msg.payload.project(fields);
        }
        let ack = msg.ack_id();
        self.run(msg, 0, Some(ack), now, out, tally);
    }

    fn run(
        &mut self,
        mut msg: Message,
        from: usize,
        ack: Option<AckId>,
        now: i64,
        out: &mut Vec<Output>,
        tally: &mut Tally,
    ) {
        let done = |out: &mut Vec<Output>| {
            if let Some(a) = ack {
                out.push(Output::Done(a));
            }
        };
        for i in from..self.steps.len() {
            let next = match &mut self.steps[i].kind {
                StepKind::Filter(f) => match f.keep(&msg) {
                    Ok(true) => Next::Continue,
                    Ok(false) => {
                        tally.filtered += 1;
                        Next::Stop
                    }
                    Err(e) => Next::Fail(e.reason(), e.to_string()),
                },
                StepKind::Map(m) => match m.apply(&mut msg) {
                    Ok(()) => Next::Continue,
                    Err(e) => Next::Fail(e.reason(), e.to_string()),
                },
                StepKind::Dedupe(d) => match d.first_sighting(&msg, now) {
                    Ok(true) => Next::Continue,
                    Ok(false) => {
                        tally.duplicates += 1;
                        Next::Stop
                    }
                    Err(e) => Next::Fail(e.reason(), e.to_string()),
                },
                StepKind::Window(w) => {
                    let mut fired = Vec::new();
                    match w.process(&msg, now, &mut fired) {
                        Ok(()) => {
                            tally.windowed += 1;
                            Next::Fired(fired)
                        }
                        Err(e) => {
                            if e.reason() == "late" {
                                tally.late += 1;
                            }
                            Next::Fail(e.reason(), e.to_string())
                        }
                    }
                }
            };
            match next {
                Next::Continue => {}
                Next::Stop => return done(out),
                Next::Fired(fired) => {
                    done(out);
                    tally.windows_emitted += fired.len() as u64;
                    for r in self.records(i, msg.partition, now, fired) {
                        self.run(r, i + 1, None, now, out, tally);
                    }
                    return;
                }
                Next::Fail(reason, error) => {
                    let name = self.steps[i].name.clone();
                    tracing::debug!(step = %name, partition = msg.partition, offset = msg.offset, reason, %error,
                        "message failed a step; dead-lettering it and going on");
                    tally.dead_letter(reason);
                    msg.payload.forget_projection();
                    out.push(Output::DeadLetter(DeadLetter {
                        message: msg,
                        reason,
                        error,
                        step: name.to_string(),
                        attempt: 1,
                        ack,
                    }));
                    return;
                }
            }
        }
        if ack.is_some() {
            tally.delivered += 1;
        }
        msg.payload.forget_projection();
        out.push(Output::Deliver(msg, ack));
    }

    /// Window results as messages: partition of their input, offset -1
    /// (they are new records, not source positions), timestamp = window end.
    fn records(&self, step: usize, partition: i32, now: i64, fired: Vec<window::Fired>) -> Vec<Message> {
        let StepKind::Window(w) = &self.steps[step].kind else { return Vec::new() };
        fired
            .into_iter()
            .map(|f| {
                let key = match f.key.to_json() {
                    serde_json::Value::String(s) => Some(s.into_bytes()),
                    serde_json::Value::Null => None,
                    other => Some(other.to_string().into_bytes()),
                };
                Message {
                    key,
                    payload: Payload::from_json(f.to_json(w.wanted())),
                    headers: Vec::new(),
                    partition,
                    offset: -1,
                    timestamp: f.end.unwrap_or(now),
                }
            })
            .collect()
    }

    /// Processing-time windows fire on the clock; call this periodically.
    pub fn tick(&mut self, now: i64, out: &mut Vec<Output>, tally: &mut Tally) {
        for i in 0..self.steps.len() {
            let mut fired = Vec::new();
            if let StepKind::Window(w) = &mut self.steps[i].kind {
                w.tick(now, &mut fired);
            }
            self.emit(i, fired.into_iter().map(|f| (None, f)).collect(), now, out, tally);
        }
    }

    /// End of input: flush every window (partial ones too), in step order,
    /// partitions in order, each in (end, start, key) order.
    pub fn flush(&mut self, now: i64, out: &mut Vec<Output>, tally: &mut Tally) {
        for i in 0..self.steps.len() {
            let mut fired = Vec::new();
            if let StepKind::Window(w) = &mut self.steps[i].kind {
                w.flush(&mut fired);
            }
            self.emit(i, fired.into_iter().map(|(p, f)| (Some(p), f)).collect(), now, out, tally);
        }
    }

    fn emit(
        &mut self,
        step: usize,
        fired: Vec<(Option<i32>, window::Fired)>,
        now: i64,
        out: &mut Vec<Output>,
        tally: &mut Tally,
    ) {
        for (p, f) in fired {
            tally.windows_emitted += 1;
            for r in self.records(step, p.unwrap_or(0), now, vec![f]) {
                self.run(r, step + 1, None, now, out, tally);
            }
        }
    }

    /// Keys held in window and dedupe state (the state-keys gauge).
    pub fn state_keys(&self) -> usize {
        self.steps
            .iter()
            .map(|s| match &s.kind {
                StepKind::Window(w) => w.state_keys(),
                StepKind::Dedupe(d) => d.state_keys(),
                _ => 0,
            })
            .sum()
    }

    /// Per partition with window state: the oldest source offset its open
    /// windows hold (the commit point must stay at or below it), and one past
    /// the newest offset they took in (a snapshot's position).
    pub fn positions(&self) -> BTreeMap<i32, (Option<i64>, Option<i64>)> {
        let mut out: BTreeMap<i32, (Option<i64>, Option<i64>)> = BTreeMap::new();
        let min = |a: Option<i64>, b: Option<i64>| match (a, b) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
        for s in &self.steps {
            if let StepKind::Window(w) = &s.kind {
                for (p, held, next) in w.positions() {
                    let e = out.entry(p).or_insert((held, next));
                    *e = (min(e.0, held), min(e.1, next));
                }
            }
        }
        out
    }

    /// Snapshots of one partition's state: (step index, bytes).
    pub fn snapshot(&self, partition: i32) -> Vec<(usize, Vec<u8>)> {
        let mut snaps = Vec::new();
        for (i, s) in self.steps.iter().enumerate() {
            let snap = match &s.kind {
                StepKind::Window(w) => w.snapshot(partition),
                StepKind::Dedupe(d) => d.snapshot(partition),
                _ => None,
            };
            match snap {
                Some(Ok(bytes)) => snaps.push((i, bytes)),
                Some(Err(e)) => {
                    tracing::warn!(step = %s.name, partition, error = %e, "cannot serialize state; skipping this snapshot")
                }
                None => {}
            }
        }
        snaps
    }

    /// Partitions that hold state (windows or remembered dedupe ids): the
    /// ones the periodic snapshot saves.
    pub fn stateful_partitions(&self) -> Vec<i32> {
        let mut ps: Vec<i32> = self
            .steps
            .iter()
            .flat_map(|s| match &s.kind {
                StepKind::Window(w) => w.partitions(),
                StepKind::Dedupe(d) => d.partitions(),
                _ => Vec::new(),
            })
            .collect();
        ps.sort_unstable();
        ps.dedup();
        ps
    }

    /// Install restored state for a newly assigned partition.
    pub fn restore(&mut self, partition: i32, step: usize, bytes: &[u8]) -> Result<(), serde_json::Error> {
        match self.steps.get_mut(step).map(|s| &mut s.kind) {
            Some(StepKind::Window(w)) => w.restore(partition, bytes),
            Some(StepKind::Dedupe(d)) => d.restore(partition, bytes),
            _ => Ok(()),
        }
    }

    /// Forget a revoked partition's state (after its final snapshot).
    pub fn revoke(&mut self, partition: i32) {
        for s in &mut self.steps {
            match &mut s.kind {
                StepKind::Window(w) => w.revoke(partition),
                StepKind::Dedupe(d) => d.revoke(partition),
                _ => {}
            }
        }
    }

    /// Step indexes that hold state (what a restore must look up).
    pub fn stateful_steps(&self) -> Vec<usize> {
        self.steps
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.kind, StepKind::Window(_) | StepKind::Dedupe(_)))
            .map(|(i, _)| i)
            .collect()
    }
}

#[cfg(test)]
mod tests;

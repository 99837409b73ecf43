//! The processor pool: N tasks, each owning a copy of the pipeline.
//!
//! ```text
//!                 ┌─bounded(queue)─> task 0 ─┐
//! dispatcher ─────┼─bounded(queue)─> task 1 ─┼─bounded─> sink stage
//! (route by key)  └─bounded(queue)─> task N ─┘
//! ```
//!
//! Routing keeps order where it matters: a message with a key goes to
//! `hash(key) % N` (per-key order), one without to `partition % N`
//! (per-partition order). A pipeline with state (window, dedupe) routes by
//! partition only: window state and watermarks are per partition, so one
//! task must see all of a partition's events in order.
//!
//! When full: `Dispatcher::send` awaits a free slot, so the source stops
//! fetching until the pool catches up. Nothing is dropped and nothing is
//! buffered beyond the bounded queues.

use std::{hash::BuildHasher, sync::Arc, time::Duration};

use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    message::{Message, now_ms},
    metrics::Metrics,
    pipeline::{Output, Pipeline, Tally},
    state::{StateKeys, StateStore},
};

/// Work for one pool task.
#[derive(Debug)]
pub enum Work {
    Batch(Vec<Message>),
    /// Install a partition's state from a snapshot (step index, bytes).
    Restore {
        partition: i32,
        snapshots: Vec<(usize, Vec<u8>)>,
    },
    /// Snapshot a partition's state, then forget it.
    Revoke {
        partition: i32,
    },
    /// End of input: flush every window.
    Flush,
}

/// What the pool hands to the sink stage: the outputs of some work, and the
/// commit limits of the partitions this task owns.
#[derive(Debug, Default)]
pub struct Outputs {
    pub outputs: Vec<Output>,
    /// (partition, hold): offsets at or above `hold` are not finished yet
    /// (open windows need them, or the last snapshot does not cover them);
    /// `None` lifts the limit.
    pub holds: Vec<(i32, Option<i64>)>,
}

/// Where state snapshots go, and how often.
#[derive(Clone)]
pub struct Snapshots {
    pub store: Arc<dyn StateStore>,
    pub keys: StateKeys,
    pub interval: Duration,
    pub ttl: Option<Duration>,
}

#[derive(Clone)]
pub struct PoolConfig {
    pub workers: usize,
    /// Batches each task's queue holds before the dispatcher waits.
    pub queue_batches: usize,
    /// How often processing-time windows are checked.
    pub tick: Duration,
    pub snapshots: Option<Snapshots>,
}

/// Sends work to the pool tasks.
pub struct Dispatcher {
    senders: Vec<mpsc::Sender<Work>>,
    stateful: bool,
    hasher: foldhash::fast::FixedState,
}

#[derive(Debug, thiserror::Error)]
#[error("pool task {0} stopped unexpectedly")]
pub struct PoolClosed(pub usize);

impl Dispatcher {
    pub fn workers(&self) -> usize {
        self.senders.len()
    }

    /// The task a message goes to.
    pub fn route(&self, m: &Message) -> usize {
        let n = self.senders.len().max(1);
        match (&m.key, self.stateful) {
            (Some(k), false) => (self.hasher.hash_one(k) % n as u64) as usize,
            _ => m.partition.unsigned_abs() as usize % n,
        }
    }

    /// The task that owns a partition's state.
    pub fn owner(&self, partition: i32) -> usize {
        partition.unsigned_abs() as usize % self.senders.len().max(1)
    }

    /// Split a batch by route and hand each part to its task, waiting for
    /// room (backpressure), in order per task.
    pub async fn dispatch(&self, batch: Vec<Message>) -> Result<(), PoolClosed> {
        let n = self.senders.len();
        if n == 1 {
            return self.send(0, Work::Batch(batch)).await;
        }
        let mut parts: Vec<Vec<Message>> = (0..n).map(|_| Vec::new()).collect();
        for m in batch {
            let i = self.route(&m);
            parts[i].push(m);
        }
        for (i, part) in parts.into_iter().enumerate() {
            if !part.is_empty() {
                self.send(i, Work::Batch(part)).await?;
            }
        }
        Ok(())
    }

    pub async fn send(&self, task: usize, work: Work) -> Result<(), PoolClosed> {
        self.senders[task].send(work).await.map_err(|_| PoolClosed(task))
    }

    pub async fn broadcast(&self, make: impl Fn() -> Work) -> Result<(), PoolClosed> {
        for i in 0..self.senders.len() {
            self.send(i, make()).await?;
        }
        Ok(())
    }

    /// Batches waiting across all queues (the queue-depth gauge).
    pub fn queued(&self) -> usize {
        self.senders.iter().map(|s| s.max_capacity() - s.capacity()).sum()
    }
}

/// Start the pool tasks. Outputs go to `sink` (bounded: a slow sink stalls
/// the tasks, which stall the dispatcher, which stops the source).
pub fn start(
    pipeline: &Pipeline,
    cfg: &PoolConfig,
    sink: mpsc::Sender<Outputs>,
    metrics: Metrics,
) -> (Dispatcher, Vec<JoinHandle<()>>) {
    let workers = cfg.workers.max(1);
    let mut senders = Vec::with_capacity(workers);
    let mut handles = Vec::with_capacity(workers);
    for id in 0..workers {
        let (tx, rx) = mpsc::channel(cfg.queue_batches.max(1));
        senders.push(tx);
        let task = PoolTask {
            id,
            pipeline: pipeline.clone(),
            rx,
            sink: sink.clone(),
            metrics: metrics.clone(),
            tick: cfg.tick,
            snapshots: cfg.snapshots.clone(),
            state_keys: 0,
            holds: Default::default(),
            saved: Default::default(),
        };
        handles.push(tokio::spawn(task.run()));
    }
    let d = Dispatcher { senders, stateful: pipeline.is_stateful(), hasher: foldhash::fast::FixedState::with_seed(0) };
    (d, handles)
}

struct PoolTask {
    id: usize,
    pipeline: Pipeline,
    rx: mpsc::Receiver<Work>,
    sink: mpsc::Sender<Outputs>,
    metrics: Metrics,
    tick: Duration,
    snapshots: Option<Snapshots>,
    state_keys: i64,
    /// Holds last sent to the sink stage.
    holds: std::collections::BTreeMap<i32, Option<i64>>,
    /// Per partition, the position of the last snapshot saved.
    saved: std::collections::BTreeMap<i32, i64>,
}

impl PoolTask {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let snapshot_every = self.snapshots.as_ref().map_or(Duration::from_secs(3600), |s| s.interval);
        let mut snapshot = tokio::time::interval_at(tokio::time::Instant::now() + snapshot_every, snapshot_every);
        loop {
            let work = tokio::select! {
                biased;
                w = self.rx.recv() => match w {
                    Some(w) => w,
                    None => break,
                },
                _ = tick.tick() => {
                    let mut out = Vec::new();
                    let mut tally = Tally::default();
                    self.pipeline.tick(now_ms(), &mut out, &mut tally);
                    if !self.emit(out, &tally).await { return; }
                    continue;
                }
                _ = snapshot.tick(), if self.snapshots.is_some() => {
                    for p in self.pipeline.stateful_partitions() {
                        self.save(p).await;
                    }
                    continue;
                }
            };
            let alive = match work {
                Work::Batch(batch) => self.process(batch).await,
                Work::Restore { partition, snapshots } => {
                    for (step, bytes) in snapshots {
                        if let Err(e) = self.pipeline.restore(partition, step, &bytes) {
                            tracing::warn!(task = self.id, partition, step, error = %e,
                                "snapshot does not match this pipeline; starting the partition empty");
                        }
                    }
                    tracing::info!(task = self.id, partition, "partition state restored");
                    true
                }
                Work::Revoke { partition } => {
                    self.save(partition).await;
                    self.pipeline.revoke(partition);
                    true
                }
                Work::Flush => {
                    let mut out = Vec::new();
                    let mut tally = Tally::default();
                    self.pipeline.flush(now_ms(), &mut out, &mut tally);
                    self.emit(out, &tally).await
                }
            };
            if !alive {
                return;
            }
        }
        // Queue closed: shutting down. Keep state for whoever takes over,
        // then tell the sink stage how far that lets it commit.
        for p in self.pipeline.stateful_partitions() {
            self.save(p).await;
        }
        self.emit(Vec::new(), &Tally::default()).await;
        tracing::debug!(task = self.id, "pool task drained");
    }

    async fn process(&mut self, batch: Vec<Message>) -> bool {
        let timer = self.metrics.processing.start_timer();
        let now = now_ms();
        let mut out = Vec::with_capacity(batch.len());
        let mut tally = Tally::default();
        for m in batch {
            self.pipeline.process(m, now, &mut out, &mut tally);
        }
        timer.observe_duration();
        self.emit(out, &tally).await
    }

    /// Commit limits per partition, so that a restart replays whatever the
    /// state it starts from lacks: the last snapshot's position once one was
    /// saved (the restored windows hold everything before it), otherwise the
    /// oldest open window's first offset (a restart starts with no windows).
    fn holds(&mut self) -> Vec<(i32, Option<i64>)> {
        let mut changed = Vec::new();
        for (p, (held, _next)) in self.pipeline.positions() {
            let saved = if self.snapshots.is_some() { self.saved.get(&p).copied() } else { None };
            let hold = saved.or(held);
            if self.holds.get(&p) != Some(&hold) {
                self.holds.insert(p, hold);
                changed.push((p, hold));
            }
        }
        changed
    }

    async fn emit(&mut self, out: Vec<Output>, tally: &Tally) -> bool {
        self.metrics.add(tally);
        // This task's share of the state-keys gauge.
        let keys = self.pipeline.state_keys() as i64;
        self.metrics.state_keys.add(keys - self.state_keys);
        self.state_keys = keys;
        let holds = self.holds();
        if out.is_empty() && holds.is_empty() {
            return true;
        }
        if self.sink.send(Outputs { outputs: out, holds }).await.is_err() {
            tracing::error!(task = self.id, "sink stage is gone; stopping this pool task");
            return false;
        }
        true
    }

    async fn save(&mut self, partition: i32) {
        let Some(s) = &self.snapshots else { return };
        let position = self.pipeline.positions().get(&partition).and_then(|(_, next)| *next);
        let entries: Vec<(String, Vec<u8>)> = self
            .pipeline
            .snapshot(partition)
            .into_iter()
            .map(|(step, bytes)| (s.keys.snapshot(partition, step), bytes))
            .collect();
        if entries.is_empty() {
            return;
        }
        match s.store.put_many(entries, s.ttl).await {
            Ok(()) => {
                if let Some(pos) = position {
                    self.saved.insert(partition, pos);
                }
                tracing::debug!(task = self.id, partition, ?position, "state snapshot saved");
            }
            Err(e) => tracing::warn!(task = self.id, partition, error = %e,
                "state snapshot failed; keeping the previous one and retrying at the next interval"),
        }
    }
}

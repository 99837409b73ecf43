//! Wires source -> pool -> sink -> acker, and shuts it down in order.
//!
//! ```text
//! source loop ──Dispatcher (bounded)──> pool tasks ──bounded──> sink stage
//!   tracks offsets                                               writes results and dead letters,
//!   restores state on Assigned                                   marks their offsets finished,
//!   stops on cancel or End                                       commits the low-water marks
//! ```
//!
//! Shutdown (SIGTERM or end of input): stop fetching; at end of input flush
//! every window; close the pool queues; the tasks drain and snapshot; the
//! sink stage drains, delivers, commits; the source hands back what is
//! left unfinished (`Source::release`); then `run` returns. The caller
//! bounds all of it with the grace period.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    deadletter::{DeadLetter, HEADER_ERROR, HEADER_STEP},
    delivery::OffsetTracker,
    message::Message,
    metrics::Metrics,
    pipeline::{Output, Pipeline},
    pool::{self, Outputs, PoolConfig, Work},
    sink::{Rejection, Sink, SinkError},
    source::{Acker, Drain, RevokeHook, Source, SourceError, SourceEvent},
};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Pool(#[from] pool::PoolClosed),
    #[error("sink {kind} failed after {attempts} attempts: {error}")]
    Sink { kind: &'static str, attempts: u32, error: String },
}

/// How long the pool may refuse work before `/readyz` says the worker is stalled.
pub const STALL: Duration = Duration::from_secs(30);

/// Idle time after which the sink stage commits its positions again, and
/// how many times (see `sink_stage`).
const RECOMMIT_IDLE: Duration = Duration::from_secs(5);
const RECOMMITS: u32 = 3;

/// How long handing back unfinished messages at the end may take.
const RELEASE: Duration = Duration::from_secs(5);

/// How long a revocation waits for the revoked partitions' in-flight
/// messages before it commits what is done and lets them go. Well under
/// Kafka's rebalance timeout, so the group never waits on this worker.
pub const REVOKE_DRAIN: Duration = Duration::from_secs(10);

/// The runtime's side of `RevokeHook`: waits until every tracked offset of
/// the partitions `drain` names has finished (or `REVOKE_DRAIN`), then
/// returns their safe points. It runs inside the source's synchronous
/// callback, on a runtime thread, in the middle of the source loop's `next`
/// (so no new work is dispatched meanwhile): `block_in_place` hands that
/// thread's other tasks (the pool, the sink stage, which are what finishes
/// the offsets) to another thread while it waits. On a current-thread
/// runtime nothing else could run, so it does not wait and returns what is
/// already done.
fn revoke_hook(tracker: Arc<Mutex<OffsetTracker>>) -> RevokeHook {
    Arc::new(move |revoked: &[i32], drain: Drain| {
        let lock = || tracker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let scope = |t: &OffsetTracker| -> Vec<i32> {
            let mut partitions = revoked.to_vec();
            if drain == Drain::All {
                partitions.extend(t.partitions());
                partitions.sort_unstable();
                partitions.dedup();
            }
            partitions
        };
        let drained = || {
            let t = lock();
            scope(&t).iter().all(|p| t.drained(*p))
        };
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let started = std::time::Instant::now();
        if multi_thread && !drained() {
            tokio::task::block_in_place(|| {
                while !drained() && started.elapsed() < REVOKE_DRAIN {
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
        let t = lock();
        let partitions = scope(&t);
        let points: Vec<(i32, i64)> = partitions.iter().filter_map(|p| Some((*p, t.safe_point(*p)?))).collect();
        let in_flight: usize = partitions.iter().filter(|p| !t.drained(**p)).count();
        tracing::info!(?revoked, ?drain, waited = ?started.elapsed(), ?points, partitions_in_flight = in_flight,
            "revocation: in-flight work drained; committing what is done");
        points
    })
}

/// What a run did (logged at exit; tests assert on it).
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub consumed: u64,
    pub delivered: u64,
    pub dead_lettered: u64,
    pub committed: BTreeMap<i32, i64>,
}

pub struct Runtime {
    pub pool: PoolConfig,
    pub batch_size: usize,
    /// Sink attempts before the run fails (backoff doubles from 50 ms).
    pub sink_attempts: u32,
    pub metrics: Metrics,
    /// Set while the worker is consuming; `/readyz` reports it.
    pub ready: Arc<AtomicBool>,
}

impl Runtime {
    pub async fn run(
        &self,
        mut source: Box<dyn Source>,
        pipeline: Pipeline,
        sink: Box<dyn Sink>,
        dead_letters: Box<dyn Sink>,
        shutdown: CancellationToken,
    ) -> Result<Summary, RuntimeError> {
        let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
        let (out_tx, out_rx) = mpsc::channel::<Outputs>(self.pool.workers.max(1) * self.pool.queue_batches.max(1));
        let (dispatcher, tasks) = pool::start(&pipeline, &self.pool, out_tx, self.metrics.clone());
        let sink_stage = tokio::spawn(sink_stage(
            out_rx,
            sink,
            dead_letters,
            source.acker(),
            tracker.clone(),
            self.metrics.clone(),
            self.sink_attempts,
        ));
        source.on_revoke(revoke_hook(tracker.clone()));
        let mut consumed = 0u64;
        self.ready.store(true, Ordering::Relaxed);
        let stateful_steps = pipeline.stateful_steps();
        let result: Result<(), RuntimeError> = async {
            loop {
                let event = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        tracing::info!("shutdown requested: no more fetching; draining in-flight work");
                        break;
                    }
                    e = source.next(self.batch_size) => e?,
                };
                match event {
                    SourceEvent::Batch(batch) => {
                        consumed += batch.len() as u64;
                        self.metrics.consumed.inc_by(batch.len() as u64);
                        track(&tracker, &batch);
                        let send = dispatcher.dispatch(batch);
                        tokio::pin!(send);
                        tokio::select! {
                            r = &mut send => r?,
                            _ = tokio::time::sleep(STALL) => {
                                // Backpressure is normal; a pool that takes no work for this
                                // long is stalled: say so on /readyz until it moves again.
                                tracing::warn!(stall = ?STALL, "pool has taken no work; reporting not ready until it does");
                                self.ready.store(false, Ordering::Relaxed);
                                send.await?;
                                self.ready.store(true, Ordering::Relaxed);
                            }
                        }
                        self.metrics.queue_depth.set(dispatcher.queued() as i64);
                    }
                    SourceEvent::Assigned(partitions) => {
                        tracing::info!(?partitions, "partitions assigned");
                        {
                            let mut t = tracker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                            for p in &partitions {
                                t.assign(*p);
                            }
                        }
                        if let Some(s) = &self.pool.snapshots {
                            for p in partitions {
                                let mut snapshots = Vec::new();
                                for step in &stateful_steps {
                                    match s.store.get(&s.keys.snapshot(p, *step)).await {
                                        Ok(Some(bytes)) => snapshots.push((*step, bytes)),
                                        Ok(None) => {}
                                        Err(e) => tracing::warn!(partition = p, step, error = %e,
                                            "cannot load the state snapshot; the partition starts empty"),
                                    }
                                }
                                if !snapshots.is_empty() {
                                    dispatcher
                                        .send(dispatcher.owner(p), Work::Restore { partition: p, snapshots })
                                        .await?;
                                }
                            }
                        }
                    }
                    SourceEvent::Revoked(partitions) => {
                        tracing::info!(?partitions, "partitions revoked; snapshotting their state");
                        for p in partitions {
                            dispatcher.send(dispatcher.owner(p), Work::Revoke { partition: p }).await?;
                            // Its in-flight offsets are the next owner's to redo; if it comes
                            // back, tracking restarts from wherever the source resumes.
                            tracker.lock().unwrap_or_else(std::sync::PoisonError::into_inner).revoke(p);
                        }
                    }
                    SourceEvent::End => {
                        tracing::info!(consumed, "end of input; flushing every open window");
                        dispatcher.broadcast(|| Work::Flush).await?;
                        break;
                    }
                }
            }
            Ok(())
        }
        .await;
        self.ready.store(false, Ordering::Relaxed);
        drop(dispatcher);
        for t in tasks {
            if let Err(e) = t.await {
                tracing::error!(error = %e, "a pool task panicked");
            }
        }
        let staged = sink_stage.await;
        // Whatever was delivered is acknowledged by now; the rest goes back.
        if tokio::time::timeout(RELEASE, source.release()).await.is_err() {
            tracing::warn!(timeout = ?RELEASE, "handing back unfinished messages took too long; the broker redelivers them after its own timeout");
        }
        let mut summary = match staged {
            Ok(r) => r?,
            Err(e) => {
                return Err(RuntimeError::Sink { kind: "stage", attempts: 0, error: e.to_string() });
            }
        };
        result?;
        summary.consumed = consumed;
        Ok(summary)
    }
}

fn track(tracker: &Mutex<OffsetTracker>, batch: &[Message]) {
    let mut t = tracker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for m in batch {
        if !t.track(m.partition, m.offset) {
            tracing::debug!(
                partition = m.partition,
                offset = m.offset,
                "not tracked (revoked from this worker, or out of order): processed, never committed here"
            );
        }
    }
}

/// Writes a batch, retrying what the sink itself did not retry. Returns
/// the records the sink refused for what they are (`SinkError::Rejected`)
/// and how many attempts each had: the caller dead-letters them.
async fn write_with_retry(
    sink: &mut dyn Sink,
    batch: &[Message],
    attempts: u32,
) -> Result<Option<(Vec<Rejection>, u32)>, RuntimeError> {
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 1;
    loop {
        match sink.write(batch).await {
            Ok(()) => return Ok(None),
            Err(SinkError::Rejected { rejected, attempts, .. }) => return Ok(Some((rejected, attempts))),
            Err(e) if attempt < attempts => {
                tracing::warn!(sink = sink.kind(), attempt, error = %e, ?backoff, "sink write failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                attempt += 1;
            }
            Err(e) => return Err(RuntimeError::Sink { kind: sink.kind(), attempts, error: e.to_string() }),
        }
    }
}

async fn sink_stage(
    mut rx: mpsc::Receiver<Outputs>,
    mut sink: Box<dyn Sink>,
    mut dead_letters: Box<dyn Sink>,
    acker: Arc<dyn Acker>,
    tracker: Arc<Mutex<OffsetTracker>>,
    metrics: Metrics,
    attempts: u32,
) -> Result<Summary, RuntimeError> {
    let mut summary = Summary::default();
    let mut results = Vec::new();
    let mut dead = Vec::new();
    let mut finished = Vec::new();
    let mut commits = Commits::new(acker.clone());
    let mut recommits_left = 0;
    loop {
        // Positions gathered for the commit interval are committed when it
        // ends, whether more input comes or not.
        let wait = commits.due_in().unwrap_or(RECOMMIT_IDLE);
        let mut batch = match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(batch)) => batch,
            Ok(None) => break,
            Err(_) if commits.due_in().is_some() => {
                commits.commit(&tracker, &metrics, &mut summary).await;
                continue;
            }
            Err(_idle) => {
                // Kafka's commits are asynchronous: one lost to a rebalance
                // in progress is only reported to the log, and with no
                // further input no later commit would carry its position.
                // So after activity ends, the positions are committed again
                // a few times (idempotent: the same offsets).
                if recommits_left > 0 {
                    recommits_left -= 1;
                    let points: Vec<(i32, i64)> = {
                        let t = tracker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        t.partitions().into_iter().filter_map(|p| Some((p, t.safe_point(p)?))).collect()
                    };
                    if !points.is_empty()
                        && let Err(e) = acker.commit(&points).await
                    {
                        tracing::warn!(error = %e, "idle re-commit failed; trying again later");
                    }
                }
                continue;
            }
        };
        recommits_left = RECOMMITS;
        // What else the pool queued while the last write or commit was in
        // flight (at most the channel's capacity) shares this write and this
        // commit: under exactly-once, one transaction instead of one per pool batch.
        for _ in 0..rx.max_capacity() {
            let Ok(more) = rx.try_recv() else { break };
            batch.outputs.extend(more.outputs);
            batch.holds.extend(more.holds);
        }
        for o in batch.outputs {
            match o {
                Output::Deliver(m, ack) => {
                    finished.extend(ack);
                    results.push(m);
                }
                Output::DeadLetter(d) => {
                    finished.extend(d.ack);
                    dead.push(d.into_message());
                }
                Output::Done(a) => finished.push(a),
            }
        }
        if !results.is_empty() {
            let mut refused = 0;
            if let Some((rejected, tries)) = write_with_retry(sink.as_mut(), &results, attempts).await? {
                // Refused records leave through the dead-letter sink, like
                // any message that cannot be processed: nothing behind them stalls.
                let step = format!("spec.sink.{}", sink.kind());
                for r in rejected {
                    let Some(m) = results.get(r.index) else { continue };
                    tracing::warn!(partition = m.partition, offset = m.offset, attempts = tries, error = %r.error,
                        "the sink refused this record; dead-lettering it");
                    refused += 1;
                    dead.push(
                        DeadLetter {
                            message: m.clone(),
                            reason: "sink_rejected",
                            error: r.error,
                            step: step.clone(),
                            attempt: tries,
                            ack: None,
                        }
                        .into_message(),
                    );
                }
                metrics.dead_lettered.with_label_values(&["sink_rejected"]).inc_by(refused as u64);
            }
            let delivered = (results.len() - refused) as u64;
            summary.delivered += delivered;
            metrics.delivered.inc_by(delivered);
            results.clear();
        }
        if !dead.is_empty() {
            if let Some((rejected, _)) = write_with_retry(dead_letters.as_mut(), &dead, attempts).await? {
                // Nowhere left to put them but the log, which keeps all of it.
                for r in rejected {
                    let Some(m) = dead.get(r.index) else { continue };
                    let h = |name| m.header(name).map(String::from_utf8_lossy).unwrap_or_default();
                    tracing::error!(partition = m.partition, offset = m.offset, error = %h(HEADER_ERROR),
                        step = %h(HEADER_STEP), dead_letter_error = %r.error,
                        payload = %String::from_utf8_lossy(&m.payload.to_bytes()),
                        "the dead-letter sink refused this dead letter too; logged here and acknowledged");
                }
            }
            summary.dead_lettered += dead.len() as u64;
            dead.clear();
        }
        // Delivered (or dead-lettered): now, and only now, finished. Open
        // windows hold their offsets back until their results are delivered.
        {
            let mut t = tracker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            commits.touch(batch.holds.iter().map(|(p, _)| *p));
            for (p, hold) in batch.holds {
                t.hold(p, hold);
            }
            for a in finished.drain(..) {
                t.finish(a.partition, a.offset);
            }
            commits.touch(t.take_commits().into_iter().map(|(p, _)| p));
        }
        if commits.due_in() == Some(Duration::ZERO) {
            commits.commit(&tracker, &metrics, &mut summary).await;
        }
    }
    // The end of the run: whatever the interval still gathers.
    commits.commit(&tracker, &metrics, &mut summary).await;
    Ok(summary)
}

/// The sink stage's commits: which partitions' positions may have moved
/// since the last one, what was committed, and when (for the acker's
/// `commit_interval`).
struct Commits {
    acker: Arc<dyn Acker>,
    interval: Duration,
    touched: std::collections::BTreeSet<i32>,
    committed: BTreeMap<i32, i64>,
    last: tokio::time::Instant,
}

impl Commits {
    fn new(acker: Arc<dyn Acker>) -> Self {
        let interval = acker.commit_interval();
        Commits {
            acker,
            interval,
            touched: Default::default(),
            committed: BTreeMap::new(),
            last: tokio::time::Instant::now(),
        }
    }

    fn touch(&mut self, partitions: impl IntoIterator<Item = i32>) {
        self.touched.extend(partitions);
    }

    /// How long until touched positions are due for a commit (zero: now);
    /// None when nothing was touched.
    fn due_in(&self) -> Option<Duration> {
        (!self.touched.is_empty()).then(|| self.interval.saturating_sub(self.last.elapsed()))
    }

    /// Commits the touched partitions' safe points that moved past what
    /// was committed.
    async fn commit(&mut self, tracker: &Mutex<OffsetTracker>, metrics: &Metrics, summary: &mut Summary) {
        let points: Vec<(i32, i64)> = {
            let t = tracker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            std::mem::take(&mut self.touched)
                .into_iter()
                .filter_map(|p| {
                    let point = t.safe_point(p)?;
                    (self.committed.get(&p).is_none_or(|c| point > *c)).then_some((p, point))
                })
                .collect()
        };
        self.last = tokio::time::Instant::now();
        if points.is_empty() {
            return;
        }
        match self.acker.commit(&points).await {
            Ok(()) => {
                metrics.commits.inc();
                self.committed.extend(points.iter().copied());
                summary.committed.extend(points);
            }
            // Positions only grow: the next commit carries these forward.
            Err(e) => tracing::warn!(error = %e, "commit failed; the next commit will carry these positions"),
        }
    }
}

//! Sources: where messages come from.
//!
//! A source yields events: batches of messages (each with a partition and an
//! offset that the `Acker` can commit later), partition assignments and
//! revocations (so that state can be restored or snapshotted), and the end of
//! a finite input. Reading and committing are separate traits, as in
//! numaflow: the runtime reads from one task and commits from another.
//!
//! Broker sources (Kafka, NATS JetStream, Redis Streams) implement the same
//! two traits: `next` is a batch fetch, `Assigned`/`Revoked` come from the
//! consumer-group rebalance callbacks, `commit` is an async offset commit.

pub mod file;
pub mod generator;
pub mod kafka;
pub mod nats;
pub mod redis;

use std::sync::{Arc, atomic::AtomicBool};

use futures::future::BoxFuture;

use crate::message::Message;

#[derive(Debug)]
pub enum SourceEvent {
    Batch(Vec<Message>),
    /// These partitions are now ours: restore their state before their messages.
    Assigned(Vec<i32>),
    /// These partitions are leaving: snapshot their state and commit.
    Revoked(Vec<i32>),
    /// A finite input is exhausted: flush windows, deliver, commit, stop.
    End,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("source {kind} is not available in this build: {hint}")]
    Unsupported { kind: &'static str, hint: &'static str },
    #[error("{field}: {detail}")]
    Config { field: &'static str, detail: String },
    #[error("{kind} source: {detail}")]
    Broker { kind: &'static str, detail: String },
}

/// Commits source positions: `(partition, next offset to consume)`.
pub trait Acker: Send + Sync {
    fn commit<'a>(&'a self, positions: &'a [(i32, i64)]) -> BoxFuture<'a, Result<(), SourceError>>;
    /// How long the runtime may gather positions before it commits them
    /// (zero: after every write). A commit that is cheap and asynchronous
    /// (Kafka's offsets, NATS acks, XACK) goes at once; one that blocks the
    /// sink stage (a Kafka transaction) is worth spacing out.
    fn commit_interval(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// Called by a source, synchronously, when partitions are about to be taken
/// away (inside Kafka's revoke callback, before the group moves them): the
/// runtime lets in-flight messages finish, for a bounded time, and returns
/// the positions that are safe to commit, so the partitions' next owner
/// starts where this worker stopped instead of redoing its work.
pub type RevokeHook = Arc<dyn Fn(&[i32], Drain) -> Vec<(i32, i64)> + Send + Sync>;

/// What a revocation waits for, and whose positions it gets back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// The revoked partitions' in-flight messages; their positions.
    /// At-least-once: each partition's offsets are committed on their own.
    Revoked,
    /// Every partition's in-flight messages; every partition's position.
    /// Exactly-once: the one open transaction holds outputs of all
    /// partitions, and it may commit only once their offsets cover them all.
    All,
}

pub trait Source: Send {
    /// The next event; a batch holds at most `max` messages.
    fn next(&mut self, max: usize) -> BoxFuture<'_, Result<SourceEvent, SourceError>>;
    fn acker(&self) -> Arc<dyn Acker>;
    fn kind(&self) -> &'static str;
    /// Whether the broker answers, for `/readyz` (None: a local input that
    /// is always reachable). The source keeps the flag current as it reads.
    fn reachability(&self) -> Option<Arc<AtomicBool>> {
        None
    }
    /// Sources whose partitions can be revoked call `hook` before they let
    /// them go; others ignore it.
    fn on_revoke(&mut self, hook: RevokeHook) {
        let _ = hook;
    }
    /// The run is over and what was delivered is acknowledged: hand back
    /// what this worker took and will not finish (messages an open window
    /// held, ...), so that another consumer gets them now instead of after
    /// the broker's redelivery timeout (NATS ackWait, Redis claimIdle).
    /// Kafka needs nothing: uncommitted offsets go with the partitions.
    fn release(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// A background task of a source (or of the leader), aborted when its
/// owner drops the handle: it never outlives what it serves.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Local inputs have nowhere to commit to; this records the last positions
/// (tests read them).
#[derive(Default)]
pub struct MemoryAcker {
    pub committed: std::sync::Mutex<std::collections::BTreeMap<i32, i64>>,
}

impl Acker for MemoryAcker {
    fn commit<'a>(&'a self, positions: &'a [(i32, i64)]) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let mut c = self.committed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (p, o) in positions {
                c.insert(*p, *o);
            }
            Ok(())
        })
    }
}

//! Worker metrics: one registry, passed explicitly; names are constants;
//! labels are bounded (outcome and reason are fixed sets, never a key).
//!
//! The pool adds per-batch tallies, not per message, so that counting costs
//! nothing measurable on the hot path.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::pipeline::Tally;

pub const CONSUMED: &str = "sluice_messages_consumed_total";
pub const PROCESSED: &str = "sluice_messages_processed_total";
pub const DEAD_LETTERED: &str = "sluice_messages_dead_lettered_total";
pub const PROCESSING_SECONDS: &str = "sluice_batch_processing_seconds";
pub const WINDOWS_EMITTED: &str = "sluice_windows_emitted_total";
pub const WINDOW_LATE: &str = "sluice_window_late_events_total";
pub const STATE_KEYS: &str = "sluice_state_keys";
pub const POOL_QUEUE_DEPTH: &str = "sluice_pool_queue_depth";
pub const DELIVERED: &str = "sluice_records_delivered_total";
pub const COMMITS: &str = "sluice_offset_commits_total";
pub const LEADER: &str = "sluice_worker_leader";
pub const STATE_JANITOR_DELETED: &str = "sluice_state_janitor_deleted_total";
pub const REDRIVEN: &str = "sluice_dead_letters_redriven_total";

/// Outcomes of `PROCESSED`.
pub const OUTCOMES: [&str; 5] = ["delivered", "filtered", "duplicate", "windowed", "dead_lettered"];
/// Reasons of `DEAD_LETTERED`.
pub const REASONS: [&str; 6] = ["bad_payload", "expression", "aggregate", "event_time", "late", "sink_rejected"];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub consumed: IntCounter,
    pub processed: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    pub processing: Histogram,
    pub windows_emitted: IntCounter,
    pub window_late: IntCounter,
    pub state_keys: IntGauge,
    pub queue_depth: IntGauge,
    pub delivered: IntCounter,
    pub commits: IntCounter,
    /// 1 while this worker holds the Lease and runs the singleton tasks.
    pub leader: IntGauge,
    /// State snapshots the janitor deleted, by reason (`janitor::REASONS`).
    pub janitor_deleted: IntCounterVec,
    /// Dead letters republished to the source by a redrive.
    pub redriven: IntCounter,
}

#[derive(Debug, thiserror::Error)]
#[error("registering metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    pub fn new(registry: Registry) -> Result<Self, MetricsError> {
        let m = Self {
            consumed: IntCounter::new(CONSUMED, "Messages read from the source")?,
            processed: IntCounterVec::new(
                Opts::new(PROCESSED, "Source messages by what became of them"),
                &["outcome"],
            )?,
            dead_lettered: IntCounterVec::new(
                Opts::new(DEAD_LETTERED, "Messages sent to the dead-letter path, by reason"),
                &["reason"],
            )?,
            processing: Histogram::with_opts(
                HistogramOpts::new(PROCESSING_SECONDS, "Time a pool task spent on one batch")
                    .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
            )?,
            windows_emitted: IntCounter::new(WINDOWS_EMITTED, "Window results emitted")?,
            window_late: IntCounter::new(WINDOW_LATE, "Events that arrived after their window closed")?,
            state_keys: IntGauge::new(STATE_KEYS, "Keys held in window and dedupe state")?,
            queue_depth: IntGauge::new(POOL_QUEUE_DEPTH, "Batches waiting in the processor pool's queues")?,
            delivered: IntCounter::new(DELIVERED, "Records the sink confirmed")?,
            commits: IntCounter::new(COMMITS, "Source position commits")?,
            leader: IntGauge::new(LEADER, "1 while this worker holds the leader Lease and runs the singleton tasks")?,
            janitor_deleted: IntCounterVec::new(
                Opts::new(STATE_JANITOR_DELETED, "Orphaned state snapshots the leader's janitor deleted, by reason"),
                &["reason"],
            )?,
            redriven: IntCounter::new(REDRIVEN, "Dead letters a redrive republished to the source")?,
            registry,
        };
        m.registry.register(Box::new(m.consumed.clone()))?;
        m.registry.register(Box::new(m.processed.clone()))?;
        m.registry.register(Box::new(m.dead_lettered.clone()))?;
        m.registry.register(Box::new(m.processing.clone()))?;
        m.registry.register(Box::new(m.windows_emitted.clone()))?;
        m.registry.register(Box::new(m.window_late.clone()))?;
        m.registry.register(Box::new(m.state_keys.clone()))?;
        m.registry.register(Box::new(m.queue_depth.clone()))?;
        m.registry.register(Box::new(m.delivered.clone()))?;
        m.registry.register(Box::new(m.commits.clone()))?;
        m.registry.register(Box::new(m.leader.clone()))?;
        m.registry.register(Box::new(m.janitor_deleted.clone()))?;
        m.registry.register(Box::new(m.redriven.clone()))?;
        for r in crate::janitor::REASONS {
            m.janitor_deleted.with_label_values(&[r]);
        }
        // Make every bounded label visible at 0 from the start.
        for o in OUTCOMES {
            m.processed.with_label_values(&[o]);
        }
        for r in REASONS {
            m.dead_lettered.with_label_values(&[r]);
        }
        Ok(m)
    }

    /// Add one batch's tallies.
    pub fn add(&self, t: &Tally) {
        let p = &self.processed;
        p.with_label_values(&["delivered"]).inc_by(t.delivered);
        p.with_label_values(&["filtered"]).inc_by(t.filtered);
        p.with_label_values(&["duplicate"]).inc_by(t.duplicates);
        p.with_label_values(&["windowed"]).inc_by(t.windowed);
        p.with_label_values(&["dead_lettered"]).inc_by(t.dead_letters());
        for (reason, n) in &t.dead_lettered {
            self.dead_lettered.with_label_values(&[reason]).inc_by(*n);
        }
        self.windows_emitted.inc_by(t.windows_emitted);
        self.window_late.inc_by(t.late);
    }

    /// The text exposition for `/metrics`.
    pub fn render(&self) -> String {
        let mut buf = String::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode_utf8(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "cannot encode metrics; serving what was encoded");
        }
        buf
    }
}

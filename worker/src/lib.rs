//! The Sluice data plane.
//!
//! ```text
//! source/ ──batches──> pool.rs (N tasks, key-hash dispatch) ──> sink/ ──> delivery.rs
//!   generator, file      pipeline/ filter, map, dedupe,           stdout,     OffsetTracker:
//!   (brokers: later)      window/ (state/ snapshots)               file, null  commit the low-water mark
//!                               └─ errors ─> deadletter.rs
//! ```
//!
//! `runtime` wires them together for the `sluice-worker` binary; `metrics`
//! and `http` expose what it does.

pub mod config;
pub mod deadletter;
pub mod delivery;
pub mod expr;
pub mod http;
pub mod janitor;
pub mod leader;
pub mod message;
pub mod metrics;
pub mod pipeline;
pub mod pool;
pub mod probe;
pub mod redrive;
pub mod retry;
pub mod runtime;
pub mod sink;
pub mod source;
pub mod state;

//! Discards everything, counting it: the sink for benchmarks.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use futures::future::BoxFuture;

use super::{Sink, SinkError};
use crate::message::Message;

#[derive(Default, Clone)]
pub struct NullSink {
    pub count: Arc<AtomicU64>,
}

impl Sink for NullSink {
    fn write<'a>(&'a mut self, batch: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>> {
        self.count.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Box::pin(async { Ok(()) })
    }

    fn kind(&self) -> &'static str {
        "null"
    }
}

/// Logs dead letters when no dead-letter sink is configured, so none is lost silently.
pub struct LogSink;

impl Sink for LogSink {
    fn write<'a>(&'a mut self, batch: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>> {
        for m in batch {
            let h = |name| m.header(name).map(String::from_utf8_lossy).unwrap_or_default();
            tracing::warn!(
                partition = m.partition,
                offset = %h(crate::deadletter::HEADER_OFFSET),
                step = %h(crate::deadletter::HEADER_STEP),
                reason = %h(crate::deadletter::HEADER_REASON),
                error = %h(crate::deadletter::HEADER_ERROR),
                "dead letter (no spec.deadLetter configured; logged and acknowledged)"
            );
        }
        Box::pin(async { Ok(()) })
    }

    fn kind(&self) -> &'static str {
        "log"
    }
}

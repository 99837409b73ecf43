//! Sinks: where results (and dead letters) go.
//!
//! A sink accepts a batch and reports when it is delivered: `write` returns
//! only once the batch is durable as far as the sink can tell (written and
//! flushed for local sinks; acknowledged by the broker for the broker sinks
//! that come later). Only then does the runtime mark the batch's source
//! offsets finished.

pub mod file;
pub mod kafka;
pub mod nats;
pub mod null;
pub mod redis;
pub mod stdout;

use futures::future::BoxFuture;
use serde_json::Value;
use sluice_crds::StdoutFormat;

use crate::message::Message;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("writing to {target}: {source}")]
    Io { target: String, source: std::io::Error },
    #[error("{field}: {detail}")]
    Config { field: &'static str, detail: String },
    #[error("{kind} sink {target}: {detail}")]
    Broker { kind: &'static str, target: String, detail: String },
    /// Not retryable: an exactly-once transaction was aborted; the worker
    /// must restart from the committed offsets.
    #[error("{kind} sink {target}: {detail}")]
    Aborted { kind: &'static str, target: String, detail: String },
    /// The broker answered, and refused these records for what they are
    /// (too large, invalid): sending them again cannot help, and holding
    /// them would stall every message behind them. The rest of the batch
    /// was delivered. After `deadLetter.maxRetries` the runtime dead-letters
    /// them (reason `sink_rejected`).
    #[error("{kind} sink {target} refused {} record(s) after {attempts} attempt(s): {}", rejected.len(),
        rejected.first().map_or("", |r| r.error.as_str()))]
    Rejected { kind: &'static str, target: String, rejected: Vec<Rejection>, attempts: u32 },
}

/// One record a sink refused: its index in the batch written, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub index: usize,
    pub error: String,
}

pub trait Sink: Send {
    /// Deliver a batch; Ok means delivered.
    fn write<'a>(&'a mut self, batch: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>>;
    fn kind(&self) -> &'static str;
}

/// One output line for a message in the given format.
pub fn render(m: &Message, format: StdoutFormat, out: &mut Vec<u8>) {
    match format {
        StdoutFormat::Json => out.extend_from_slice(&m.payload.to_bytes()),
        StdoutFormat::Envelope => {
            let payload = match m.payload.json() {
                Ok(v) => v.clone(),
                Err(_) => Value::String(String::from_utf8_lossy(&m.payload.to_bytes()).into_owned()),
            };
            let headers: serde_json::Map<String, Value> = m
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(String::from_utf8_lossy(v).into_owned())))
                .collect();
            let env = serde_json::json!({
                "key": m.key_str(),
                "partition": m.partition,
                "offset": m.offset,
                "timestamp": m.timestamp,
                "headers": headers,
                "payload": payload,
            });
            out.extend_from_slice(env.to_string().as_bytes());
        }
    }
    out.push(b'\n');
}

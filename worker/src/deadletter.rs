//! The dead-letter path: a message that cannot be processed (bad payload,
//! expression error, late event, bad event time) leaves the pipeline here,
//! with headers that say what went wrong, where, and which source position
//! it was, so that it can be inspected and redriven. No message is dropped
//! silently: without a configured dead-letter sink the record is logged.

use crate::message::{AckId, Message};

pub const HEADER_ERROR: &str = "sluice-error";
pub const HEADER_REASON: &str = "sluice-reason";
pub const HEADER_STEP: &str = "sluice-step";
pub const HEADER_PARTITION: &str = "sluice-partition";
pub const HEADER_OFFSET: &str = "sluice-offset";
pub const HEADER_ATTEMPT: &str = "sluice-attempt";
/// Where the message came from (`kafka/<topic>`, ...); set by broker dead-letter sinks.
pub const HEADER_SOURCE: &str = "sluice-source";

/// One dead-lettered message.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    pub message: Message,
    /// Bounded label: bad_payload, expression, aggregate, event_time, late, sink_rejected.
    pub reason: &'static str,
    pub error: String,
    /// The step's name (`pipeline[2].window` unless named).
    pub step: String,
    pub attempt: u32,
    /// The source position to acknowledge once the dead letter is delivered;
    /// `None` for records a window emitted.
    pub ack: Option<AckId>,
}

impl DeadLetter {
    /// The message as written to the dead-letter sink: the payload as it
    /// was at the failing step, and the headers naming the failure.
    pub fn into_message(self) -> Message {
        let mut m = self.message;
        let (partition, offset) = (m.partition, m.offset);
        m.headers.retain(|(k, _)| !k.starts_with("sluice-"));
        m.headers.extend([
            (HEADER_ERROR.to_string(), self.error.into_bytes()),
            (HEADER_REASON.to_string(), self.reason.as_bytes().to_vec()),
            (HEADER_STEP.to_string(), self.step.into_bytes()),
            (HEADER_PARTITION.to_string(), partition.to_string().into_bytes()),
            (HEADER_OFFSET.to_string(), offset.to_string().into_bytes()),
            (HEADER_ATTEMPT.to_string(), self.attempt.to_string().into_bytes()),
        ]);
        m
    }
}

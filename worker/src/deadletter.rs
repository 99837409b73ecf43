//! The dead-letter path: a message that cannot be processed (bad payload,
//! expression error, late event, bad event time) leaves the pipeline here,
//! with headers that say what went wrong, where, and which source position
//! it was, so that it can be inspected and redriven. No message is dropped
//! silently: without a configured dead-letter sink the record is logged.

use sluice_crds::StreamProcessorSpec;

use crate::{
    message::{AckId, Message},
    sink::{Sink, SinkError, kafka::KafkaSink, nats::NatsSink, redis::RedisSink},
};

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
    /// Bounded label: bad_payload, expression, aggregate, event_time, late,
    /// sink_rejected, redrive_rejected.
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

/// Where dead letters name their source (`HEADER_SOURCE`): `kafka/<topic>`,
/// `nats/<stream>`, `redis/<stream>`, else the source kind.
pub fn source_name(spec: &StreamProcessorSpec) -> String {
    let s = &spec.source;
    match (&s.kafka, &s.nats, &s.redis) {
        (Some(k), _, _) => format!("kafka/{}", k.topic),
        (_, Some(n), _) => format!("nats/{}", n.stream),
        (_, _, Some(r)) => format!("redis/{}", r.stream),
        _ => s.kind().to_string(),
    }
}

/// The broker dead-letter sink `spec.deadLetter` names (Kafka, NATS or
/// Redis), each record carrying `HEADER_SOURCE`; None for stdout or none.
/// Secrets come from `SLUICE_SECRET_DEADLETTER_*` through `env`.
pub async fn broker_sink(
    spec: &StreamProcessorSpec,
    env: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Result<Option<Box<dyn Sink>>, SinkError> {
    let Some(dl) = spec.dead_letter.as_ref() else { return Ok(None) };
    let source = source_name(spec);
    Ok(Some(if let Some(k) = &dl.kafka {
        Box::new(
            KafkaSink::new(k, spec.source.kafka.as_ref(), "DEADLETTER", "spec.deadLetter.kafka", env)?
                .with_header(HEADER_SOURCE, source),
        )
    } else if let Some(r) = &dl.redis {
        Box::new(RedisSink::new(r, "DEADLETTER", "spec.deadLetter.redis", env)?.with_field(HEADER_SOURCE, source))
    } else if let Some(n) = &dl.nats {
        Box::new(NatsSink::new(n, "DEADLETTER", "spec.deadLetter.nats", env).await?.with_header(HEADER_SOURCE, source))
    } else {
        return Ok(None);
    }))
}

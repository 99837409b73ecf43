//! NATS JetStream sink (and dead-letter sink): publishes with a bounded
//! window of unacknowledged publishes; `write` returns once JetStream
//! acknowledged every message of the batch (stored in the stream).
//!
//! Each publish carries `Nats-Msg-Id` = the source identity of the message
//! (`redis-id`/`nats-seq` header, else partition and offset) plus a hash of
//! the payload, so a redelivered input that produces the same output is
//! dropped by JetStream's duplicate window, while distinct outputs of one
//! input (windows) are not.

use std::{
    collections::VecDeque,
    hash::{BuildHasher, Hasher},
};

use async_nats::{
    HeaderMap,
    jetstream::{
        self,
        context::{PublishAckFuture, PublishError, PublishErrorKind},
    },
};
use futures::future::BoxFuture;
use sluice_crds::NatsSink as NatsSinkSpec;

use super::{Rejection, Sink, SinkError};
use crate::{
    message::Message,
    source::{
        nats::{HEADER_KEY, HEADER_NATS_SEQ, connect_options, log_connection_events},
        redis::HEADER_REDIS_ID,
    },
};

const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

pub struct NatsSink {
    js: jetstream::Context,
    subject: String,
    max_in_flight: usize,
    extra_headers: Vec<(String, Vec<u8>)>,
}

/// The dedupe id of a message: where it came from and what it says.
pub fn message_id(m: &Message, payload: &[u8]) -> String {
    let mut h = foldhash::quality::FixedState::with_seed(0x5eed).build_hasher();
    h.write(payload);
    let hash = h.finish();
    if let Some(id) = m.header(HEADER_REDIS_ID) {
        format!("r{}-{hash:016x}", String::from_utf8_lossy(id))
    } else if let Some(seq) = m.header(HEADER_NATS_SEQ) {
        format!("n{}-{hash:016x}", String::from_utf8_lossy(seq))
    } else {
        format!("p{}-{}-{hash:016x}", m.partition, m.offset)
    }
}

/// Header values may not hold line breaks.
fn header_value(v: &[u8]) -> String {
    String::from_utf8_lossy(v).replace(['\r', '\n'], " ")
}

impl NatsSink {
    pub async fn new(
        spec: &NatsSinkSpec,
        place: &str,
        field: &'static str,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
    ) -> Result<Self, SinkError> {
        let options = connect_options(spec.auth.as_ref(), place, field, env)
            .map_err(|detail| SinkError::Config { field, detail })?;
        let options = log_connection_events(options, field, &spec.servers, None);
        let client = options.name("sluice-worker-sink").connect(&spec.servers).await.map_err(|e| {
            SinkError::Config { field, detail: format!("cannot connect to {}: {e}", spec.servers.join(",")) }
        })?;
        let max_in_flight =
            spec.max_in_flight.and_then(|n| usize::try_from(n).ok()).unwrap_or(DEFAULT_MAX_IN_FLIGHT).max(1);
        tracing::info!(subject = %spec.subject, max_in_flight, "NATS JetStream sink configured");
        Ok(Self { js: jetstream::new(client), subject: spec.subject.clone(), max_in_flight, extra_headers: Vec::new() })
    }

    /// Adds a header to every message this sink publishes.
    pub fn with_header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.extra_headers.push((name.to_string(), value.into()));
        self
    }

    fn error(&self, what: &str, e: impl std::fmt::Display) -> SinkError {
        SinkError::Broker { kind: "nats", target: self.subject.clone(), detail: format!("{what}: {e}") }
    }

    async fn write_batch(&self, batch: &[Message]) -> Result<(), SinkError> {
        let mut window: VecDeque<(usize, PublishAckFuture)> =
            VecDeque::with_capacity(self.max_in_flight.min(batch.len()));
        let mut rejected = Vec::new();
        for (index, m) in batch.iter().enumerate() {
            let payload = m.payload.to_bytes().into_owned();
            let mut headers = HeaderMap::new();
            for (k, v) in m.headers.iter().chain(&self.extra_headers) {
                headers.insert(k.as_str(), header_value(v).as_str());
            }
            if let Some(k) = &m.key {
                headers.insert(HEADER_KEY, header_value(k).as_str());
            }
            // `headers` replaces the map: the message id goes in after it.
            let publish = jetstream::message::PublishMessage::build()
                .headers(headers)
                .message_id(message_id(m, &payload))
                .payload(payload.into());
            if window.len() >= self.max_in_flight
                && let Some((i, oldest)) = window.pop_front()
            {
                self.acked(i, oldest.await, &mut rejected)?;
            }
            match self.js.send_publish(self.subject.clone(), publish).await {
                Ok(ack) => window.push_back((index, ack)),
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    rejected.push(Rejection { index, error: format!("the client refused the message: {e}") });
                }
                Err(e) => return Err(self.error("publish", e)),
            }
        }
        for (i, ack) in window {
            self.acked(i, ack.await, &mut rejected)?;
        }
        if rejected.is_empty() {
            Ok(())
        } else {
            Err(SinkError::Rejected { kind: "nats", target: self.subject.clone(), rejected, attempts: 1 })
        }
    }

    /// A publish acknowledgement: stored, refused for what the message is
    /// (over the stream's maximum message size), or an error.
    fn acked(
        &self,
        index: usize,
        ack: Result<jetstream::publish::PublishAck, PublishError>,
        rejected: &mut Vec<Rejection>,
    ) -> Result<(), SinkError> {
        match ack {
            Ok(_) => Ok(()),
            Err(e) if refuses_the_message(&e) => {
                rejected.push(Rejection { index, error: format!("JetStream refused the message: {e}") });
                Ok(())
            }
            Err(e) => Err(self.error("publish ack", e)),
        }
    }
}

/// JetStream's answer that the message itself is refused: its payload or
/// headers are larger than the stream allows.
fn refuses_the_message(e: &PublishError) -> bool {
    use jetstream::ErrorCode;
    std::error::Error::source(e).and_then(|s| s.downcast_ref::<jetstream::Error>()).is_some_and(|j| {
        matches!(j.error_code(), ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM | ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM)
    })
}

impl Sink for NatsSink {
    fn write<'a>(&'a mut self, batch: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(self.write_batch(batch))
    }

    fn kind(&self) -> &'static str {
        "nats"
    }
}

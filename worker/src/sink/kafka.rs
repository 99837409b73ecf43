//! Kafka sink (and dead-letter sink): an idempotent producer with `acks=all`;
//! `write` enqueues the whole batch, then awaits every delivery report, so a
//! batch counts as delivered only once the broker has it.
//!
//! ```text
//! batch ──send_result (librdkafka batches by linger.ms/batch.size, compresses)──> broker
//!   └─ DeliveryFuture per message ──all Ok──> write returns Ok ──> offsets finish
//! ```
//!
//! A full local queue is backpressure: the sink waits for the reports it
//! already has in flight, then enqueues the rest. A failed report fails the
//! batch; the runtime retries it (at-least-once: messages of the batch that
//! did arrive are sent again).

use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer},
};
use serde_json::Value;
use sluice_crds::{Compression, KafkaSink as KafkaSinkSpec};

use super::{Sink, SinkError};
use crate::{expr::Expression, message::Message, source::kafka::client_config};

/// The librdkafka producer settings a sink always runs with (the user's
/// `properties` cannot weaken delivery).
fn producer_settings(compression: Compression) -> [(&'static str, &'static str); 5] {
    [
        ("enable.idempotence", "true"),
        ("acks", "all"),
        ("linger.ms", "5"),
        ("message.timeout.ms", "300000"),
        (
            "compression.type",
            match compression {
                Compression::None => "none",
                Compression::Gzip => "gzip",
                Compression::Snappy => "snappy",
                Compression::Lz4 => "lz4",
                Compression::Zstd => "zstd",
            },
        ),
    ]
}

pub struct KafkaSink {
    producer: FutureProducer,
    topic: String,
    key: Option<Expression>,
    /// Added to every record (the dead-letter sink names the source here).
    extra_headers: Vec<(String, Vec<u8>)>,
}

impl KafkaSink {
    /// `place`: `SINK` or `DEADLETTER` (which secrets to read); `field`: the
    /// spec field for errors; `default_brokers`: the source's brokers, used
    /// when the sink names none.
    pub fn new(
        spec: &KafkaSinkSpec,
        default_brokers: Option<&[String]>,
        place: &str,
        field: &'static str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, SinkError> {
        let brokers = match (&spec.brokers, default_brokers) {
            (Some(b), _) if !b.is_empty() => b.clone(),
            (_, Some(b)) => b.to_vec(),
            _ => {
                return Err(SinkError::Config {
                    field,
                    detail: "no brokers: set brokers (required unless the source is Kafka)".into(),
                });
            }
        };
        let mut config = client_config(&brokers, spec.auth.as_ref(), place, field, env)
            .map_err(|detail| SinkError::Config { field, detail })?;
        for (k, v) in &spec.properties {
            config.set(k, v);
        }
        for (k, v) in producer_settings(spec.compression) {
            config.set(k, v);
        }
        let producer: FutureProducer = config.create().map_err(|e| SinkError::Config {
            field,
            detail: format!("the Kafka client rejected the configuration: {e}"),
        })?;
        let key = spec
            .key
            .as_deref()
            .map(Expression::parse)
            .transpose()
            .map_err(|e| SinkError::Config { field, detail: format!("key: {e}") })?;
        tracing::info!(topic = %spec.topic, brokers = %brokers.join(","), compression = ?spec.compression, "Kafka producer ready");
        Ok(Self { producer, topic: spec.topic.clone(), key, extra_headers: Vec::new() })
    }

    /// Adds a header to every record this sink writes.
    pub fn with_header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.extra_headers.push((name.to_string(), value.into()));
        self
    }

    /// The record key: the key expression's value (strings as is, anything
    /// else as JSON), else the message's own key.
    fn key_of(&self, m: &Message) -> Option<Vec<u8>> {
        let Some(expr) = &self.key else { return m.key.clone() };
        match expr.eval(m) {
            Ok(v) => Some(match v.as_ref() {
                Value::String(s) => s.as_bytes().to_vec(),
                Value::Null => return m.key.clone(),
                other => other.to_string().into_bytes(),
            }),
            Err(e) => {
                tracing::warn!(topic = %self.topic, partition = m.partition, offset = m.offset, error = %e,
                    "sink key expression failed; producing with the message's own key");
                m.key.clone()
            }
        }
    }

    fn error(&self, what: &str, e: &KafkaError) -> SinkError {
        SinkError::Broker { kind: "kafka", target: self.topic.clone(), detail: format!("{what}: {e}") }
    }

    async fn write_batch(&self, batch: &[Message]) -> Result<(), SinkError> {
        let mut reports: Vec<DeliveryFuture> = Vec::with_capacity(batch.len());
        for m in batch {
            let payload = m.payload.to_bytes();
            let key = self.key_of(m);
            let mut headers = OwnedHeaders::new_with_capacity(m.headers.len() + self.extra_headers.len());
            for (k, v) in m.headers.iter().chain(&self.extra_headers) {
                headers = headers.insert(Header { key: k, value: Some(v) });
            }
            let mut record = FutureRecord::to(&self.topic).payload(payload.as_ref()).headers(headers);
            if let Some(k) = &key {
                record = record.key(k.as_slice());
            }
            if m.timestamp > 0 {
                record = record.timestamp(m.timestamp);
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(report) => {
                        reports.push(report);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // Backpressure: wait for what is in flight, then retry.
                        record = back;
                        if reports.is_empty() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        } else {
                            await_reports(self, &mut reports).await?;
                        }
                    }
                    Err((e, _)) => return Err(self.error("enqueue", &e)),
                }
            }
        }
        await_reports(self, &mut reports).await
    }
}

async fn await_reports(sink: &KafkaSink, reports: &mut Vec<DeliveryFuture>) -> Result<(), SinkError> {
    let mut first_error = None;
    for report in reports.drain(..) {
        match report.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => {
                first_error.get_or_insert_with(|| sink.error("delivery", &e));
            }
            Err(_) => {
                first_error.get_or_insert_with(|| SinkError::Broker {
                    kind: "kafka",
                    target: sink.topic.clone(),
                    detail: "the producer dropped a delivery report".into(),
                });
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

impl Sink for KafkaSink {
    fn write<'a>(&'a mut self, batch: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(self.write_batch(batch))
    }

    fn kind(&self) -> &'static str {
        "kafka"
    }
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        // Every write awaited its reports, so this only flushes stragglers of
        // a failed batch; bounded so a dead broker cannot hold shutdown.
        if let Err(e) = self.producer.flush(Duration::from_secs(5)) {
            tracing::debug!(topic = %self.topic, error = %e, "Kafka producer flush at shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_settings_are_fixed() {
        let s: std::collections::BTreeMap<_, _> = producer_settings(Compression::Zstd).into_iter().collect();
        assert_eq!(s["enable.idempotence"], "true");
        assert_eq!(s["acks"], "all");
        assert_eq!(s["compression.type"], "zstd");
    }
}

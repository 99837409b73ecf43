//! Kafka lag: for each partition of the topic, the high watermark minus the
//! group's committed offset (OffsetFetch, which any client may send for a
//! group it is not a member of: no JoinGroup, so no rebalance).
//!
//! rdkafka's metadata, watermark and committed-offset calls block, so one
//! probe runs on the blocking pool, each call bounded by what is left of the
//! probe's deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};
use sluice_crds::{KafkaSource, SaslMechanism, StartFrom};

use super::{Broker, Credentials, Lag, LagProbe, PartitionLag, ProbeError, ProbeOptions, ProcessorRef};

const BROKERS_FIELD: &str = "spec.source.kafka.brokers";
const SASL_FIELD: &str = "spec.source.kafka.auth.sasl.secretRef";
const TLS_FIELD: &str = "spec.source.kafka.auth.tls";

/// Probes one topic for one consumer group; keeps its client between probes.
pub struct KafkaProbe {
    shared: Arc<Shared>,
}

/// What a probe on the blocking pool needs.
struct Shared {
    consumer: BaseConsumer<ProbeContext>,
    endpoint: String,
    topic: String,
    group: String,
    start_from: StartFrom,
    timeout: Duration,
}

/// Keeps the last refused login or failed TLS handshake, with the auth
/// field to fix: librdkafka reports those only to the error callback
/// (served while the consumer is polled), while the call that could not
/// get through just times out. Cleared once a call gets an answer.
#[derive(Default)]
struct ProbeContext {
    refused: std::sync::Mutex<Option<(String, &'static str)>>,
}

impl ProbeContext {
    fn refused(&self) -> std::sync::MutexGuard<'_, Option<(String, &'static str)>> {
        self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "Kafka client error");
        if let Some(field) = crate::source::kafka::auth_field(&error, reason) {
            *self.refused() = Some((reason.to_string(), field));
        }
    }

    /// librdkafka logs a refused login from its own threads at once, even
    /// when the error event has not reached this never-polled-for-messages
    /// consumer yet.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        tracing::debug!(?level, fac, message, "librdkafka");
        if let Some(field) = crate::source::kafka::refusal_field(message) {
            *self.refused() = Some((message.to_string(), field));
        }
    }
}

impl ConsumerContext for ProbeContext {}

impl std::fmt::Debug for KafkaProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaProbe")
            .field("endpoint", &self.shared.endpoint)
            .field("topic", &self.shared.topic)
            .field("group", &self.shared.group)
            .field("start_from", &self.shared.start_from)
            .finish()
    }
}

impl KafkaProbe {
    /// Creates the client (which connects lazily, in the background).
    pub fn new(
        spec: &KafkaSource,
        processor: &ProcessorRef,
        credentials: Credentials,
        options: ProbeOptions,
    ) -> Result<Self, ProbeError> {
        let endpoint = spec.brokers.join(",");
        let group = spec.group.clone().unwrap_or_else(|| processor.default_kafka_group());
        let config = client_config(spec, &group, &credentials, options.timeout)?;
        let consumer: BaseConsumer<ProbeContext> =
            config.create_with_context(ProbeContext::default()).map_err(|e| ProbeError::Config {
                field: "spec.source.kafka".into(),
                detail: format!("the Kafka client rejected the configuration: {e}"),
            })?;
        let shared = Shared {
            consumer,
            endpoint,
            topic: spec.topic.clone(),
            group,
            start_from: spec.start_from,
            timeout: options.timeout,
        };
        Ok(Self { shared: Arc::new(shared) })
    }

    /// The consumer group whose offsets the probe reads.
    pub fn group(&self) -> &str {
        &self.shared.group
    }
}

impl Shared {
    fn blocking_probe(&self) -> Result<Lag, ProbeError> {
        let deadline = Instant::now() + self.timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        // Errors that piled up since the last probe: only a refusal is kept
        // (librdkafka reports a repeated one once), until a call gets through.
        let _ = self.drain_events();

        let metadata = self
            .consumer
            .fetch_metadata(Some(&self.topic), left())
            .map_err(|e| self.error("fetch metadata", e, true))?;
        *self.consumer.context().refused() = None;
        let topic = metadata.topics().iter().find(|t| t.name() == self.topic);
        let partitions: Vec<i32> = match topic {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                t.partitions().iter().map(|p| p.id()).collect()
            }
            _ => {
                return Err(ProbeError::NotFound {
                    broker: Broker::Kafka,
                    endpoint: self.endpoint.clone(),
                    what: "topic",
                    name: self.topic.clone(),
                    field: "spec.source.kafka.topic",
                });
            }
        };

        let mut wanted = TopicPartitionList::with_capacity(partitions.len());
        for &p in &partitions {
            wanted.add_partition(&self.topic, p);
        }
        let committed = self
            .consumer
            .committed_offsets(wanted, left())
            .map_err(|e| self.error("fetch committed offsets", e, false))?;

        let mut per_partition = Vec::with_capacity(partitions.len());
        for &partition in &partitions {
            let (low, high) = self
                .consumer
                .fetch_watermarks(&self.topic, partition, left())
                .map_err(|e| self.error("fetch watermarks", e, false))?;
            let position = committed.find_partition(&self.topic, partition).and_then(|e| match e.offset() {
                Offset::Offset(offset) => Some(offset),
                _ => None,
            });
            let lag = match (position, self.start_from) {
                // Below the low watermark (retention deleted it): the
                // consumer resumes at the low watermark.
                (Some(committed), _) => high - committed.max(low),
                (None, StartFrom::Earliest) => high - low,
                (None, StartFrom::Latest) => 0,
            };
            per_partition.push(PartitionLag { partition, position, end: high, lag: lag.max(0) as u64 });
        }
        let count = u32::try_from(partitions.len()).unwrap_or(u32::MAX);
        Ok(Lag::from_partitions(count, per_partition))
    }

    /// A consumer that is never polled keeps librdkafka's error events
    /// (broker down, ...) queued for ever. It has no assignment, so a poll
    /// returns no messages: only those events, which are logged and dropped.
    /// Polling also serves the error callback ([`ProbeContext`]); returns
    /// the last refusal it kept.
    fn drain_events(&self) -> Option<(String, &'static str)> {
        const MAX_EVENTS: usize = 1000;
        for _ in 0..MAX_EVENTS {
            match self.consumer.poll(Duration::ZERO) {
                None => break,
                Some(Err(error)) => tracing::debug!(%error, endpoint = %self.endpoint, "Kafka client event"),
                Some(Ok(_)) => {}
            }
        }
        self.consumer.context().refused().clone()
    }

    /// `first_contact`: a failure of the first call means the brokers were
    /// never reached, which says more than "timed out".
    fn error(&self, step: &'static str, error: KafkaError, first_contact: bool) -> ProbeError {
        let code = error.rdkafka_error_code();
        let endpoint = self.endpoint.clone();
        if matches!(
            code,
            Some(
                RDKafkaErrorCode::AllBrokersDown
                    | RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::OperationTimedOut
                    | RDKafkaErrorCode::RequestTimedOut
            )
        ) && let Some((refused, field)) = self.drain_events()
        {
            let detail = format!("{step}: {refused}");
            return if field == "auth.tls" {
                ProbeError::Unreachable {
                    broker: Broker::Kafka,
                    endpoint,
                    field: TLS_FIELD,
                    detail: format!("TLS handshake failed: {detail}"),
                }
            } else {
                ProbeError::Auth { broker: Broker::Kafka, endpoint, field: SASL_FIELD, detail }
            };
        }
        match code {
            Some(
                RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::TopicAuthorizationFailed,
            ) => ProbeError::Auth { broker: Broker::Kafka, endpoint, field: SASL_FIELD, detail: error.to_string() },
            Some(
                RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::Resolve
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::RequestTimedOut,
            ) if first_contact => ProbeError::Unreachable {
                broker: Broker::Kafka,
                endpoint,
                field: BROKERS_FIELD,
                detail: format!("{step}: {error} (no answer within {:?})", self.timeout),
            },
            Some(RDKafkaErrorCode::OperationTimedOut | RDKafkaErrorCode::RequestTimedOut) => {
                ProbeError::Timeout { broker: Broker::Kafka, endpoint, step, timeout: self.timeout }
            }
            _ => ProbeError::Broker { broker: Broker::Kafka, endpoint, step, detail: error.to_string() },
        }
    }
}

impl LagProbe for KafkaProbe {
    async fn probe(&self) -> Result<Lag, ProbeError> {
        let shared = Arc::clone(&self.shared);
        let this = &self.shared;
        let timeout_error = || ProbeError::Timeout {
            broker: Broker::Kafka,
            endpoint: this.endpoint.clone(),
            step: "the lag probe",
            timeout: this.timeout,
        };
        // Each blocking call has its own timeout inside; this outer bound
        // (with a margin for the blocking pool) is the belt to those braces.
        let task = tokio::task::spawn_blocking(move || shared.blocking_probe());
        let lag = match tokio::time::timeout(this.timeout + Duration::from_secs(1), task).await {
            Ok(Ok(result)) => result?,
            Ok(Err(join)) => {
                return Err(ProbeError::Broker {
                    broker: Broker::Kafka,
                    endpoint: this.endpoint.clone(),
                    step: "the lag probe",
                    detail: format!("the probe task failed: {join}"),
                });
            }
            Err(_) => return Err(timeout_error()),
        };
        tracing::debug!(topic = %this.topic, group = %this.group, partitions = lag.partitions, lag = lag.total, "probed Kafka lag");
        Ok(lag)
    }
}

/// A consumer that never subscribes: it only asks for metadata, watermarks
/// and the group's committed offsets.
fn client_config(
    spec: &KafkaSource,
    group: &str,
    credentials: &Credentials,
    timeout: Duration,
) -> Result<ClientConfig, ProbeError> {
    let mut config = ClientConfig::new();
    // The user's extra properties first, so the probe's own settings win.
    for (key, value) in &spec.properties {
        config.set(key, value);
    }
    let millis = timeout.as_millis().clamp(10, i32::MAX as u128).to_string();
    config
        .set("bootstrap.servers", spec.brokers.join(","))
        .set("group.id", group)
        .set("client.id", "sluice-lag-probe")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("socket.timeout.ms", &millis)
        .set("socket.connection.setup.timeout.ms", &millis)
        .set("reconnect.backoff.max.ms", "2000")
        .set_log_level(RDKafkaLogLevel::Warning);

    let auth = spec.auth.as_ref();
    let sasl = auth.and_then(|a| a.sasl.as_ref());
    let tls = auth.and_then(|a| a.tls.as_ref());
    let protocol = match (sasl.is_some(), tls.is_some()) {
        (false, false) => "plaintext",
        (false, true) => "ssl",
        (true, false) => "sasl_plaintext",
        (true, true) => "sasl_ssl",
    };
    config.set("security.protocol", protocol);
    if let Some(sasl) = sasl {
        let mechanism = match sasl.mechanism {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        };
        let missing = |what: &str| ProbeError::Config {
            field: SASL_FIELD.into(),
            detail: format!("no SASL {what} was passed to the probe; the Secret must hold it"),
        };
        let username = credentials.username.as_deref().ok_or_else(|| missing("username"))?;
        let password = credentials.password.as_deref().ok_or_else(|| missing("password"))?;
        config.set("sasl.mechanism", mechanism).set("sasl.username", username).set("sasl.password", password);
    }
    if tls.is_some() {
        if let Some(ca) = &credentials.ca_pem {
            config.set("ssl.ca.pem", ca);
        }
        if let (Some(cert), Some(key)) = (&credentials.client_cert_pem, &credentials.client_key_pem) {
            config.set("ssl.certificate.pem", cert).set("ssl.key.pem", key);
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_crds::{CredentialsSecretRef, KafkaAuth, Sasl};

    fn spec() -> KafkaSource {
        KafkaSource {
            brokers: vec!["a:9092".into(), "b:9092".into()],
            topic: "orders".into(),
            group: None,
            start_from: StartFrom::Earliest,
            auth: None,
            properties: [("group.id".to_string(), "hijack".to_string()), ("fetch.max.bytes".into(), "1000".into())]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn the_probe_owns_group_and_commit_settings() {
        let config =
            client_config(&spec(), "shop.orders", &Credentials::default(), Duration::from_secs(3)).expect("config");
        assert_eq!(config.get("group.id"), Some("shop.orders"));
        assert_eq!(config.get("enable.auto.commit"), Some("false"));
        assert_eq!(config.get("bootstrap.servers"), Some("a:9092,b:9092"));
        assert_eq!(config.get("fetch.max.bytes"), Some("1000"));
        assert_eq!(config.get("socket.timeout.ms"), Some("3000"));
        assert_eq!(config.get("security.protocol"), Some("plaintext"));
    }

    #[test]
    fn sasl_needs_the_resolved_username_and_password() {
        let mut spec = spec();
        spec.auth = Some(KafkaAuth {
            sasl: Some(Sasl {
                mechanism: SaslMechanism::ScramSha512,
                secret_ref: CredentialsSecretRef {
                    name: "kafka-user".into(),
                    username_key: "username".into(),
                    password_key: "password".into(),
                },
            }),
            tls: None,
        });
        let err = client_config(&spec, "g", &Credentials::default(), Duration::from_secs(1)).expect_err("no secret");
        assert!(err.to_string().contains(SASL_FIELD), "{err}");
        let credentials = Credentials { username: Some("u".into()), password: Some("p".into()), ..Default::default() };
        let config = client_config(&spec, "g", &credentials, Duration::from_secs(1)).expect("config");
        assert_eq!(config.get("security.protocol"), Some("sasl_plaintext"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("sasl.username"), Some("u"));
    }
}

//! Lag probes: how far a StreamProcessor's consumer is behind its source,
//! asked of the broker WITHOUT joining the consumer group (a probe that
//! joined would trigger a rebalance on every poll).
//!
//! ```text
//!  operator, every pollInterval
//!     └─ SourceProbe::new(spec.source, processor, credentials, options)   (once per spec)
//!          ├─ KafkaProbe  group's committed offsets (OffsetFetch) vs watermarks, per partition
//!          ├─ NatsProbe   the durable's num_pending + num_ack_pending (one "partition")
//!          └─ RedisProbe  XINFO GROUPS lag + pending (one "partition")
//!       .probe().await  ──>  Lag { partitions, total, per_partition }  ──> autoscaler, status
//! ```
//!
//! No position yet (a group that never committed, a durable or group not
//! created yet) counts as the whole retained backlog for `startFrom:
//! earliest` and as nothing for `latest`: that is where the worker will start.
//!
//! Every broker call has a deadline, so an unreachable broker is a
//! [`ProbeError`] after at most [`ProbeOptions::timeout`], never a hang.
//! Credentials arrive resolved ([`Credentials`]): the operator reads the
//! Secrets the spec names, the probe never talks to Kubernetes.

mod kafka;
mod nats;
mod redis;

use std::fmt;
use std::time::Duration;

use sluice_crds::Source;

pub use kafka::KafkaProbe;
pub use nats::NatsProbe;
pub use redis::RedisProbe;

/// How long one probe may take in all, unless the caller says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The StreamProcessor a probe is for: its namespace and name make the
/// default group and durable names, exactly as the worker derives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessorRef {
    pub namespace: String,
    pub name: String,
}

impl ProcessorRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }

    /// Kafka consumer group when `spec.source.kafka.group` is unset: `<namespace>.<name>`.
    pub fn default_kafka_group(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }

    /// JetStream durable when `spec.source.nats.consumer` is unset:
    /// `<namespace>-<name>` (NATS names may not contain dots).
    pub fn default_nats_consumer(&self) -> String {
        format!("{}-{}", self.namespace, self.name)
    }

    /// Redis consumer group when `spec.source.redis.group` is unset: `<namespace>.<name>`.
    pub fn default_redis_group(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }
}

/// Secret values the spec refers to, already read by the caller. Which
/// fields a broker uses: Kafka SASL `username`/`password` and TLS
/// `ca_pem`/`client_cert_pem`/`client_key_pem`; NATS `token`, or
/// `username`/`password`, or `nats_creds` (a .creds file's contents);
/// Redis `password` (and `username` for an ACL user).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub username: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub nats_creds: Option<String>,
    pub ca_pem: Option<String>,
    pub client_cert_pem: Option<String>,
    pub client_key_pem: Option<String>,
}

/// Shows which credentials are present, never their values.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |v: &Option<String>| if v.is_some() { "<set>" } else { "<unset>" };
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &set(&self.password))
            .field("token", &set(&self.token))
            .field("nats_creds", &set(&self.nats_creds))
            .field("ca_pem", &set(&self.ca_pem))
            .field("client_cert_pem", &set(&self.client_cert_pem))
            .field("client_key_pem", &set(&self.client_key_pem))
            .finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeOptions {
    /// Deadline for one whole probe (connecting included).
    pub timeout: Duration,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self { timeout: DEFAULT_TIMEOUT }
    }
}

/// One partition's position. `position` and `end` are in the broker's own
/// units (Kafka offsets; NATS stream sequences: ack floor and last sequence;
/// Redis entries-read and entries-added); `lag` is the number of messages
/// still to process, by the rules in the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    pub partition: i32,
    /// Where the group stands: Kafka's committed offset, NATS's ack floor,
    /// Redis's entries-read. `None`: no position yet, or the broker cannot
    /// tell (Redis, for a group created at an id, until it reads).
    pub position: Option<i64>,
    /// The end of the log in the same units.
    pub end: i64,
    pub lag: u64,
}

/// What one probe found.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Lag {
    /// Kafka: the topic's partition count; NATS and Redis: 1.
    pub partitions: u32,
    /// Sum of `per_partition[..].lag`.
    pub total: u64,
    /// Sorted by partition.
    pub per_partition: Vec<PartitionLag>,
}

impl Lag {
    fn from_partitions(partitions: u32, mut per_partition: Vec<PartitionLag>) -> Self {
        per_partition.sort_by_key(|p| p.partition);
        let total = per_partition.iter().map(|p| p.lag).sum();
        Self { partitions, total, per_partition }
    }
}

/// Which broker an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broker {
    Kafka,
    Nats,
    Redis,
}

impl fmt::Display for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Broker::Kafka => "Kafka",
            Broker::Nats => "NATS",
            Broker::Redis => "Redis",
        })
    }
}

/// Why a probe found no numbers. Each names the broker, the endpoint and the
/// spec field to check.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "{broker} at {endpoint} is unreachable: {detail}; check {field} and that the broker is up and reachable from the operator"
    )]
    Unreachable { broker: Broker, endpoint: String, field: &'static str, detail: String },
    #[error(
        "{broker} at {endpoint} did not answer {step} within {timeout:?}; check that the broker is up and not overloaded"
    )]
    Timeout { broker: Broker, endpoint: String, step: &'static str, timeout: Duration },
    #[error("{broker} {what} `{name}` does not exist at {endpoint}; check {field}, or create it")]
    NotFound { broker: Broker, endpoint: String, what: &'static str, name: String, field: &'static str },
    #[error("{broker} at {endpoint} refused the credentials: {detail}; check the Secret that {field} refers to")]
    Auth { broker: Broker, endpoint: String, field: &'static str, detail: String },
    #[error("{broker} at {endpoint}: {step} failed: {detail}")]
    Broker { broker: Broker, endpoint: String, step: &'static str, detail: String },
    #[error("{field}: {detail}")]
    Config { field: String, detail: String },
    #[error("a `{kind}` source has no broker to ask; the worker reports its lag")]
    NoBroker { kind: &'static str },
}

impl ProbeError {
    /// Worth retrying with backoff (the broker may come back, the worker
    /// may create the stream); the others wait for a spec or Secret change.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ProbeError::Unreachable { .. }
                | ProbeError::Timeout { .. }
                | ProbeError::NotFound { .. }
                | ProbeError::Broker { .. }
        )
    }

    /// A bounded label: the metric label and the Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            ProbeError::Unreachable { .. } => "BrokerUnreachable",
            ProbeError::Timeout { .. } => "BrokerTimeout",
            ProbeError::NotFound { .. } => "SourceNotFound",
            ProbeError::Auth { .. } => "BrokerAuthFailed",
            ProbeError::Broker { .. } => "BrokerError",
            ProbeError::Config { .. } => "InvalidSource",
            ProbeError::NoBroker { .. } => "NoBroker",
        }
    }
}

/// Something that can report a source's lag. Implementations keep their
/// connection between probes and reconnect when it broke.
pub trait LagProbe {
    fn probe(&self) -> impl Future<Output = Result<Lag, ProbeError>> + Send;
}

/// The probe for whichever broker a spec's source names.
#[derive(Debug)]
pub enum SourceProbe {
    Kafka(KafkaProbe),
    Nats(NatsProbe),
    Redis(RedisProbe),
}

impl SourceProbe {
    /// Builds the probe; no network traffic until the first [`LagProbe::probe`].
    pub fn new(
        source: &Source,
        processor: &ProcessorRef,
        credentials: Credentials,
        options: ProbeOptions,
    ) -> Result<Self, ProbeError> {
        if let Some(kafka) = &source.kafka {
            return KafkaProbe::new(kafka, processor, credentials, options).map(SourceProbe::Kafka);
        }
        if let Some(nats) = &source.nats {
            return NatsProbe::new(nats, processor, credentials, options).map(SourceProbe::Nats);
        }
        if let Some(redis) = &source.redis {
            return RedisProbe::new(redis, processor, credentials, options).map(SourceProbe::Redis);
        }
        Err(ProbeError::NoBroker { kind: source.kind() })
    }
}

impl LagProbe for SourceProbe {
    async fn probe(&self) -> Result<Lag, ProbeError> {
        match self {
            SourceProbe::Kafka(p) => p.probe().await,
            SourceProbe::Nats(p) => p.probe().await,
            SourceProbe::Redis(p) => p.probe().await,
        }
    }
}

/// Runs `call` with what is left of the probe's budget, as a Timeout error
/// naming `step` when it runs out.
async fn within<T>(
    deadline: tokio::time::Instant,
    broker: Broker,
    endpoint: &str,
    step: &'static str,
    timeout: Duration,
    call: impl Future<Output = Result<T, ProbeError>>,
) -> Result<T, ProbeError> {
    match tokio::time::timeout_at(deadline, call).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout { broker, endpoint: endpoint.to_string(), step, timeout }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_follow_the_spec_docs() {
        let p = ProcessorRef::new("shop", "orders-by-country");
        assert_eq!(p.default_kafka_group(), "shop.orders-by-country");
        assert_eq!(p.default_nats_consumer(), "shop-orders-by-country");
        assert_eq!(p.default_redis_group(), "shop.orders-by-country");
    }

    #[test]
    fn credentials_debug_hides_secrets() {
        let c = Credentials { username: Some("app".into()), password: Some("hunter2".into()), ..Default::default() };
        let shown = format!("{c:?}");
        assert!(shown.contains("app") && shown.contains("<set>") && !shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn a_generator_has_no_broker() {
        let source = Source {
            generator: Some(sluice_crds::GeneratorSource {
                rate: 1,
                count: None,
                partitions: 1,
                keys: 1,
                seed: None,
                template: Default::default(),
                burst: None,
            }),
            ..Default::default()
        };
        let err =
            SourceProbe::new(&source, &ProcessorRef::new("a", "b"), Credentials::default(), ProbeOptions::default())
                .expect_err("no broker");
        assert_eq!(err.reason(), "NoBroker");
        assert!(!err.is_transient());
    }

    #[test]
    fn lag_sums_and_sorts_partitions() {
        let p = |partition, lag| PartitionLag { partition, position: None, end: 0, lag };
        let lag = Lag::from_partitions(3, vec![p(2, 5), p(0, 1), p(1, 0)]);
        assert_eq!(lag.total, 6);
        assert_eq!(lag.per_partition.iter().map(|p| p.partition).collect::<Vec<_>>(), [0, 1, 2]);
    }
}

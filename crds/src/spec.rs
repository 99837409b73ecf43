//! `StreamProcessor` spec: what the user applies.
//!
//! ```text
//! source ──> pipeline[0..n] (filter | map | dedupe | window) ──> sink
//!                 │ permanent errors (bad payload, expression error, late event,
//!                 └──> deadLetter     retries exhausted)
//! ```
//!
//! Rules the API server can check live here as schema bounds and CEL
//! `x-kubernetes-validations` (one source of truth: `validate` evaluates the
//! same generated schema client-side for local runs). What it cannot check
//! (user expressions compile, referenced Secrets exist) is in `validate`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Duration, StreamProcessorStatus};

/// A stream processor: consume from a source, run a pipeline of steps, produce
/// to a sink, and acknowledge only what was delivered or dead-lettered.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sluice.io",
    version = "v1alpha1",
    kind = "StreamProcessor",
    namespaced,
    shortname = "sp",
    category = "sluice",
    status = "StreamProcessorStatus",
    derive = "PartialEq",
    doc = "A StreamProcessor consumes from Kafka, NATS JetStream or Redis Streams, runs a pipeline of filter/map/dedupe/window steps, and produces to a sink; the operator runs it as an autoscaled worker Deployment.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.source", description = "Source kind and topic/stream"),
    printcolumn(name = "Partitions", type_ = "integer", json_path = ".status.partitions"),
    printcolumn(name = "Lag", type_ = "integer", json_path = ".status.lag"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".status.desiredReplicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Status", type_ = "string", json_path = r#".status.conditions[?(@.type=="Ready")].reason"#),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 50 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name must be a DNS label of at most 50 characters that starts with a letter: it names the worker Deployment, Service and Lease")
)]
#[x_kube(validation = Rule::new("self.delivery != 'exactlyOnce' || (has(self.source.kafka) && has(self.sink.kafka))")
    .message("delivery: exactlyOnce needs a Kafka source and a Kafka sink; use atLeastOnce for other brokers")
    .field_path(".delivery"))]
#[x_kube(validation = Rule::new("!has(self.sink.kafka) || has(self.sink.kafka.brokers) || has(self.source.kafka)")
    .message("sink.kafka.brokers is required unless the source is Kafka (then the source's brokers are used)")
    .field_path(".sink.kafka"))]
#[serde(rename_all = "camelCase")]
pub struct StreamProcessorSpec {
    /// Where messages come from: exactly one of kafka, nats, redis, generator.
    pub source: Source,

    /// Ordered steps; each is exactly one of filter, map, dedupe, window.
    /// Expressions are CEL over `msg` (the JSON payload) and `meta` (key,
    /// headers, partition, offset, timestamp).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub pipeline: Vec<Step>,

    /// Where results go: exactly one of kafka, nats, redis, stdout.
    pub sink: Sink,

    /// Where messages that cannot be processed go, and how hard to retry first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetter>,

    /// Where dedupe and window state lives; memory when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<State>,

    /// Delivery guarantee. exactlyOnce needs a Kafka source and a Kafka sink.
    #[serde(default)]
    pub delivery: Delivery,

    /// Worker replicas when `scaling` is absent; the scale subresource points
    /// here, so `kubectl scale`, an HPA or KEDA can drive it. Defaults to 1
    /// in the API server: the scale subresource fails while it is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000), extend("default" = 1))]
    pub replicas: Option<i32>,

    /// Built-in autoscaling on consumer lag and partition count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<Scaling>,

    /// Processor tasks per pod (default: the CPU limit, at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub workers: Option<i32>,

    /// Messages fetched from the source per batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub batch_size: Option<i32>,

    /// Worker image (default: the operator's own worker image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Compute resources of the worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// A small overlay on the worker pod template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodOverlay>,
}

// ---------------------------------------------------------------- source --

/// Exactly one source kind.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("[has(self.kafka), has(self.nats), has(self.redis), has(self.generator)].filter(x, x).size() == 1")
    .message("set exactly one of source.kafka, source.nats, source.redis, source.generator"))]
#[serde(rename_all = "camelCase")]
pub struct Source {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator: Option<GeneratorSource>,
}

impl Source {
    /// The kind name, as shown in the Source printer column.
    pub fn kind(&self) -> &'static str {
        match self {
            Source { kafka: Some(_), .. } => "kafka",
            Source { nats: Some(_), .. } => "nats",
            Source { redis: Some(_), .. } => "redis",
            Source { generator: Some(_), .. } => "generator",
            _ => "none",
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum StartFrom {
    /// Start from the oldest retained message when the group has no position yet.
    #[default]
    Earliest,
    /// Start from new messages only when the group has no position yet.
    Latest,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSource {
    /// Bootstrap brokers, `host:port`.
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 253)))]
    pub brokers: Vec<String>,
    #[schemars(length(min = 1, max = 249))]
    pub topic: String,
    /// Consumer group (default: `<namespace>.<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub group: Option<String>,
    #[serde(default)]
    pub start_from: StartFrom,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<KafkaAuth>,
    /// Extra librdkafka properties (e.g. `fetch.max.bytes`); credentials belong in `auth`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaAuth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<Sasl>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Sasl {
    pub mechanism: SaslMechanism,
    /// A Secret with the username and password.
    pub secret_ref: CredentialsSecretRef,
}

/// A Secret holding a username and a password, by reference.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[serde(default = "default_username_key")]
    #[schemars(length(min = 1, max = 253))]
    pub username_key: String,
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253))]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}

/// One key of a Secret, by reference.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Tls {
    /// CA bundle that signs the brokers' certificates (default: the system roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// A `kubernetes.io/tls` Secret (tls.crt, tls.key) for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub client_cert_secret_name: Option<String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NatsSource {
    /// Server URLs, `nats://host:port`.
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 512)))]
    pub servers: Vec<String>,
    /// The JetStream stream to read.
    #[schemars(length(min = 1, max = 255))]
    pub stream: String,
    /// Durable pull consumer name (default: `<namespace>-<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub consumer: Option<String>,
    /// Only subjects matching this filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub filter_subject: Option<String>,
    #[serde(default)]
    pub start_from: StartFrom,
    /// How long the server waits for an ack before redelivering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_wait: Option<Duration>,
    /// Deliveries before the server gives up on a message (-1: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -1, max = 1000000))]
    pub max_deliver: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<NatsAuth>,
}

/// NATS credentials, by reference: a token, a user and password, or a creds
/// file; and TLS.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NatsAuth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_secret_ref: Option<CredentialsSecretRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds_secret_ref: Option<SecretKeyRef>,
    /// TLS to the servers (the connection never falls back to plaintext):
    /// the CA that signs their certificates and a client certificate, as
    /// for Kafka. Set `tls: {}` for servers signed by a public CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RedisSource {
    /// `redis://host:port[/db]`, or `rediss://` for TLS, with no password in
    /// it (use passwordSecretRef).
    #[schemars(length(min = 1, max = 512))]
    pub url: String,
    #[schemars(length(min = 1, max = 512))]
    pub stream: String,
    /// Consumer group (default: `<namespace>.<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub group: Option<String>,
    #[serde(default)]
    pub start_from: StartFrom,
    /// Claim pending messages idle this long from other consumers (a dead pod's messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_idle: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// TLS settings for a `rediss://` URL: the CA that signs the server's
    /// certificate (default: the system roots) and a client certificate
    /// for servers that verify clients (`tls-auth-clients`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
}

/// A synthetic source for demos, tests and benchmarks.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GeneratorSource {
    /// Messages per second across all partitions; 0 means as fast as possible.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100000000))]
    pub rate: i64,
    /// Total messages before the input ends (default: endless).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub count: Option<i64>,
    /// Simulated partitions.
    #[serde(default = "default_generator_partitions")]
    #[schemars(range(min = 1, max = 1024))]
    pub partitions: i32,
    /// Distinct values of the `key` field generator.
    #[serde(default = "default_generator_keys")]
    #[schemars(range(min = 1, max = 100000000))]
    pub keys: i64,
    /// Seed of the pseudo-random generators, for reproducible runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub seed: Option<i64>,
    /// Payload fields and how each is generated: `seq`, `key`, `uuid`, `now`,
    /// `int(lo,hi)`, `float(lo,hi)`, `choice(a|b|c)`, or `const(text)`.
    #[schemars(length(min = 1, max = 64))]
    pub template: BTreeMap<String, String>,
    /// Periodic bursts on top of the rate, to make lag rise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<Burst>,
}

fn default_generator_partitions() -> i32 {
    1
}
fn default_generator_keys() -> i64 {
    100
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Burst {
    pub every: Duration,
    #[schemars(range(min = 1, max = 100000000))]
    pub messages: i64,
}

// -------------------------------------------------------------- pipeline --

/// One pipeline step: exactly one of filter, map, dedupe, window.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("[has(self.filter), has(self.map), has(self.dedupe), has(self.window)].filter(x, x).size() == 1")
    .message("each pipeline step sets exactly one of filter, map, dedupe, window"))]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// A name for logs, metrics and dead-letter headers (default: the step's index and kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub name: Option<String>,
    /// Keep messages for which this CEL expression is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub filter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<MapStep>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedupe: Option<Dedupe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
}

impl Step {
    pub fn kind(&self) -> &'static str {
        match self {
            Step { filter: Some(_), .. } => "filter",
            Step { map: Some(_), .. } => "map",
            Step { dedupe: Some(_), .. } => "dedupe",
            Step { window: Some(_), .. } => "window",
            _ => "none",
        }
    }
}

/// Set fields from CEL expressions, then drop fields.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("size(self.set) + size(self.drop) > 0")
    .message("map sets or drops at least one field"))]
#[serde(rename_all = "camelCase")]
pub struct MapStep {
    /// Field name to CEL expression; the result replaces or adds that top-level field.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub set: BTreeMap<String, String>,
    /// Top-level fields to remove.
    #[serde(default)]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256)))]
    pub drop: Vec<String>,
}

/// Drop messages whose key was seen within `ttl`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Dedupe {
    /// CEL expression for the identity of a message, e.g. `msg.id`.
    #[schemars(length(min = 1, max = 4096))]
    pub key: String,
    pub ttl: Duration,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum WindowType {
    /// Fixed, non-overlapping windows of `size`, aligned to the epoch.
    Tumbling,
    /// Windows of `size` starting every `slide`.
    Sliding,
    /// Per-key bursts of activity separated by at least `gap`.
    Session,
    /// Every `count` messages of a key.
    Count,
}

/// A keyed window with aggregates.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.type == 'tumbling' ? (has(self.size) && !has(self.slide) && !has(self.gap) && !has(self.count)) : true")
    .message("a tumbling window sets size only (not slide, gap or count)"))]
#[x_kube(validation = Rule::new("self.type == 'sliding' ? (has(self.size) && has(self.slide) && !has(self.gap) && !has(self.count)) : true")
    .message("a sliding window sets size and slide (not gap or count)"))]
#[x_kube(validation = Rule::new("self.type == 'sliding' && has(self.size) && has(self.slide) ? duration(self.slide) <= duration(self.size) && duration(self.slide) > duration('0s') : true")
    .message("a sliding window's slide must be greater than 0 and at most its size")
    .field_path(".slide"))]
#[x_kube(validation = Rule::new("self.type == 'session' ? (has(self.gap) && !has(self.size) && !has(self.slide) && !has(self.count)) : true")
    .message("a session window sets gap only (not size, slide or count)"))]
#[x_kube(validation = Rule::new("self.type == 'count' ? (has(self.count) && !has(self.size) && !has(self.slide) && !has(self.gap) && !has(self.time)) : true")
    .message("a count window sets count only (not size, slide, gap or time)"))]
#[x_kube(validation = Rule::new("!has(self.size) || duration(self.size) > duration('0s')")
    .message("window size must be greater than 0")
    .field_path(".size"))]
#[x_kube(validation = Rule::new("!has(self.gap) || duration(self.gap) > duration('0s')")
    .message("session gap must be greater than 0")
    .field_path(".gap"))]
#[serde(rename_all = "camelCase")]
pub struct Window {
    #[serde(rename = "type")]
    pub type_: WindowType,
    /// tumbling and sliding: window length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Duration>,
    /// sliding: distance between window starts (at most size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slide: Option<Duration>,
    /// session: inactivity that closes a session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap: Option<Duration>,
    /// count: messages per window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000000))]
    pub count: Option<i64>,
    /// CEL expression for the grouping key (default: one window for all messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub key_by: Option<String>,
    /// Event time; processing time when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<EventTime>,
    pub aggregate: Aggregates,
}

/// Where event time comes from and how late an event may arrive.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EventTime {
    /// CEL expression giving epoch milliseconds or an RFC 3339 string, e.g. `msg.ts`.
    #[schemars(length(min = 1, max = 4096))]
    pub field: String,
    /// How far behind the newest event time an event may arrive and still count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_lateness: Option<Duration>,
}

/// Marker for aggregates that take no argument (`count: {}`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Empty {}

/// The aggregates emitted per window; only those named are computed.
/// Each value (but count's) is a CEL expression evaluated per message.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("has(self.count) || has(self.sum) || has(self.min) || has(self.max) || has(self.avg) || has(self.first) || has(self.last) || has(self.distinctCount)")
    .message("name at least one aggregate: count, sum, min, max, avg, first, last or distinctCount"))]
#[serde(rename_all = "camelCase")]
pub struct Aggregates {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<Empty>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub sum: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub min: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub max: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub avg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub first: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub last: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub distinct_count: Option<String>,
}

impl Aggregates {
    /// (output field, expression) for every named aggregate but count.
    pub fn expressions(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("sum", &self.sum),
            ("min", &self.min),
            ("max", &self.max),
            ("avg", &self.avg),
            ("first", &self.first),
            ("last", &self.last),
            ("distinctCount", &self.distinct_count),
        ]
        .into_iter()
        .filter_map(|(name, expr)| expr.as_deref().map(|e| (name, e)))
    }
}

// ------------------------------------------------------------------ sink --

/// Exactly one sink kind.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("[has(self.kafka), has(self.nats), has(self.redis), has(self.stdout)].filter(x, x).size() == 1")
    .message("set exactly one of sink.kafka, sink.nats, sink.redis, sink.stdout"))]
#[serde(rename_all = "camelCase")]
pub struct Sink {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSink>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsSink>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSink>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<StdoutSink>,
}

impl Sink {
    pub fn kind(&self) -> &'static str {
        match self {
            Sink { kafka: Some(_), .. } => "kafka",
            Sink { nats: Some(_), .. } => "nats",
            Sink { redis: Some(_), .. } => "redis",
            Sink { stdout: Some(_), .. } => "stdout",
            _ => "none",
        }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    #[default]
    Lz4,
    Zstd,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSink {
    /// Bootstrap brokers (default: the Kafka source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 253)))]
    pub brokers: Option<Vec<String>>,
    #[schemars(length(min = 1, max = 249))]
    pub topic: String,
    /// CEL expression for the record key (default: the input message's key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub key: Option<String>,
    #[serde(default)]
    pub compression: Compression,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<KafkaAuth>,
    /// Extra librdkafka producer properties. Records go to the partition
    /// Java clients choose for their key (`partitioner: murmur2_random`)
    /// unless `partitioner` is set here; idempotence, acks and compression
    /// cannot be changed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NatsSink {
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 512)))]
    pub servers: Vec<String>,
    /// Subject to publish to; JetStream must have a stream that captures it
    /// (see `stream`).
    #[schemars(length(min = 1, max = 255))]
    pub subject: String,
    /// The JetStream stream that captures `subject`. When set, the
    /// processor's leader creates it if it is missing (file storage, limits
    /// retention, `subject` its only subject) and reports an existing one
    /// that does not capture `subject`. Unset: the stream is yours to create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"^[^.*>\s/\\]+$"))]
    pub stream: Option<String>,
    /// Publishes awaiting an ack at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_in_flight: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<NatsAuth>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RedisSink {
    #[schemars(length(min = 1, max = 512))]
    pub url: String,
    #[schemars(length(min = 1, max = 512))]
    pub stream: String,
    /// Trim the stream to about this many entries (XADD MAXLEN ~).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_len: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// TLS settings for a `rediss://` URL: the CA that signs the server's
    /// certificate (default: the system roots) and a client certificate
    /// for servers that verify clients (`tls-auth-clients`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// Write each output once even when its input is delivered again (after
    /// a crash or a rebalance). Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedupe: Option<SinkDedupe>,
}

/// Deduplication in a sink: an entry whose id (its input's identity and a
/// hash of its payload) was written within `window` is skipped.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SinkDedupe {
    /// How long an id is remembered (a key with this expiry per entry in
    /// Redis); longer than the longest redelivery you expect.
    pub window: Duration,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum StdoutFormat {
    /// One JSON object per line: the payload only.
    #[default]
    Json,
    /// One JSON object per line with key, headers, partition and offset around the payload.
    Envelope,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StdoutSink {
    #[serde(default)]
    pub format: StdoutFormat,
}

// ----------------------------------------------------------- dead letter --

/// Where unprocessable messages go (exactly one target), with the retry policy
/// for sink errors (`backoff` for every retry; `maxRetries` for records a
/// sink refuses before they are given up on).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("[has(self.kafka), has(self.nats), has(self.redis), has(self.stdout)].filter(x, x).size() == 1")
    .message("set exactly one of deadLetter.kafka, deadLetter.nats, deadLetter.redis, deadLetter.stdout"))]
#[x_kube(validation = Rule::new("!has(self.redrive) || !has(self.stdout)")
    .message("deadLetter.redrive needs a dead-letter topic or stream to read back (kafka, nats or redis), not stdout")
    .field_path(".redrive"))]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSink>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsSink>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSink>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<StdoutSink>,
    /// Attempts after the first for a record the sink refuses for what it is (too large, invalid); then it is dead-lettered with reason sink_rejected. An unreachable broker is retried without limit instead (backpressure), never a reason to dead-letter.
    #[serde(default = "default_max_retries")]
    #[schemars(range(min = 0, max = 100))]
    pub max_retries: i32,
    #[serde(default)]
    pub backoff: Backoff,
    /// Replay the dead letters into the source once the cause is fixed.
    /// Setting `redrive.id`, or changing it, asks for one redrive: the
    /// leader worker reads the dead-letter topic or stream from where the
    /// last redrive stopped up to its end at the start (so records that
    /// fail again wait for the next redrive instead of looping), and
    /// republishes each record to the source with its key, payload and
    /// headers (minus the dead-letter ones, plus `sluice-redrive-id: <id>`).
    /// A finished id is recorded on the worker Lease
    /// (`sluice.io/redrive-done`) and never run again; a redrive cut short
    /// by a restart is finished by the next leader. Changing this field
    /// restarts the worker pods, like any spec change. Not for a stdout
    /// dead-letter sink, which cannot be read back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redrive: Option<Redrive>,
}

/// One requested redrive of the dead letters.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Redrive {
    /// Any new value asks for a redrive, e.g. a date or a ticket number;
    /// the records it republishes carry it in the `sluice-redrive-id`
    /// header. An id that was already done does nothing.
    #[schemars(length(min = 1, max = 253))]
    pub id: String,
}

fn default_max_retries() -> i32 {
    3
}

/// Exponential backoff with full jitter between `initial` and `max`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("duration(self.initial) <= duration(self.max)")
    .message("backoff.initial must not exceed backoff.max"))]
#[serde(rename_all = "camelCase")]
pub struct Backoff {
    #[serde(default = "default_backoff_initial")]
    pub initial: Duration,
    #[serde(default = "default_backoff_max")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: default_backoff_initial(), max: default_backoff_max() }
    }
}

fn default_backoff_initial() -> Duration {
    Duration::from_millis(100)
}
fn default_backoff_max() -> Duration {
    Duration::from_millis(10_000)
}

// ----------------------------------------------------------------- state --

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum StateBackend {
    /// In the worker's memory; window state is lost when a partition moves.
    #[default]
    Memory,
    /// In Redis; window state is snapshotted and restored when a partition moves.
    Redis,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.backend != 'redis' || has(self.redis)")
    .message("state.backend: redis needs state.redis.url")
    .field_path(".redis"))]
#[serde(rename_all = "camelCase")]
pub struct State {
    #[serde(default)]
    pub backend: StateBackend,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisState>,
    /// Expire keys (dedupe entries, idle window state) after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    /// How often window state is snapshotted to the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_interval: Option<Duration>,
    /// Bound on keys held in memory; the oldest are evicted first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_keys: Option<i64>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RedisState {
    #[schemars(length(min = 1, max = 512))]
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// TLS settings for a `rediss://` URL: the CA that signs the server's
    /// certificate (default: the system roots) and a client certificate
    /// for servers that verify clients (`tls-auth-clients`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
}

// -------------------------------------------------------------- delivery --

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum Delivery {
    /// Commit a source position only after everything at or below it was delivered or dead-lettered.
    #[default]
    AtLeastOnce,
    /// Kafka to Kafka only: produce and commit offsets in one transaction.
    ExactlyOnce,
}

// --------------------------------------------------------------- scaling --

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("scaling.minReplicas must not exceed scaling.maxReplicas")
    .field_path(".minReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct Scaling {
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Lag one replica is expected to keep up with.
    #[serde(default = "default_lag_per_replica")]
    #[schemars(range(min = 1))]
    pub lag_per_replica: i64,
    /// How often the broker is probed for lag and partitions.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Duration,
    /// Scale down only to the highest recommendation seen within this window.
    #[serde(default = "default_stabilization")]
    pub scale_down_stabilization: Duration,
    /// With scaleToZero: lag above which a processor at zero is woken up.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub activation_lag: i64,
    /// Scale to zero replicas when there has been no lag for scaleDownStabilization.
    #[serde(default)]
    pub scale_to_zero: bool,
    /// Polls a partition's committed offset may stand still, with lag, before it
    /// counts as stuck and leaves the lag sum.
    #[serde(default = "default_stuck_after")]
    #[schemars(range(min = 1, max = 1000))]
    pub stuck_after: i32,
}

fn default_min_replicas() -> i32 {
    1
}
fn default_lag_per_replica() -> i64 {
    1000
}
fn default_poll_interval() -> Duration {
    Duration::from_millis(10_000)
}
fn default_stabilization() -> Duration {
    Duration::from_millis(300_000)
}
fn default_stuck_after() -> i32 {
    3
}

// ------------------------------------------------------------------- pod --

/// What users may add to the worker pod template.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodOverlay {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub tolerations: Vec<Toleration>,
    /// Run workers under this ServiceAccount instead of the one the operator creates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: Option<String>,
}

//! Validation in two layers, each returning every problem at once with the
//! field path at fault (`spec.pipeline[2].window.size: ...`).
//!
//! 1. [`validate_manifest`] checks a document the way the API server would:
//!    the generated CRD schema (types, enums, bounds, required fields, and
//!    unknown fields as `kubectl --validate=strict` does), then the CRD's CEL
//!    rules, evaluated client-side with `kube-cel` against the very same
//!    generated schema, so a local `sluice-worker run` and the cluster agree.
//! 2. [`StreamProcessorSpec::validate`] checks what the API server cannot:
//!    user CEL expressions compile and name only `msg` and `meta`, durations
//!    are sensible, generator templates parse, URLs carry no credentials.
//!    The operator runs this on every reconcile and reports failures as a
//!    `Degraded` condition.

use std::fmt;

use serde_json::Value;

use crate::{StreamProcessor, StreamProcessorSpec, crd, generator::FieldGenerator};

/// One problem, at one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path from the document root, e.g. `spec.pipeline[2].window.size`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found, in document order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl ValidationErrors {
    pub fn paths(&self) -> Vec<&str> {
        self.0.iter().map(|e| e.path.as_str()).collect()
    }
}

/// The variables user expressions may read.
pub const EXPRESSION_VARIABLES: [&str; 2] = ["msg", "meta"];

/// Parse and validate a StreamProcessor document (YAML or JSON). A document
/// without `kind` is taken as a bare spec, which the worker accepts for local runs.
pub fn parse_manifest(text: &str) -> Result<StreamProcessor, ValidationErrors> {
    let value: Value = serde_yaml::from_str(text).map_err(|e| {
        ValidationErrors(vec![FieldError {
            path: "<document>".into(),
            message: format!("not valid YAML or JSON: {e}"),
        }])
    })?;
    let value = match value.get("kind") {
        Some(_) => value,
        None => serde_json::json!({
            "apiVersion": "sluice.io/v1alpha1",
            "kind": "StreamProcessor",
            "metadata": {"name": "local", "namespace": "default"},
            "spec": value,
        }),
    };
    validate_manifest(&value)
}

/// Validate a StreamProcessor object as the API server would, then as the
/// operator does.
pub fn validate_manifest(value: &Value) -> Result<StreamProcessor, ValidationErrors> {
    let mut errors = Vec::new();
    match (value.get("apiVersion").and_then(Value::as_str), value.get("kind").and_then(Value::as_str)) {
        (Some("sluice.io/v1alpha1"), Some("StreamProcessor")) => {}
        (api, kind) => errors.push(FieldError {
            path: "<document>".into(),
            message: format!(
                "expected apiVersion sluice.io/v1alpha1 and kind StreamProcessor, found {} {}",
                api.unwrap_or("<none>"),
                kind.unwrap_or("<none>")
            ),
        }),
    }
    let mut schema = crd::openapi_schema();
    // The served schema leaves the object envelope implicit; name it so that
    // it is not taken for unknown fields.
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        props.insert("apiVersion".into(), serde_json::json!({"type": "string"}));
        props.insert("kind".into(), serde_json::json!({"type": "string"}));
        props.insert("metadata".into(), serde_json::json!({"type": "object"}));
    }
    forbid_unknown_fields(&mut schema);
    let validator = jsonschema::validator_for(&schema).expect("the generated CRD schema is a valid JSON schema");
    for err in validator.iter_errors(value) {
        let mut path = pointer_to_path(err.instance_path().as_str());
        let message = match err.kind() {
            jsonschema::error::ValidationErrorKind::Required { property } => {
                path = join(&path, property.as_str().unwrap_or_default());
                "required field is missing".to_string()
            }
            jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } => {
                for field in unexpected.iter().skip(1) {
                    errors.push(FieldError { path: join(&path, field), message: "unknown field".into() });
                }
                path = join(&path, unexpected.first().map(String::as_str).unwrap_or_default());
                "unknown field".to_string()
            }
            _ => err.to_string(),
        };
        errors.push(FieldError { path, message });
    }
    if !errors.is_empty() {
        return Err(ValidationErrors(errors));
    }
    if let Err(cel_errors) = kube::core::cel::Validator::new().validate(&schema, value, None) {
        errors.extend(cel_errors.into_vec().into_iter().map(|e| FieldError {
            path: match e.field_path.trim_start_matches('.') {
                // The API server allows no fieldPath into metadata, so rules on
                // the object root name their field at the start of the message.
                "" if e.message.starts_with("metadata.") => {
                    e.message.split_whitespace().next().unwrap_or_default().trim_end_matches(':').to_string()
                }
                "" => "<document>".into(),
                p => p.to_string(),
            },
            message: e.message,
        }));
    }
    let sp: StreamProcessor = match serde_json::from_value(value.clone()) {
        Ok(sp) => sp,
        Err(e) => {
            errors.push(FieldError { path: "<document>".into(), message: e.to_string() });
            return Err(ValidationErrors(errors));
        }
    };
    if let Err(ValidationErrors(more)) = sp.spec.validate() {
        errors.extend(more);
    }
    if errors.is_empty() { Ok(sp) } else { Err(ValidationErrors(errors)) }
}

/// Structural schemas prune unknown fields silently; `kubectl apply` rejects
/// them (`--validate=strict`). Mirror kubectl so a typo is an error here too.
fn forbid_unknown_fields(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let is_open = map.contains_key("additionalProperties")
                || map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            if map.contains_key("properties") && !is_open {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            for (key, child) in map.iter_mut() {
                // `metadata` is checked by the API server, not by our schema.
                if key != "metadata" {
                    forbid_unknown_fields(child);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(forbid_unknown_fields),
        _ => {}
    }
}

/// `/spec/pipeline/2/window` -> `spec.pipeline[2].window`.
fn pointer_to_path(pointer: &str) -> String {
    let mut path = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if seg.chars().all(|c| c.is_ascii_digit()) && !seg.is_empty() {
            path.push_str(&format!("[{seg}]"));
        } else {
            path = join(&path, &seg);
        }
    }
    if path.is_empty() { "<document>".into() } else { path }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() || path == "<document>" { field.to_string() } else { format!("{path}.{field}") }
}

/// Collects problems under a path prefix.
struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError { path: path.into(), message: message.into() });
    }

    /// A user expression compiles and reads only `msg` and `meta`.
    fn expression(&mut self, path: String, expr: &str) {
        match cel::Program::compile(expr) {
            Err(e) => {
                let detail: Vec<String> =
                    e.errors.iter().map(|pe| format!("at column {}: {}", pe.pos.1 + 1, pe.msg)).collect();
                self.err(path, format!("invalid CEL expression {expr:?}: {}", detail.join("; ")));
            }
            Ok(program) => {
                let unknown: Vec<String> = crate::expr::free_variables(program.expression())
                    .into_iter()
                    .filter(|v| !EXPRESSION_VARIABLES.contains(&v.as_str()))
                    .collect();
                if !unknown.is_empty() {
                    self.err(
                        path,
                        format!(
                            "expression {expr:?} reads unknown variable(s) {}; expressions see `msg` (the JSON payload) and `meta` (key, headers, partition, offset, timestamp)",
                            unknown.join(", ")
                        ),
                    );
                }
            }
        }
    }

    fn positive(&mut self, path: String, d: &crate::Duration) {
        if d.as_millis() == 0 {
            self.err(path, "must be greater than 0");
        }
    }

    fn at_least(&mut self, path: String, d: &crate::Duration, min_ms: u64, hint: &str) {
        if d.as_millis() < min_ms {
            self.err(path, format!("must be at least {}; {hint}", crate::Duration::from_millis(min_ms)));
        }
    }

    fn kafka_brokers(&mut self, path: &str, brokers: &[String]) {
        for (i, b) in brokers.iter().enumerate() {
            let ok = b.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok || b.contains("://") {
                self.err(format!("{path}[{i}]"), format!("{b:?} is not host:port, e.g. kafka.shop.svc:9092"));
            }
        }
    }

    fn kafka_properties(&mut self, path: &str, props: &std::collections::BTreeMap<String, String>) {
        const SECRET: [&str; 6] = [
            "sasl.password",
            "sasl.username",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
        ];
        const OWNED: [&str; 5] =
            ["enable.auto.commit", "group.id", "transactional.id", "enable.idempotence", "bootstrap.servers"];
        for key in props.keys() {
            if SECRET.contains(&key.as_str()) {
                self.err(
                    format!("{path}.{key}"),
                    "credentials must not be inline; use auth.sasl.secretRef or auth.tls",
                );
            } else if OWNED.contains(&key.as_str()) {
                self.err(format!("{path}.{key}"), "set by Sluice from the spec (brokers, group, delivery); remove it");
            }
        }
    }

    /// `path` is the Redis object's (`spec.source.redis`, ...).
    fn redis_url(&mut self, path: &str, url: &str, tls: Option<&crate::Tls>) {
        if tls.is_some() && url.starts_with("redis://") {
            self.err(
                format!("{path}.tls"),
                "TLS settings need a rediss:// url (redis:// is plaintext); use rediss:// or remove tls",
            );
        }
        let path = format!("{path}.url");
        let Some(rest) = url.strip_prefix("redis://").or_else(|| url.strip_prefix("rediss://")) else {
            self.err(path, format!("{url:?} must start with redis:// or rediss://"));
            return;
        };
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.contains('@') {
            self.err(path, "credentials must not be inline in the URL; use passwordSecretRef");
        } else if authority.is_empty() {
            self.err(path, format!("{url:?} names no host"));
        }
    }

    fn nats_servers(&mut self, path: &str, servers: &[String]) {
        for (i, s) in servers.iter().enumerate() {
            let rest = ["nats://", "tls://", "ws://", "wss://"].iter().find_map(|p| s.strip_prefix(p)).unwrap_or(s);
            if rest.contains('@') {
                self.err(format!("{path}[{i}]"), "credentials must not be inline in the URL; use auth");
            } else if rest.is_empty() || rest.contains("://") {
                self.err(format!("{path}[{i}]"), format!("{s:?} is not a NATS URL, e.g. nats://nats.shop.svc:4222"));
            }
        }
    }

    fn sink(&mut self, path: &str, sink: &SinkRef<'_>) {
        if let Some(k) = sink.kafka {
            if let Some(brokers) = &k.brokers {
                self.kafka_brokers(&format!("{path}.kafka.brokers"), brokers);
            }
            if let Some(key) = &k.key {
                self.expression(format!("{path}.kafka.key"), key);
            }
            self.kafka_properties(&format!("{path}.kafka.properties"), &k.properties);
        }
        if let Some(n) = sink.nats {
            self.nats_servers(&format!("{path}.nats.servers"), &n.servers);
        }
        if let Some(r) = sink.redis {
            self.redis_url(&format!("{path}.redis"), &r.url, r.tls.as_ref());
        }
    }
}

/// The destination kinds shared by `sink` and `deadLetter`.
struct SinkRef<'a> {
    kafka: Option<&'a crate::KafkaSink>,
    nats: Option<&'a crate::NatsSink>,
    redis: Option<&'a crate::RedisSink>,
}

impl StreamProcessorSpec {
    /// What the API server cannot check. Paths start at `spec.`.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut c = Checker { errors: Vec::new() };

        let src = &self.source;
        if let Some(k) = &src.kafka {
            c.kafka_brokers("spec.source.kafka.brokers", &k.brokers);
            c.kafka_properties("spec.source.kafka.properties", &k.properties);
        }
        if let Some(n) = &src.nats {
            c.nats_servers("spec.source.nats.servers", &n.servers);
            if let Some(d) = &n.ack_wait {
                c.at_least("spec.source.nats.ackWait".into(), d, 1000, "the server needs time to see an ack");
            }
            if let Some(consumer) = &n.consumer
                && consumer.contains(['.', '*', '>', ' '])
            {
                c.err("spec.source.nats.consumer", "a durable name must not contain '.', '*', '>' or spaces");
            }
        }
        if let Some(r) = &src.redis {
            c.redis_url("spec.source.redis", &r.url, r.tls.as_ref());
            if let Some(d) = &r.claim_idle {
                c.at_least(
                    "spec.source.redis.claimIdle".into(),
                    d,
                    1000,
                    "shorter steals messages from live consumers",
                );
            }
        }
        if let Some(g) = &src.generator {
            for (field, spec) in &g.template {
                if let Err(e) = spec.parse::<FieldGenerator>() {
                    c.err(format!("spec.source.generator.template.{field}"), e.to_string());
                }
            }
            if let Some(b) = &g.burst {
                c.positive("spec.source.generator.burst.every".into(), &b.every);
            }
        }

        for (i, step) in self.pipeline.iter().enumerate() {
            let p = format!("spec.pipeline[{i}]");
            if let Some(f) = &step.filter {
                c.expression(format!("{p}.filter"), f);
            }
            if let Some(m) = &step.map {
                for (field, expr) in &m.set {
                    if field.is_empty() {
                        c.err(format!("{p}.map.set"), "field names must not be empty");
                    }
                    c.expression(format!("{p}.map.set.{field}"), expr);
                }
                for (j, field) in m.drop.iter().enumerate() {
                    if m.set.contains_key(field) {
                        c.err(format!("{p}.map.drop[{j}]"), format!("{field:?} is both set and dropped; remove one"));
                    }
                }
            }
            if let Some(d) = &step.dedupe {
                c.expression(format!("{p}.dedupe.key"), &d.key);
                c.positive(format!("{p}.dedupe.ttl"), &d.ttl);
            }
            if let Some(w) = &step.window {
                if let Some(k) = &w.key_by {
                    c.expression(format!("{p}.window.keyBy"), k);
                }
                if let Some(t) = &w.time {
                    c.expression(format!("{p}.window.time.field"), &t.field);
                }
                for (name, expr) in w.aggregate.expressions() {
                    c.expression(format!("{p}.window.aggregate.{name}"), expr);
                }
                if let (Some(size), Some(slide)) = (&w.size, &w.slide)
                    && slide.as_millis() > 0
                    && size.as_millis() / slide.as_millis() > 1000
                {
                    c.err(format!("{p}.window.slide"), "size/slide exceeds 1000 windows per event; use a larger slide");
                }
            }
        }

        c.sink(
            "spec.sink",
            &SinkRef {
                kafka: self.sink.kafka.as_ref(),
                nats: self.sink.nats.as_ref(),
                redis: self.sink.redis.as_ref(),
            },
        );
        if let Some(dl) = &self.dead_letter {
            c.sink(
                "spec.deadLetter",
                &SinkRef { kafka: dl.kafka.as_ref(), nats: dl.nats.as_ref(), redis: dl.redis.as_ref() },
            );
            if let Some(k) = &dl.kafka
                && k.brokers.is_none()
                && self.source.kafka.is_none()
            {
                c.err(
                    "spec.deadLetter.kafka.brokers",
                    "required unless the source is Kafka (then the source's brokers are used)",
                );
            }
            if dl.redrive.is_some() && self.source.generator.is_some() {
                c.err(
                    "spec.deadLetter.redrive",
                    "a generator source cannot take records back; remove redrive (redrive needs a kafka, nats or redis source)",
                );
            }
            // A redrive publishes each dead letter back to one subject the
            // source reads: the source's filter, which must then be literal.
            if dl.redrive.is_some()
                && let Some(n) = &self.source.nats
                && n.filter_subject.as_deref().is_none_or(|f| f.split('.').any(|t| t == "*" || t == ">"))
            {
                c.err(
                    "spec.source.nats.filterSubject",
                    "a redrive publishes the dead letters back to this subject: set filterSubject to a subject without wildcards (or remove spec.deadLetter.redrive)",
                );
            }
        }
        if let Some(state) = &self.state {
            if let Some(r) = &state.redis {
                c.redis_url("spec.state.redis", &r.url, r.tls.as_ref());
            }
            // State snapshots are keyed by partition and restored when a pod
            // is assigned one, and a saved snapshot lets the source commit
            // past the messages it holds. NATS and Redis Streams hand messages
            // to whichever pod asks: no partition to restore by, so a snapshot
            // would let messages be acked that a replaced pod then never
            // restores.
            if state.backend == crate::StateBackend::Redis {
                let kind = if self.source.nats.is_some() {
                    Some("nats")
                } else if self.source.redis.is_some() {
                    Some("redis")
                } else {
                    None
                };
                if let Some(kind) = kind {
                    c.err(
                        "spec.state.backend",
                        format!("state in Redis needs a kafka source: a {kind} source has no partitions whose state a pod could restore; use memory (windows rebuild from redelivered messages, which stay unacked until their window closes)"),
                    );
                }
            }
            if let Some(ttl) = &state.ttl {
                c.positive("spec.state.ttl".into(), ttl);
            }
            if let Some(s) = &state.snapshot_interval {
                c.at_least(
                    "spec.state.snapshotInterval".into(),
                    s,
                    1000,
                    "snapshots more often than every second overload the backend",
                );
            }
        }
        if let Some(s) = &self.scaling {
            c.at_least(
                "spec.scaling.pollInterval".into(),
                &s.poll_interval,
                1000,
                "probing the broker more often gains nothing",
            );
        }

        if c.errors.is_empty() { Ok(()) } else { Err(ValidationErrors(c.errors)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redrive_needs_an_id_a_readable_dead_letter_sink_and_a_broker_source() {
        let doc = |source: &str, dead_letter: &str| {
            format!(
                "apiVersion: sluice.io/v1alpha1\nkind: StreamProcessor\nmetadata: {{name: p}}\n\
                 spec: {{source: {source}, sink: {{stdout: {{}}}}, deadLetter: {dead_letter}}}\n"
            )
        };
        let redis = "{redis: {url: 'redis://r:6379', stream: in}}";
        let ok = parse_manifest(&doc(redis, "{redis: {url: 'redis://r:6379', stream: dlq}, redrive: {id: fix-1}}"))
            .expect("a redrive from a Redis dead-letter stream into a Redis source");
        assert_eq!(ok.spec.dead_letter.and_then(|d| d.redrive).map(|r| r.id).as_deref(), Some("fix-1"));
        parse_manifest(&doc(
            "{nats: {servers: ['nats://n:4222'], stream: IN, filterSubject: in.orders}}",
            "{nats: {servers: ['nats://n:4222'], subject: dlq}, redrive: {id: fix-1}}",
        ))
        .expect("a redrive into a NATS source with a literal filterSubject");
        for (source, dead_letter, path, text) in [
            (
                redis,
                "{redis: {url: 'redis://r:6379', stream: dlq}, redrive: {id: ''}}",
                "spec.deadLetter.redrive.id",
                "",
            ),
            (redis, "{stdout: {}, redrive: {id: fix-1}}", "spec.deadLetter.redrive", "not stdout"),
            (
                "{generator: {template: {id: seq}}}",
                "{redis: {url: 'redis://r:6379', stream: dlq}, redrive: {id: fix-1}}",
                "spec.deadLetter.redrive",
                "a generator source cannot take records back",
            ),
            (
                "{nats: {servers: ['nats://n:4222'], stream: IN}}",
                "{nats: {servers: ['nats://n:4222'], subject: dlq}, redrive: {id: fix-1}}",
                "spec.source.nats.filterSubject",
                "without wildcards",
            ),
            (
                "{nats: {servers: ['nats://n:4222'], stream: IN, filterSubject: 'in.>'}}",
                "{nats: {servers: ['nats://n:4222'], subject: dlq}, redrive: {id: fix-1}}",
                "spec.source.nats.filterSubject",
                "without wildcards",
            ),
        ] {
            let errors = parse_manifest(&doc(source, dead_letter)).expect_err(dead_letter);
            assert!(
                errors.0.iter().any(|e| e.path == path && e.message.contains(text)),
                "{dead_letter}: expected {path}: ...{text}..., got:\n{errors}"
            );
        }
    }

    #[test]
    fn pointer_paths_read_like_field_paths() {
        assert_eq!(pointer_to_path("/spec/pipeline/2/window/size"), "spec.pipeline[2].window.size");
        assert_eq!(pointer_to_path(""), "<document>");
        assert_eq!(pointer_to_path("/spec/pod/annotations/a~1b"), "spec.pod.annotations.a/b");
    }

    #[test]
    fn macro_variables_are_not_unknown_variables() {
        let mut c = Checker { errors: Vec::new() };
        c.expression("p".into(), "msg.items.exists(x, x.qty > 1) && meta.partition >= 0");
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        c.expression("q".into(), "message.amount > 0");
        assert_eq!(c.errors.len(), 1);
        assert!(c.errors[0].message.contains("message"), "{:?}", c.errors);
    }

    #[test]
    fn parse_errors_name_the_column() {
        let mut c = Checker { errors: Vec::new() };
        c.expression("spec.pipeline[0].filter".into(), "msg.amount >");
        assert_eq!(c.errors.len(), 1);
        assert!(c.errors[0].message.contains("invalid CEL expression"), "{:?}", c.errors);
    }
}

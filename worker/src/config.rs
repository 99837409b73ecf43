//! Worker configuration: the spec (a YAML manifest, a bare spec, or the
//! JSON the operator mounts), environment overrides named as in the seeds,
//! and the worker's own settings.
//!
//! | variable | overrides |
//! |---|---|
//! | `WORKER_COUNT` | `spec.workers` |
//! | `BATCH_SIZE` | `spec.batchSize` |
//! | `KAFKA_BROKERS` (comma-separated) | `spec.source.kafka.brokers` |
//! | `KAFKA_TOPIC`, `KAFKA_GROUP_ID` | `spec.source.kafka.topic`, `.group` |
//! | `KAFKA_OUTPUT_TOPIC` | `spec.sink.kafka.topic` |
//! | `NATS_URL` (comma-separated) | `spec.source.nats.servers` |
//! | `NATS_STREAM`, `NATS_CONSUMER` | `spec.source.nats.stream`, `.consumer` |
//! | `REDIS_URL` | `spec.state.redis.url` |
//! | `SLUICE_HTTP_ADDR` | HTTP listen address (default `0.0.0.0:9090`) |
//! | `SHUTDOWN_GRACE_PERIOD` | drain deadline after SIGTERM (default `25s`) |
//! | `LOG_FORMAT` | `json` for JSON logs (default: text) |
//! | `LOG_LEVEL` / `RUST_LOG` | log filter (default `info`) |

use std::{net::SocketAddr, time::Duration};

use sluice_crds::{StreamProcessor, StreamProcessorSpec, validate::parse_manifest};

/// A spec that cannot be used; printed as is, exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read spec file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not a valid StreamProcessor:\n{errors}")]
    Invalid { path: String, errors: sluice_crds::ValidationErrors },
    #[error("environment variable {var}={value:?}: {reason}")]
    Env { var: &'static str, value: String, reason: String },
}

/// Everything the worker runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub processor: String,
    pub spec: StreamProcessorSpec,
    pub workers: usize,
    pub batch_size: usize,
    pub http_addr: SocketAddr,
    pub grace: Duration,
}

/// Read and validate the spec, apply `env`, validate again.
pub fn load(path: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let sp: StreamProcessor =
        parse_manifest(&text).map_err(|errors| ConfigError::Invalid { path: path.into(), errors })?;
    let processor = format!(
        "{}/{}",
        sp.metadata.namespace.as_deref().unwrap_or("default"),
        sp.metadata.name.as_deref().unwrap_or("local")
    );
    let mut spec = sp.spec;
    apply_env(&mut spec, env)?;
    spec.validate()
        .map_err(|errors| ConfigError::Invalid { path: format!("{path} (after environment overrides)"), errors })?;
    let parse_num = |var: &'static str| -> Result<Option<usize>, ConfigError> {
        env(var)
            .map(|v| {
                v.trim().parse::<usize>().ok().filter(|n| *n > 0).ok_or(ConfigError::Env {
                    var,
                    value: v.clone(),
                    reason: "must be a positive integer".into(),
                })
            })
            .transpose()
    };
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let workers =
        parse_num("WORKER_COUNT")?.or(spec.workers.and_then(|w| usize::try_from(w).ok())).unwrap_or(cpus).clamp(1, 256);
    let batch_size = parse_num("BATCH_SIZE")?
        .or(spec.batch_size.and_then(|b| usize::try_from(b).ok()))
        .unwrap_or(500)
        .clamp(1, 100_000);
    let http_addr = match env("SLUICE_HTTP_ADDR") {
        Some(v) => v.parse().map_err(|e: std::net::AddrParseError| ConfigError::Env {
            var: "SLUICE_HTTP_ADDR",
            value: v.clone(),
            reason: format!("{e}; write host:port, e.g. 0.0.0.0:9090"),
        })?,
        None => SocketAddr::from(([0, 0, 0, 0], 9090)),
    };
    let grace = match env("SHUTDOWN_GRACE_PERIOD") {
        Some(v) => humantime::parse_duration(&v).map_err(|e| ConfigError::Env {
            var: "SHUTDOWN_GRACE_PERIOD",
            value: v.clone(),
            reason: format!("{e}; write a duration like 25s"),
        })?,
        None => Duration::from_secs(25),
    };
    Ok(Config { processor, spec, workers, batch_size, http_addr, grace })
}

fn list(v: &str) -> Vec<String> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

/// Seed-style overrides; a variable for a source or sink kind the spec
/// does not use is an error, so a typo'd deployment fails loudly.
fn apply_env(spec: &mut StreamProcessorSpec, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
    let missing = |var: &'static str, value: String, what: &str| ConfigError::Env {
        var,
        value,
        reason: format!("the spec has no {what} to override"),
    };
    if let Some(v) = env("KAFKA_BROKERS") {
        let k = spec.source.kafka.as_mut().ok_or_else(|| missing("KAFKA_BROKERS", v.clone(), "source.kafka"))?;
        k.brokers = list(&v);
    }
    if let Some(v) = env("KAFKA_TOPIC") {
        let k = spec.source.kafka.as_mut().ok_or_else(|| missing("KAFKA_TOPIC", v.clone(), "source.kafka"))?;
        k.topic = v;
    }
    if let Some(v) = env("KAFKA_GROUP_ID") {
        let k = spec.source.kafka.as_mut().ok_or_else(|| missing("KAFKA_GROUP_ID", v.clone(), "source.kafka"))?;
        k.group = Some(v);
    }
    if let Some(v) = env("KAFKA_OUTPUT_TOPIC") {
        let k = spec.sink.kafka.as_mut().ok_or_else(|| missing("KAFKA_OUTPUT_TOPIC", v.clone(), "sink.kafka"))?;
        k.topic = v;
    }
    if let Some(v) = env("NATS_URL") {
        let n = spec.source.nats.as_mut().ok_or_else(|| missing("NATS_URL", v.clone(), "source.nats"))?;
        n.servers = list(&v);
    }
    if let Some(v) = env("NATS_STREAM") {
        let n = spec.source.nats.as_mut().ok_or_else(|| missing("NATS_STREAM", v.clone(), "source.nats"))?;
        n.stream = v;
    }
    if let Some(v) = env("NATS_CONSUMER") {
        let n = spec.source.nats.as_mut().ok_or_else(|| missing("NATS_CONSUMER", v.clone(), "source.nats"))?;
        n.consumer = Some(v);
    }
    if let Some(v) = env("REDIS_URL") {
        let r = spec
            .state
            .as_mut()
            .and_then(|s| s.redis.as_mut())
            .ok_or_else(|| missing("REDIS_URL", v.clone(), "state.redis"))?;
        r.url = v;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    const KAFKA: &str = r#"{"source": {"kafka": {"brokers": ["a:9092"], "topic": "in"}},
        "pipeline": [{"filter": "msg.x > 1"}], "sink": {"stdout": {}}, "workers": 3}"#;

    #[test]
    fn json_spec_with_env_overrides() {
        let f = write(KAFKA);
        let vars: HashMap<&str, &str> =
            [("KAFKA_BROKERS", "k1:9092, k2:9092"), ("BATCH_SIZE", "64"), ("SHUTDOWN_GRACE_PERIOD", "3s")].into();
        let c = load(f.path().to_str().unwrap(), &|k| vars.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(c.spec.source.kafka.unwrap().brokers, vec!["k1:9092", "k2:9092"]);
        assert_eq!((c.workers, c.batch_size, c.grace), (3, 64, Duration::from_secs(3)));
        assert_eq!(c.processor, "default/local");
    }

    #[test]
    fn bad_values_name_the_variable() {
        let f = write(KAFKA);
        for (var, val) in [("WORKER_COUNT", "many"), ("NATS_URL", "nats://x:4222"), ("KAFKA_BROKERS", "not a broker")] {
            let e = load(f.path().to_str().unwrap(), &|k| (k == var).then(|| val.to_string())).unwrap_err();
            assert!(
                e.to_string().contains(if var == "KAFKA_BROKERS" { "spec.source.kafka.brokers" } else { var }),
                "{e}"
            );
        }
    }

    #[test]
    fn invalid_spec_names_the_field() {
        let f = write(
            r#"{"source": {"generator": {"template": {"a": "seq"}}}, "sink": {"stdout": {}}, "pipeline": [{"filter": "msg.a >"}]}"#,
        );
        let e = load(f.path().to_str().unwrap(), &|_| None).unwrap_err();
        assert!(e.to_string().contains("spec.pipeline[0].filter"), "{e}");
    }
}

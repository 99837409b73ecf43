//! Every Secret a spec refers to, and the environment variable that carries
//! it into the worker pod.
//!
//! The operator turns each [`SecretEnv`] into a `secretKeyRef` env var on the
//! worker container (so credentials never land in the ConfigMap), checks that
//! the Secret exists before rolling pods, and the worker reads the value back
//! from the same variable. One function names them for both sides.

use crate::{CredentialsSecretRef, KafkaAuth, NatsAuth, SecretKeyRef, StreamProcessorSpec, Tls};

/// One Secret key exposed to the worker as an environment variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretEnv {
    /// Where the reference is in the spec, e.g. `spec.source.kafka.auth.sasl.secretRef`.
    pub spec_path: String,
    /// `SLUICE_SECRET_<PLACE>_<WHAT>`, e.g. `SLUICE_SECRET_SOURCE_SASL_PASSWORD`.
    pub env: String,
    pub secret: String,
    pub key: String,
}

/// All Secret references of a spec, in a stable order.
pub fn secret_envs(spec: &StreamProcessorSpec) -> Vec<SecretEnv> {
    let mut out = Vec::new();
    let src = &spec.source;
    if let Some(k) = &src.kafka {
        kafka_auth(&mut out, "spec.source.kafka.auth", "SOURCE", k.auth.as_ref());
    }
    if let Some(n) = &src.nats {
        nats_auth(&mut out, "spec.source.nats.auth", "SOURCE", n.auth.as_ref());
    }
    if let Some(r) = &src.redis {
        key(&mut out, "spec.source.redis.passwordSecretRef", "SOURCE_REDIS_PASSWORD", r.password_secret_ref.as_ref());
        tls(&mut out, "spec.source.redis", "SOURCE", r.tls.as_ref());
    }
    sink(&mut out, "spec.sink", "SINK", &spec.sink.kafka, &spec.sink.nats, &spec.sink.redis);
    if let Some(dl) = &spec.dead_letter {
        sink(&mut out, "spec.deadLetter", "DEADLETTER", &dl.kafka, &dl.nats, &dl.redis);
    }
    if let Some(r) = spec.state.as_ref().and_then(|s| s.redis.as_ref()) {
        key(&mut out, "spec.state.redis.passwordSecretRef", "STATE_REDIS_PASSWORD", r.password_secret_ref.as_ref());
        tls(&mut out, "spec.state.redis", "STATE", r.tls.as_ref());
    }
    out
}

fn sink(
    out: &mut Vec<SecretEnv>,
    path: &str,
    place: &str,
    kafka: &Option<crate::KafkaSink>,
    nats: &Option<crate::NatsSink>,
    redis: &Option<crate::RedisSink>,
) {
    if let Some(k) = kafka {
        kafka_auth(out, &format!("{path}.kafka.auth"), place, k.auth.as_ref());
    }
    if let Some(n) = nats {
        nats_auth(out, &format!("{path}.nats.auth"), place, n.auth.as_ref());
    }
    if let Some(r) = redis {
        key(
            out,
            &format!("{path}.redis.passwordSecretRef"),
            &format!("{place}_REDIS_PASSWORD"),
            r.password_secret_ref.as_ref(),
        );
        tls(out, &format!("{path}.redis"), place, r.tls.as_ref());
    }
}

fn kafka_auth(out: &mut Vec<SecretEnv>, path: &str, place: &str, auth: Option<&KafkaAuth>) {
    let Some(auth) = auth else { return };
    if let Some(sasl) = &auth.sasl {
        credentials(out, &format!("{path}.sasl.secretRef"), &format!("{place}_SASL"), &sasl.secret_ref);
    }
    tls(out, path, place, auth.tls.as_ref());
}

/// `SLUICE_SECRET_<place>_TLS_CA`, `_TLS_CERT`, `_TLS_KEY`: the same names
/// for Kafka, NATS and Redis (a place has one broker), which the operator's
/// lag probe reads for any.
fn tls(out: &mut Vec<SecretEnv>, path: &str, place: &str, tls: Option<&Tls>) {
    let Some(tls) = tls else { return };
    key(out, &format!("{path}.tls.caSecretRef"), &format!("{place}_TLS_CA"), tls.ca_secret_ref.as_ref());
    if let Some(name) = &tls.client_cert_secret_name {
        for (k, what) in [("tls.crt", "TLS_CERT"), ("tls.key", "TLS_KEY")] {
            out.push(SecretEnv {
                spec_path: format!("{path}.tls.clientCertSecretName"),
                env: format!("SLUICE_SECRET_{place}_{what}"),
                secret: name.clone(),
                key: k.into(),
            });
        }
    }
}

fn nats_auth(out: &mut Vec<SecretEnv>, path: &str, place: &str, auth: Option<&NatsAuth>) {
    let Some(auth) = auth else { return };
    key(out, &format!("{path}.tokenSecretRef"), &format!("{place}_NATS_TOKEN"), auth.token_secret_ref.as_ref());
    if let Some(user) = &auth.user_secret_ref {
        credentials(out, &format!("{path}.userSecretRef"), &format!("{place}_NATS"), user);
    }
    key(out, &format!("{path}.credsSecretRef"), &format!("{place}_NATS_CREDS"), auth.creds_secret_ref.as_ref());
    tls(out, path, place, auth.tls.as_ref());
}

fn credentials(out: &mut Vec<SecretEnv>, path: &str, what: &str, r: &CredentialsSecretRef) {
    out.push(SecretEnv {
        spec_path: path.into(),
        env: format!("SLUICE_SECRET_{what}_USERNAME"),
        secret: r.name.clone(),
        key: r.username_key.clone(),
    });
    out.push(SecretEnv {
        spec_path: path.into(),
        env: format!("SLUICE_SECRET_{what}_PASSWORD"),
        secret: r.name.clone(),
        key: r.password_key.clone(),
    });
}

fn key(out: &mut Vec<SecretEnv>, path: &str, what: &str, r: Option<&SecretKeyRef>) {
    if let Some(r) = r {
        out.push(SecretEnv {
            spec_path: path.into(),
            env: format!("SLUICE_SECRET_{what}"),
            secret: r.name.clone(),
            key: r.key.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_every_reference_once_with_a_stable_env_name() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/kafka-exactly-once.yaml"))
            .expect("example");
        let sp = crate::validate::parse_manifest(&text).expect("valid");
        let envs: Vec<(String, String, String)> =
            secret_envs(&sp.spec).into_iter().map(|e| (e.env, e.secret, e.key)).collect();
        assert_eq!(
            envs,
            [
                ("SLUICE_SECRET_SOURCE_SASL_USERNAME", "kafka-ledger-user", "username"),
                ("SLUICE_SECRET_SOURCE_SASL_PASSWORD", "kafka-ledger-user", "password"),
                ("SLUICE_SECRET_SOURCE_TLS_CA", "kafka-ca", "ca.crt"),
                ("SLUICE_SECRET_SINK_SASL_USERNAME", "kafka-ledger-user", "username"),
                ("SLUICE_SECRET_SINK_SASL_PASSWORD", "kafka-ledger-user", "password"),
                ("SLUICE_SECRET_SINK_TLS_CA", "kafka-ca", "ca.crt"),
            ]
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        );
    }

    #[test]
    fn nats_tls_uses_the_same_names_as_kafka() {
        let spec: StreamProcessorSpec = serde_json::from_value(serde_json::json!({
            "source": {"nats": {"servers": ["tls://n:4222"], "stream": "in", "auth": {
                "userSecretRef": {"name": "nats-user"},
                "tls": {"caSecretRef": {"name": "nats-ca", "key": "ca.crt"}, "clientCertSecretName": "nats-client"}
            }}},
            "sink": {"stdout": {}}
        }))
        .expect("spec");
        let envs: Vec<(String, String, String)> =
            secret_envs(&spec).into_iter().map(|e| (e.spec_path, e.env, e.key)).collect();
        assert_eq!(
            envs,
            [
                ("spec.source.nats.auth.userSecretRef", "SLUICE_SECRET_SOURCE_NATS_USERNAME", "username"),
                ("spec.source.nats.auth.userSecretRef", "SLUICE_SECRET_SOURCE_NATS_PASSWORD", "password"),
                ("spec.source.nats.auth.tls.caSecretRef", "SLUICE_SECRET_SOURCE_TLS_CA", "ca.crt"),
                ("spec.source.nats.auth.tls.clientCertSecretName", "SLUICE_SECRET_SOURCE_TLS_CERT", "tls.crt"),
                ("spec.source.nats.auth.tls.clientCertSecretName", "SLUICE_SECRET_SOURCE_TLS_KEY", "tls.key"),
            ]
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        );
    }
}

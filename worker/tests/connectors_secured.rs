//! The connectors against secured brokers, through the real `sluice-worker`
//! binary: Kafka with SASL over TLS (SCRAM-SHA-512 for the source, PLAIN for
//! the sink, a CA generated per broker) and with mutual TLS and
//! SCRAM-SHA-256, NATS with a user, a password and TLS and with a token and
//! mutual TLS, Redis with `requirepass`. Credentials reach the worker exactly as the
//! operator passes them: the Secret references in the spec, turned into
//! `SLUICE_SECRET_*` variables by `sluice_crds::secrets::secret_envs`.
//!
//! Per broker: every id arrives, the lag probe answers with the same
//! credentials (the whole backlog before, 0 after), and a wrong password is
//! an error naming the spec field and the broker (the probe's `Auth` error;
//! the worker stays up, not ready, and logs which field to fix) instead of
//! a hang or a panic.
//!
//! Redis: a password on the plain port, and a password over mutual TLS
//! (`rediss://`).

use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures::StreamExt;
use serde_json::{Value, json};
use sluice_crds::{Source, StreamProcessorSpec, secrets::secret_envs};
use sluice_tests::brokers::{Kafka, KafkaConfig, Nats, NatsConfig, Redis, RedisConfig, SecureListener};
use sluice_worker::probe::{Credentials, Lag, LagProbe, ProbeError, ProbeOptions, ProcessorRef, SourceProbe};

const N: u64 = 10_000;
/// Deadline for a whole stream to arrive; generous for two shared cores.
const STREAM_DEADLINE: Duration = Duration::from_secs(180);
/// How long a worker with a wrong password gets to say so.
const ERROR_DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- worker --

/// Secret values by (Secret name, key), as the API server would hold them.
type Secrets = BTreeMap<(String, String), String>;

fn secrets(entries: &[(&str, &str, &str)]) -> Secrets {
    entries.iter().map(|(name, key, value)| ((name.to_string(), key.to_string()), value.to_string())).collect()
}

/// The worker's environment for `spec`: what the operator's `secretKeyRef`
/// env vars would hold. Every reference must resolve.
fn secret_env(spec: &Value, secrets: &Secrets) -> Vec<(String, String)> {
    let spec: StreamProcessorSpec = serde_json::from_value(spec.clone()).expect("a valid spec");
    secret_envs(&spec)
        .into_iter()
        .map(|e| {
            let value = secrets
                .get(&(e.secret.clone(), e.key.clone()))
                .unwrap_or_else(|| panic!("{}: no Secret {} with key {}", e.spec_path, e.secret, e.key));
            (e.env, value.clone())
        })
        .collect()
}

/// A `sluice-worker run` child process, SIGKILLed when dropped (so a failing
/// test leaves nothing running), with its HTTP port for `/readyz`.
struct Worker {
    child: Child,
    log: PathBuf,
    http: String,
}

impl Worker {
    fn start(dir: &Path, name: &str, spec: &Value, secrets: &Secrets) -> Worker {
        let spec_path = dir.join(format!("{name}.json"));
        std::fs::write(&spec_path, serde_json::to_vec_pretty(spec).expect("spec json")).expect("write spec");
        let log = dir.join(format!("{name}.log"));
        let out = File::options().create(true).append(true).open(&log).expect("worker log file");
        let err = out.try_clone().expect("worker log file");
        let http = format!("127.0.0.1:{}", sluice_tests::brokers::free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_sluice-worker"))
            .arg("run")
            .arg(&spec_path)
            .envs(secret_env(spec, secrets))
            .env("SLUICE_HTTP_ADDR", &http)
            .env("LOG_LEVEL", "info,rdkafka=warn")
            .env("POD_NAME", name)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn sluice-worker");
        Worker { child, log, http }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = self.log_text();
        let mut start = text.len().saturating_sub(6000);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text[start..].to_string()
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("sluice-worker exited with {status}; its log:\n{}", self.log_tail());
        }
    }

    fn readyz(&self) -> Option<u16> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&self.http).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        // One write: the worker answers after its first read and closes,
        // so a request in pieces can meet a reset.
        let request = format!("GET /readyz HTTP/1.0\r\nHost: {}\r\n\r\n", self.http);
        stream.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response.split_whitespace().nth(1)?.parse().ok()
    }

    fn wait_for_readyz(&mut self, code: u16) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.assert_running();
            if self.readyz() == Some(code) {
                return;
            }
            assert!(Instant::now() < deadline, "/readyz never answered {code}; the worker's log:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A worker that cannot log in: it keeps running, says which spec field
    /// to fix (every one of `needles` in one log line), and is not ready.
    fn assert_refused(&mut self, needles: &[&str]) -> String {
        let deadline = Instant::now() + ERROR_DEADLINE;
        let line = loop {
            self.assert_running();
            let text = self.log_text();
            if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                break line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with all of {needles:?} within {ERROR_DEADLINE:?}; the worker's log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        self.wait_for_readyz(503);
        // Still up, never ready: retrying, not hanging on a dead end. (No
        // answer at all can happen on a busy machine; only 200 is wrong.)
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            self.assert_running();
            assert_ne!(self.readyz(), Some(200), "ready with a wrong password; the log:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(100));
        }
        line
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn payload(id: u64) -> Vec<u8> {
    let key = format!("k{}", id % 16);
    serde_json::to_vec(&json!({"id": id, "key": key, "type": "order", "amount": id % 1000})).expect("json")
}

fn id_of(payload: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Value>(payload).ok()?["id"].as_u64()
}

fn assert_all_ids(seen: &HashSet<u64>) {
    let missing: Vec<u64> = (0..N).filter(|id| !seen.contains(id)).take(20).collect();
    assert!(missing.is_empty(), "{} of {N} ids missing, e.g. {missing:?}", N as usize - seen.len());
}

/// The pipeline every test runs: the map proves the worker processed it.
fn pipeline() -> Value {
    json!([{"map": {"set": {"double": "msg.amount * 2"}}}])
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

fn probe(source: &Value, credentials: Credentials) -> Result<Lag, ProbeError> {
    let source: Source = serde_json::from_value(source.clone()).expect("a valid source");
    let options = ProbeOptions { timeout: Duration::from_secs(5) };
    runtime().block_on(async {
        SourceProbe::new(&source, &ProcessorRef::new("shop", "secured"), credentials, options)?.probe().await
    })
}

/// Probes until the lag is `want` (the worker commits asynchronously).
fn wait_for_lag(source: &Value, credentials: &Credentials, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match probe(source, credentials.clone()) {
            Ok(lag) if lag.total == want => return,
            Ok(lag) if Instant::now() > deadline => panic!("lag {} (want {want}): {lag:?}", lag.total),
            Err(e) if Instant::now() > deadline => panic!("the probe failed: {e}"),
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// The probe with a wrong password: an `Auth` error naming the field.
fn assert_probe_refused(source: &Value, credentials: Credentials, field: &str) {
    match probe(source, credentials) {
        Err(e @ ProbeError::Auth { .. }) => {
            let text = e.to_string();
            assert!(text.contains(field), "the probe's error names {field}: {text}");
            assert_eq!(e.reason(), "BrokerAuthFailed");
            assert!(!e.is_transient(), "a refused login waits for a Secret change: {text}");
        }
        other => panic!("a wrong password should be ProbeError::Auth naming {field}, got {other:?}"),
    }
}

// ------------------------------------------------------------------ kafka --

#[test]
fn kafka_sasl_ssl_scram_and_plain_end_to_end_with_the_lag_probe() {
    let kafka = Kafka::start_with(KafkaConfig {
        secure: Some(SecureListener {
            scram_users: vec![("alice".into(), "alice-secret".into())],
            plain_users: vec![("bob".into(), "bob-secret".into())],
            tls: true,
            client_auth: false,
        }),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let ca = kafka.ca_pem().expect("a CA with tls").to_string();
    kafka.create_topic("in", 4).expect("topic");
    kafka.create_topic("out", 4).expect("topic");
    kafka.create_topic("dlq", 1).expect("topic");
    // The harness writes through its plaintext listener; the worker and the
    // probe only ever see the SASL_SSL one.
    let produced = kafka.produce("in", (0..N).map(|id| (Some(format!("k{}", id % 16)), payload(id)))).expect("produce");
    assert_eq!(produced as u64, N);

    let secure = kafka.secure_bootstrap();
    let tls = json!({"caSecretRef": {"name": "kafka-ca", "key": "ca.crt"}});
    let source = json!({"kafka": {
        "brokers": [secure], "topic": "in", "group": "secured", "startFrom": "earliest",
        "auth": {"sasl": {"mechanism": "SCRAM-SHA-512", "secretRef": {"name": "kafka-alice"}}, "tls": tls},
    }});
    let sink_auth = json!({"sasl": {"mechanism": "PLAIN", "secretRef": {"name": "kafka-bob"}}, "tls": tls});
    let spec = json!({
        "source": source,
        "pipeline": pipeline(),
        "sink": {"kafka": {"brokers": [secure], "topic": "out", "key": "msg.key", "auth": sink_auth}},
        "deadLetter": {"kafka": {"brokers": [secure], "topic": "dlq", "auth": sink_auth}},
        "workers": 2,
        "batchSize": 500
    });
    let good = secrets(&[
        ("kafka-alice", "username", "alice"),
        ("kafka-alice", "password", "alice-secret"),
        ("kafka-bob", "username", "bob"),
        ("kafka-bob", "password", "bob-secret"),
        ("kafka-ca", "ca.crt", &ca),
    ]);
    let credentials = |password: &str| Credentials {
        username: Some("alice".into()),
        password: Some(password.into()),
        ca_pem: Some(ca.clone()),
        ..Default::default()
    };
    let sasl_field = "spec.source.kafka.auth.sasl.secretRef";

    // The probe: a wrong password is an Auth error; the right one sees the
    // whole backlog (no commit yet, startFrom earliest).
    assert_probe_refused(&source, credentials("wrong"), sasl_field);
    assert_eq!(probe(&source, credentials("alice-secret")).expect("probe").total, N);
    // No CA: the system roots do not sign the broker's certificate, and the
    // error says where to look.
    let untrusted = probe(&source, Credentials { ca_pem: None, ..credentials("alice-secret") })
        .expect_err("a certificate from an unknown CA");
    assert!(untrusted.to_string().contains("spec.source.kafka.auth.tls"), "{untrusted}");

    // A worker with a wrong source password: up, not ready, the field and
    // the brokers in its log.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bad = good.clone();
    bad.insert(("kafka-alice".into(), "password".into()), "wrong".into());
    let mut refused = Worker::start(dir.path(), "kafka-wrong-password", &spec, &bad);
    let line = refused.assert_refused(&[sasl_field, &secure]);
    eprintln!("wrong Kafka password: {line}");
    drop(refused);

    // A CA that did not sign the broker's certificate (a public root): the
    // worker names the TLS settings instead.
    let bundle = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt")
        .expect("the system CA bundle (apt-get install -y ca-certificates)");
    let end = "-----END CERTIFICATE-----";
    let foreign_ca = &bundle[..bundle.find(end).expect("a PEM certificate in the bundle") + end.len()];
    let mut untrusted = good.clone();
    untrusted.insert(("kafka-ca".into(), "ca.crt".into()), foreign_ca.to_string());
    let mut untrusting = Worker::start(dir.path(), "kafka-foreign-ca", &spec, &untrusted);
    let line = untrusting.assert_refused(&["spec.source.kafka.auth.tls", &secure]);
    eprintln!("foreign Kafka CA: {line}");
    drop(untrusting);

    let mut worker = Worker::start(dir.path(), "kafka", &spec, &good);
    assert_all_ids(&kafka_output_ids(&kafka, &mut worker));
    worker.wait_for_readyz(200);
    wait_for_lag(&source, &credentials("alice-secret"), 0);
}

/// Reads topic `out` (through the harness's plaintext listener) until every
/// id is there, checking that the pipeline's map ran.
fn kafka_output_ids(kafka: &Kafka, worker: &mut Worker) -> HashSet<u64> {
    let deadline = Instant::now() + STREAM_DEADLINE;
    let mut seen = HashSet::new();
    while seen.len() < N as usize {
        worker.assert_running();
        assert!(Instant::now() < deadline, "only {} of {N} ids; the worker's log:\n{}", seen.len(), worker.log_tail());
        let (mut ids, mut parsed) = (HashSet::new(), 0);
        let records = kafka
            .read_topic("out", "read_uncommitted", Duration::from_secs(10), |r| {
                ids.extend(r[parsed..].iter().filter_map(|r| id_of(&r.payload)));
                parsed = r.len();
                ids.len() >= N as usize
            })
            .expect("read out");
        for r in &records {
            let v: Value = serde_json::from_slice(&r.payload).expect("output is JSON");
            assert_eq!(v["double"].as_u64(), v["amount"].as_u64().map(|a| a * 2), "the map ran");
        }
        seen = records.iter().filter_map(|r| id_of(&r.payload)).collect();
        eprintln!("kafka out: {} of {N} ids", seen.len());
    }
    seen
}

/// Mutual TLS (the broker requires a client certificate) with SCRAM-SHA-256;
/// the sink and the dead letters name no brokers, so they take the source's
/// cluster and its whole login, client certificate included.
#[test]
fn kafka_mutual_tls_and_scram_sha_256_with_the_sink_inheriting_the_login() {
    let kafka = Kafka::start_with(KafkaConfig {
        secure: Some(SecureListener {
            scram_users: vec![("carol".into(), "carol-secret".into())],
            tls: true,
            client_auth: true,
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let ca = kafka.ca_pem().expect("a CA with tls").to_string();
    let client = kafka.client_cert().expect("a client certificate with client_auth").clone();
    for (topic, partitions) in [("in", 4), ("out", 4), ("dlq", 1)] {
        kafka.create_topic(topic, partitions).expect("topic");
    }
    let produced = kafka.produce("in", (0..N).map(|id| (Some(format!("k{}", id % 16)), payload(id)))).expect("produce");
    assert_eq!(produced as u64, N);

    let secure = kafka.secure_bootstrap();
    let source_with = |tls: Value| {
        json!({"kafka": {
            "brokers": [secure], "topic": "in", "group": "mutual", "startFrom": "earliest",
            "auth": {"sasl": {"mechanism": "SCRAM-SHA-256", "secretRef": {"name": "kafka-carol"}}, "tls": tls},
        }})
    };
    let ca_ref = json!({"caSecretRef": {"name": "kafka-ca", "key": "ca.crt"}});
    let source = source_with(json!({"caSecretRef": ca_ref["caSecretRef"], "clientCertSecretName": "worker-cert"}));
    let spec_with = |source: &Value| {
        json!({
            "source": source,
            "pipeline": pipeline(),
            "sink": {"kafka": {"topic": "out", "key": "msg.key"}},
            "deadLetter": {"kafka": {"topic": "dlq"}},
            "workers": 2,
            "batchSize": 500
        })
    };
    let good = secrets(&[
        ("kafka-carol", "username", "carol"),
        ("kafka-carol", "password", "carol-secret"),
        ("kafka-ca", "ca.crt", &ca),
        ("worker-cert", "tls.crt", &client.cert_pem),
        ("worker-cert", "tls.key", &client.key_pem),
    ]);
    let credentials = |with_cert: bool| Credentials {
        username: Some("carol".into()),
        password: Some("carol-secret".into()),
        ca_pem: Some(ca.clone()),
        client_cert_pem: with_cert.then(|| client.cert_pem.clone()),
        client_key_pem: with_cert.then(|| client.key_pem.clone()),
        ..Default::default()
    };

    assert_eq!(probe(&source, credentials(true)).expect("probe with the client certificate").total, N);
    let refused = probe(&source_with(ca_ref.clone()), credentials(false)).expect_err("no client certificate");
    assert!(refused.to_string().contains("spec.source.kafka.auth.tls"), "{refused}");
    eprintln!("Kafka probe without a client certificate: {refused}");

    // Without a client certificate the broker ends the handshake; the
    // worker stays up, not ready, and names the brokers.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut without = Worker::start(dir.path(), "kafka-no-cert", &spec_with(&source_with(ca_ref.clone())), &good);
    let line = without.assert_refused(&["spec.source.kafka.auth.tls", &secure]);
    eprintln!("Kafka worker without a client certificate: {line}");
    drop(without);

    let mut worker = Worker::start(dir.path(), "kafka-mutual", &spec_with(&source), &good);
    assert_all_ids(&kafka_output_ids(&kafka, &mut worker));
    worker.wait_for_readyz(200);
    wait_for_lag(&source, &credentials(true), 0);
}

// ------------------------------------------------------------------- nats --

async fn nats_client(nats: &Nats, user: &str, password: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .add_root_certificates(nats.dir().join("ca.crt"))
        .require_tls(true)
        .connect(nats.url())
        .await
        .expect("the test's own NATS client connects with TLS and the password")
}

#[test]
fn nats_user_password_and_tls_end_to_end_with_the_lag_probe() {
    let nats = Nats::start_with(NatsConfig {
        user: Some(("alice".into(), "alice-secret".into())),
        tls: true,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let ca = nats.ca_pem().expect("a CA with tls").to_string();
    let rt = runtime();
    rt.block_on(async { nats_fill(nats_client(&nats, "alice", "alice-secret").await).await });

    let servers = [nats.url()];
    let auth = json!({
        "userSecretRef": {"name": "nats-alice"},
        "tls": {"caSecretRef": {"name": "nats-ca", "key": "ca.crt"}},
    });
    let source = json!({"nats": {"servers": servers, "stream": "IN", "consumer": "secured", "auth": auth}});
    let spec = json!({
        "source": source,
        "pipeline": pipeline(),
        "sink": {"nats": {"servers": servers, "subject": "out", "auth": auth}},
        "deadLetter": {"nats": {"servers": servers, "subject": "dlq", "auth": auth}},
        "workers": 2,
        "batchSize": 500
    });
    let good = secrets(&[
        ("nats-alice", "username", "alice"),
        ("nats-alice", "password", "alice-secret"),
        ("nats-ca", "ca.crt", &ca),
    ]);
    let credentials = |password: &str| Credentials {
        username: Some("alice".into()),
        password: Some(password.into()),
        ca_pem: Some(ca.clone()),
        ..Default::default()
    };
    let auth_field = "spec.source.nats.auth";

    assert_probe_refused(&source, credentials("wrong"), auth_field);
    assert_eq!(probe(&source, credentials("alice-secret")).expect("probe").total, N);
    // No CA: the server's certificate is not trusted, and the error says where to look.
    let untrusted = probe(&source, Credentials { ca_pem: None, ..credentials("alice-secret") })
        .expect_err("a certificate from an unknown CA");
    assert!(untrusted.to_string().contains("spec.source.nats.auth.tls"), "{untrusted}");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut bad = good.clone();
    bad.insert(("nats-alice".into(), "password".into()), "wrong".into());
    let mut refused = Worker::start(dir.path(), "nats-wrong-password", &spec, &bad);
    let line = refused.assert_refused(&[auth_field, &nats.url(), "refused the credentials"]);
    eprintln!("wrong NATS password: {line}");
    drop(refused);

    let mut worker = Worker::start(dir.path(), "nats", &spec, &good);
    let seen = nats_output_ids(&rt, nats_client(&nats, "alice", "alice-secret"), &mut worker);
    assert_all_ids(&seen);
    worker.wait_for_readyz(200);
    wait_for_lag(&source, &credentials("alice-secret"), 0);
}

/// Reads stream OUT with `client` until every id is there, checking that
/// the pipeline's map ran.
fn nats_output_ids(
    rt: &tokio::runtime::Runtime,
    client: impl std::future::Future<Output = async_nats::Client>,
    worker: &mut Worker,
) -> HashSet<u64> {
    rt.block_on(async {
        let js = async_nats::jetstream::new(client.await);
        let stream = js.get_stream("OUT").await.expect("OUT");
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .expect("an ephemeral reader of OUT");
        let mut messages = consumer.messages().await.expect("read OUT");
        let deadline = tokio::time::Instant::now() + STREAM_DEADLINE;
        let mut seen = HashSet::new();
        while seen.len() < N as usize {
            worker.assert_running();
            match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(Ok(m))) => {
                    let v: Value = serde_json::from_slice(&m.payload).expect("output is JSON");
                    assert_eq!(v["double"].as_u64(), v["amount"].as_u64().map(|a| a * 2), "the map ran");
                    seen.extend(id_of(&m.payload));
                    m.ack().await.expect("ack");
                }
                Ok(other) => panic!("reading OUT: {other:?}"),
                Err(_) => panic!("only {} of {N} ids; the worker's log:\n{}", seen.len(), worker.log_tail()),
            }
        }
        seen
    })
}

/// Creates streams IN, OUT and DLQ and publishes the N inputs to IN.
async fn nats_fill(client: async_nats::Client) {
    let js = async_nats::jetstream::new(client);
    for (name, subject) in [("IN", "in"), ("OUT", "out"), ("DLQ", "dlq")] {
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            ..Default::default()
        })
        .await
        .expect("create stream");
    }
    // Acks awaited in windows: the context bounds the publishes in flight.
    let mut acks = Vec::with_capacity(1000);
    for id in 0..N {
        acks.push(js.publish("in", payload(id).into()).await.expect("publish"));
        if acks.len() == 1000 || id == N - 1 {
            for ack in acks.drain(..) {
                ack.await.expect("publish ack");
            }
        }
    }
}

/// A token login over mutual TLS (the server verifies client certificates).
#[test]
fn nats_token_and_mutual_tls_end_to_end_with_the_lag_probe() {
    let nats = Nats::start_with(NatsConfig {
        token: Some("s3cr3t-token".into()),
        tls: true,
        verify_clients: true,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let ca = nats.ca_pem().expect("a CA with tls").to_string();
    let cert = nats.client_cert().expect("a client certificate with verify_clients").clone();
    let connect = || {
        let dir = nats.dir().to_path_buf();
        let (crt, key) = (dir.join("test-client.crt"), dir.join("test-client.key"));
        std::fs::write(&crt, &cert.cert_pem).expect("write the client certificate");
        std::fs::write(&key, &cert.key_pem).expect("write the client key");
        let url = nats.url();
        async move {
            async_nats::ConnectOptions::with_token("s3cr3t-token".into())
                .add_root_certificates(dir.join("ca.crt"))
                .add_client_certificate(crt, key)
                .require_tls(true)
                .connect(url)
                .await
                .expect("the test's own NATS client connects with the token and its certificate")
        }
    };
    let rt = runtime();
    rt.block_on(async { nats_fill(connect().await).await });

    let servers = [nats.url()];
    let auth_with = |tls: Value| json!({"tokenSecretRef": {"name": "nats-token", "key": "token"}, "tls": tls});
    let ca_ref = json!({"caSecretRef": {"name": "nats-ca", "key": "ca.crt"}});
    let auth = auth_with(json!({"caSecretRef": ca_ref["caSecretRef"], "clientCertSecretName": "worker-cert"}));
    let spec_with = |auth: &Value| {
        json!({
            "source": {"nats": {"servers": servers, "stream": "IN", "consumer": "mutual", "auth": auth}},
            "pipeline": pipeline(),
            "sink": {"nats": {"servers": servers, "subject": "out", "auth": auth}},
            "deadLetter": {"nats": {"servers": servers, "subject": "dlq", "auth": auth}},
            "workers": 2,
            "batchSize": 500
        })
    };
    let spec = spec_with(&auth);
    let source = spec["source"].clone();
    let good = secrets(&[
        ("nats-token", "token", "s3cr3t-token"),
        ("nats-ca", "ca.crt", &ca),
        ("worker-cert", "tls.crt", &cert.cert_pem),
        ("worker-cert", "tls.key", &cert.key_pem),
    ]);
    let credentials = |token: &str, with_cert: bool| Credentials {
        token: Some(token.into()),
        ca_pem: Some(ca.clone()),
        client_cert_pem: with_cert.then(|| cert.cert_pem.clone()),
        client_key_pem: with_cert.then(|| cert.key_pem.clone()),
        ..Default::default()
    };

    assert_probe_refused(&source, credentials("wrong", true), "spec.source.nats.auth");
    assert_eq!(probe(&source, credentials("s3cr3t-token", true)).expect("probe").total, N);
    let no_cert = spec_with(&auth_with(ca_ref.clone()))["source"].clone();
    let refused = probe(&no_cert, credentials("s3cr3t-token", false)).expect_err("no client certificate");
    assert!(refused.to_string().contains("spec.source.nats.auth.tls"), "{refused}");
    eprintln!("NATS probe without a client certificate: {refused}");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut bad = good.clone();
    bad.insert(("nats-token".into(), "token".into()), "wrong".into());
    let mut refused = Worker::start(dir.path(), "nats-wrong-token", &spec, &bad);
    let line = refused.assert_refused(&["spec.source.nats.auth", &nats.url()]);
    eprintln!("wrong NATS token: {line}");
    drop(refused);
    let mut without = Worker::start(dir.path(), "nats-no-cert", &spec_with(&auth_with(ca_ref)), &good);
    let line = without.assert_refused(&["spec.source.nats.auth.tls", &nats.url()]);
    eprintln!("NATS worker without a client certificate: {line}");
    drop(without);

    let mut worker = Worker::start(dir.path(), "nats-mutual", &spec, &good);
    let seen = nats_output_ids(&rt, connect(), &mut worker);
    assert_all_ids(&seen);
    worker.wait_for_readyz(200);
    wait_for_lag(&source, &credentials("s3cr3t-token", true), 0);
}

// ------------------------------------------------------------------ redis --

#[test]
fn redis_requirepass_end_to_end_with_the_lag_probe() {
    let mut config = RedisConfig::default();
    config.directives.insert("requirepass".into(), "redis-secret".into());
    let redis = Redis::start_with(config).unwrap_or_else(|e| panic!("{e}"));
    let client = redis::Client::open(redis.authenticated_url()).expect("client");
    let mut conn = client.get_connection().expect("the test's own client logs in");
    let mut pipe = redis::pipe();
    for id in 0..N {
        pipe.cmd("XADD").arg("in").arg("*").arg("payload").arg(payload(id)).ignore();
    }
    pipe.query::<()>(&mut conn).expect("XADD");

    let url = redis.url();
    let password = json!({"name": "redis-password", "key": "password"});
    let source = json!({"redis": {"url": url, "stream": "in", "group": "secured", "passwordSecretRef": password}});
    let spec = json!({
        "source": source,
        "pipeline": pipeline(),
        "sink": {"redis": {"url": url, "stream": "out", "passwordSecretRef": password}},
        "deadLetter": {"redis": {"url": url, "stream": "dlq", "passwordSecretRef": password}},
        "workers": 2,
        "batchSize": 500
    });
    let good = secrets(&[("redis-password", "password", "redis-secret")]);
    let credentials = |password: &str| Credentials { password: Some(password.into()), ..Default::default() };
    let password_field = "spec.source.redis.passwordSecretRef";

    assert_probe_refused(&source, credentials("wrong"), password_field);
    assert_eq!(probe(&source, credentials("redis-secret")).expect("probe").total, N);

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = secrets(&[("redis-password", "password", "wrong")]);
    let mut refused = Worker::start(dir.path(), "redis-wrong-password", &spec, &bad);
    let line = refused.assert_refused(&[password_field, &url]);
    eprintln!("wrong Redis password: {line}");
    drop(refused);

    let mut worker = Worker::start(dir.path(), "redis", &spec, &good);
    assert_all_ids(&redis_output_ids(&mut conn, &mut worker));
    worker.wait_for_readyz(200);
    wait_for_lag(&source, &credentials("redis-secret"), 0);
}

/// Reads stream `out` until every id is there.
fn redis_output_ids(conn: &mut redis::Connection, worker: &mut Worker) -> HashSet<u64> {
    let deadline = Instant::now() + STREAM_DEADLINE;
    let mut seen = HashSet::new();
    while seen.len() < N as usize {
        worker.assert_running();
        assert!(Instant::now() < deadline, "only {} of {N} ids; the worker's log:\n{}", seen.len(), worker.log_tail());
        let entries: redis::streams::StreamRangeReply =
            redis::cmd("XRANGE").arg("out").arg("-").arg("+").query(conn).expect("XRANGE");
        seen = entries.ids.iter().filter_map(|e| e.get::<Vec<u8>>("payload")).filter_map(|p| id_of(&p)).collect();
        if seen.len() < N as usize {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    seen
}

/// `rediss://` with a password and mutual TLS (`tls-auth-clients yes`) for
/// the source, the sink and the dead letters. (Window state in Redis takes
/// the same client; it needs a Kafka source, see the validation.)
#[test]
fn redis_password_over_mutual_tls_end_to_end_with_the_lag_probe() {
    let mut config = RedisConfig { tls: true, verify_clients: true, ..Default::default() };
    config.directives.insert("requirepass".into(), "redis-secret".into());
    let redis = Redis::start_with(config).unwrap_or_else(|e| panic!("{e}"));
    let ca = redis.ca_pem().expect("a CA with tls").to_string();
    let cert = redis.client_cert().expect("a client certificate").clone();
    // The harness's own client uses the plain port.
    let client = redis::Client::open(redis.authenticated_url()).expect("client");
    let mut conn = client.get_connection().expect("the test's own client logs in");
    let mut pipe = redis::pipe();
    for id in 0..N {
        pipe.cmd("XADD").arg("in").arg("*").arg("payload").arg(payload(id)).ignore();
    }
    pipe.query::<()>(&mut conn).expect("XADD");

    let url = redis.tls_url().expect("a TLS port");
    let password = json!({"name": "redis-password", "key": "password"});
    let ca_ref = json!({"caSecretRef": {"name": "redis-ca", "key": "ca.crt"}});
    let tls = json!({"caSecretRef": ca_ref["caSecretRef"], "clientCertSecretName": "worker-cert"});
    let at = |extra: Value| {
        let mut v = json!({"url": url, "passwordSecretRef": password, "tls": tls});
        v.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
        v
    };
    let source = json!({"redis": at(json!({"stream": "in", "group": "mutual"}))});
    let spec = json!({
        "source": source,
        "pipeline": pipeline(),
        "sink": {"redis": at(json!({"stream": "out"}))},
        "deadLetter": {"redis": at(json!({"stream": "dlq"}))},
        "workers": 2,
        "batchSize": 500
    });
    let good = secrets(&[
        ("redis-password", "password", "redis-secret"),
        ("redis-ca", "ca.crt", &ca),
        ("worker-cert", "tls.crt", &cert.cert_pem),
        ("worker-cert", "tls.key", &cert.key_pem),
    ]);
    let credentials = |with_cert: bool| Credentials {
        password: Some("redis-secret".into()),
        ca_pem: Some(ca.clone()),
        client_cert_pem: with_cert.then(|| cert.cert_pem.clone()),
        client_key_pem: with_cert.then(|| cert.key_pem.clone()),
        ..Default::default()
    };

    assert_eq!(probe(&source, credentials(true)).expect("probe over mutual TLS").total, N);
    let refused = probe(&source, credentials(false)).expect_err("no client certificate");
    assert!(refused.to_string().contains("spec.source.redis.tls"), "{refused}");
    eprintln!("Redis probe without a client certificate: {refused}");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut without_cert = spec.clone();
    without_cert["source"]["redis"]["tls"] = ca_ref;
    let mut refused = Worker::start(dir.path(), "redis-no-cert", &without_cert, &good);
    let line = refused.assert_refused(&["spec.source.redis.tls", &url]);
    eprintln!("Redis worker without a client certificate: {line}");
    drop(refused);

    let mut worker = Worker::start(dir.path(), "redis-mutual", &spec, &good);
    assert_all_ids(&redis_output_ids(&mut conn, &mut worker));
    worker.wait_for_readyz(200);
    wait_for_lag(&source, &credentials(true), 0);
}

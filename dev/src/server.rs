//! One server process on this host (Apache Kafka here, NATS and Redis in
//! sluice-tests' harness): spawn it with its output in a log file, poll a
//! readiness probe until a deadline, stop it with a signal and a grace period,
//! then a kill. Everything it writes lives in a temp dir of its own.
//!
//! ```text
//!   temp_dir() ──> free_ports() ──> ServerProcess::spawn ──> wait_ready(probe, deadline)
//!        │                                (stdout+stderr -> <dir>/<name>.log)
//!        ├── stop(grace) / kill()          same command again for a restart
//!        └── Drop: SIGKILL, reap (the TempDir beside it removes the dir)
//! ```
//!
//! Modelled on controller-runtime's envtest `process` package. Everything
//! here blocks (no runtime needed): starting a server is a one-off of a few
//! seconds. A server whose owning process was SIGKILLed (a CI timeout) is
//! swept by the next [`temp_dir`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

/// How long a server may take to answer after it was spawned. Kafka's JVM
/// needs about 2 s on an idle machine; two shared cores under a parallel
/// `cargo test` can make that ten times longer.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `stop()` waits after SIGTERM before it kills.
pub const STOP_GRACE: Duration = Duration::from_secs(30);
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
        "`{tool}` is not on PATH. Run with `make test` or `make demo`, which install it, or install it yourself: {install}"
    )]
    ToolMissing { tool: &'static str, install: &'static str },
    #[error(
        "Apache Kafka's jars are not in {dir}: run `bash dev/kafka/fetch.sh` (copies them from Maven Central into the cache; `make test` and `make demo` do it too) or point SLUICE_KAFKA_LIBS at them"
    )]
    KafkaJarsMissing { dir: PathBuf },
    #[error("{server}: {step} exited with {status} before it was ready. Its log ({log}):\n{tail}")]
    Exited { server: &'static str, step: &'static str, status: ExitStatus, log: PathBuf, tail: String },
    #[error("{server} did not answer within {waited:?} (last probe: {last}). Its log ({log}):\n{tail}")]
    NotReady { server: &'static str, waited: Duration, last: String, log: PathBuf, tail: String },
    #[error("kafka: {step}: {detail}")]
    Kafka { step: String, detail: String },
}

pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

/// `name` on PATH, or [`BrokerError::ToolMissing`] naming how to install it.
pub fn find_tool(tool: &'static str, install: &'static str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
        .ok_or(BrokerError::ToolMissing { tool, install })
}

/// A server's command and, while it runs, its child process. Output of every
/// run is appended to one log file, so a restart keeps the earlier lines.
#[derive(Debug)]
pub struct ServerProcess {
    server: &'static str,
    command: Command,
    log: PathBuf,
    child: Option<Child>,
}

impl ServerProcess {
    pub fn new(server: &'static str, command: Command, log: PathBuf) -> Self {
        Self { server, command, log, child: None }
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Starts the command; its pid goes to `server.pid` beside the log, for
    /// the orphan sweep.
    pub fn spawn(&mut self) -> Result<()> {
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
    pub fn wait_ready(&mut self, timeout: Duration, mut probe: impl FnMut() -> Result<(), String>) -> Result<()> {
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

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. A no-op when not running.
    pub fn stop(&mut self, grace: Duration) {
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
    pub fn kill(&mut self) {
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
pub fn run_to_completion(server: &'static str, step: &'static str, mut command: Command, log: &Path) -> Result<()> {
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
pub fn log_tail(log: &Path) -> String {
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

/// In every server dir: the process that owns it, and the server's pid.
/// Drop cleans up after a panic, but not after a SIGKILL of the owner
/// (a CI timeout): the next start sweeps what such a run left.
const OWNER_FILE: &str = "owner.pid";
const SERVER_PID_FILE: &str = "server.pid";
const DIR_PREFIXES: [&str; 3] = ["sluice-kafka-", "sluice-nats-", "sluice-redis-"];

/// A fresh `sluice-<server>-*` temp dir owned by this process, after sweeping
/// what owners that are gone left behind.
pub fn temp_dir(server: &'static str) -> Result<TempDir> {
    sweep_orphans();
    let dir = tempfile::Builder::new()
        .prefix(&format!("sluice-{server}-"))
        .tempdir()
        .map_err(|source| BrokerError::Io { server, what: "create temp dir".into(), source })?;
    write(server, &dir.path().join(OWNER_FILE), &std::process::id().to_string())?;
    Ok(dir)
}

/// Kills the servers of owner processes that are gone and removes their dirs.
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
        note(&format!("removing {}, left by process {owner}, which is gone", dir.display()));
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

pub fn write(server: &'static str, path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(|source| BrokerError::Io {
        server,
        what: format!("write {}", path.display()),
        source,
    })
}

/// `N` distinct free ports, from below the kernel's ephemeral range so that
/// no outgoing connection takes one before the server binds it (see
/// [`crate::host::unused_port`]).
pub fn free_ports<const N: usize>(server: &'static str) -> Result<[u16; N]> {
    let mut ports = [0u16; N];
    for port in &mut ports {
        *port = crate::host::unused_port(crate::host::Protocols::Tcp).map_err(|source| BrokerError::Io {
            server,
            what: "find a free port".into(),
            source,
        })?;
    }
    Ok(ports)
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Replaces every `{{name}}`. The templates are ours and fixed, so a leftover
/// placeholder is a bug in the caller: panic.
pub fn render(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = template.to_string();
    for (name, value) in values {
        out = out.replace(&format!("{{{{{name}}}}}"), value);
    }
    assert!(!out.contains("{{"), "a placeholder in a server config template has no value:\n{out}");
    out
}

pub fn tcp_accepts(addr: SocketAddr) -> Result<(), String> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map(drop).map_err(|e| format!("connect {addr}: {e}"))
}

/// Start-up lines go to stderr, which the test runner shows only for a
/// failing test; they carry the start time that suites want to see.
pub fn note(line: &str) {
    eprintln!("sluice-dev: {line}");
}

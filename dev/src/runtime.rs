//! Starts components in dependency order, waits for each to be healthy with a
//! deadline, and stops them in reverse (SIGTERM, then SIGKILL after the
//! component's stop timeout). After controller-runtime's envtest
//! `process/process.go`.
//!
//! ```text
//!   start: spawn every component whose `waits_for` are healthy
//!          -> poll health of the started ones (100 ms) -> repeat until all healthy
//!   stop:  reverse start order, SIGTERM, wait stop_timeout, SIGKILL
//! ```
//!
//! Children get their own process group (Ctrl-C reaches only sluice-dev, which
//! then stops them in order) and die with the thread that started them
//! (PR_SET_PDEATHSIG) if sluice-dev itself is killed.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::component::{Component, HealthCheck};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{component}: writing {path}: {source}")]
    WriteFile {
        component: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{component}: starting {command}: {source}")]
    Spawn {
        component: &'static str,
        command: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{component} exited ({status}) before it was healthy; last lines of {log}:\n{tail}")]
    Exited { component: &'static str, status: String, log: PathBuf, tail: String },
    #[error("{component} was not healthy ({check}) within {timeout:?}; last lines of {log}:\n{tail}")]
    Unhealthy { component: &'static str, check: String, timeout: Duration, log: PathBuf, tail: String },
    #[error("{component} waits for {missing}, which is not part of this cluster")]
    UnknownDependency { component: &'static str, missing: &'static str },
    #[error("no component named {0} is running")]
    NotRunning(String),
}

struct Running {
    component: Component,
    child: Child,
    log: PathBuf,
    healthy: bool,
    started: Instant,
}

/// The processes of one cluster.
pub struct Runtime {
    logs_dir: PathBuf,
    running: Vec<Running>,
    https_clients: HashMap<String, kube::Client>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("logs_dir", &self.logs_dir).field("running", &self.pids()).finish()
    }
}

impl Runtime {
    pub fn new(logs_dir: PathBuf) -> Self {
        Runtime { logs_dir, running: Vec::new(), https_clients: HashMap::new() }
    }

    /// (name, pid) of every running component, in start order.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.running.iter().map(|r| (r.component.name, r.child.id())).collect()
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.logs_dir.join(format!("{name}.log"))
    }

    /// Starts `components` (dependencies may be among them or already running)
    /// and returns when every one is healthy.
    pub async fn start(&mut self, components: Vec<Component>) -> Result<(), RuntimeError> {
        let names: Vec<&'static str> = components.iter().map(|c| c.name).collect();
        for c in &components {
            for dep in &c.waits_for {
                if !names.contains(dep) && !self.running.iter().any(|r| r.component.name == *dep) {
                    return Err(RuntimeError::UnknownDependency { component: c.name, missing: dep });
                }
            }
        }
        let mut pending = components;
        loop {
            let mut i = 0;
            while i < pending.len() {
                let ready = pending[i]
                    .waits_for
                    .iter()
                    .all(|dep| self.running.iter().any(|r| r.component.name == *dep && r.healthy));
                if ready {
                    let c = pending.remove(i);
                    self.spawn(c)?;
                } else {
                    i += 1;
                }
            }
            let mut all_healthy = pending.is_empty();
            for idx in 0..self.running.len() {
                if self.running[idx].healthy {
                    continue;
                }
                self.check_one(idx).await?;
                all_healthy &= self.running[idx].healthy;
            }
            if all_healthy {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn check_one(&mut self, idx: usize) -> Result<(), RuntimeError> {
        let r = &mut self.running[idx];
        if let Ok(Some(status)) = r.child.try_wait() {
            return Err(RuntimeError::Exited {
                component: r.component.name,
                status: status.to_string(),
                log: r.log.clone(),
                tail: tail(&r.log, 30),
            });
        }
        let check = r.component.health.clone();
        let ok = probe(&check, &mut self.https_clients).await;
        let r = &mut self.running[idx];
        if ok {
            r.healthy = true;
            tracing::info!(
                component = r.component.name,
                pid = r.child.id(),
                elapsed_ms = r.started.elapsed().as_millis() as u64,
                "healthy"
            );
        } else if r.started.elapsed() > r.component.start_timeout {
            return Err(RuntimeError::Unhealthy {
                component: r.component.name,
                check: format!("{check:?}"),
                timeout: r.component.start_timeout,
                log: r.log.clone(),
                tail: tail(&r.log, 30),
            });
        }
        Ok(())
    }

    fn spawn(&mut self, c: Component) -> Result<(), RuntimeError> {
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RuntimeError::WriteFile { component: c.name, path, source }
        };
        fs::create_dir_all(&c.workdir).map_err(write_err(&c.workdir))?;
        fs::create_dir_all(&self.logs_dir).map_err(write_err(&self.logs_dir))?;
        for (path, text) in &c.files {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(write_err(parent))?;
            }
            fs::write(path, text).map_err(write_err(path))?;
        }
        let log = self.log_path(c.name);
        let out = OpenOptions::new().create(true).append(true).open(&log).map_err(write_err(&log))?;
        let err = out.try_clone().map_err(write_err(&log))?;
        let mut cmd = Command::new(&c.command);
        cmd.args(&c.args)
            .envs(c.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&c.workdir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| RuntimeError::Spawn {
            component: c.name,
            command: c.command.clone(),
            source,
        })?;
        tracing::info!(component = c.name, pid = child.id(), log = %log.display(), "started");
        self.running.push(Running { component: c, child, log, healthy: false, started: Instant::now() });
        Ok(())
    }

    /// Stops one component (for restart tests); returns its definition.
    pub fn stop(&mut self, name: &str) -> Result<Component, RuntimeError> {
        let idx = self
            .running
            .iter()
            .position(|r| r.component.name == name)
            .ok_or_else(|| RuntimeError::NotRunning(name.to_string()))?;
        let mut r = self.running.remove(idx);
        terminate(&mut r.child, r.component.stop_timeout, r.component.name);
        Ok(r.component)
    }

    /// Stops every component, the last started first.
    pub fn stop_all(&mut self) {
        while let Some(mut r) = self.running.pop() {
            terminate(&mut r.child, r.component.stop_timeout, r.component.name);
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// SIGTERM, wait up to `timeout`, then SIGKILL; always reaps the child.
fn terminate(child: &mut Child, timeout: Duration, name: &str) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            tracing::debug!(component = name, "stopped");
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    tracing::warn!(component = name, ?timeout, "did not stop after SIGTERM; killing it");
    let _ = child.kill();
    let _ = child.wait();
}

/// One health probe; any error is "not healthy yet".
pub async fn probe(check: &HealthCheck, clients: &mut HashMap<String, kube::Client>) -> bool {
    let attempt = async {
        match check {
            HealthCheck::None => true,
            HealthCheck::UnixSocket { path } => tokio::net::UnixStream::connect(path).await.is_ok(),
            HealthCheck::Http { url } => http_get_ok(url).await,
            HealthCheck::Https { url, ca } => https_get_ok(url, ca, clients).await,
        }
    };
    tokio::time::timeout(Duration::from_secs(3), attempt).await.unwrap_or(false)
}

/// A minimal HTTP/1.0 GET (health endpoints on loopback only).
async fn http_get_ok(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let Ok(mut stream) = tokio::net::TcpStream::connect(authority).await else {
        return false;
    };
    let req = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n");
    if stream.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    let mut n = 0;
    while n < 12 {
        match stream.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return false,
            Ok(k) => n += k,
        }
    }
    // "HTTP/1.x 2xx"
    buf[9] == b'2'
}

async fn https_get_ok(url: &str, ca: &Path, clients: &mut HashMap<String, kube::Client>) -> bool {
    let Some(split) = url.find("://").and_then(|i| url[i + 3..].find('/').map(|j| i + 3 + j)) else {
        return false;
    };
    let (server, path) = url.split_at(split);
    let client = match clients.get(server) {
        Some(c) => c.clone(),
        None => match crate::kubeconfig::anonymous_client(server, ca).await {
            Ok(c) => {
                clients.insert(server.to_string(), c.clone());
                c
            }
            Err(_) => return false,
        },
    };
    let Ok(req) = http::Request::get(path).body(Vec::new()) else {
        return false;
    };
    client.request_text(req).await.is_ok()
}

/// The last `lines` lines of a log file (for error messages).
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::from("(no log)");
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(16 * 1024);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut s = String::new();
    let mut bytes = Vec::new();
    if f.read_to_end(&mut bytes).is_ok() {
        s = String::from_utf8_lossy(&bytes).into_owned();
    }
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper(name: &'static str, dir: &Path) -> Component {
        let mut c = Component::new(name, "/bin/sleep".into(), dir.to_path_buf());
        c.args = vec!["30".into()];
        c
    }

    #[tokio::test]
    async fn starts_in_order_and_stops_everything() {
        let dir = tempfile::tempdir().unwrap();
        let mut rt = Runtime::new(dir.path().join("logs"));
        let a = sleeper("a", dir.path());
        let mut b = sleeper("b", dir.path());
        b.waits_for = vec!["a"];
        b.files = vec![(dir.path().join("b/conf"), "x".into())];
        rt.start(vec![b, a]).await.unwrap();
        let pids = rt.pids();
        assert_eq!(pids.iter().map(|p| p.0).collect::<Vec<_>>(), vec!["a", "b"]);
        assert_eq!(fs::read_to_string(dir.path().join("b/conf")).unwrap(), "x");
        rt.stop_all();
        for (_, pid) in pids {
            assert!(kill(Pid::from_raw(pid as i32), None).is_err(), "{pid} still alive");
        }
    }

    #[tokio::test]
    async fn a_component_that_exits_is_an_error_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut rt = Runtime::new(dir.path().join("logs"));
        let mut c = Component::new("bad", "/bin/sh".into(), dir.path().to_path_buf());
        c.args = vec!["-c".into(), "echo boom >&2; exit 3".into()];
        c.health = HealthCheck::Http { url: "http://127.0.0.1:1/".into() };
        let err = rt.start(vec![c]).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("bad exited"), "{msg}");
        assert!(msg.contains("boom"), "{msg}");
    }

    #[tokio::test]
    async fn unknown_dependency_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut rt = Runtime::new(dir.path().join("logs"));
        let mut c = sleeper("x", dir.path());
        c.waits_for = vec!["nope"];
        assert!(matches!(rt.start(vec![c]).await, Err(RuntimeError::UnknownDependency { .. })));
    }
}

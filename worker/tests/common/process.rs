//! A `sluice-worker run` child process, for the suites that drive the real
//! binary against real brokers: its output appended to a log file, and
//! SIGKILLed and reaped when dropped, so a failing test leaves nothing running.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
};

pub struct WorkerProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl WorkerProcess {
    /// `sluice-worker run <spec>` as pod `pod`, with `/metrics` on an
    /// ephemeral port and `LOG_LEVEL=info`; `env` on top of those.
    pub fn start(spec: &Path, log: PathBuf, pod: &str, env: &[(&str, &str)]) -> Self {
        let out = File::options().create(true).append(true).open(&log).expect("worker log file");
        let err = out.try_clone().expect("worker log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_sluice-worker"));
        command
            .arg("run")
            .arg(spec)
            .env("SLUICE_HTTP_ADDR", "127.0.0.1:0")
            .env("LOG_LEVEL", "info")
            .env("NO_COLOR", "1")
            .env("POD_NAME", pod);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.stdin(Stdio::null()).stdout(out).stderr(err).spawn().expect("spawn sluice-worker");
        Self { child, log }
    }

    /// SIGKILL, as a node failure would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as a scale-down does: the worker drains, commits and leaves;
    /// waits for it to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().expect("kill -TERM");
        assert!(status.success(), "kill -TERM failed");
        self.child.wait().expect("wait for the worker")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last 6000 bytes of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let mut start = text.len().saturating_sub(6000);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text[start..].to_string()
    }

    /// Panics with the log's tail if the worker has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("sluice-worker exited with {status}; its log:\n{}", self.log_tail());
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

//! One cluster component as data (after kwok's `pkg/kwokctl/components`):
//! what to run, with which flags and files, what it waits for, and how to
//! tell that it is healthy. Builders in `components/` are pure functions from
//! a [`ClusterConfig`](crate::config::ClusterConfig) to a [`Component`].

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    /// Plain HTTP GET answered with 2xx.
    Http { url: String },
    /// HTTPS GET answered with 2xx, the server verified against `ca`.
    Https { url: String, ca: PathBuf },
    /// A unix socket accepts connections.
    UnixSocket { path: PathBuf },
    /// Started is enough.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    pub name: &'static str,
    /// Components that must be healthy before this one starts.
    pub waits_for: Vec<&'static str>,
    pub command: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Named ports it listens on (for logs and tests).
    pub ports: Vec<(&'static str, u16)>,
    pub workdir: PathBuf,
    /// Configuration files written before start: (path, contents).
    pub files: Vec<(PathBuf, String)>,
    pub health: HealthCheck,
    /// How long to wait for health after start.
    pub start_timeout: Duration,
    /// How long to wait after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
}

impl Component {
    pub fn new(name: &'static str, command: PathBuf, workdir: PathBuf) -> Self {
        Component {
            name,
            waits_for: Vec::new(),
            command,
            args: Vec::new(),
            env: Vec::new(),
            ports: Vec::new(),
            workdir,
            files: Vec::new(),
            health: HealthCheck::None,
            start_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(10),
        }
    }

    /// Adds `--name=value`.
    pub fn flag(mut self, name: &str, value: impl std::fmt::Display) -> Self {
        self.args.push(format!("--{name}={value}"));
        self
    }

    /// The value of `--name=` if set (for tests and logs).
    pub fn flag_value(&self, name: &str) -> Option<&str> {
        let prefix = format!("--{name}=");
        self.args.iter().find_map(|a| a.strip_prefix(prefix.as_str()))
    }
}

//! `sluice-dev demo`: the whole product on this machine in one command. It
//! starts the local cluster with the project's image, installs the chart,
//! runs a real Apache Kafka on the host, applies examples/quickstart.yaml,
//! feeds it a quiet stream with one burst, and prints what the operator does
//! about it until Ctrl-C, SIGTERM or `--duration`; then it draws the run.
//!
//! ```text
//!  release binaries ─> image (buildah) ─> Cluster::start ─> helm install charts/sluice
//!  Kafka on the host IP ─> topics ─> Service kafka.demo (selector-less + EndpointSlice)
//!     ─> kubectl apply examples/quickstart.yaml ─> LoadGenerator: quiet ─ burst ─ quiet
//!  every 2 s: StreamProcessor status + last `Scaled` Event ─> one line, one Sample
//!  at the end: stop everything ─> check nothing is left ─> SVG + JSON summary
//! ```
//!
//! Everything it starts is owned by a value whose Drop stops it (the cluster,
//! the broker, the generator's thread), so every way out, an error included,
//! stops them all.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use serde::Serialize;
use serde_json::json;

use crate::bootstrap::{self, HostPort};
use crate::kafka::{Kafka, KafkaConfig};
use crate::server::{BrokerError, find_tool};
use crate::{Cluster, ClusterError, ClusterOptions, host, image};

/// Where the quickstart runs and how its broker is named from pods.
pub const NAMESPACE: &str = "demo";
pub const OPERATOR_NAMESPACE: &str = "sluice-system";
pub const PROCESSOR: &str = "quickstart";
pub const INPUT_TOPIC: &str = "orders";
pub const OUTPUT_TOPIC: &str = "orders-eur";
/// The quickstart's source partitions: the workers' cap. Six so that two
/// cores run every worker.
pub const PARTITIONS: i32 = 6;
/// `kafka.demo.svc:9092`, as examples/quickstart.yaml names it.
pub const KAFKA_SERVICE: &str = "kafka";
pub const KAFKA_SERVICE_PORT: u16 = 9092;
const FIELD_MANAGER: &str = "sluice-dev-demo";
/// Between two lines of the live view.
const TICK: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("building the project's image: {0}")]
    Image(#[from] image::ImageError),
    #[error(transparent)]
    Host(#[from] host::HostError),
    #[error("Apache Kafka: {0}")]
    Kafka(#[from] BrokerError),
    #[error(
        "{path} is missing: build the release binaries with `cargo build --release -p sluice-operator -p sluice-worker -p sluice-dev` (make demo does), or pass --binaries <dir>"
    )]
    MissingBinary { path: PathBuf },
    #[error("{step} failed ({status}):\n{output}")]
    Command { step: String, status: std::process::ExitStatus, output: String },
    #[error("{step}: {source}")]
    Io {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{step}: {source}")]
    Kube {
        step: String,
        #[source]
        source: kube::Error,
    },
    #[error("the load generator: {0}")]
    Producer(String),
    #[error("drawing {path}: {detail}")]
    Plot { path: PathBuf, detail: String },
    #[error("{what} did not happen within {seconds} s; the cluster's logs are in {logs}")]
    Timeout { what: &'static str, seconds: u64, logs: PathBuf },
    #[error("interrupted while {step}; stopped everything that had started")]
    Interrupted { step: &'static str },
}

type Result<T, E = DemoError> = std::result::Result<T, E>;

fn io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let step = step.into();
    move |source| DemoError::Io { step, source }
}

fn kube_err(step: impl Into<String>) -> impl FnOnce(kube::Error) -> DemoError {
    let step = step.into();
    move |source| DemoError::Kube { step, source }
}

/// What `sluice-dev demo` is asked to do.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The checkout: charts/sluice, examples/quickstart.yaml, Dockerfile.
    pub repo_root: PathBuf,
    /// Holds the release `sluice-operator` and `sluice-worker`.
    pub binaries_dir: PathBuf,
    /// The cluster's state folder (None: a temporary one).
    pub state_dir: Option<PathBuf>,
    pub bin_dir: PathBuf,
    /// Stop by itself this long after the load started (None: at Ctrl-C).
    pub duration: Option<Duration>,
    /// Stop by itself once the workers went up to the cap and back down
    /// (`UNTIL_DONE_TAIL` later, so the picture shows them staying down).
    pub until_done: bool,
    pub load: LoadPlan,
    pub svg: PathBuf,
    pub summary: Option<PathBuf>,
}

impl DemoOptions {
    /// The defaults for a checkout at `repo_root` whose release binaries are
    /// in `binaries_dir`.
    pub fn new(repo_root: PathBuf, binaries_dir: PathBuf) -> Self {
        DemoOptions {
            svg: repo_root.join("docs/demo.svg"),
            repo_root,
            binaries_dir,
            state_dir: None,
            bin_dir: host::default_bin_dir(),
            duration: None,
            until_done: false,
            load: LoadPlan::default(),
            summary: None,
        }
    }
}

// ------------------------------------------------------------------- load --

/// The load: a quiet stream, one burst as fast as the broker takes it once
/// the processor is Ready and settled, then quiet again.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LoadPlan {
    /// Messages per second outside the burst.
    pub quiet_rate: u64,
    /// The burst starts this long after the processor first reports Ready.
    pub burst_after_ready: Duration,
    /// Messages in the burst: many times lagPerReplica x partitions, so the
    /// lag asks for more workers than there are partitions.
    pub burst_messages: u64,
}

impl Default for LoadPlan {
    fn default() -> Self {
        LoadPlan { quiet_rate: 50, burst_after_ready: Duration::from_secs(15), burst_messages: 300_000 }
    }
}

impl LoadPlan {
    /// Messages of the quiet stream due `elapsed` after it started.
    pub fn quiet_due(&self, elapsed: Duration) -> u64 {
        (elapsed.as_secs_f64() * self.quiet_rate as f64) as u64
    }
}

/// One order; ids are sequential, so the output can be checked by id.
pub fn order(id: u64) -> (String, String) {
    const COUNTRIES: [&str; 6] = ["de", "fr", "nl", "us", "jp", "br"];
    let key = format!("customer-{}", id % 97);
    let payload = json!({
        "id": id,
        "country": COUNTRIES[(id % 6) as usize],
        "amount": (id * 37) % 500,
    });
    (key, payload.to_string())
}

enum LoadCommand {
    Burst,
}

/// The load generator: an rdkafka producer on a thread of its own. Dropping
/// it stops and joins the thread.
pub struct LoadGenerator {
    commands: mpsc::Sender<LoadCommand>,
    stop: Arc<AtomicBool>,
    produced: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl LoadGenerator {
    pub fn start(bootstrap: &str, topic: &str, plan: LoadPlan) -> Result<Self> {
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("linger.ms", "20")
            .set("compression.type", "lz4")
            .set("queue.buffering.max.messages", "200000")
            .set("log_level", "3")
            .create()
            .map_err(|e| DemoError::Producer(format!("creating the producer for {bootstrap}: {e}")))?;
        let (commands, received) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let produced = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, produced, topic) = (stop.clone(), produced.clone(), topic.to_string());
            std::thread::Builder::new()
                .name("demo-load".into())
                .spawn(move || generate(producer, &topic, plan, received, &stop, &produced))
                .map_err(io("starting the load generator's thread"))?
        };
        Ok(LoadGenerator { commands, stop, produced, thread: Some(thread) })
    }

    pub fn burst(&self) {
        let _ = self.commands.send(LoadCommand::Burst);
    }

    pub fn produced(&self) -> u64 {
        self.produced.load(Ordering::Relaxed)
    }

    /// Whether the thread ended with an error (the broker went away).
    pub fn failed(&mut self) -> Option<String> {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            return self.thread.take().map(|t| match t.join() {
                Ok(Ok(())) => "stopped early".into(),
                Ok(Err(e)) => e,
                Err(_) => "panicked".into(),
            });
        }
        None
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LoadGenerator {
    fn drop(&mut self) {
        self.stop();
    }
}

fn generate(
    producer: ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    plan: LoadPlan,
    commands: mpsc::Receiver<LoadCommand>,
    stop: &AtomicBool,
    produced: &AtomicU64,
) -> Result<(), String> {
    let started = Instant::now();
    let mut next_id = 0u64;
    let mut quiet_sent = 0u64;
    let send = |id: u64| -> Result<bool, String> {
        let (key, payload) = order(id);
        let mut record = BaseRecord::to(topic).key(&key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => return Ok(true),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(false);
                    }
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(format!("producing to {topic}: {e}")),
            }
        }
    };
    while !stop.load(Ordering::Relaxed) {
        if let Ok(LoadCommand::Burst) = commands.try_recv() {
            for _ in 0..plan.burst_messages {
                if !send(next_id)? {
                    break;
                }
                next_id += 1;
                produced.fetch_add(1, Ordering::Relaxed);
            }
        }
        let due = plan.quiet_due(started.elapsed());
        while quiet_sent < due {
            if !send(next_id)? {
                break;
            }
            next_id += 1;
            quiet_sent += 1;
            produced.fetch_add(1, Ordering::Relaxed);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = producer.flush(Duration::from_secs(5));
    Ok(())
}

// ---------------------------------------------------------------- samples --

/// One line of the live view.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Sample {
    /// Seconds since the load started.
    pub t: f64,
    pub ready: String,
    pub reason: String,
    pub lag: i64,
    pub desired: i32,
    pub ready_replicas: i32,
    pub produced: u64,
    pub last_scaling: String,
}

impl Sample {
    /// Reads a StreamProcessor's status (as JSON) into a sample.
    pub fn from_status(t: f64, status: &serde_json::Value, produced: u64, last_scaling: String) -> Self {
        let ready = status["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
            .cloned()
            .unwrap_or_default();
        Sample {
            t,
            ready: ready["status"].as_str().unwrap_or("-").into(),
            reason: ready["reason"].as_str().unwrap_or("-").into(),
            lag: status["lag"].as_i64().unwrap_or(0),
            desired: status["desiredReplicas"].as_i64().unwrap_or(0) as i32,
            ready_replicas: status["readyReplicas"].as_i64().unwrap_or(0) as i32,
            produced,
            last_scaling,
        }
    }

    pub fn header() -> String {
        format!(
            "{:>7}  {:<5} {:<16} {:>8} {:>7} {:>5} {:>9}  last scaling Event",
            "elapsed", "Ready", "reason", "lag", "desired", "ready", "produced"
        )
    }

    pub fn line(&self, cap: i32) -> String {
        let bar: String = (0..cap)
            .map(|i| {
                if i < self.ready_replicas {
                    '#'
                } else if i < self.desired {
                    '+'
                } else {
                    '.'
                }
            })
            .collect();
        format!(
            "{:>6.0}s  {:<5} {:<16} {:>8} {:>7} {:>5} {:>9}  [{bar}] {}",
            self.t,
            self.ready,
            self.reason,
            self.lag,
            self.desired,
            self.ready_replicas,
            self.produced,
            self.last_scaling
        )
    }
}

/// What the run showed, for the test and for people.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Summary {
    pub partitions: i32,
    pub min_replicas: i32,
    /// min(maxReplicas, partitions): the most workers the lag can ask for.
    pub cap: i32,
    pub max_lag: i64,
    pub max_desired: i32,
    pub max_ready_replicas: i32,
    /// Seconds since the load started when the burst began (None: it never did).
    pub burst_at: Option<f64>,
    /// When every worker up to the cap was first Ready.
    pub scaled_up_to_cap_at: Option<f64>,
    /// When, after that, the processor was back to minReplicas with no lag.
    pub scaled_back_down_at: Option<f64>,
    pub scaled_up_to_cap: bool,
    pub scaled_back_down: bool,
    /// The distinct `Scaled` Event notes, in order.
    pub scale_events: Vec<String>,
    pub produced: u64,
    /// Seconds each setup step took.
    pub setup: Vec<(String, f64)>,
    /// Pids of the processes the demo started (cluster components, Kafka).
    pub pids: Vec<(String, u32)>,
    /// Processes still running after the demo stopped them (should be empty).
    pub left_running: Vec<String>,
    pub samples: Vec<Sample>,
}

impl Summary {
    /// Judges the samples: up to the cap, then back to minReplicas.
    pub fn from_samples(samples: Vec<Sample>, partitions: i32, min_replicas: i32, cap: i32) -> Self {
        let up = samples.iter().position(|s| s.ready_replicas >= cap && s.desired >= cap);
        let down = up.and_then(|i| {
            samples[i..].iter().find(|s| s.desired <= min_replicas && s.ready_replicas <= min_replicas && s.lag < 1000)
        });
        let mut scale_events: Vec<String> = Vec::new();
        for s in &samples {
            if !s.last_scaling.is_empty() && scale_events.last() != Some(&s.last_scaling) {
                scale_events.push(s.last_scaling.clone());
            }
        }
        Summary {
            partitions,
            min_replicas,
            cap,
            max_lag: samples.iter().map(|s| s.lag).max().unwrap_or(0),
            max_desired: samples.iter().map(|s| s.desired).max().unwrap_or(0),
            max_ready_replicas: samples.iter().map(|s| s.ready_replicas).max().unwrap_or(0),
            burst_at: None,
            scaled_up_to_cap_at: up.map(|i| samples[i].t),
            scaled_back_down_at: down.map(|s| s.t),
            scaled_up_to_cap: up.is_some(),
            scaled_back_down: down.is_some(),
            scale_events,
            produced: samples.last().map(|s| s.produced).unwrap_or(0),
            setup: Vec::new(),
            pids: Vec::new(),
            left_running: Vec::new(),
            samples,
        }
    }
}

// ---------------------------------------------------------------- picture --

/// Draws lag (top) and desired/ready workers (bottom) over time as an SVG.
/// plotters' SVG backend writes text as <text> elements, so no font files
/// are needed (its `naive` font metrics lay out the labels).
pub fn draw_svg(summary: &Summary, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let plot_err = |e: &dyn std::fmt::Display| DemoError::Plot { path: path.to_path_buf(), detail: e.to_string() };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let samples = &summary.samples;
    let t_max = samples.last().map(|s| s.t).unwrap_or(1.0).max(1.0);
    let lag_max = (summary.max_lag.max(1) as f64 * 1.1) as i64 + 1;
    let replicas_max = summary.cap.max(summary.max_desired).max(summary.max_ready_replicas) + 1;
    let root = SVGBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(&e))?;
    let title = format!(
        "sluice-dev demo: {} on {} partitions, lagPerReplica 1000 ({} messages)",
        PROCESSOR, summary.partitions, summary.produced
    );
    let root = root.titled(&title, ("sans-serif", 18)).map_err(|e| plot_err(&e))?;
    let (top, bottom) = root.split_vertically(260);

    let mut lag = ChartBuilder::on(&top)
        .margin(12)
        .x_label_area_size(28)
        .y_label_area_size(70)
        .caption("consumer lag (messages not yet committed)", ("sans-serif", 14))
        .build_cartesian_2d(0f64..t_max, 0i64..lag_max)
        .map_err(|e| plot_err(&e))?;
    lag.configure_mesh()
        .x_desc("seconds since the load started")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .light_line_style(WHITE)
        .draw()
        .map_err(|e| plot_err(&e))?;
    lag.draw_series(
        AreaSeries::new(samples.iter().map(|s| (s.t, s.lag)), 0, RGBColor(66, 133, 244).mix(0.25))
            .border_style(RGBColor(66, 133, 244).stroke_width(2)),
    )
    .map_err(|e| plot_err(&e))?
    .label("lag")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RGBColor(66, 133, 244).stroke_width(2)));
    if let Some(b) = summary.burst_at {
        lag.draw_series(std::iter::once(PathElement::new(vec![(b, 0), (b, lag_max)], BLACK.mix(0.4))))
            .map_err(|e| plot_err(&e))?
            .label("the burst starts")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.4)));
    }
    lag.configure_series_labels()
        .border_style(BLACK.mix(0.3))
        .background_style(WHITE)
        .draw()
        .map_err(|e| plot_err(&e))?;

    let mut replicas = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(34)
        .y_label_area_size(70)
        .caption(format!("workers (cap: {} partitions)", summary.cap), ("sans-serif", 14))
        .build_cartesian_2d(0f64..t_max, 0i32..replicas_max)
        .map_err(|e| plot_err(&e))?;
    replicas
        .configure_mesh()
        .x_desc("seconds since the load started")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_labels(replicas_max as usize + 1)
        .light_line_style(WHITE)
        .draw()
        .map_err(|e| plot_err(&e))?;
    // Steps, not slopes: a replica count holds until the next sample.
    let steps = |value: fn(&Sample) -> i32| {
        let mut points = Vec::with_capacity(samples.len() * 2);
        for (i, s) in samples.iter().enumerate() {
            if i > 0 {
                points.push((s.t, value(&samples[i - 1])));
            }
            points.push((s.t, value(s)));
        }
        points
    };
    let desired_color = RGBColor(219, 68, 55);
    let ready_color = RGBColor(15, 157, 88);
    replicas
        .draw_series(LineSeries::new(steps(|s| s.desired), desired_color.stroke_width(2)))
        .map_err(|e| plot_err(&e))?
        .label("desired (operator)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], desired_color.stroke_width(2)));
    replicas
        .draw_series(LineSeries::new(steps(|s| s.ready_replicas), ready_color.stroke_width(3)))
        .map_err(|e| plot_err(&e))?
        .label("ready workers")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], ready_color.stroke_width(3)));
    replicas
        .configure_series_labels()
        .border_style(BLACK.mix(0.3))
        .background_style(WHITE)
        .draw()
        .map_err(|e| plot_err(&e))?;
    root.present().map_err(|e| plot_err(&e))?;
    Ok(())
}

// -------------------------------------------------------------------- run --

/// Resolves when Ctrl-C or SIGTERM arrives.
pub async fn interrupted() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// Races one setup step against the shutdown signal.
async fn step<T>(
    stop: &mut tokio::sync::watch::Receiver<bool>,
    name: &'static str,
    setup: &mut Vec<(String, f64)>,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    let started = Instant::now();
    say(&format!("- {name} ..."));
    let out = tokio::select! {
        r = fut => r?,
        _ = stop.wait_for(|s| *s) => return Err(DemoError::Interrupted { step: name }),
    };
    let secs = started.elapsed().as_secs_f64();
    say(&format!("  {name}: done in {secs:.1} s"));
    setup.push((name.to_string(), secs));
    Ok(out)
}

fn say(line: &str) {
    println!("{line}");
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DemoError::Io { step: "a blocking step".into(), source: std::io::Error::other(e.to_string()) })?
}

async fn run_command(step: String, command: std::process::Command) -> Result<String> {
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true).stdin(std::process::Stdio::null());
    let out = command.output().await.map_err(io(step.clone()))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() { Ok(text) } else { Err(DemoError::Command { step, status: out.status, output: text }) }
}

async fn restricted_namespace(client: &kube::Client, name: &str) -> Result<()> {
    let ns: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest"}}
    }))
    .map_err(|e| DemoError::Producer(format!("namespace manifest: {e}")))?;
    Api::<Namespace>::all(client.clone())
        .patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&ns))
        .await
        .map_err(kube_err(format!("creating namespace {name}")))?;
    Ok(())
}

fn chart_image(repo_root: &Path) -> Result<String> {
    let path = repo_root.join("charts/sluice/Chart.yaml");
    let text = std::fs::read_to_string(&path).map_err(io(format!("reading {}", path.display())))?;
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string());
    Ok(format!("sluice:{version}"))
}

/// The newest `Scaled` Event of the processor, by its note.
async fn last_scaling(events: &Api<Event>) -> String {
    let Ok(list) = events.list(&ListParams::default()).await else { return String::new() };
    list.items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Scaled"))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(PROCESSOR))
        .max_by_key(|e| {
            e.series.as_ref().map(|s| s.last_observed_time.0).or(e.event_time.as_ref().map(|t| t.0)).or(e
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0))
        })
        .and_then(|e| e.note)
        .unwrap_or_default()
}

/// Processes whose command line names `needle` (a state or data folder).
/// This process and its ancestors (whose command lines may name the state
/// folder too: `make demo DEMO_ARGS=--state-dir ...`) do not count.
fn processes_naming(needle: &str) -> Vec<String> {
    let mut ours = vec![std::process::id()];
    while let Some(parent) = parent_of(ours[ours.len() - 1]).filter(|p| *p > 1 && !ours.contains(p)) {
        ours.push(parent);
    }
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !ours.contains(pid))
        .filter_map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle).then(|| format!("{pid}: {}", cmd.trim()))
        })
        .collect()
}

/// The parent pid from /proc/<pid>/stat ("pid (comm) state ppid ..."; comm may hold spaces).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// How long `until_done` goes on after the workers are back down.
const UNTIL_DONE_TAIL: Duration = Duration::from_secs(5);

/// Runs the demo until `shutdown` resolves or `opts.duration` has passed,
/// then stops everything and writes the picture and the summary.
pub async fn run(opts: DemoOptions, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<Summary> {
    let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut setup = Vec::new();

    // Everything that can be missing, before anything slow starts.
    host::check_host()?;
    host::check_binaries(&opts.bin_dir)?;
    find_tool("java", "apt-get install -y openjdk-17-jre-headless")?;
    crate::kafka::kafka_libs()?;
    for b in ["sluice-operator", "sluice-worker"] {
        let path = opts.binaries_dir.join(b);
        if !path.is_file() {
            return Err(DemoError::MissingBinary { path });
        }
    }
    let quickstart = opts.repo_root.join("examples/quickstart.yaml");
    let image_name = chart_image(&opts.repo_root)?;

    let tar = {
        let (repo, bins, name) = (opts.repo_root.clone(), opts.binaries_dir.clone(), image_name.clone());
        step(&mut stop, "build the image", &mut setup, async move {
            blocking(move || Ok(image::project_image_tar(&repo, &bins, &name, &host::cache_root())?)).await
        })
        .await?
    };
    // Every run starts from an empty cluster: a previous run's etcd on the
    // same state folder would bring back its helm release, workers and Events.
    if let Some(data) = opts
        .state_dir
        .as_ref()
        .map(|d| crate::components::etcd::data_dir(&d.join(crate::components::etcd::NAME)))
        .filter(|d| d.exists())
    {
        std::fs::remove_dir_all(&data).map_err(io(format!("removing the previous run's {}", data.display())))?;
    }
    let cluster_opts = ClusterOptions {
        state_dir: opts.state_dir.clone(),
        bin_dir: opts.bin_dir.clone(),
        images: vec![tar],
        ..ClusterOptions::default()
    };
    let cluster =
        step(&mut stop, "start the local cluster", &mut setup, async move { Ok(Cluster::start(cluster_opts).await?) })
            .await?;
    let kubeconfig = cluster.kubeconfig_path();
    say(&format!(
        "\n  The cluster is up. From another terminal:\n    export KUBECONFIG={}\n    {} get sp,deploy,pods,leases,events -A\n",
        kubeconfig.display(),
        cluster.config().bin("kubectl").display()
    ));
    let client = cluster.client().await?;
    restricted_namespace(&client, OPERATOR_NAMESPACE).await?;
    restricted_namespace(&client, NAMESPACE).await?;

    // The broker starts while helm waits for the operator.
    let host_ip = cluster.host_ip();
    let kafka_start = tokio::task::spawn_blocking(move || -> Result<(Kafka, f64)> {
        let started = Instant::now();
        let kafka = Kafka::start_with(KafkaConfig { host: host_ip, ..KafkaConfig::default() })?;
        kafka.create_topic(INPUT_TOPIC, PARTITIONS)?;
        kafka.create_topic(OUTPUT_TOPIC, PARTITIONS)?;
        Ok((kafka, started.elapsed().as_secs_f64()))
    });
    let mut helm = cluster.helm();
    helm.current_dir(&opts.repo_root).args([
        "install",
        "sluice",
        "charts/sluice",
        "-n",
        OPERATOR_NAMESPACE,
        "--set",
        "image.pullPolicy=Never",
        "--wait",
        "--timeout",
        "3m",
    ]);
    let helm_out =
        step(&mut stop, "helm install charts/sluice", &mut setup, run_command("helm install".into(), helm)).await;
    // Wait for the broker even when helm failed or was interrupted, so that
    // it is stopped here (its start is bounded by KafkaConfig::start_timeout).
    let kafka = kafka_start.await.map_err(|e| DemoError::Producer(format!("the Kafka start thread: {e}")));
    helm_out?;
    let (kafka, kafka_secs) = kafka??;
    say(&format!("  Apache Kafka and its topics (started beside helm): {kafka_secs:.1} s"));
    setup.push(("start Apache Kafka and its topics (beside helm)".into(), kafka_secs));
    say(&format!("  Kafka on {} is kafka.{NAMESPACE}.svc:{KAFKA_SERVICE_PORT} for pods", kafka.bootstrap()));
    bootstrap::apply_host_service(
        &client,
        NAMESPACE,
        KAFKA_SERVICE,
        None,
        host_ip,
        &[HostPort {
            name: "kafka".into(),
            protocol: "TCP",
            port: KAFKA_SERVICE_PORT,
            target_port: kafka.broker_port(),
        }],
    )
    .await
    .map_err(|e| DemoError::Cluster(e.into()))?;

    let mut apply = cluster.kubectl();
    apply.arg("apply").arg("-f").arg(&quickstart);
    let applied = step(
        &mut stop,
        "kubectl apply -f examples/quickstart.yaml",
        &mut setup,
        run_command("kubectl apply".into(), apply),
    )
    .await?;
    say(&format!("  {}", applied.trim()));

    let mut load = LoadGenerator::start(&kafka.bootstrap(), INPUT_TOPIC, opts.load)?;
    let load_started = Instant::now();
    say(&format!(
        "\nLoad: {} orders/s; a burst of {} orders {} s after the processor is Ready.{}\n",
        opts.load.quiet_rate,
        opts.load.burst_messages,
        opts.load.burst_after_ready.as_secs(),
        match opts.duration {
            Some(d) => format!(" Stops after {} s.", d.as_secs()),
            None => " Ctrl-C stops everything.".into(),
        }
    ));

    let sps: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        NAMESPACE,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("sluice.io", "v1alpha1", "StreamProcessor"),
            "streamprocessors",
        ),
    );
    let events: Api<Event> = Api::namespaced(client.clone(), NAMESPACE);
    let mut samples: Vec<Sample> = Vec::new();
    let mut ready_at: Option<Instant> = None;
    let mut burst_at: Option<f64> = None;
    let mut done_at: Option<Duration> = None;
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ready_deadline = Duration::from_secs(180);
    loop {
        tokio::select! {
            _ = ticker.tick() => {},
            _ = stop.wait_for(|s| *s) => break,
        }
        let t = load_started.elapsed();
        if opts.duration.is_some_and(|d| t >= d) {
            break;
        }
        if let Some(e) = load.failed() {
            return Err(DemoError::Producer(e));
        }
        let status = sps
            .get_opt(PROCESSOR)
            .await
            .ok()
            .flatten()
            .map(|sp| sp.data["status"].clone())
            .unwrap_or(serde_json::Value::Null);
        let sample = Sample::from_status(t.as_secs_f64(), &status, load.produced(), last_scaling(&events).await);
        if ready_at.is_none() && sample.ready == "True" {
            ready_at = Some(Instant::now());
        }
        if ready_at.is_none() && t > ready_deadline {
            return Err(DemoError::Timeout {
                what: "the quickstart becoming Ready",
                seconds: ready_deadline.as_secs(),
                logs: cluster.config().logs_dir(),
            });
        }
        if burst_at.is_none() && ready_at.is_some_and(|r| r.elapsed() >= opts.load.burst_after_ready) {
            load.burst();
            burst_at = Some(t.as_secs_f64());
            say(&format!("--- burst: {} orders as fast as Kafka takes them", opts.load.burst_messages));
        }
        if samples.len().is_multiple_of(20) {
            say(&Sample::header());
        }
        say(&sample.line(PARTITIONS));
        samples.push(sample);
        if done_at.is_none() && (opts.until_done || opts.duration.is_none()) {
            let so_far = Summary::from_samples(samples.clone(), PARTITIONS, 1, PARTITIONS);
            if so_far.scaled_back_down {
                done_at = Some(t);
                if !opts.until_done {
                    say("--- scaled up to the partition cap and back down. Ctrl-C stops everything.");
                }
            }
        }
        if opts.until_done && done_at.is_some_and(|d| t >= d + UNTIL_DONE_TAIL) {
            say("--- scaled up to the partition cap and back down: done.");
            break;
        }
    }

    // Stop in reverse: load, broker, cluster; then look for anything left.
    say("\nstopping the load generator, Kafka and the cluster ...");
    let stopping = Instant::now();
    let mut pids: Vec<(String, u32)> = cluster.pids().into_iter().map(|(n, p)| (n.to_string(), p)).collect();
    pids.extend(kafka.pid().map(|p| ("kafka".to_string(), p)));
    let state_dir = cluster.config().state_dir.display().to_string();
    let kafka_dir = kafka.dir().display().to_string();
    load.stop();
    drop(load);
    drop(kafka);
    tokio::task::block_in_place(|| drop(cluster));
    let mut left_running = processes_naming(&state_dir);
    left_running.extend(processes_naming(&kafka_dir));
    left_running.extend(
        pids.iter()
            .filter(|(_, pid)| Path::new(&format!("/proc/{pid}")).exists())
            .map(|(name, pid)| format!("{pid}: {name}")),
    );
    say(&format!(
        "stopped in {:.1} s; {}",
        stopping.elapsed().as_secs_f64(),
        if left_running.is_empty() {
            "no process of the demo is left".to_string()
        } else {
            format!("STILL RUNNING: {left_running:?}")
        }
    ));

    let mut summary = Summary::from_samples(samples, PARTITIONS, 1, PARTITIONS);
    summary.burst_at = burst_at;
    summary.setup = setup;
    summary.pids = pids;
    summary.left_running = left_running;
    draw_svg(&summary, &opts.svg)?;
    say(&format!("picture of the run: {}", opts.svg.display()));
    if let Some(path) = &opts.summary {
        let text = serde_json::to_string_pretty(&summary)
            .map_err(|e| DemoError::Producer(format!("serializing the summary: {e}")))?;
        std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))?;
        say(&format!("summary: {}", path.display()));
    }
    say(&format!(
        "scaled up to the cap of {}: {}; back down to {}: {}; max lag {}; {} orders produced",
        summary.cap,
        summary.scaled_up_to_cap,
        summary.min_replicas,
        summary.scaled_back_down,
        summary.max_lag,
        summary.produced
    ));
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64, lag: i64, desired: i32, ready: i32) -> Sample {
        Sample {
            t,
            ready: "True".into(),
            reason: "Running".into(),
            lag,
            desired,
            ready_replicas: ready,
            produced: 0,
            last_scaling: String::new(),
        }
    }

    #[test]
    fn a_run_that_reaches_the_cap_and_returns_scaled_up_and_down() {
        let run = vec![
            sample(0.0, 0, 1, 1),
            sample(2.0, 90_000, 6, 1),
            sample(4.0, 40_000, 6, 6),
            sample(6.0, 0, 6, 6),
            sample(40.0, 0, 1, 1),
        ];
        let s = Summary::from_samples(run, 6, 1, 6);
        assert!(s.scaled_up_to_cap && s.scaled_back_down);
        assert_eq!((s.scaled_up_to_cap_at, s.scaled_back_down_at), (Some(4.0), Some(40.0)));
        assert_eq!((s.max_lag, s.max_desired, s.max_ready_replicas), (90_000, 6, 6));
    }

    #[test]
    fn desired_alone_is_not_scaled_up_and_staying_up_is_not_down() {
        let never_ready = vec![sample(0.0, 0, 1, 1), sample(2.0, 9_000, 6, 3), sample(40.0, 0, 1, 1)];
        let s = Summary::from_samples(never_ready, 6, 1, 6);
        assert!(!s.scaled_up_to_cap && !s.scaled_back_down);
        let stays_up = vec![sample(0.0, 0, 1, 1), sample(2.0, 9_000, 6, 6), sample(40.0, 0, 6, 6)];
        let s = Summary::from_samples(stays_up, 6, 1, 6);
        assert!(s.scaled_up_to_cap && !s.scaled_back_down);
    }

    #[test]
    fn the_quiet_stream_keeps_its_rate() {
        let plan = LoadPlan { quiet_rate: 50, ..LoadPlan::default() };
        assert_eq!(plan.quiet_due(Duration::ZERO), 0);
        assert_eq!(plan.quiet_due(Duration::from_millis(1500)), 75);
    }

    #[test]
    fn orders_spread_over_keys_and_carry_their_id() {
        let (key, payload) = order(98);
        assert_eq!(key, "customer-1");
        let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
        assert_eq!(v["id"], 98);
        assert_eq!(v["amount"], (98 * 37) % 500);
    }

    #[test]
    fn the_status_becomes_a_sample() {
        let status = json!({
            "conditions": [{"type": "Progressing", "status": "False", "reason": "Stable"},
                           {"type": "Ready", "status": "True", "reason": "Running"}],
            "lag": 5800, "desiredReplicas": 6, "readyReplicas": 2
        });
        let s = Sample::from_status(3.0, &status, 10, "scaled 1 -> 6".into());
        assert_eq!(
            (s.ready.as_str(), s.reason.as_str(), s.lag, s.desired, s.ready_replicas),
            ("True", "Running", 5800, 6, 2)
        );
        assert!(s.line(6).contains("[##++++]"), "{}", s.line(6));
        let empty = Sample::from_status(0.0, &serde_json::Value::Null, 0, String::new());
        assert_eq!((empty.ready.as_str(), empty.desired), ("-", 0));
    }

    #[test]
    fn the_leftover_check_finds_a_child_and_walks_up_to_the_parent() {
        let parent = parent_of(std::process::id()).expect("a parent");
        assert_eq!(parent, std::os::unix::process::parent_id());
        let needle = format!("sluice-demo-leftover-{}", std::process::id());
        let mut child = std::process::Command::new("sh").arg("-c").arg(format!("sleep 30 # {needle}")).spawn().unwrap();
        // Right after spawn the child may not have exec'd yet (its
        // cmdline is still this test's): look until it shows, or 5 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut found = processes_naming(&needle);
        while found.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            found = processes_naming(&needle);
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
    }

    #[test]
    fn the_picture_is_an_svg_with_both_panels() {
        let run = vec![sample(0.0, 0, 1, 1), sample(2.0, 90_000, 6, 1), sample(4.0, 0, 6, 6), sample(40.0, 0, 1, 1)];
        let mut s = Summary::from_samples(run, 6, 1, 6);
        s.burst_at = Some(1.0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo.svg");
        draw_svg(&s, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        for text in ["consumer lag", "ready workers", "desired (operator)", "partitions"] {
            assert!(svg.contains(text), "the picture lacks {text:?}");
        }
    }
}

//! `sluice-worker run <spec>`: the data plane of one StreamProcessor pod.
//!
//! Exit codes: 0 done (end of input or drained after SIGTERM), 1 runtime
//! failure, 2 bad spec or configuration.

use std::{
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use clap::{Parser, Subcommand};
use sluice_crds::{StdoutFormat, StreamProcessorSpec};
use sluice_worker::{
    config::{self, Config},
    http,
    metrics::Metrics,
    pipeline::Pipeline,
    pool::{PoolConfig, Snapshots},
    retry::{Backoff, RetryingSink},
    runtime::Runtime,
    sink::{
        Sink,
        file::FileSink,
        kafka::{KafkaSink, Transaction},
        nats::NatsSink,
        null::LogSink,
        redis::RedisSink,
        stdout::StdoutSink,
    },
    source::{
        Source, SourceError, file::FileSource, generator::Generator, kafka::KafkaSource, kafka::pod_name,
        nats::NatsSource, redis::RedisSource,
    },
    state::{
        StateKeys, StateStore,
        fingerprint::{FingerprintedStore, StepFingerprints},
        redis::RedisStore,
    },
};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "sluice-worker", version, about = "Runs a StreamProcessor's pipeline")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline of a StreamProcessor manifest, a bare spec, or the
    /// operator's mounted JSON.
    Run {
        /// Spec file (YAML or JSON).
        #[arg(env = "SLUICE_SPEC", default_value = "/etc/sluice/spec.json")]
        spec: String,
        /// Read JSON lines from this file (`-`: stdin) instead of the spec's source.
        #[arg(long)]
        input: Option<String>,
        /// Write results as JSON lines to this file (`-`: stdout) instead of the spec's sink.
        #[arg(long)]
        output: Option<String>,
        /// Write dead letters (with their headers) to this file (`-`: stderr).
        #[arg(long)]
        dead_letter: Option<String>,
    },
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOG_LEVEL")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs();
    let Command::Run { spec, input, output, dead_letter } = cli.command;
    let cfg = match config::load(&spec, &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let pipeline = match Pipeline::compile(&cfg.spec) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{spec}: {e}");
            return ExitCode::from(2);
        }
    };
    let rt =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(cfg.workers.clamp(1, 64)).enable_all().build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("cannot start the async runtime: {e}");
                return ExitCode::from(1);
            }
        };
    match rt.block_on(run(cfg, pipeline, input, output, dead_letter)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %e, "worker failed");
            ExitCode::from(1)
        }
    }
}

async fn source(
    spec: &StreamProcessorSpec,
    processor: &str,
    input: Option<String>,
    txn: Option<Arc<Transaction>>,
) -> Result<Box<dyn Source>, Box<dyn std::error::Error>> {
    if let Some(path) = input {
        return Ok(Box::new(FileSource::new(path)));
    }
    if let Some(g) = &spec.source.generator {
        return Ok(Box::new(Generator::new(g)?));
    }
    if let Some(k) = &spec.source.kafka {
        // Default group `<namespace>.<name>`, as the operator's lag probe assumes.
        let group = k.group.clone().unwrap_or_else(|| processor.replace('/', "."));
        let mut source = KafkaSource::new(k, &group, &|v| std::env::var(v).ok())?;
        if let Some(txn) = txn {
            source.set_transaction(txn);
        }
        return Ok(Box::new(source));
    }
    if let Some(r) = &spec.source.redis {
        // The consumer is the pod: POD_NAME (downward API), else the host name.
        let group = r.group.clone().unwrap_or_else(|| processor.replace('/', "."));
        let consumer = pod_name().unwrap_or_else(|_| "sluice-worker".into());
        return Ok(Box::new(RedisSource::new(r, &group, &consumer, &|v| std::env::var(v).ok())?));
    }
    if let Some(n) = &spec.source.nats {
        // Default durable `<namespace>-<name>`, as the operator's lag probe assumes.
        let durable = n.consumer.clone().unwrap_or_else(|| processor.replace('/', "-"));
        return Ok(Box::new(NatsSource::new(n, &durable, &|v| std::env::var(v).ok()).await?));
    }
    Err(Box::new(SourceError::Unsupported {
        kind: spec.source.kind(),
        hint: "broker connectors arrive with the connector issue; run locally with --input <file.jsonl|->",
    }))
}

/// Run by the operator: Kubernetes sets KUBERNETES_SERVICE_HOST in every
/// container, the operator's pod template sets POD_NAME.
fn in_a_pod() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() && std::env::var_os("POD_NAME").is_some()
}

fn sink_for(path: &str, format: StdoutFormat, stderr: bool) -> Box<dyn Sink> {
    match (path, stderr) {
        ("-", false) => Box::new(StdoutSink::new(format)),
        ("-", true) => Box::new(StdoutSink::stderr(format)),
        (p, _) => Box::new(FileSink::new(p, format)),
    }
}

async fn run(
    cfg: Config,
    pipeline: Pipeline,
    input: Option<String>,
    output: Option<String>,
    dead_letter: Option<String>,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let spec = &cfg.spec;
    // Exactly-once (Kafka to Kafka): one transactional producer shared by the
    // sink and the source's acker; transactional.id stable per group and pod.
    let txn = match (spec.delivery, &spec.source.kafka, &spec.sink.kafka, &output) {
        (sluice_crds::Delivery::ExactlyOnce, Some(src), Some(snk), None) => {
            let group = src.group.clone().unwrap_or_else(|| cfg.processor.replace('/', "."));
            let id = format!("sluice-{group}-{}", pod_name().unwrap_or_else(|_| "worker".into()));
            Some(Transaction::new(snk, Some(src), &id, &|v| std::env::var(v).ok())?)
        }
        _ => None,
    };
    let source = source(spec, &cfg.processor, input, txn.clone()).await?;
    let source_up = source.reachability().unwrap_or_else(|| Arc::new(AtomicBool::new(true)));
    let env = |v: &str| std::env::var(v).ok();
    let kafka_source = spec.source.kafka.as_ref();
    let format = spec.sink.stdout.as_ref().map_or(StdoutFormat::Json, |s| s.format);
    let sink: Box<dyn Sink> = match (&output, &spec.sink.stdout) {
        (Some(path), _) => sink_for(path, format, false),
        (None, Some(_)) => Box::new(StdoutSink::new(format)),
        (None, None) if spec.sink.kafka.is_some() => {
            let k = spec.sink.kafka.as_ref().ok_or("sink.kafka")?;
            Box::new(match &txn {
                Some(txn) => KafkaSink::transactional(k, txn.clone())?,
                None => KafkaSink::new(k, kafka_source, "SINK", "spec.sink.kafka", &env)?,
            })
        }
        (None, None) if spec.sink.redis.is_some() => {
            let r = spec.sink.redis.as_ref().ok_or("sink.redis")?;
            Box::new(RedisSink::new(r, "SINK", "spec.sink.redis", &env)?)
        }
        (None, None) if spec.sink.nats.is_some() => {
            let n = spec.sink.nats.as_ref().ok_or("sink.nats")?;
            Box::new(NatsSink::new(n, "SINK", "spec.sink.nats", &env).await?)
        }
        (None, None) => {
            return Err(format!(
                "sink {} is not available in this build yet; run locally with --output <file|->",
                spec.sink.kind()
            )
            .into());
        }
    };
    let dead_letters: Box<dyn Sink> = match (&dead_letter, spec.dead_letter.as_ref().and_then(|d| d.stdout.as_ref())) {
        (Some(path), _) => sink_for(path, StdoutFormat::Envelope, true),
        (None, Some(s)) => Box::new(StdoutSink::new(match s.format {
            StdoutFormat::Json => StdoutFormat::Envelope,
            f => f,
        })),
        (None, None) => match sluice_worker::deadletter::broker_sink(spec, &env).await? {
            Some(sink) => sink,
            None => Box::new(LogSink),
        },
    };
    // Broker sinks retry transient errors behind a circuit breaker and turn
    // /readyz false while they fail (runtime sets it true when it starts).
    let ready = Arc::new(AtomicBool::new(false));
    let backoff = spec.dead_letter.as_ref().map_or_else(
        || Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
        |d| Backoff::from_spec(&d.backoff),
    );
    // Records a broker refuses (too large, invalid) are sent again at most
    // deadLetter.maxRetries times, then dead-lettered.
    let max_retries = spec.dead_letter.as_ref().map_or(3, |d| u32::try_from(d.max_retries).unwrap_or(0));
    let sink: Box<dyn Sink> = Box::new(RetryingSink::new(sink, backoff.clone(), ready.clone(), max_retries));
    let dead_letters: Box<dyn Sink> = Box::new(RetryingSink::new(dead_letters, backoff, ready.clone(), max_retries));
    let snapshots = match spec.state.as_ref() {
        Some(s) if s.backend == sluice_crds::StateBackend::Redis => {
            let redis = s.redis.as_ref();
            let url = redis.map(|r| r.url.clone()).unwrap_or_default();
            // The password from spec.state.redis.passwordSecretRef and the TLS
            // settings (the operator puts the Secrets' keys in variables).
            let tls = redis.and_then(|r| r.tls.as_ref());
            let client = sluice_worker::source::redis::client_at(&url, "STATE", tls, "spec.state.redis", &env)?;
            let redis: Arc<dyn StateStore> = Arc::new(RedisStore::with_client(client).await?);
            // Snapshots name their step's definition: an edited step does not
            // restore the state its old definition wrote.
            let store: Arc<dyn StateStore> = Arc::new(FingerprintedStore::new(
                redis,
                StateKeys::new(cfg.processor.clone()),
                StepFingerprints::of(spec),
            ));
            Some(Snapshots {
                store,
                keys: StateKeys::new(cfg.processor.clone()),
                interval: s.snapshot_interval.as_ref().map_or(Duration::from_secs(30), |d| d.as_std()),
                ttl: s.ttl.as_ref().map(|d| d.as_std()),
            })
        }
        _ => None,
    };

    let metrics = Metrics::new(prometheus::Registry::new())?;
    let shutdown = CancellationToken::new();
    let http_stop = CancellationToken::new();
    match http::bind(cfg.http_addr).await {
        Ok(listener) => {
            tracing::info!(addr = %cfg.http_addr, "serving /metrics, /healthz, /readyz");
            tokio::spawn(http::serve(
                listener,
                http::Health { metrics: metrics.clone(), ready: ready.clone(), source_up: source_up.clone() },
                http_stop.clone(),
            ));
        }
        Err(e) => tracing::warn!(addr = %cfg.http_addr, error = %e,
            "cannot serve HTTP (set SLUICE_HTTP_ADDR); running without /metrics"),
    }

    let grace = cfg.grace;
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(?grace, "signal received: stopping fetches and draining");
        signals.cancel();
    });

    // Singleton tasks, while this worker holds the processor's Lease (not
    // for a local run whose outputs go to files).
    let leader_stop = CancellationToken::new();
    let leader = (output.is_none() && dead_letter.is_none()).then(|| {
        tokio::spawn(sluice_worker::leader::run(
            sluice_worker::leader::LeaseConfig::from_env(),
            sluice_worker::leader::Processor {
                name: cfg.processor.clone(),
                spec: Arc::new(spec.clone()),
                metrics: metrics.clone(),
            },
            leader_stop.clone(),
        ))
    });
    let stop_leading = shutdown.clone();
    let leader_stop_on_signal = leader_stop.clone();
    tokio::spawn(async move {
        stop_leading.cancelled().await;
        leader_stop_on_signal.cancel();
    });

    let runtime = Runtime {
        pool: PoolConfig { workers: cfg.workers, queue_batches: 4, tick: Duration::from_millis(100), snapshots },
        batch_size: cfg.batch_size,
        sink_attempts: 5,
        metrics,
        ready,
    };
    tracing::info!(processor = %cfg.processor, source = source.kind(), workers = cfg.workers,
        batch_size = cfg.batch_size, "worker starting");
    let work = runtime.run(source, pipeline, sink, dead_letters, shutdown.clone());
    tokio::pin!(work);
    let result = tokio::select! {
        r = &mut work => r,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::error!(?grace, "drain did not finish within the grace period; exiting without a final commit");
            http_stop.cancel();
            return Ok(ExitCode::from(1));
        }
    };
    // A finite input (a generator with `count`, a file) that ended in a pod:
    // an exiting worker would be started again by its Deployment and replay
    // it, so it stays, serving /metrics and /readyz, until it is stopped.
    if result.is_ok() && !shutdown.is_cancelled() && output.is_none() && in_a_pod() {
        tracing::info!("input ended and every result is out; idling until stopped");
        shutdown.cancelled().await;
    }
    http_stop.cancel();
    // Stop the singleton tasks and release the Lease (bounded: it must not
    // hold up the exit).
    leader_stop.cancel();
    if let Some(leader) = leader
        && tokio::time::timeout(Duration::from_secs(6), leader).await.is_err()
    {
        tracing::warn!("the singleton tasks did not stop in time");
    }
    let summary = result?;
    tracing::info!(consumed = summary.consumed, delivered = summary.delivered, dead_lettered = summary.dead_lettered,
        committed = ?summary.committed, "worker stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the worker");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

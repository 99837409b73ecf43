//! `sluice-operator`: reconciles StreamProcessors into scaled worker Deployments.
//!
//! `run` holds a Lease (`sluice-operator` in its own namespace) so that two
//! replicas are safe: only the holder runs the controller, the standby takes
//! over within the lease duration.

use std::{net::SocketAddr, process::ExitCode, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use sluice_operator::{build::Settings, controller, http, metrics::Metrics, probe::BrokerProbe};
use tokio::{signal::unix::SignalKind, sync::watch};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(name = "sluice-operator", version, about = "The Sluice operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the StreamProcessor CustomResourceDefinition as YAML.
    Crd,
    /// Print the API reference (Markdown) generated from the CRD schema.
    ApiDocs,
    /// Run the controller.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Image for workers whose spec names none.
    #[arg(long, env = "SLUICE_WORKER_IMAGE", default_value_t = Settings::default().worker_image)]
    worker_image: String,
    #[arg(long, env = "SLUICE_WORKER_IMAGE_PULL_POLICY", default_value = "IfNotPresent")]
    worker_image_pull_policy: String,
    /// Watch one namespace only (default: all).
    #[arg(long, env = "SLUICE_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "SLUICE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Run the controller only while holding the leader Lease.
    #[arg(long, env = "SLUICE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    #[arg(long, env = "SLUICE_LEASE_NAME", default_value = "sluice-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease (default: the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a Lease is valid after its last renewal.
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// Seconds a worker gets after SIGTERM.
    #[arg(long, default_value_t = 60)]
    worker_termination_grace: i64,
}

fn init_tracing() {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    if std::env::var("LOG_FORMAT").as_deref() == Ok("json") {
        fmt().json().with_env_filter(filter).init();
    } else {
        fmt().with_env_filter(filter).init();
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn terminated() {
    let mut term = match tokio::signal::unix::signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot listen for SIGTERM: {e}");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

async fn run(args: RunArgs) -> Result<(), String> {
    let client = Client::try_default().await.map_err(|e| format!("cannot reach the Kubernetes API: {e}"))?;
    let metrics = Metrics::new();
    let settings = Settings {
        worker_image: args.worker_image,
        image_pull_policy: args.worker_image_pull_policy,
        termination_grace_seconds: args.worker_termination_grace,
    };
    let http_metrics = metrics.clone();
    let addr = args.http_addr;
    let server = tokio::spawn(async move { http::serve(addr, http_metrics).await });
    let probe = Arc::new(BrokerProbe::default());

    // Shutdown is broadcast: SIGTERM, or the loss of the Lease.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        terminated().await;
        info!("SIGTERM: stopping");
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    if !args.leader_elect {
        metrics.leader.set(1);
        controller::run(client, args.watch_namespace, settings, metrics, probe, stopped(stop_rx)).await;
        server.abort();
        return Ok(());
    }

    let identity = args.identity.unwrap_or_else(|| format!("sluice-operator-{}", std::process::id()));
    let manager = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
        .with_namespace(&args.lease_namespace)
        .with_identity(&identity)
        .with_duration(args.lease_duration)
        .with_grace(5.min(args.lease_duration / 3).max(1))
        .build()
        .await
        .map_err(|e| format!("cannot set up the leader Lease {}/{}: {e}", args.lease_namespace, args.lease_name))?;
    let (mut leading, lease_task) = manager.watch().await;
    info!(identity, lease = args.lease_name, "waiting for the leader Lease");
    loop {
        let mut stop = stop_rx.clone();
        tokio::select! {
            r = leading.wait_for(|l| *l) => if r.is_err() { return Err("the Lease task ended".into()) },
            _ = stop.wait_for(|s| *s) => break,
        }
        info!(identity, "leading: starting the controller");
        metrics.leader.set(1);
        let mut lost = leading.clone();
        let stop_now = stop_rx.clone();
        let until = async move {
            let mut stop_now = stop_now;
            tokio::select! {
                _ = lost.wait_for(|l| !*l) => warn!("lost the leader Lease: stopping the controller"),
                _ = stop_now.wait_for(|s| *s) => {},
            }
        };
        controller::run(
            client.clone(),
            args.watch_namespace.clone(),
            settings.clone(),
            metrics.clone(),
            probe.clone(),
            until,
        )
        .await;
        metrics.leader.set(0);
        if *stop_rx.borrow() {
            break;
        }
    }
    // Dropping the channel makes the manager release the Lease, so the
    // standby takes over at once instead of after the lease duration.
    drop(leading);
    match tokio::time::timeout(Duration::from_secs(5), lease_task).await {
        Ok(Ok(Ok(_))) => info!("released the leader Lease"),
        Ok(Ok(Err(e))) => warn!("releasing the leader Lease: {e}"),
        _ => warn!("the Lease task did not stop in time"),
    }
    server.abort();
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", sluice_crds::crd::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::ApiDocs => {
            print!("{}", sluice_crds::crd::api_reference());
            ExitCode::SUCCESS
        }
        Command::Run(args) => {
            init_tracing();
            match run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

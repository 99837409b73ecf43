//! `sluice-dev`: up, down, kubeconfig, image, demo. See dev/README.md.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use sluice_dev::image::{self, ImageSpec};
use sluice_dev::{Cluster, ClusterOptions, host};

#[derive(Parser)]
#[command(name = "sluice-dev", about = "A real one-node Kubernetes cluster for Sluice")]
struct Cli {
    /// The cluster's state folder (data, certificates, logs, kubeconfig).
    #[arg(long, global = true, env = "SLUICE_DEV_STATE_DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the cluster and keep it running until Ctrl-C or SIGTERM.
    Up {
        /// Also add N KWOK fake nodes (tainted kwok.x-k8s.io/node=fake:NoSchedule).
        #[arg(long, default_value_t = 0)]
        virtual_nodes: u32,
        /// docker-archive tars to import into the node before it starts.
        #[arg(long = "image")]
        images: Vec<PathBuf>,
        /// Folder of the cluster binaries (default: the last build-cluster.sh build).
        #[arg(long, env = "SLUICE_CLUSTER_BIN_DIR")]
        bin_dir: Option<PathBuf>,
        /// Optional parts to run as well (repeatable): `keda` (built by
        /// dev/scripts/build-keda.sh) runs KEDA's operator and metrics adapter.
        #[arg(long = "with", value_enum)]
        with: Vec<Addon>,
        /// KEDA's build folder (default: the last build-keda.sh build).
        #[arg(long, env = "SLUICE_KEDA_DIR")]
        keda_dir: Option<PathBuf>,
    },
    /// Stop a cluster started with `up` and remove everything it left on the host.
    Down,
    /// The quickstart end to end: cluster, chart, a real Kafka, a load with a
    /// burst, and a live view of the workers scaling up and back down.
    Demo {
        /// Stop by itself this many seconds after the load starts (default: at Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
        /// Stop by itself once the workers went up to the cap and back down
        /// (`--duration` still bounds the run).
        #[arg(long)]
        until_done: bool,
        /// Where to draw the run (lag and workers over time).
        #[arg(long, default_value = "docs/demo.svg")]
        svg: PathBuf,
        /// Also write the run as JSON (samples, max replicas, scaled up and down).
        #[arg(long)]
        summary: Option<PathBuf>,
        /// Folder with the release sluice-operator and sluice-worker (default: this binary's).
        #[arg(long)]
        binaries: Option<PathBuf>,
        /// Orders in the burst.
        #[arg(long)]
        burst: Option<u64>,
    },
    /// Print the path of the admin kubeconfig.
    Kubeconfig,
    /// Build an image from a Dockerfile with buildah and import it into the node.
    Image {
        #[arg(long, default_value = "Dockerfile")]
        dockerfile: PathBuf,
        /// Build context (default: the Dockerfile's folder).
        #[arg(long, conflicts_with = "binary")]
        context: Option<PathBuf>,
        /// A host-built binary to put in the context as dist/<name>
        /// (repeatable); the target then defaults to `prebuilt`.
        #[arg(long)]
        binary: Vec<PathBuf>,
        /// Dockerfile stage to build (the one that copies host-built binaries).
        #[arg(long)]
        target: Option<String>,
        #[arg(long, default_value = "sluice:dev")]
        name: String,
        /// KEY=VALUE, repeatable.
        #[arg(long = "build-arg")]
        build_args: Vec<String>,
        /// Only build the tar; do not import it.
        #[arg(long)]
        no_import: bool,
    },
}

/// Optional parts of the cluster (`up --with`).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Addon {
    Keda,
}

fn default_state_dir() -> PathBuf {
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"))
        .join("sluice-dev")
}

fn up_pid_path(state: &Path) -> PathBuf {
    state.join("up.pid")
}

/// Running (a zombie whose parent has not reaped it yet counts as gone).
fn pid_alive(pid: i32) -> bool {
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
        return false;
    }
    // /proc/<pid>/stat: "pid (comm) S ..."; comm may contain spaces.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()) != Some('Z'),
        Err(_) => false,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "sluice_dev=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let state = cli.state_dir.unwrap_or_else(default_state_dir);
    match cli.command {
        Cmd::Up { virtual_nodes, images, bin_dir, with, keda_dir } => {
            let keda = with.contains(&Addon::Keda).then(|| keda_dir.unwrap_or_else(sluice_dev::keda::default_dir));
            up(state, virtual_nodes, images, bin_dir, keda).await
        }
        Cmd::Down => down(&state),
        Cmd::Demo { duration, until_done, svg, summary, binaries, burst } => {
            demo(state, duration, until_done, svg, summary, binaries, burst).await
        }
        Cmd::Kubeconfig => {
            let path = state.join("kubeconfig/admin.yaml");
            if !path.exists() {
                bail!("no cluster at {}; start one with: sluice-dev up", state.display());
            }
            println!("{}", path.display());
            Ok(())
        }
        Cmd::Image { dockerfile, context, binary, mut target, name, build_args, no_import } => {
            let staged = if binary.is_empty() {
                None
            } else {
                target.get_or_insert_with(|| "prebuilt".into());
                Some(image::stage_binaries(&binary, &host::cache_root(), &name)?)
            };
            let context = staged.or(context).unwrap_or_else(|| {
                dockerfile.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
            });
            let mut args = Vec::new();
            for a in build_args {
                let (k, v) = a.split_once('=').with_context(|| format!("--build-arg {a}: expected KEY=VALUE"))?;
                args.push((k.to_string(), v.to_string()));
            }
            let spec = ImageSpec { dockerfile, context, target, name: name.clone(), build_args: args };
            let t0 = Instant::now();
            let tar = image::build(&spec, &host::cache_root())?;
            eprintln!("built {name} in {:.1} s: {}", t0.elapsed().as_secs_f64(), tar.display());
            if !no_import {
                let socket = state.join("containerd/containerd.sock");
                if !socket.exists() {
                    bail!(
                        "no running cluster at {} to import into; start one with `sluice-dev up` (or pass --no-import)",
                        state.display()
                    );
                }
                image::import(&host::default_bin_dir().join("ctr"), &socket, &tar)?;
                eprintln!("imported {name} into the node; use imagePullPolicy: Never or IfNotPresent");
            }
            Ok(())
        }
    }
}

/// Makes `state` this process's: refuses when a live `up` or `demo` already
/// runs from it, else records this pid (so `sluice-dev down` can stop it).
fn claim_state_dir(state: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
    if let Some(pid) = std::fs::read_to_string(up_pid_path(state))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| pid_alive(*p))
    {
        bail!("a cluster already runs from {} (pid {pid}); stop it with: sluice-dev down", state.display());
    }
    std::fs::write(up_pid_path(state), std::process::id().to_string())?;
    Ok(())
}

async fn up(
    state: PathBuf,
    virtual_nodes: u32,
    images: Vec<PathBuf>,
    bin_dir: Option<PathBuf>,
    keda: Option<PathBuf>,
) -> anyhow::Result<()> {
    claim_state_dir(&state)?;
    let mut opts =
        ClusterOptions { state_dir: Some(state.clone()), virtual_nodes, images, keda, ..ClusterOptions::default() };
    if let Some(b) = bin_dir {
        opts.bin_dir = b;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let start = Cluster::start(opts);
    let cluster = tokio::select! {
        c = start => c?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted while starting; stopped what had started"),
        _ = term.recv() => bail!("terminated while starting; stopped what had started"),
    };
    let t = cluster.timings();
    let kc = cluster.kubeconfig_path();
    let kubectl = cluster.config().bin("kubectl");
    println!(
        "sluice-dev is up: node {} Ready after {:.1} s (DNS answering after {:.1} s)\n\n  export KUBECONFIG={}\n  {} get nodes\n\nhost address (where pods reach this machine): {}\nlogs: {}\nstop with Ctrl-C, or: sluice-dev down --state-dir {}",
        cluster.config().node_name,
        t.node_ready.as_secs_f64(),
        t.total.as_secs_f64(),
        kc.display(),
        kubectl.display(),
        cluster.host_ip(),
        cluster.config().logs_dir().display(),
        state.display(),
    );
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    eprintln!("stopping...");
    let t0 = Instant::now();
    drop(cluster);
    let _ = std::fs::remove_file(up_pid_path(&state));
    eprintln!("stopped in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// Claims the state folder as `up` does (so `sluice-dev down` stops a demo
/// too), runs the demo, and fails when it did not stop everything it started.
async fn demo(
    state: PathBuf,
    duration: Option<u64>,
    until_done: bool,
    svg: PathBuf,
    summary: Option<PathBuf>,
    binaries: Option<PathBuf>,
    burst: Option<u64>,
) -> anyhow::Result<()> {
    claim_state_dir(&state)?;
    let exe_dir = std::env::current_exe()?.parent().map(Path::to_path_buf).unwrap_or_default();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut opts = sluice_dev::demo::DemoOptions::new(repo, binaries.unwrap_or(exe_dir));
    opts.state_dir = Some(state.clone());
    opts.duration = duration.map(Duration::from_secs);
    opts.until_done = until_done;
    opts.svg = svg;
    opts.summary = summary;
    if let Some(n) = burst {
        opts.load.burst_messages = n;
    }
    let result = sluice_dev::demo::run(opts, sluice_dev::demo::interrupted()).await;
    let _ = std::fs::remove_file(up_pid_path(&state));
    let summary = result?;
    if !summary.left_running.is_empty() {
        bail!("the demo left processes running: {:?}", summary.left_running);
    }
    Ok(())
}

fn down(state: &Path) -> anyhow::Result<()> {
    let pid = std::fs::read_to_string(up_pid_path(state)).ok().and_then(|s| s.trim().parse::<i32>().ok());
    if let Some(pid) = pid.filter(|p| pid_alive(*p)) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while pid_alive(pid) {
            if Instant::now() > deadline {
                bail!("sluice-dev up (pid {pid}) did not stop within 120 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("stopped the cluster of {}", state.display());
    } else if sluice_dev::cluster::teardown_orphaned(state) {
        eprintln!("cleaned up after a cluster of {} whose `up` had died", state.display());
    } else {
        eprintln!("no cluster at {}", state.display());
    }
    let _ = std::fs::remove_file(up_pid_path(state));
    Ok(())
}

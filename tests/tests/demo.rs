//! `make demo` as a user runs it, with `--duration` so it ends by itself:
//! `sluice-dev demo` starts the local cluster with the project's image,
//! installs the chart, runs a real Apache Kafka, applies
//! examples/quickstart.yaml and feeds it a burst. From the summary it writes:
//! the workers scaled up to the partition cap and back down to one, the
//! operator said so in `Scaled` Events, and no process it started is left
//! once it exits (root; the cluster binaries, Kafka's jars and java as
//! `make test` installs them).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use sluice_dev::demo::Summary;
use sluice_tests::repo_root;

/// At most this many seconds of load; the demo stops 5 s after the workers
/// are back at one (`--until-done`). The burst comes 15 s after Ready, the
/// workers are at the cap a few seconds later, and back at one 30 s
/// (scaleDownStabilization) after the lag is gone: 56 s in a run on two
/// shared cores. The rest is headroom for busier cores.
const DURATION_SECS: &str = "180";

/// The demo runs as `make demo` builds it: the release sluice-dev beside
/// the release binaries it puts in the image.
fn release_sluice_dev() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(&cargo);
    // Not the variables `cargo test` gives this test (CARGO_PKG_NAME=sluice-tests,
    // CARGO_MANIFEST_DIR, ...): build scripts that track them (ring's) would
    // see them changed from make test's release build and rebuild half the
    // tree, and the image's binaries with it (about 3 minutes).
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let set_by_cargo_test = ["CARGO_PKG_", "CARGO_BIN_", "CARGO_MANIFEST_"].iter().any(|p| name.starts_with(p))
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&name.as_ref());
        if set_by_cargo_test {
            build.env_remove(name.as_ref());
        }
    }
    let out = build
        .args(["build", "--release", "--locked", "-p", "sluice-worker", "-p", "sluice-operator", "-p", "sluice-dev"])
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| panic!("run {cargo:?} build --release: {e}"));
    assert!(
        out.status.success(),
        "cargo build --release -p sluice-dev -p sluice-operator -p sluice-worker failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"));
    let exe = target.join("release/sluice-dev");
    assert!(exe.is_file(), "{} is missing after cargo build --release -p sluice-dev", exe.display());
    exe
}

/// Processes whose command line names `dir`.
fn processes_naming(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmd = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).ok()?).replace('\0', " ");
            cmd.contains(&needle).then(|| format!("{pid}: {cmd}"))
        })
        .collect()
}

#[test]
fn the_demo_scales_the_workers_up_to_the_cap_and_back_down_and_leaves_nothing() {
    let exe = release_sluice_dev();
    let dir = tempfile::Builder::new().prefix("sluice-demo-test-").tempdir().expect("temp dir");
    let (state, summary_path, svg) =
        (dir.path().join("state"), dir.path().join("summary.json"), dir.path().join("demo.svg"));

    let started = Instant::now();
    let mut child = Command::new(&exe)
        .arg("--state-dir")
        .arg(&state)
        .args(["demo", "--until-done", "--duration", DURATION_SECS, "--summary"])
        .arg(&summary_path)
        .arg("--svg")
        .arg(&svg)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", exe.display()));
    // The live view through the test's own output (shown on failure or with --nocapture).
    let stdout = child.stdout.take().expect("stdout");
    let echo = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let stderr = child.stderr.take().expect("stderr");
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let status = child.wait().expect("wait for sluice-dev demo");
    let (stdout, stderr) = (echo.join().expect("stdout"), errors.join().expect("stderr"));
    let wall = started.elapsed();
    let tail: String =
        stderr.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    assert!(status.success(), "sluice-dev demo failed ({status}):\n{tail}");
    eprintln!("sluice-dev demo --until-done --duration {DURATION_SECS}: {wall:?} in all");

    let summary: Summary = serde_json::from_str(
        &std::fs::read_to_string(&summary_path).unwrap_or_else(|e| panic!("{}: {e}\n{stdout}", summary_path.display())),
    )
    .expect("summary JSON");
    eprintln!(
        "setup {:?}; max lag {}; at the cap after {:?} s, back down after {:?} s; events {:?}",
        summary.setup, summary.max_lag, summary.scaled_up_to_cap_at, summary.scaled_back_down_at, summary.scale_events
    );
    assert_eq!(summary.cap, 6, "the quickstart's cap is its 6 partitions");
    assert!(summary.burst_at.is_some(), "the burst never started (the processor never became Ready?)");
    assert!(
        summary.scaled_up_to_cap,
        "the workers never reached the cap of {} (max desired {}, max ready {}, max lag {})",
        summary.cap, summary.max_desired, summary.max_ready_replicas, summary.max_lag
    );
    assert!(
        summary.scaled_back_down,
        "the workers did not come back down to {} within {DURATION_SECS} s: last sample {:?}",
        summary.min_replicas,
        summary.samples.last()
    );
    assert!(
        summary.scale_events.iter().any(|e| e.contains(&format!("-> {}", summary.cap))),
        "no Scaled Event up to the cap: {:?}",
        summary.scale_events
    );
    assert!(
        summary.scale_events.iter().any(|e| e.starts_with(&format!("scaled {} -> ", summary.cap))),
        "no Scaled Event down from the cap: {:?}",
        summary.scale_events
    );
    assert!(std::fs::read_to_string(&svg).is_ok_and(|s| s.contains("<svg")), "no picture at {}", svg.display());

    // Nothing it started is left: its own check, the pids it recorded, and anything naming its folders.
    assert!(summary.left_running.is_empty(), "the demo reported leftovers: {:?}", summary.left_running);
    assert!(summary.pids.iter().any(|(name, _)| name == "kafka"), "no Kafka pid recorded: {:?}", summary.pids);
    assert!(summary.pids.iter().any(|(name, _)| name == "kube-apiserver"), "no cluster pids: {:?}", summary.pids);
    let alive: Vec<_> = summary.pids.iter().filter(|(_, pid)| Path::new(&format!("/proc/{pid}")).exists()).collect();
    assert!(alive.is_empty(), "still running after the demo exited: {alive:?}");
    let naming = processes_naming(dir.path());
    assert!(naming.is_empty(), "processes of the demo's state folder are left: {naming:?}");
}

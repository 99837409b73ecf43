//! The `sluice-dev` binary end to end: `up` in the background, `kubeconfig`,
//! the pinned kubectl against it, `down` from another process. Needs root and
//! the cluster binaries (bash dev/scripts/build-cluster.sh); fails otherwise.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_sluice-dev");

#[test]
fn up_kubeconfig_kubectl_down() {
    let state = tempfile::tempdir().expect("temp dir");
    let state_arg = state.path().to_str().expect("utf-8 path");
    // up logs to stderr all along; a pipe nobody reads would block it.
    let log = tempfile::NamedTempFile::new().expect("log file");
    let mut up = Command::new(BIN)
        .args(["--state-dir", state_arg, "up"])
        .stdout(Stdio::piped())
        .stderr(log.reopen().expect("log file"))
        .spawn()
        .expect("spawning sluice-dev up");
    // Never leave a cluster behind, even when an assertion fails.
    struct Down<'a>(&'a str);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = Command::new(BIN).args(["--state-dir", self.0, "down"]).output();
        }
    }
    let _down = Down(state_arg);
    let stdout = up.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut banner = String::new();
    while !banner.contains("sluice-dev is up") {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => banner = line,
            Err(_) => {
                if let Ok(Some(status)) = up.try_wait() {
                    let err = std::fs::read_to_string(log.path()).unwrap_or_default();
                    panic!(
                        "sluice-dev up exited ({status}) before the cluster was up:\n{err}\n(build the binaries with `bash dev/scripts/build-cluster.sh` and run as root)"
                    );
                }
                assert!(Instant::now() < deadline, "sluice-dev up did not report the cluster up in time");
            }
        }
    }

    let kc = Command::new(BIN).args(["--state-dir", state_arg, "kubeconfig"]).output().expect("kubeconfig");
    assert!(kc.status.success());
    let kubeconfig = String::from_utf8_lossy(&kc.stdout).trim().to_string();
    assert!(kubeconfig.ends_with("kubeconfig/admin.yaml"), "{kubeconfig}");

    let kubectl = sluice_dev::host::default_bin_dir().join("kubectl");
    let nodes = Command::new(&kubectl)
        .args(["get", "nodes", "--no-headers"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .expect("kubectl");
    let nodes = String::from_utf8_lossy(&nodes.stdout).into_owned();
    assert!(nodes.contains("sluice-dev") && nodes.contains(" Ready "), "{nodes}");

    // A second `up` on the same folder refuses while the first runs.
    let second = Command::new(BIN).args(["--state-dir", state_arg, "up"]).output().expect("second up");
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already runs"), "{second:?}");

    let t0 = Instant::now();
    let down = Command::new(BIN).args(["--state-dir", state_arg, "down"]).output().expect("down");
    assert!(down.status.success(), "{down:?}");
    let status = up.wait().expect("waiting for up");
    assert!(status.success(), "up exited with {status}");
    eprintln!("down took {:?}", t0.elapsed());

    let state_str = state.path().display().to_string();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&state_str) && !c.contains("cli-"))
        .collect();
    assert!(left.is_empty(), "processes left behind: {left:#?}");
    assert!(!std::path::Path::new("/sys/class/net/sluice0").exists(), "bridge left behind");
}

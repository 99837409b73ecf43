//! Leaves the host as `up` found it: containers, shims, mounts, network
//! namespaces, the pod bridge, kube-proxy's iptables chains, and the host
//! folders that kubelet and the CNI plugins create even when told to use
//! the state folder (removed only if they did not exist before `up`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// Host folders kubelet and the CNI plugins create outside the state folder.
pub const HOST_DIRS: &[&str] = &[
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/var/log/containers",
    "/var/log/pods",
    "/run/sluice-dev",
    "/etc/cni",
    "/opt/cni",
];

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// What the host looked like before `up` (kept in `<state>/host-before.json`
/// so that `down` works after a crash too).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostBefore {
    pub existing_dirs: Vec<PathBuf>,
    pub ip_forward: Option<String>,
    /// `<command>/<table>/<chain>` of every iptables chain before `up`.
    pub chains: Vec<String>,
}

/// Everything `down` needs to know about the cluster it removes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Teardown {
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub bridge: String,
    pub containerd_socket: PathBuf,
    pub runc: PathBuf,
    pub before: HostBefore,
}

pub fn snapshot() -> HostBefore {
    HostBefore {
        existing_dirs: HOST_DIRS.iter().map(PathBuf::from).filter(|p| p.exists()).collect(),
        ip_forward: std::fs::read_to_string(IP_FORWARD).ok().map(|s| s.trim().to_string()),
        chains: all_chains(),
    }
}

const IPTABLES: &[&str] = &["iptables", "ip6tables"];
const TABLES: &[&str] = &["nat", "filter", "mangle"];

fn rules(cmd: &str, table: &str) -> String {
    Command::new(cmd)
        .args(["-t", table, "-S"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn all_chains() -> Vec<String> {
    let mut v = Vec::new();
    for cmd in IPTABLES {
        for table in TABLES {
            for c in parse_chains(&rules(cmd, table)) {
                v.push(format!("{cmd}/{table}/{c}"));
            }
        }
    }
    v
}

/// Removes the KUBE-* and CNI-* chains that kubelet, kube-proxy and the CNI
/// plugins created (and the rules that jump to them), keeping any that
/// existed before `up`.
fn remove_new_chains(before: &[String]) {
    for cmd in IPTABLES {
        for table in TABLES {
            let text = rules(cmd, table);
            let new: Vec<String> = parse_chains(&text)
                .into_iter()
                .filter(|c| c.starts_with("KUBE-") || c.starts_with("CNI-"))
                .filter(|c| !before.contains(&format!("{cmd}/{table}/{c}")))
                .collect();
            if new.is_empty() {
                continue;
            }
            for rule in jumps_to(&text, &new) {
                let mut args = vec!["-t", table, "-D"];
                args.extend(rule.split_whitespace().skip(1));
                run(Path::new(cmd), &args);
            }
            for c in &new {
                run(Path::new(cmd), &["-t", table, "-F", c]);
            }
            for c in &new {
                run(Path::new(cmd), &["-t", table, "-X", c]);
            }
        }
    }
}

/// `-A` rules of chains not in `chains` that jump to one of `chains`.
pub fn jumps_to(text: &str, chains: &[String]) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("-A "))
        .filter(|l| {
            let mut it = l.split_whitespace();
            let owner = it.nth(1).unwrap_or_default();
            let target = l.split_whitespace().skip_while(|w| *w != "-j" && *w != "-g").nth(1).unwrap_or_default();
            !chains.iter().any(|c| c == owner) && chains.iter().any(|c| c == target)
        })
        .map(str::to_string)
        .collect()
}

/// Chain names from `iptables -S` output (`-N NAME` lines).
pub fn parse_chains(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.strip_prefix("-N ")).map(|s| s.trim().to_string()).collect()
}

/// Mount points under any of `prefixes`, deepest first, from mountinfo text.
pub fn mounts_under(mountinfo: &str, prefixes: &[&Path]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| prefixes.iter().any(|p| m.starts_with(p)))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

fn run(cmd: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    if !out.status.success() {
        tracing::debug!(cmd = %cmd.display(), ?args, stderr = %String::from_utf8_lossy(&out.stderr), "cleanup command failed");
    }
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Kills every container and sandbox of the node while containerd still runs.
pub fn remove_containers(t: &Teardown) {
    let ctr = t.bin_dir.join("ctr");
    let sock = t.containerd_socket.display().to_string();
    if !t.containerd_socket.exists() {
        return;
    }
    let base = ["-a", sock.as_str(), "-n", "k8s.io"];
    let tasks = run(&ctr, &[&base[..], &["tasks", "ls", "-q"]].concat()).unwrap_or_default();
    for id in tasks.lines().filter(|l| !l.is_empty()) {
        run(&ctr, &[&base[..], &["tasks", "kill", "-s", "SIGKILL", id]].concat());
    }
    for id in tasks.lines().filter(|l| !l.is_empty()) {
        run(&ctr, &[&base[..], &["tasks", "delete", "-f", id]].concat());
    }
}

/// Everything after the processes stopped. Idempotent; best effort (each
/// step logs what it could not do and the next one still runs).
pub fn after_stop(t: &Teardown) {
    // Containers that outlived containerd: runc's own state is private.
    let runc_root = t.run_dir.join("runc");
    if runc_root.exists() {
        let root = runc_root.display().to_string();
        let list = run(&t.runc, &["--root", &root, "list", "-q"]).unwrap_or_default();
        for id in list.lines().filter(|l| !l.is_empty()) {
            run(&t.runc, &["--root", &root, "kill", id, "KILL"]);
            run(&t.runc, &["--root", &root, "delete", "--force", id]);
        }
    }
    kill_shims(&t.containerd_socket);

    // Mounts (netns under containerd's state, overlay rootfs, kubelet volumes).
    let kubelet_root = t.state_dir.join("kubelet");
    let prefixes = [t.state_dir.as_path(), t.run_dir.as_path(), kubelet_root.as_path()];
    for _ in 0..3 {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mounts = mounts_under(&info, &prefixes);
        if mounts.is_empty() {
            break;
        }
        for m in mounts {
            if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
                tracing::debug!(mount = %m.display(), error = %e, "unmount failed");
            }
        }
    }

    // kube-proxy's chains, the CNI's chains, the bridge.
    run(&t.bin_dir.join("kube-proxy"), &["--cleanup", "--proxy-mode=iptables"]);
    remove_new_chains(&t.before.chains);
    if Path::new("/sys/class/net").join(&t.bridge).exists() {
        run(Path::new("ip"), &["link", "delete", &t.bridge]);
    }
    if let Some(v) = &t.before.ip_forward {
        let _ = std::fs::write(IP_FORWARD, v);
    }

    let _ = std::fs::remove_dir_all(&t.run_dir);
    for d in HOST_DIRS {
        let d = Path::new(d);
        if d.exists()
            && !t.before.existing_dirs.iter().any(|e| e == d)
            && let Err(e) = std::fs::remove_dir_all(d)
        {
            tracing::warn!(dir = %d.display(), error = %e, "could not remove");
        }
    }
}

/// Shims of this cluster's containerd (their command line names its socket).
fn kill_shims(socket: &Path) {
    let sock = socket.display().to_string();
    for pid in processes_with_arg(&sock) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Pids whose command line contains `needle` as one argument.
pub fn processes_with_arg(needle: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|b| *b == 0).any(|a| a == needle.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_are_found_deepest_first() {
        let info = "22 1 8:1 / / rw - ext4 /dev/vda rw
100 22 0:50 / /s/containerd/root/x rw - overlay o rw
101 22 0:4 / /run/sluice-dev/ab/containerd/netns/cni-1 rw - nsfs nsfs rw
102 100 0:51 / /s/containerd/root/x/y rw - tmpfs t rw
103 22 0:52 / /other rw - tmpfs t rw";
        let m = mounts_under(info, &[Path::new("/s"), Path::new("/run/sluice-dev/ab")]);
        assert_eq!(
            m,
            vec![
                PathBuf::from("/run/sluice-dev/ab/containerd/netns/cni-1"),
                PathBuf::from("/s/containerd/root/x/y"),
                PathBuf::from("/s/containerd/root/x"),
            ]
        );
    }

    #[test]
    fn chains_are_parsed() {
        let text = "-P PREROUTING ACCEPT\n-N KUBE-SERVICES\n-N CNI-HOSTPORT-DNAT\n-A X -j Y\n";
        assert_eq!(parse_chains(text), vec!["KUBE-SERVICES", "CNI-HOSTPORT-DNAT"]);
    }

    #[test]
    fn rules_jumping_to_new_chains_are_found() {
        let text = "-N KUBE-FIREWALL\n-A INPUT -j KUBE-FIREWALL\n-A OUTPUT -p tcp -j ACCEPT\n-A KUBE-FIREWALL -j DROP\n-A OUTPUT -j KUBE-FIREWALL\n";
        assert_eq!(
            jumps_to(text, &["KUBE-FIREWALL".to_string()]),
            vec!["-A INPUT -j KUBE-FIREWALL", "-A OUTPUT -j KUBE-FIREWALL"]
        );
    }
}

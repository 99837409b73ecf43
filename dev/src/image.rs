//! Container images without a registry. Debian's buildah (chroot isolation,
//! its own storage under the sluice cache) builds images; `ctr images import`
//! loads them into the node's containerd, where pods use them without a pull.
//!
//! ```text
//!  mmdebstrap (libc, libssl, CA bundle) --buildah--> localhost/sluice-dev/base:bookworm
//!  Dockerfile stage + host-built binaries --buildah bud--> <name> --push--> docker-archive tar
//!  upstream pause.c (built statically) --buildah--> localhost/sluice-dev/pause:<ver>
//!  tar --ctr -n k8s.io images import--> node
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const PAUSE_IMAGE: &str = "localhost/sluice-dev/pause:3.10.2";
pub const BASE_IMAGE: &str = "localhost/sluice-dev/base:bookworm-3";
pub const BUSYBOX_IMAGE: &str = "localhost/sluice-dev/busybox:test";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{command} failed ({status}): {stderr}")]
    Command { command: String, status: String, stderr: String },
    #[error("running {command}: {source} (is the Debian package installed? apt-get install -y buildah mmdebstrap)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: path.to_path_buf(), source }
}

fn run(cmd: &mut Command) -> Result<String, ImageError> {
    let command = format!("{cmd:?}");
    tracing::debug!(%command, "running");
    let out = cmd.output().map_err(|source| ImageError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        return Err(ImageError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// buildah with storage of its own under the sluice cache.
#[derive(Debug, Clone)]
pub struct Buildah {
    root: PathBuf,
    runroot: PathBuf,
}

impl Buildah {
    pub fn new(cache_root: &Path) -> Self {
        Buildah { root: cache_root.join("buildah/root"), runroot: cache_root.join("buildah/runroot") }
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .arg("--storage-driver")
            .arg("overlay")
            .env("BUILDAH_ISOLATION", "chroot");
        c
    }

    pub fn exists(&self, image: &str) -> bool {
        run(self.cmd().args(["images", "-q", image])).is_ok_and(|s| !s.is_empty())
    }

    /// An image from a folder tree: `FROM scratch` + `ADD dir /` + config.
    pub fn from_dir(&self, dir: &Path, image: &str, entrypoint: &str, user: &str) -> Result<(), ImageError> {
        let c = run(self.cmd().args(["from", "scratch"]))?;
        let result = (|| {
            run(self.cmd().arg("add").arg(&c).arg(dir).arg("/"))?;
            run(self.cmd().args(["config", "--entrypoint", entrypoint, "--user", user, c.as_str()]))?;
            run(self.cmd().args(["commit", "--rm", c.as_str(), image]))
        })();
        if result.is_err() {
            let _ = run(self.cmd().args(["rm", c.as_str()]));
        }
        result.map(|_| ())
    }

    /// Writes `image` as a docker-archive tar tagged `image`.
    pub fn save(&self, image: &str, tar: &Path) -> Result<(), ImageError> {
        if let Some(parent) = tar.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let _ = fs::remove_file(tar);
        run(self.cmd().arg("push").arg(image).arg(format!("docker-archive:{}:{image}", tar.display())))?;
        Ok(())
    }
}

/// The pause image from upstream's pause.c (built by build-cluster.sh),
/// as a tar cached next to the binaries.
pub fn pause_image_tar(bin_dir: &Path, cache_root: &Path) -> Result<PathBuf, ImageError> {
    let tar = bin_dir.parent().unwrap_or(bin_dir).join("images/pause.tar");
    if tar.exists() {
        return Ok(tar);
    }
    let dir = tempfile::tempdir().map_err(io_err(bin_dir))?;
    let pause = bin_dir.join("pause");
    fs::copy(&pause, dir.path().join("pause")).map_err(io_err(&pause))?;
    let b = Buildah::new(cache_root);
    b.from_dir(dir.path(), PAUSE_IMAGE, r#"["/pause"]"#, "65535:65535")?;
    b.save(PAUSE_IMAGE, &tar)?;
    Ok(tar)
}

/// A test image: Debian's static busybox (sh, nslookup, nc, ...; its wget
/// crashes, use nc).
pub fn busybox_image_tar(cache_root: &Path) -> Result<PathBuf, ImageError> {
    let tar = cache_root.join("images/busybox.tar");
    if tar.exists() {
        return Ok(tar);
    }
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        return Err(ImageError::Io {
            path: busybox.into(),
            source: std::io::Error::other("not found; install it with: apt-get install -y busybox-static"),
        });
    }
    let dir = tempfile::tempdir().map_err(io_err(cache_root))?;
    let bin = dir.path().join("bin");
    fs::create_dir_all(&bin).map_err(io_err(&bin))?;
    fs::copy(busybox, bin.join("busybox")).map_err(io_err(busybox))?;
    for applet in [
        "sh", "cat", "echo", "env", "ls", "nslookup", "printf", "sleep", "nc", "trap", "kill", "grep", "head", "date",
        "id", "true", "false", "httpd", "mkdir", "touch",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).map_err(io_err(&bin))?;
    }
    for d in ["tmp", "etc"] {
        fs::create_dir_all(dir.path().join(d)).map_err(io_err(dir.path()))?;
    }
    use std::os::unix::fs::PermissionsExt;
    let tmp = dir.path().join("tmp");
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).map_err(io_err(&tmp))?;
    fs::write(dir.path().join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        .map_err(io_err(dir.path()))?;
    let b = Buildah::new(cache_root);
    b.from_dir(dir.path(), BUSYBOX_IMAGE, r#"["/bin/sh"]"#, "65534:65534")?;
    b.save(BUSYBOX_IMAGE, &tar)?;
    Ok(tar)
}

/// The runtime base: glibc, libgcc, libssl, zlib, CA certificates and a non-root user from
/// Debian 12, made by mmdebstrap without a chroot.
pub fn base_image(cache_root: &Path) -> Result<String, ImageError> {
    let b = Buildah::new(cache_root);
    if b.exists(BASE_IMAGE) {
        return Ok(BASE_IMAGE.to_string());
    }
    let dir = tempfile::tempdir().map_err(io_err(cache_root))?;
    let tar = dir.path().join("base.tar");
    // The CA bundle is assembled from usr/share/ca-certificates, since no
    // maintainer script runs in chrootless mode.
    let hook = concat!(
        r#"cd "$1" && mkdir -p etc/ssl/certs tmp && chmod 1777 tmp && "#,
        r#"find usr/share/ca-certificates -name '*.crt' -exec cat {} + > etc/ssl/certs/ca-certificates.crt && "#,
        r#"echo 'root:x:0:0:root:/root:/sbin/nologin' > etc/passwd && "#,
        r#"echo 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >> etc/passwd && "#,
        r#"printf 'root:x:0:\nnonroot:x:65532:\n' > etc/group && mkdir -p home/nonroot"#
    );
    run(Command::new("mmdebstrap")
        .args(["--mode=chrootless", "--variant=custom", "--include=libc6,libgcc-s1,libssl3,zlib1g,ca-certificates"])
        .arg(format!("--customize-hook={hook}"))
        .arg("bookworm")
        .arg(&tar)
        .arg("/etc/apt/sources.list.d/debian.sources"))?;
    let c = run(b.cmd().args(["from", "scratch"]))?;
    run(b.cmd().arg("add").arg(&c).arg(&tar).arg("/"))?;
    run(b.cmd().args(["commit", "--rm", c.as_str(), BASE_IMAGE]))?;
    Ok(BASE_IMAGE.to_string())
}

/// What `sluice-dev image` builds.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub dockerfile: PathBuf,
    pub context: PathBuf,
    pub target: Option<String>,
    pub name: String,
    pub build_args: Vec<(String, String)>,
}

/// Builds the project's image from its Dockerfile with the local base as
/// `RUNTIME_IMAGE`, unless nothing in the context changed since the last
/// build. Returns the docker-archive tar.
pub fn build(spec: &ImageSpec, cache_root: &Path) -> Result<PathBuf, ImageError> {
    let safe: String = spec.name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    let tar = cache_root.join(format!("images/{safe}.tar"));
    let stamp = cache_root.join(format!("images/{safe}.fingerprint"));
    // One build at a time per image, across threads and processes (the
    // tests of one suite start their clusters at once): two `buildah push`es
    // to one archive fail. The lock is taken before the fingerprint check,
    // so whoever waited finds the image built and returns it.
    let lock_path = cache_root.join(format!("images/{safe}.lock"));
    fs::create_dir_all(cache_root.join("images")).map_err(io_err(&lock_path))?;
    let lock = fs::File::create(&lock_path).map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;
    let mut fp = fingerprint(&spec.dockerfile, &spec.context)?;
    fp.push_str(&format!(" {:?} {:?}", spec.target, spec.build_args));
    if tar.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s == fp) {
        tracing::info!(image = %spec.name, "unchanged; not rebuilding");
        return Ok(tar);
    }
    let base = base_image(cache_root)?;
    let b = Buildah::new(cache_root);
    let mut cmd = b.cmd();
    cmd.arg("bud")
        .arg("--layers=false")
        .arg("-f")
        .arg(&spec.dockerfile)
        .arg("-t")
        .arg(&spec.name)
        .arg("--build-arg")
        .arg(format!("RUNTIME_IMAGE={base}"))
        .arg("--pull-never");
    if let Some(t) = &spec.target {
        cmd.arg("--target").arg(t);
    }
    for (k, v) in &spec.build_args {
        cmd.arg("--build-arg").arg(format!("{k}={v}"));
    }
    cmd.arg(&spec.context);
    run(&mut cmd)?;
    b.save(&spec.name, &tar)?;
    fs::write(&stamp, fp).map_err(io_err(&stamp))?;
    Ok(tar)
}

/// FNV-1a over the Dockerfile's contents and every context file's name,
/// size and modification time (cargo rewrites a binary it rebuilt), skipping
/// `.git` and `target`.
pub fn fingerprint(dockerfile: &Path, context: &Path) -> Result<String, ImageError> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(&fs::read(dockerfile).map_err(io_err(dockerfile))?);
    let mut stack = vec![context.to_path_buf()];
    let mut files = Vec::new();
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let p = e.path();
            let name = e.file_name();
            if name == ".git" || name == "target" {
                continue;
            }
            let ft = e.file_type().map_err(io_err(&p))?;
            if ft.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    for f in files {
        let m = fs::symlink_metadata(&f).map_err(io_err(&f))?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        feed(f.as_os_str().as_encoded_bytes());
        feed(&m.len().to_le_bytes());
        feed(&mtime.to_le_bytes());
    }
    Ok(format!("{h:016x}"))
}

/// A build context holding `dist/<file>` for each binary (hard links when
/// possible), for the Dockerfile stage that copies host-built binaries.
pub fn stage_binaries(binaries: &[PathBuf], cache_root: &Path, name: &str) -> Result<PathBuf, ImageError> {
    let safe: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    let ctx = cache_root.join(format!("images/context-{safe}"));
    let dist = ctx.join("dist");
    let _ = fs::remove_dir_all(&ctx);
    fs::create_dir_all(&dist).map_err(io_err(&dist))?;
    for b in binaries {
        let file = b
            .file_name()
            .ok_or_else(|| ImageError::Io { path: b.clone(), source: std::io::Error::other("not a file") })?;
        let dst = dist.join(file);
        if fs::hard_link(b, &dst).is_err() {
            fs::copy(b, &dst).map_err(io_err(b))?;
        }
    }
    Ok(ctx)
}

/// The project's own image, `name` (the chart's `<repository>:<appVersion>`),
/// from the Dockerfile's `prebuilt` stage with host-built `sluice-operator`
/// and `sluice-worker` from `binaries_dir` (e.g. the cargo target's release/).
pub fn project_image_tar(
    repo_root: &Path,
    binaries_dir: &Path,
    name: &str,
    cache_root: &Path,
) -> Result<PathBuf, ImageError> {
    let mut binaries = Vec::new();
    for b in ["sluice-operator", "sluice-worker"] {
        let path = binaries_dir.join(b);
        if !path.is_file() {
            return Err(ImageError::Io {
                path,
                source: std::io::Error::other(
                    "not built; run: cargo build --release -p sluice-operator -p sluice-worker",
                ),
            });
        }
        binaries.push(path);
    }
    let context = stage_binaries(&binaries, cache_root, name)?;
    build(
        &ImageSpec {
            dockerfile: repo_root.join("Dockerfile"),
            context,
            target: Some("prebuilt".into()),
            name: name.into(),
            build_args: Vec::new(),
        },
        cache_root,
    )
}

/// Loads a docker-archive tar into the node's containerd (namespace k8s.io).
pub fn import(ctr: &Path, containerd_socket: &Path, tar: &Path) -> Result<(), ImageError> {
    run(Command::new(ctr).arg("-a").arg(containerd_socket).args(["-n", "k8s.io", "images", "import"]).arg(tar))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_changes_with_the_context() {
        let dir = tempfile::tempdir().unwrap();
        let df = dir.path().join("Dockerfile");
        fs::write(&df, "FROM scratch\n").unwrap();
        fs::create_dir(dir.path().join("bin")).unwrap();
        fs::write(dir.path().join("bin/x"), "1").unwrap();
        let a = fingerprint(&df, dir.path()).unwrap();
        assert_eq!(a, fingerprint(&df, dir.path()).unwrap());
        fs::write(dir.path().join("bin/x"), "22").unwrap();
        assert_ne!(a, fingerprint(&df, dir.path()).unwrap());
    }
}

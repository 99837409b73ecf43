//! Test harness shared by the suites in tests/tests/: finding the tools and
//! servers the suites run for real. A missing tool is a failing test whose
//! message says how to install it, never a skipped one.

use std::path::{Path, PathBuf};

pub mod brokers;
pub mod e2e;
pub mod keda;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Find `name` on PATH, or panic with how to install it. `make test` puts
/// every tool on PATH (dev/scripts/setup.sh); this names the fix for someone
/// running `cargo test` by hand.
pub fn require_tool(name: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not on PATH. Run the suites with `make test`, which installs it, or install it yourself: {install}"
            )
        })
}

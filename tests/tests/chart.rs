//! The Helm chart, checked with the helm built from the pinned module and
//! with kubernetes-validate. (Installing it into the real cluster is part of
//! the e2e suite.)

use std::process::{Command, Output};

use sluice_tests::{repo_root, require_tool};

fn helm(args: &[&str]) -> Output {
    let helm =
        require_tool("helm", "bash dev/scripts/build-cluster.sh, then put its bin folder on PATH (make test does)");
    Command::new(helm).args(args).current_dir(repo_root()).output().expect("run helm")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn template(values: &[&str]) -> String {
    let mut args = vec!["template", "sluice", "charts/sluice", "--namespace", "sluice-system"];
    for v in values {
        args.extend(["--set", v]);
    }
    let out = helm(&args);
    assert!(out.status.success(), "helm template {values:?} failed:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubernetes_validate(manifests: &str) {
    let tool =
        require_tool("kubernetes-validate", "pip install -r dev/requirements.txt (make test does this in a venv)");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, manifests).expect("write rendered chart");
    let out = Command::new(tool).arg("--strict").arg(&file).output().expect("run kubernetes-validate");
    assert!(out.status.success(), "kubernetes-validate --strict rejected the chart:\n{}\n{manifests}", text(&out));
}

#[test]
fn lint_is_clean() {
    let out = helm(&["lint", "--strict", "charts/sluice"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("0 chart(s) failed"), "{}", text(&out));
}

#[test]
fn default_values_render_valid_manifests() {
    let out = template(&[]);
    kubernetes_validate(&out);
    for kind in ["kind: ServiceAccount", "kind: ClusterRole", "kind: ClusterRoleBinding", "kind: Deployment"] {
        assert!(out.contains(kind), "missing {kind}:\n{out}");
    }
    assert!(out.contains("replicas: 2"), "two operator replicas by default");
    assert!(out.contains("image: sluice:0.1.0"), "the image tag defaults to appVersion");
    assert!(out.contains("--leader-elect=true"));
    assert!(out.contains("readOnlyRootFilesystem: true") && out.contains("runAsNonRoot: true"));
}

#[test]
fn non_default_values_render_valid_manifests() {
    let out = template(&[
        "watchNamespace=streams",
        "replicaCount=1",
        "leaderElection.enabled=false",
        "image.repository=registry.example/sluice",
        "image.tag=9.9.9",
        "dashboard.enabled=true",
        "logFormat=text",
    ]);
    kubernetes_validate(&out);
    assert!(out.contains("kind: Role\n") && out.contains("kind: RoleBinding\n") && !out.contains("kind: ClusterRole"));
    assert!(out.contains("namespace: streams"));
    assert!(out.contains("--watch-namespace=streams"));
    assert!(out.contains("image: registry.example/sluice:9.9.9"));
    assert!(out.contains("grafana_dashboard: \"1\"") && out.contains("\"uid\": \"sluice-overview\""));
}

#[test]
fn the_dashboard_is_valid_json_with_the_panels_operators_need() {
    let text = std::fs::read_to_string(repo_root().join("charts/sluice/dashboards/sluice.json")).expect("dashboard");
    let json: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let titles: Vec<&str> =
        json["panels"].as_array().expect("panels").iter().filter_map(|p| p["title"].as_str()).collect();
    for want in ["Lag", "Throughput", "Replicas", "Dead letters", "Reconcile errors", "Reconcile latency"] {
        assert!(titles.iter().any(|t| t.contains(want)), "no {want} panel in {titles:?}");
    }
}

#[test]
fn values_schema_rejects_bad_values() {
    for (bad, why) in [
        ("replicaCount=0", "replicaCount"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("watchNamespace=Not_A_Namespace", "watchNamespace"),
        ("unknownKey=1", "unknownKey"),
        ("logFormat=xml", "logFormat"),
    ] {
        let out = helm(&["template", "sluice", "charts/sluice", "--set", bad]);
        assert!(!out.status.success(), "helm accepted {bad}");
        assert!(text(&out).contains(why), "the error for {bad} does not name {why}:\n{}", text(&out));
    }
}

#[test]
fn the_charts_crd_is_the_generated_one() {
    let chart =
        std::fs::read_to_string(repo_root().join("charts/sluice/crds/streamprocessors.sluice.io.yaml")).expect("crd");
    assert_eq!(chart, sluice_crds::crd::crd_yaml(), "regenerate with `make crd`");
}

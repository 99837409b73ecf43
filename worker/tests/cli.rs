//! The `sluice-worker` binary: bad specs exit 2 naming the field; a file
//! input gives golden window output; SIGTERM drains and exits cleanly.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_sluice-worker");

fn repo(path: &str) -> String {
    format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))
}

fn worker() -> Command {
    let mut c = Command::new(BIN);
    c.env("SLUICE_HTTP_ADDR", "127.0.0.1:0").env_remove("LOG_FORMAT");
    c
}

#[test]
fn invalid_examples_exit_2_and_name_the_field() {
    for (file, field) in [
        ("examples/invalid/bad-cel.yaml", "spec.pipeline"),
        ("examples/invalid/session-without-gap.yaml", "window"),
        ("examples/invalid/unknown-field.yaml", "unknown field"),
        ("examples/invalid/bad-generator.yaml", "template"),
    ] {
        let out = worker().args(["run", &repo(file)]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{file}: {stderr}");
        assert!(stderr.contains(field), "{file}: {stderr}");
    }
    let out = worker().args(["run", "/nonexistent/spec.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn every_example_compiles_into_a_pipeline() {
    for entry in std::fs::read_dir(repo("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let cfg = sluice_worker::config::load(path.to_str().unwrap(), &|_| None)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            sluice_worker::pipeline::Pipeline::compile(&cfg.spec).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }
}

const SESSION_SPEC: &str = r#"
apiVersion: sluice.io/v1alpha1
kind: StreamProcessor
metadata: {name: sessions}
spec:
  source: {kafka: {brokers: ["kafka:9092"], topic: clicks}}
  pipeline:
    - filter: "msg.page != 'health'"
    - window:
        type: session
        gap: 10s
        keyBy: msg.user
        time: {field: msg.ts, allowedLateness: 5s}
        aggregate: {count: {}, first: msg.page, last: msg.page, distinctCount: msg.page}
  sink: {stdout: {}}
"#;

#[test]
fn file_input_gives_golden_session_windows() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.yaml");
    std::fs::write(&spec, SESSION_SPEC).unwrap();
    let input = dir.path().join("in.jsonl");
    let dead = dir.path().join("dead.jsonl");
    let lines = [
        r#"{"user":"ann","page":"home","ts":"1970-01-01T00:00:01Z"}"#,
        r#"{"user":"bob","page":"home","ts":2000}"#,
        r#"{"user":"ann","page":"cart","ts":9000}"#,
        r#"{"user":"ann","page":"health","ts":9500}"#,
        "not json",
        r#"{"user":"bob","page":"buy","ts":40000}"#,
        r#"{"user":"ann","page":"late","ts":3000}"#,
        r#"{"user":"ann","page":"pay","ts":41000}"#,
    ];
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = worker()
        .args(["run", spec.to_str().unwrap(), "--input", input.to_str().unwrap(), "--dead-letter"])
        .arg(&dead)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let want = [
        r#"{"key":"bob","start":2000,"end":12000,"count":1,"first":"home","last":"home","distinctCount":1}"#,
        r#"{"key":"ann","start":1000,"end":19000,"count":2,"first":"home","last":"cart","distinctCount":2}"#,
        r#"{"key":"bob","start":40000,"end":50000,"count":1,"first":"buy","last":"buy","distinctCount":1}"#,
        r#"{"key":"ann","start":41000,"end":51000,"count":1,"first":"pay","last":"pay","distinctCount":1}"#,
    ];
    let want: Vec<serde_json::Value> = want.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got, want);
    let dead: Vec<serde_json::Value> =
        std::fs::read_to_string(&dead).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let reasons: Vec<(&str, i64)> =
        dead.iter().map(|d| (d["headers"]["sluice-reason"].as_str().unwrap(), d["offset"].as_i64().unwrap())).collect();
    assert_eq!(reasons, vec![("bad_payload", 4), ("late", 6)]);
}

#[test]
fn sigterm_drains_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.yaml");
    std::fs::write(
        &spec,
        r#"{"source": {"generator": {"rate": 2000, "keys": 10, "template": {"n": "seq", "k": "key"}}},
            "pipeline": [{"filter": "msg.n >= 0"}], "sink": {"stdout": {}}}"#,
    )
    .unwrap();
    let mut child = worker()
        .args(["run", spec.to_str().unwrap()])
        .env("SHUTDOWN_GRACE_PERIOD", "10s")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains("\"n\""), "{first}");
    let t0 = Instant::now();
    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
    // Keep reading so the worker never blocks on a full pipe while draining.
    let reader = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
        rest
    });
    let status = child.wait().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10), "exited within the grace period");
    let _ = reader.join();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("worker stopped cleanly"), "{err}");
    let _ = std::io::stderr().flush();
}

/// The README's demo: examples/generator-windows.yaml runs with no broker and
/// prints windows. Run here at full speed (rate 0) so the test takes a second.
#[test]
fn the_generator_demo_prints_windows() {
    let example = std::fs::read_to_string(repo("examples/generator-windows.yaml")).unwrap();
    assert!(example.contains("rate: 2000"), "the demo's rate changed; update this test");
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("demo.yaml");
    std::fs::write(&spec, example.replace("rate: 2000", "rate: 0")).unwrap();
    let out = worker().args(["run", spec.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let windows: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!windows.is_empty());
    let mut counted = 0;
    for w in &windows {
        assert!(["DE", "FR", "US", "JP"].contains(&w["key"].as_str().unwrap()), "{w}");
        let (start, end) = (w["start"].as_i64().unwrap(), w["end"].as_i64().unwrap());
        assert_eq!((start % 10_000, end - start), (0, 10_000), "{w}");
        assert!(w["sum"].is_f64() && w["max"].as_i64().is_some_and(|m| (1..=500).contains(&m)), "{w}");
        counted += w["count"].as_u64().unwrap();
    }
    // 100000 messages, a quarter of them `type: ignore` (choice of 4, seed 7).
    assert!((70_000..80_000).contains(&counted), "{counted}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("worker stopped cleanly"), "{stderr}");
}

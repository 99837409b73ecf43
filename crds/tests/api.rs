//! The API as users meet it: the checked-in CRD, the examples they copy, and
//! the errors they get for manifests that are wrong.

use std::path::{Path, PathBuf};

use sluice_crds::{crd, validate};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("crds/ has a parent").to_path_buf()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn checked_in_crd_matches_the_types() {
    let path = repo_root().join(crd::CHECKED_IN_PATH);
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == crd::crd_yaml(),
        "{} is out of date with crds/src; regenerate it with\n  cargo run -p sluice-operator -- crd > {}",
        path.display(),
        crd::CHECKED_IN_PATH
    );
}

#[test]
fn checked_in_api_reference_matches_the_types() {
    let path = repo_root().join(crd::API_REFERENCE_PATH);
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == crd::api_reference(),
        "{} is out of date with crds/src; regenerate it with\n  cargo run -p sluice-operator -- api-docs > {}",
        path.display(),
        crd::API_REFERENCE_PATH
    );
}

#[test]
fn every_example_is_valid() {
    let examples = yaml_files(&repo_root().join("examples"));
    assert!(examples.len() >= 5, "expected the examples, found {examples:?}");
    let schema = crd::openapi_schema();
    let schema_validator = jsonschema::validator_for(&schema).expect("CRD schema compiles");
    for path in examples {
        let text = std::fs::read_to_string(&path).expect("read example");
        let value: serde_json::Value = serde_yaml::from_str(&text).expect("example is YAML");
        // Against the generated CRD's openAPIV3Schema alone ...
        let schema_errors: Vec<String> = schema_validator.iter_errors(&value).map(|e| e.to_string()).collect();
        assert!(schema_errors.is_empty(), "{}: {schema_errors:?}", path.display());
        // ... and through every layer of validate().
        if let Err(e) = validate::parse_manifest(&text) {
            panic!("{} is invalid:\n{e}", path.display());
        }
    }
}

/// Each file in examples/invalid/ names, in `# expect: <path> | <text>` lines,
/// exactly the errors it must produce.
#[test]
fn every_invalid_manifest_fails_for_its_stated_reason() {
    let files = yaml_files(&repo_root().join("examples/invalid"));
    assert!(files.len() >= 15, "expected the invalid manifests, found {}", files.len());
    for path in files {
        let text = std::fs::read_to_string(&path).expect("read manifest");
        let expected: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .map(|l| {
                let (p, m) = l.split_once(" | ").expect("expect lines read `path | text`");
                (p.trim().to_string(), m.trim().to_string())
            })
            .collect();
        assert!(!expected.is_empty(), "{} has no `# expect:` line", path.display());
        let errors = match validate::parse_manifest(&text) {
            Ok(_) => panic!("{} was accepted", path.display()),
            Err(e) => e,
        };
        for (p, m) in &expected {
            assert!(
                errors.0.iter().any(|e| &e.path == p && e.message.contains(m.as_str())),
                "{}: expected `{p}: ...{m}...`, got:\n{errors}",
                path.display()
            );
        }
        assert_eq!(
            errors.0.len(),
            expected.len(),
            "{}: expected exactly {:?}, got:\n{errors}",
            path.display(),
            expected.iter().map(|(p, _)| p).collect::<Vec<_>>()
        );
    }
}

#[test]
fn a_bare_spec_is_accepted_for_local_runs() {
    let sp = validate::parse_manifest("source: {generator: {template: {id: seq}}}\nsink: {stdout: {}}\n")
        .expect("bare spec is valid");
    assert_eq!(sp.spec.source.kind(), "generator");
    // Schema defaults are applied by serde the same way the API server applies them.
    let g = sp.spec.source.generator.expect("generator");
    assert_eq!((g.partitions, g.keys, g.rate), (1, 100, 0));
}

#[test]
fn defaults_round_trip() {
    let text = std::fs::read_to_string(repo_root().join("examples/kafka-orders-by-country.yaml")).unwrap();
    let sp = validate::parse_manifest(&text).unwrap();
    let again: sluice_crds::StreamProcessor = serde_json::from_value(serde_json::to_value(&sp).unwrap()).unwrap();
    assert_eq!(sp, again);
    let dl = sp.spec.dead_letter.expect("deadLetter");
    assert_eq!(dl.backoff.initial.as_millis(), 100);
    assert_eq!(sp.spec.scaling.expect("scaling").stuck_after, 3);
}

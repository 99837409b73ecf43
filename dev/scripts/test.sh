#!/usr/bin/env bash
# The project's test command (README: `make test`; CI: .ci/run).
# Installs what it needs (dev/scripts/setup.sh), then: rustfmt, clippy, and
# every test suite, unit to end-to-end, against real servers it starts itself.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
start=$(date +%s)
eval "$(bash dev/scripts/setup.sh)"

step() { printf '\n== %s (%ss)\n' "$*" "$(($(date +%s) - start))"; }
step "cargo fmt --check"
cargo fmt --all --check
step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "cargo build --release (the binaries in the image the e2e suites run)"
cargo build --release --locked -p sluice-worker -p sluice-operator
step "cargo test"
# Every suite runs and reports, even after one fails.
cargo test --workspace --locked --no-fail-fast "$@"
step "done"

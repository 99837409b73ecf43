#!/usr/bin/env bash
# The project's test command (README: `make test`; CI: .ci/run).
# Installs what it needs (dev/scripts/setup.sh), then: rustfmt, clippy, and
# every test suite, unit to end-to-end, against real servers it starts itself.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
start=$(date +%s)
# KEDA builds in the background when missing; its suite runs last (below).
eval "$(SLUICE_KEDA=background bash dev/scripts/setup.sh)"

step() { printf '\n== %s (%ss)\n' "$*" "$(($(date +%s) - start))"; }
step "cargo fmt --check"
cargo fmt --all --check
step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "cargo build --release (the binaries in the image the e2e suites run)"
# The same package set as `make demo` and the demo suite build: another set
# unifies dependency features differently (rustls, ring through sluice-dev),
# so each build would undo the other's (2m49s measured) and the e2e image
# would change between suites.
cargo build --release --locked -p sluice-worker -p sluice-operator -p sluice-dev
step "cargo test"
# Every suite runs and reports, even after one fails.
status=0
cargo test --workspace --locked --no-fail-fast "$@" || status=$?
step "cargo test --test keda (last: waits for a KEDA build still running in the background)"
# build-keda.sh under the lock: waits for the background build, then returns
# at once, or builds what a failed background build left undone.
if ! flock "$SLUICE_KEDA_BUILD_LOCK" bash dev/scripts/build-keda.sh >/dev/null; then
  echo "the KEDA build failed; the end of its log ($SLUICE_KEDA_BUILD_LOG):" >&2
  tail -n 30 "$SLUICE_KEDA_BUILD_LOG" >&2 || true
fi
cargo test -p sluice-tests --locked --test keda "$@" || status=$?
step "done"
exit "$status"

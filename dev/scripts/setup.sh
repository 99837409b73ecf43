#!/usr/bin/env bash
# Installs what the test suites need, idempotently, and prints the environment
# to use them as `export` lines (the test script evals them).
#
# Everything heavy is cached by pinned version OUTSIDE the clone, under
# ${XDG_CACHE_HOME:-$HOME/.cache}/sluice, so a fresh clone on the same machine
# (CI) finds it and a second run does nothing:
#   venv-<hash>/      PyPI tools pinned in dev/requirements.txt
#   cargo-target/     the shared Cargo target dir
#   cluster/<key>/    Kubernetes, containerd, CoreDNS, KWOK, helm built from pinned Go modules
#   keda/<key>/       KEDA's operator and metrics adapter (and its CRDs) from its pinned Go module
#   kafka/<version>/  Apache Kafka jars from Maven Central
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/sluice
mkdir -p "$cache"
log() { printf '%s setup: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# --- Debian packages ---------------------------------------------------------
apt_packages=(redis-server kcat python3-venv)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]}; install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  log "installing ${missing[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

# --- Python tools in a venv keyed by the pinned requirements -------------------
req="$root/dev/requirements.txt"
venv="$cache/venv-$(sha256sum "$req" | cut -c1-12)"
if [ ! -x "$venv/.complete" ]; then
  log "creating $venv"
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" >&2
  printf '#!/bin/sh\n' > "$venv/.complete" && chmod +x "$venv/.complete"
fi

# --- The local cluster's binaries ----------------------------------------------
cluster_bin=$(bash "$root/dev/scripts/build-cluster.sh")

# --- KEDA, for the KEDA suite and benchmark (13 to 19 minutes cold) ------------
# SLUICE_KEDA says when: `now` (default) builds it before returning;
# `background` (test.sh) starts a missing build in the background and returns,
# and test.sh waits for it (the lock) just before the KEDA suite, which it runs
# last, so that on a fresh machine the build overlaps the Rust build and the
# other suites instead of delaying them; `skip` (the demo, which does not use
# KEDA) leaves it alone. One build at a time, whoever starts it (flock).
keda_dir=$(bash "$root/dev/scripts/build-keda.sh" --dir)
keda_lock="$cache/keda-build.lock"
keda_log="$cache/keda-build.log"
case "${SLUICE_KEDA:-now}" in
  now) flock "$keda_lock" bash "$root/dev/scripts/build-keda.sh" >/dev/null ;;
  background)
    if [ ! -f "$keda_dir/.complete" ]; then
      log "building KEDA in the background (log: $keda_log); the KEDA suite waits for it"
      setsid flock "$keda_lock" bash "$root/dev/scripts/build-keda.sh" >"$keda_log" 2>&1 </dev/null &
    fi
    ;;
  skip) ;;
  *)
    echo "setup: SLUICE_KEDA must be now, background or skip (got ${SLUICE_KEDA})" >&2
    exit 1
    ;;
esac

# --- Apache Kafka jars from Maven Central (the test brokers) -------------------
kafka_libs=$(bash "$root/dev/kafka/fetch.sh")

echo "export CARGO_TARGET_DIR=\"\${CARGO_TARGET_DIR:-$cache/cargo-target}\""
echo "export PATH=\"$venv/bin:$cluster_bin:\$PATH\""
echo "export SLUICE_CLUSTER_BIN=\"$cluster_bin\""
echo "export SLUICE_KEDA_DIR=\"$keda_dir\""
echo "export SLUICE_KEDA_BUILD_LOCK=\"$keda_lock\""
echo "export SLUICE_KEDA_BUILD_LOG=\"$keda_log\""
echo "export SLUICE_KAFKA_LIBS=\"$kafka_libs\""

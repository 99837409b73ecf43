#!/usr/bin/env bash
# Builds KEDA (the operator and the external-metrics adapter) from its pinned
# Go module into a cache folder OUTSIDE the clone, for `sluice-dev up --with
# keda` and the KEDA e2e suite and benchmark:
#
#   ${XDG_CACHE_HOME:-$HOME/.cache}/sluice/keda/<key>/bin/{keda,keda-adapter}
#   ${XDG_CACHE_HOME:-$HOME/.cache}/sluice/keda/<key>/crds/*.yaml   (KEDA's own CRDs)
#
# KEDA's go.mod carries a replace directive that a wrapping module would not
# inherit, so the binaries are built inside the downloaded module itself with
# its own go.mod and go.sum (verified against the checksum database), exactly
# as upstream's Makefile builds them (CGO off, version stamped). The admission
# webhooks are not built: they only validate ScaledObjects, nothing needs them.
#
# <key> hashes the version, the recipe and the Go version. Idempotent: a
# complete build leaves a marker and a second run only prints the bin path.
# Cold: about 9 minutes on 2 cores. The Go build cache is removed afterwards
# (it grows by several GB); the module cache is shared with build-cluster.sh.
#
# `build-keda.sh --dir` prints the build folder without building.
#
# Environment: SLUICE_GO_PARALLEL (default 2) is passed to `go build -p`.
set -euo pipefail

cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/sluice"

KEDA_MODULE=github.com/kedacore/keda/v2
KEDA_VERSION=v2.21.0
# Anything that changes how binaries are built goes into RECIPE (and so the key).
RECIPE="recipe=1 keda=$KEDA_VERSION cgo=0 flags=-trimpath,-s,-w binaries=operator,adapter crds=config/crd/bases"

if ! command -v go >/dev/null; then
  echo "build-keda: Go 1.26 is needed to build KEDA (go not found on PATH)" >&2
  exit 1
fi

key="$( { echo "$RECIPE"; GOTOOLCHAIN=local go version; } | sha256sum | cut -c1-16)"
out="$cache_root/keda/$key"
bin="$out/bin"
marker="$out/.complete"

# --dir: where the build is (or will be), without building.
if [[ "${1:-}" == --dir ]]; then
  echo "$out"
  exit 0
fi

if [[ -f "$marker" ]]; then
  echo "$bin"
  exit 0
fi

log() { printf '%s build-keda: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

export GOMODCACHE="$cache_root/go/mod"
export GOCACHE="$cache_root/go/build-keda"
export GOFLAGS="-buildvcs=false -mod=readonly"
export GOTOOLCHAIN=local
export CGO_ENABLED=0
par="${SLUICE_GO_PARALLEL:-2}"
start_all=$SECONDS

t0=$SECONDS
src="$(cd /tmp && go mod download -json "$KEDA_MODULE@$KEDA_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
if [[ -z "$src" || ! -f "$src/go.mod" ]]; then
  log "could not download $KEDA_MODULE@$KEDA_VERSION from the Go module proxy"
  exit 1
fi
(cd "$src" && go mod download)
log "module download: $((SECONDS - t0)) s"

mkdir -p "$bin"
ldflags="-s -w -X=$KEDA_MODULE/version.Version=${KEDA_VERSION#v} -X=$KEDA_MODULE/version.GitCommit=module-proxy"

# go_build <output name> <package dir in the module>
go_build() {
  local name="$1" pkg="$2"
  if [[ -x "$bin/$name" && -f "$out/.built-$name" ]]; then
    log "$name: already built"
    return 0
  fi
  local t0=$SECONDS
  log "$name: building $KEDA_MODULE/$pkg"
  (cd "$src" && nice -n 10 go build -p "$par" -trimpath -ldflags "$ldflags" -o "$bin/$name.tmp" "./$pkg")
  mv "$bin/$name.tmp" "$bin/$name"
  touch "$out/.built-$name"
  log "$name: built in $((SECONDS - t0)) s ($(du -h "$bin/$name" | cut -f1))"
  printf '%s %s\n' "$name" "$((SECONDS - t0))" >>"$out/build-times.txt"
}

go_build keda cmd/operator
go_build keda-adapter cmd/adapter

rm -rf "$out/crds"
mkdir -p "$out/crds"
cp "$src"/config/crd/bases/*.yaml "$out/crds/"
chmod u+w "$out"/crds/*.yaml

echo "keda $KEDA_VERSION" >"$out/versions.txt"
log "built in $((SECONDS - start_all)) s; bin $(du -sh "$bin" | cut -f1), go build cache $(du -sh "$GOCACHE" | cut -f1) (removed)"
rm -rf "$GOCACHE"
touch "$marker"
ln -sfn "$out" "$cache_root/keda/current"
echo "$bin"

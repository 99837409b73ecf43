#!/usr/bin/env bash
# Builds every binary of the sluice-dev cluster from the pinned Go modules in
# dev/cluster/ into a cache folder OUTSIDE the clone, keyed by the pins:
#
#   ${XDG_CACHE_HOME:-$HOME/.cache}/sluice/cluster/<key>/bin
#
# <key> is a hash of dev/cluster/*/go.mod, go.sum, the build recipe below and
# the Go version, so a fresh clone on the same machine finds the binaries and a
# changed pin builds a new set. Idempotent: a complete build leaves a marker and
# a second run only prints the bin path. Debian packages the cluster needs at
# run time (runc, CNI plugins, iptables, conntrack, buildah, mmdebstrap) are
# installed with apt-get when missing.
#
# Environment: SLUICE_CLUSTER_SKIP_APT=1 skips the package step;
# SLUICE_GO_PARALLEL (default 2) is passed to `go build -p`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"   # dev/
cluster_src="$here/cluster"
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/sluice"

K8S_VERSION=v1.37.2
ETCD_VERSION=v3.6.16
CONTAINERD_VERSION=v2.4.2
COREDNS_VERSION=v1.15.0
KWOK_VERSION=v0.8.0
HELM_VERSION=v4.3.1
PAUSE_VERSION=3.10.2
CONTAINERD_TAGS="urfave_cli_no_docs no_btrfs no_devmapper no_zfs"
# Anything that changes how binaries are built goes into RECIPE (and so the key).
RECIPE="recipe=3 k8s=$K8S_VERSION etcd=$ETCD_VERSION containerd=$CONTAINERD_VERSION tags=$CONTAINERD_TAGS coredns=$COREDNS_VERSION kwok=$KWOK_VERSION helm=$HELM_VERSION pause=$PAUSE_VERSION flags=-trimpath,-s,-w"

if ! command -v go >/dev/null; then
  echo "build-cluster: Go 1.26 is needed to build the cluster (go not found on PATH)" >&2
  exit 1
fi

key="$( { cat "$cluster_src"/*/go.mod "$cluster_src"/*/go.sum; echo "$RECIPE"; go version; } | sha256sum | cut -c1-16)"
out="$cache_root/cluster/$key"
bin="$out/bin"
marker="$out/.complete"

if [[ -f "$marker" ]]; then
  echo "$bin"
  exit 0
fi

log() { printf '%s build-cluster: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# --- Debian packages -------------------------------------------------------
debs=(runc containernetworking-plugins iptables conntrack buildah mmdebstrap gcc libc6-dev busybox-static)
if [[ "${SLUICE_CLUSTER_SKIP_APT:-}" != 1 ]]; then
  missing=()
  for p in "${debs[@]}"; do
    dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    if [[ $(id -u) != 0 ]]; then
      log "missing Debian packages: ${missing[*]}; run: sudo apt-get update && sudo apt-get install -y ${missing[*]}"
      exit 1
    fi
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
fi

# --- Go builds -------------------------------------------------------------
export GOMODCACHE="$cache_root/go/mod"
export GOCACHE="$cache_root/go/build"
export GOFLAGS="-buildvcs=false -mod=readonly"
export GOTOOLCHAIN=local
par="${SLUICE_GO_PARALLEL:-2}"
mkdir -p "$bin"
build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
start_all=$SECONDS

# go_build <module dir> <output name> <package> [extra go build args...]
go_build() {
  local mod="$1" name="$2" pkg="$3"
  shift 3
  if [[ -x "$bin/$name" && -f "$out/.built-$name" ]]; then
    log "$name: already built"
    return 0
  fi
  local t0=$SECONDS
  log "$name: building $pkg"
  (cd "$cluster_src/$mod" && nice -n 10 go build -p "$par" -trimpath -o "$bin/$name.tmp" "$@" "$pkg")
  mv "$bin/$name.tmp" "$bin/$name"
  touch "$out/.built-$name"
  log "$name: built in $((SECONDS - t0)) s ($(du -h "$bin/$name" | cut -f1))"
  printf '%s %s\n' "$name" "$((SECONDS - t0))" >>"$out/build-times.txt"
}

t0=$SECONDS
for m in kubernetes etcd containerd coredns kwok helm; do
  (cd "$cluster_src/$m" && go mod download)
done
log "module download: $((SECONDS - t0)) s"

kminor="${K8S_VERSION#v1.}"; kminor="${kminor%%.*}"
kube_ldflags=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kube_ldflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$kminor"
  kube_ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=$build_date"
done
for c in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
  go_build kubernetes "$c" "k8s.io/kubernetes/cmd/$c" -ldflags "-s -w$kube_ldflags"
done

go_build etcd etcd go.etcd.io/etcd/server/v3 -ldflags "-s -w"

ctrd_ldflags="-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION"
ctrd_ldflags+=" -X github.com/containerd/containerd/v2/version.Package=github.com/containerd/containerd/v2"
for c in containerd containerd-shim-runc-v2 ctr; do
  CGO_ENABLED=0 go_build containerd "$c" "github.com/containerd/containerd/v2/cmd/$c" \
    -tags "$CONTAINERD_TAGS" -ldflags "$ctrd_ldflags"
done

go_build coredns coredns github.com/coredns/coredns -ldflags "-s -w"
go_build kwok kwok sigs.k8s.io/kwok/cmd/kwok \
  -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}"
go_build helm helm helm.sh/helm/v4/cmd/helm \
  -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"

# --- pause, from upstream's pause.c ----------------------------------------
kube_src="$GOMODCACHE/k8s.io/kubernetes@$K8S_VERSION"
if [[ ! -x "$bin/pause" ]]; then
  t0=$SECONDS
  gcc -Os -Wall -Werror -static -DVERSION="v$PAUSE_VERSION-$K8S_VERSION" \
    -o "$bin/pause.tmp" "$kube_src/build/pause/linux/pause.c"
  strip "$bin/pause.tmp"
  mv "$bin/pause.tmp" "$bin/pause"
  log "pause: built in $((SECONDS - t0)) s"
fi

# --- KWOK's own stage definitions (it exits "no stages found" without) ------
share="$out/share"
mkdir -p "$share/kwok"
kwok_src="$GOMODCACHE/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage"
{
  for f in "$kwok_src"/node/fast/node-initialize.yaml \
    "$kwok_src"/node/heartbeat-with-lease/*.yaml \
    "$kwok_src"/pod/general/*.yaml; do
    echo "---"
    cat "$f"
  done
} >"$share/kwok/stages.yaml"

cat >"$out/versions.txt" <<EOF
kubernetes $K8S_VERSION
etcd $ETCD_VERSION
containerd $CONTAINERD_VERSION
coredns $COREDNS_VERSION
kwok $KWOK_VERSION
helm $HELM_VERSION
pause $PAUSE_VERSION
EOF

log "all binaries built in $((SECONDS - start_all)) s; bin $(du -sh "$bin" | cut -f1), go module cache $(du -sh "$GOMODCACHE" | cut -f1), go build cache $(du -sh "$GOCACHE" | cut -f1)"
touch "$marker"
ln -sfn "$out" "$cache_root/cluster/current"
echo "$bin"

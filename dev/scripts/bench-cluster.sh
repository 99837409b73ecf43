#!/usr/bin/env bash
# Benchmarks of the sluice-dev cluster, printed as a Markdown table for
# docs/benchmarks.md: start to node Ready, to first pod Ready, idle RSS per
# component, 1000 pods on KWOK nodes, and `down`. Needs root and the binaries
# (bash dev/scripts/build-cluster.sh); builds sluice-dev with cargo.
#
#   bash dev/scripts/bench-cluster.sh [pods=1000] [kwok-nodes=10]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
pods=${1:-1000}
fake_nodes=${2:-10}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice/cargo-target}
bin=$(bash dev/scripts/build-cluster.sh)
cargo build -q -p sluice-dev
sd="$CARGO_TARGET_DIR/debug/sluice-dev"
state=$(mktemp -d /tmp/sluice-bench-XXXXXX)
kubectl="$bin/kubectl"
export KUBECONFIG="$state/kubeconfig/admin.yaml"
up_pid=
cleanup() {
  if [[ -n "$up_pid" ]] && kill -0 "$up_pid" 2>/dev/null; then "$sd" --state-dir "$state" down >/dev/null 2>&1 || true; fi
  rm -rf "$state" "$state.up.log"
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc | xargs printf '%.1f'; }

t0=$(now)
"$sd" --state-dir "$state" up --virtual-nodes "$fake_nodes" >"$state.up.log" 2>&1 &
up_pid=$!
until grep -q 'sluice-dev is up' "$state.up.log" 2>/dev/null; do
  kill -0 "$up_pid" 2>/dev/null || { cat "$state.up.log" >&2; exit 1; }
  sleep 0.1
done
up_line=$(grep 'sluice-dev is up' "$state.up.log")
node_ready=$(sed -E 's/.*Ready after ([0-9.]+) s.*/\1/' <<<"$up_line")
up_total=$(since "$t0")

# First pod of a local image (the pause image is always there).
t1=$(now)
"$kubectl" run first --image=localhost/sluice-dev/pause:3.10.2 --image-pull-policy=Never >/dev/null
"$kubectl" wait --for=condition=Ready pod/first --timeout=60s >/dev/null
first_pod=$(since "$t1")
first_pod_from_start=$(echo "$up_total + $first_pod" | bc | xargs printf '%.1f')

sleep 20 # let the cluster settle to idle
# Every component has a path in the state folder among its flags.
rss() { local total=0; for p in $(pgrep -f "/$1 .*$state" || true); do total=$((total + $(awk '/VmRSS/{print $2}' "/proc/$p/status"))); done; echo $((total / 1024)); }
shim_rss=0
for p in $(pgrep -f "containerd-shim-runc-v2.*$state" || true); do shim_rss=$((shim_rss + $(awk '/VmRSS/{print $2}' "/proc/$p/status"))); done
components=(etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy coredns kwok)
declare -A mem
total=0
for c in "${components[@]}"; do mem[$c]=$(rss "$c"); total=$((total + mem[$c])); done
total=$((total + shim_rss / 1024))

cat <<EOF | "$kubectl" apply -f - >/dev/null
apiVersion: apps/v1
kind: Deployment
metadata: {name: fake, namespace: default}
spec:
  replicas: $pods
  selector: {matchLabels: {app: fake}}
  template:
    metadata: {labels: {app: fake}}
    spec:
      nodeSelector: {type: kwok}
      tolerations: [{key: kwok.x-k8s.io/node, operator: Exists, effect: NoSchedule}]
      containers: [{name: c, image: fake-image}]
EOF
t2=$(now)
until [[ $("$kubectl" get pods -l app=fake --field-selector=status.phase=Running --no-headers 2>/dev/null | wc -l) -ge $pods ]]; do
  sleep 0.5
done
kwok_pods=$(since "$t2")
busy_apiserver=$(rss kube-apiserver)

t3=$(now)
"$sd" --state-dir "$state" down >/dev/null 2>&1
while kill -0 "$up_pid" 2>/dev/null; do sleep 0.1; done
down=$(since "$t3")
left=$(pgrep -f "$state" | wc -l || true)

cat <<EOF
| sluice-dev cluster ($(nproc) cores, $(date -u +%Y-%m-%d)) | measured |
|---|---|
| \`up\` to node Ready | ${node_ready} s |
| \`up\` to ready for use (node Ready, DNS answering, ${fake_nodes} KWOK nodes) | ${up_total} s |
| first pod Ready after creation / after \`up\` started | ${first_pod} s / ${first_pod_from_start} s |
| idle RSS: etcd / apiserver / controller-manager / scheduler | ${mem[etcd]} / ${mem[kube-apiserver]} / ${mem[kube-controller-manager]} / ${mem[kube-scheduler]} MB |
| idle RSS: containerd / kubelet / kube-proxy / CoreDNS / KWOK / shims | ${mem[containerd]} / ${mem[kubelet]} / ${mem[kube-proxy]} / ${mem[coredns]} / ${mem[kwok]} / $((shim_rss / 1024)) MB |
| idle RSS, whole cluster | ${total} MB |
| ${pods} pods Running on ${fake_nodes} KWOK nodes | ${kwok_pods} s (apiserver then ${busy_apiserver} MB) |
| \`down\` | ${down} s, ${left} processes left |
EOF

#!/usr/bin/env bash
# Copies Apache Kafka (pinned in dev/kafka/pom.xml) and its runtime jars from
# Maven Central into a cache folder OUTSIDE the clone, and prints that folder:
#
#   ${XDG_CACHE_HOME:-$HOME/.cache}/sluice/kafka/<version>/libs
#
# The harness (tests/src/brokers.rs) runs `java -cp '<libs>/*' kafka.Kafka`.
# Idempotent: a complete copy leaves a marker holding the pom's hash; a second
# run only prints the path. A changed pom (another version, another jar) copies
# again. Maven's local repository is its default (~/.m2) unless
# MAVEN_OPTS/settings say otherwise. Logs go to stderr, the path to stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"   # dev/kafka/
pom="$here/pom.xml"
version="$(sed -n 's|.*<kafka.version>\(.*\)</kafka.version>.*|\1|p' "$pom")"
if [[ -z "$version" ]]; then
  echo "fetch-kafka: no <kafka.version> in $pom" >&2
  exit 1
fi
out="${XDG_CACHE_HOME:-$HOME/.cache}/sluice/kafka/$version"
libs="$out/libs"
marker="$out/.complete"
pom_hash="$(sha256sum "$pom" | cut -c1-16)"

if [[ -f "$marker" && "$(cat "$marker")" == "$pom_hash" ]]; then
  echo "$libs"
  exit 0
fi

log() { printf '%s fetch-kafka: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
for tool in mvn java; do
  if ! command -v "$tool" >/dev/null; then
    log "\`$tool\` is not on PATH; install it with: sudo apt-get install -y maven openjdk-17-jdk-headless"
    exit 1
  fi
done

log "copying Apache Kafka $version and its runtime jars from Maven Central into $libs"
start=$(date +%s)
mkdir -p "$out"
staging="$(mktemp -d "$out/libs.XXXXXX")"
trap 'rm -rf "$staging"' EXIT
# runtime scope: the broker's compile and runtime dependencies, no test jars.
mvn -q -B -f "$pom" dependency:copy-dependencies \
  -DincludeScope=runtime -DoutputDirectory="$staging" >&2
rm -rf "$libs"
mv "$staging" "$libs"
trap - EXIT
echo "$pom_hash" > "$marker"
log "copied $(find "$libs" -name '*.jar' | wc -l) jars, $(du -sh "$libs" | cut -f1), in $(($(date +%s) - start)) s"
echo "$libs"

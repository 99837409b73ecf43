# The two commands a newcomer needs. Both install what they need on a fresh
# Debian 12 machine (as root) and cache heavy builds under ~/.cache/sluice.
.PHONY: test demo crd

test:   ## fmt, clippy and every test suite against real servers
	bash dev/scripts/test.sh

crd:    ## regenerate the checked-in CRD after an API change
	cargo run -q -p sluice-operator -- crd > charts/sluice/crds/streamprocessors.sluice.io.yaml
	cargo run -q -p sluice-operator -- api-docs > docs/api.md

demo:   ## the quickstart on a local cluster: Kafka, a burst, workers scaling up and back down (Linux, root)
	bash -c 'set -euo pipefail; eval "$$(SLUICE_KEDA=skip bash dev/scripts/setup.sh)"; \
	  cargo build --release --locked -p sluice-operator -p sluice-worker -p sluice-dev; \
	  exec "$$CARGO_TARGET_DIR/release/sluice-dev" demo $(DEMO_ARGS)'

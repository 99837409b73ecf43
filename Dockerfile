# One image with both binaries: `sluice-operator` (the entrypoint) and
# `sluice-worker` (what the operator's worker pods run).
#
# Where a registry is reachable (the usual way):
#   docker build -t sluice:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t <registry>/sluice:0.1.0 --push .
#
# Where none is (this project's CI and `sluice-dev image`): the binaries are
# built on the host with `cargo build --release`, copied into dist/, and the
# `prebuilt` stage is built with buildah on a locally made Debian base:
#   buildah bud --target prebuilt --build-arg RUNTIME_IMAGE=<local base> -t sluice:0.1.0 <context with dist/>
# Both targets end in the same final stage layout, user and entrypoint.

ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# --- build: dependencies first, so source edits reuse the dependency layer ---
FROM ${RUST_IMAGE} AS build
WORKDIR /src
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake=3.25.* libssl-dev=3.0.* \
 && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY crds/Cargo.toml crds/Cargo.toml
COPY worker/Cargo.toml worker/Cargo.toml
COPY operator/Cargo.toml operator/Cargo.toml
COPY dev/Cargo.toml dev/Cargo.toml
COPY tests/Cargo.toml tests/Cargo.toml
# Empty targets stand in for the sources while the dependencies compile.
RUN for c in crds worker operator dev tests; do mkdir -p $c/src && echo '' > $c/src/lib.rs; done \
 && mkdir -p worker/src/bin worker/benches \
 && echo 'fn main() {}' > worker/src/main.rs \
 && for b in worker/src/bin/sluice-bench-engine.rs worker/benches/engine.rs operator/src/main.rs dev/src/main.rs; do echo 'fn main() {}' > $b; done \
 && cargo build --release --locked -p sluice-worker -p sluice-operator \
 && rm -rf crds worker operator dev tests
COPY . .
RUN touch crds/src/lib.rs worker/src/lib.rs operator/src/lib.rs \
 && cargo build --release --locked -p sluice-worker -p sluice-operator \
 && mkdir -p /dist \
 && strip --strip-debug -o /dist/sluice-worker target/release/sluice-worker \
 && strip --strip-debug -o /dist/sluice-operator target/release/sluice-operator

# --- prebuilt: the same final layout from binaries built on the host ---------
FROM ${RUNTIME_IMAGE} AS prebuilt
COPY dist/sluice-worker dist/sluice-operator /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sluice-operator"]
CMD ["run"]

# --- runtime (default target) ------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
COPY --from=build /dist/sluice-worker /dist/sluice-operator /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sluice-operator"]
CMD ["run"]

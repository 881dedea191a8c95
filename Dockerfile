# syntax=docker/dockerfile:1
# mtls-sidecar container image: build with the pinned Rust toolchain, run on distroless.
# How to build and run it: deploy/docker/README.md.

# ---- build stage -------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Only what `cargo build --release` needs (see .dockerignore): the manifest, the lock file, src/.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The registry and target caches survive between builds (BuildKit); the binary is copied out of
# the cached target dir so the next stage can use it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -D -m 0755 target/release/mtls-sidecar /out/mtls-sidecar

# ---- runtime stage -----------------------------------------------------------------------------
# The binary links only glibc, libm and libgcc_s: distroless/cc ships exactly those, plus CA
# certificates (for the system trust store when --ca is not given), no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot

# The project has no canonical repository URL yet: pass it (and the commit) at build time, e.g.
#   --build-arg SOURCE_URL=https://github.com/OWNER/mtls-sidecar --build-arg REVISION=$(git rev-parse HEAD)
ARG SOURCE_URL=""
ARG REVISION=""
LABEL org.opencontainers.image.title="mtls-sidecar" \
      org.opencontainers.image.description="Plaintext-to-mTLS sidecar proxy: forwards local TCP connections over mutual TLS" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=build /out/mtls-sidecar /usr/local/bin/mtls-sidecar

# Numeric, so that Kubernetes' runAsNonRoot can verify it without an /etc/passwd lookup.
USER 65532:65532

# 8080: plaintext listener (`--listen`); 9901: admin listener (`--admin`: /healthz, /readyz, /metrics).
EXPOSE 8080 9901

# Exec form: mtls-sidecar is PID 1 and receives SIGTERM itself (drain, then exit 0).
ENTRYPOINT ["/usr/local/bin/mtls-sidecar"]
CMD ["--help"]

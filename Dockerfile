# syntax=docker/dockerfile:1
# Image of the identity-events relay: a static Go binary on distroless, non-root.
#   docker build -t ghcr.io/decnet/identity-relay:0.1.0 .
# The Helm chart (deploy/helm/relay) expects: the binary at /relay, UID/GID 65532, port 8080, no
# shell or sleep binary (its preStop hook uses the kubelet's sleep action).

# Build on the builder's own platform and cross-compile (no emulation for multi-arch builds).
FROM --platform=$BUILDPLATFORM golang:1.26 AS build
WORKDIR /src
# Modules first: this layer stays cached until go.mod or go.sum change.
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod \
    go mod download
COPY . .
# Set by BuildKit from --platform (this file needs BuildKit anyway, for the cache mounts).
ARG TARGETOS
ARG TARGETARCH
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags='-s -w' -o /out/relay ./cmd/relay

# static-debian12: CA certificates and tzdata, no libc, no shell; :nonroot runs as 65532.
FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="identity-relay" \
      org.opencontainers.image.description="SSE fan-out relay of DECNET identity events from Kafka" \
      org.opencontainers.image.source="https://github.com/decnet/identity-relay"
COPY --from=build /out/relay /relay
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/relay"]

# syntax=docker/dockerfile:1
# The fleetpatch images: one static binary on distroless each. rustls with ring, no
# OpenSSL; musl makes the binaries static.
#   docker build -t ghcr.io/fleetpatch/fleetpatch:$(version) .
#       the full binary (controller, gateway, dev server, agent): the last stage, built
#       by default
#   docker build --target agent -t ghcr.io/fleetpatch/fleetpatch-agent:$(version) .
#       the agent build alone (`--no-default-features --features agent`), for the Linux
#       node DaemonSet (the chart's nodeAgent.linux.image)

FROM rust:1-bookworm AS toolchain
# musl-gcc compiles the C parts (ring, the tree-sitter grammars) for the musl target.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
ENV CC_x86_64_unknown_linux_musl=musl-gcc
WORKDIR /src
COPY . .

FROM toolchain AS build
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-musl --bin fleetpatch \
 && cp target/x86_64-unknown-linux-musl/release/fleetpatch /fleetpatch

FROM toolchain AS build-agent
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile agent --locked --target x86_64-unknown-linux-musl --bin fleetpatch \
        --no-default-features --features agent \
 && cp target/x86_64-unknown-linux-musl/agent/fleetpatch /fleetpatch

FROM gcr.io/distroless/static-debian12:nonroot AS agent
COPY --from=build-agent /fleetpatch /fleetpatch
# The node agent's pod runs it as root (see the chart).
USER 65532:65532
ENTRYPOINT ["/fleetpatch"]

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /fleetpatch /fleetpatch
# The controller runs as this user; the node agent's pod runs it as root (see the chart).
USER 65532:65532
ENTRYPOINT ["/fleetpatch"]

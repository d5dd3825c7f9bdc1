# syntax=docker/dockerfile:1
# The fleetpatch image: one static binary (controller, gateway and Linux node agent) on
# distroless. rustls with ring, no OpenSSL; musl makes the binary static. Build with
#   docker build -t ghcr.io/fleetpatch/fleetpatch:$(version) .

FROM rust:1-bookworm AS build
# musl-gcc compiles the C parts (ring, the tree-sitter grammars) for the musl target.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
ENV CC_x86_64_unknown_linux_musl=musl-gcc
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-musl --bin fleetpatch \
 && cp target/x86_64-unknown-linux-musl/release/fleetpatch /fleetpatch

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /fleetpatch /fleetpatch
# The controller runs as this user; the node agent's pod runs it as root (see the chart).
USER 65532:65532
ENTRYPOINT ["/fleetpatch"]

# syntax=docker/dockerfile:1
# sluice and the example enrichment plugin. Used by docker-compose.yml.
#
# The builder is Debian 12 like the runtime image, so the binary's glibc and OpenSSL match.
FROM rust:1.95-bookworm AS builder
# libclang-dev: rocksdb's bindgen. librdkafka builds with make (bundled, no cmake needed).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libclang-dev \
    && rm -rf /var/lib/apt/lists/*
RUN rustup target add wasm32-wasip2
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sluice --bin sluice \
    && cargo build --release --locked -p sluice-plugin-enrich --target wasm32-wasip2 \
    && mkdir -p /out \
    && cp target/release/sluice /out/sluice \
    && cp target/wasm32-wasip2/release/sluice_plugin_enrich.wasm /out/enrich.wasm

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /etc/sluice /var/lib/sluice /usr/share/sluice/plugins
COPY --from=builder /out/sluice /usr/local/bin/sluice
COPY --from=builder /out/enrich.wasm /usr/share/sluice/plugins/enrich.wasm
VOLUME /var/lib/sluice
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["run", "-c", "/etc/sluice/pipeline.yaml"]

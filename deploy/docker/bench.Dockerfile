# framecast-bench, the load client. Build from the repository root:
#   docker build -f deploy/docker/bench.Dockerfile -t framecast/bench .
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake nasm libopus-dev libvpx-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p framecast-bench --bins

FROM debian:bookworm-slim
# The gateway load client's peers decode Opus and VP8 (libopus, libvpx).
RUN apt-get update && apt-get install -y --no-install-recommends libopus0 libvpx7 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /srv framecast
COPY --from=build /src/target/release/framecast-bench /usr/local/bin/
USER 10001
ENTRYPOINT ["framecast-bench"]

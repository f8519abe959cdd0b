# framecast-gateway: the WebRTC front end (CPU only, no libtorch). Build from the repository
# root:
#   docker build -f deploy/docker/gateway.Dockerfile -t framecast/gateway .
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake nasm libopus-dev libvpx-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p framecast-gateway --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libopus0 libvpx7 curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /srv framecast
# Sessions take UDP ports 40000-40007 (one each, --max-sessions 8); the page and signalling
# are on 8021, metrics on 9093. FRAMECAST_GATEWAY_UDP_HOST must be the address browsers reach.
ENV FRAMECAST_GATEWAY_LISTEN=0.0.0.0:8021 \
    FRAMECAST_GATEWAY_METRICS_LISTEN=0.0.0.0:9093 \
    FRAMECAST_GATEWAY_UDP_BIND=0.0.0.0 \
    FRAMECAST_GATEWAY_UDP_PORTS=40000-40007 \
    FRAMECAST_GATEWAY_MAX_SESSIONS=8
COPY --from=build /src/target/release/framecast-gateway /usr/local/bin/
USER 10001
EXPOSE 8021 9093 40000-40007/udp
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s \
    CMD ["curl", "-fsS", "http://127.0.0.1:8021/healthz"]
ENTRYPOINT ["framecast-gateway"]

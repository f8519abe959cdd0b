# framecast-compositor: CPU only, no libtorch. Build from the repository root:
#   docker build -f deploy/docker/compositor.Dockerfile -t framecast/compositor .
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake nasm libopus-dev libvpx-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p framecast-compositor -p framecast-bench --bins

FROM debian:bookworm-slim
# `framecast-compositor avatar import` decodes videos with ffmpeg and finds faces with
# OpenCV's cascade from opencv-data (run it as a job: `docker run ... avatar import VIDEO`);
# framecast-bench (the health check) links libopus and libvpx for its WebRTC peers.
RUN apt-get update && apt-get install -y --no-install-recommends ffmpeg opencv-data libopus0 libvpx7 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --home /srv framecast
ENV FRAMECAST_AVATARS=/avatars \
    FRAMECAST_COMPOSITOR_LISTEN=0.0.0.0:8011 \
    FRAMECAST_COMPOSITOR_METRICS_LISTEN=0.0.0.0:8012
COPY --from=build /src/target/release/framecast-compositor /src/target/release/framecast-bench \
    /usr/local/bin/
USER 10001
EXPOSE 8011 8012
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s \
    CMD ["framecast-bench", "wait", "http://127.0.0.1:8011", "--timeout-s", "4"]
ENTRYPOINT ["framecast-compositor", "serve"]

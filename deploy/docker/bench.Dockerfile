# framecast-bench, the load client. Build from the repository root:
#   docker build -f deploy/docker/bench.Dockerfile -t framecast/bench .
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake nasm \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p framecast-bench --bins

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home /srv framecast
COPY --from=build /src/target/release/framecast-bench /usr/local/bin/
USER 10001
ENTRYPOINT ["framecast-bench"]

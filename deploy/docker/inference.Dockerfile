# framecast-inference on a GPU host. Build from the repository root:
#   docker build -f deploy/docker/inference.Dockerfile -t framecast/inference .
# Stage 1 links the binary against the CUDA libtorch of the torch==2.11.0 wheel (the same
# path as `make build-cuda`) and writes the built-in models with the CPU build.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake nasm unzip python3-pip \
    libopus-dev libvpx-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN scripts/build-cuda.sh && cargo build --release -p framecast-bench --bins

# Stage 2: PyTorch 2.11's own CUDA libraries (pulled by the wheel) and the binary, as non-root;
# libopus and libvpx for framecast-bench (the health check), which links them.
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends libopus0 libvpx7 \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --no-cache-dir torch==2.11.0 \
    && useradd --system --uid 10001 --home /srv framecast
ENV LD_LIBRARY_PATH=/usr/local/lib/python3.11/site-packages/torch/lib \
    FRAMECAST_REPOSITORY=/models \
    FRAMECAST_DEVICES=cuda:0 \
    FRAMECAST_INFERENCE_LISTEN=0.0.0.0:8001 \
    FRAMECAST_INFERENCE_METRICS_LISTEN=0.0.0.0:8002
COPY --from=build /src/out/cuda-bundle/framecast-inference /usr/local/bin/
COPY --from=build /src/out/cuda-bundle/models /models
COPY --from=build /src/target/release/framecast-bench /usr/local/bin/
USER 10001
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s \
    CMD ["framecast-bench", "wait", "http://127.0.0.1:8001", "--timeout-s", "4"]
ENTRYPOINT ["framecast-inference", "serve"]

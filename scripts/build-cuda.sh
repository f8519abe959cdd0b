#!/usr/bin/env bash
# make build-cuda: a CUDA-capable framecast-inference linked against the CUDA libtorch of the
# torch==2.11.0 wheel, and a bundle (binary, built-in models, run script) in out/cuda-bundle/
# that runs on any x86-64 GPU host with PyTorch 2.11 installed.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=out/cuda-bundle
rm -rf "$bundle" && mkdir -p "$bundle"
# The models are written by the CPU build: TorchScript files are device-independent, and the
# CUDA binary cannot start on a machine without the CUDA libraries.
(
  eval "$(scripts/setup.sh)"
  cargo build --release -p framecast-inference --bin framecast-inference
  target/release/framecast-inference models --out "$bundle/models"
  # The compositor and the bench link no libtorch: the CPU builds run on the GPU host as they are
  # (make gpu-check drives them there).
  cargo build --release -p framecast-compositor -p framecast-bench --bins
  cp target/release/framecast-compositor target/release/framecast-bench "$bundle/"
)
(
  eval "$(FRAMECAST_TORCH=cuda scripts/setup.sh)"
  export FRAMECAST_CUDA=1 CARGO_TARGET_DIR=target/cuda
  cargo build --release -p framecast-inference --bin framecast-inference
)
cp target/cuda/release/framecast-inference "$bundle/"
cat > "$bundle/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the bundled server on the GPU host's own PyTorch 2.11 libraries.
# Usage: ./run.sh [serve flags...]   (default: --devices cuda:0 --repository ./models)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
torch_lib=${TORCH_LIB:-$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')}
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$here/framecast-inference" serve --repository "$here/models" --devices cuda:0 "$@"
RUN
chmod +x "$bundle/run.sh"
echo "bundle ready in $bundle (run: $bundle/run.sh)"

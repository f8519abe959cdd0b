#!/usr/bin/env bash
# make demo: build, generate models and the demo avatar, start both servers, have the demo
# avatar (talking-demo) speak a sentence from espeak-ng over an audio session, write frames,
# an AVI with the speech as its sound track, and a contact sheet under out/demo, stop the servers.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"

cargo build --release --bins
bin=target/release
out=out/demo
mkdir -p "$out"

source scripts/lib/services.sh
demo_assets "$out"
"$bin/framecast-compositor" avatar check "$out/avatars/demo"

inf_port=${FRAMECAST_DEMO_INFERENCE_PORT:-18001}
comp_port=${FRAMECAST_DEMO_COMPOSITOR_PORT:-18011}
start_inference "$inf_port" "$out/inference.log" --repository "$out/models" --load talking-demo
start_compositor "$comp_port" "$inf_port" "$out/compositor.log" --avatars "$out/avatars" --preload demo
wait_ready 180 "$inf_port" "$comp_port"
"$bin/framecast-bench" demo --compositor "http://127.0.0.1:$comp_port" --out "$out" "$@"

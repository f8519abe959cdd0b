#!/usr/bin/env bash
# make bench-clock: the compositor's frame clock (cross-session batching, --frame-tick-ms
# CLOCK_TICK_MS, default 40) side by side with every request sent alone (--frame-tick-ms 0,
# how compositors sent them before the clock, and its `auto` default on a CPU):
# `framecast-bench speech` at CLOCK_SESSIONS live sessions (default 4 8 12 16), CLOCK_SECONDS
# each (default 8), the two compositors taking turns against one inference service. Each line
# gives latency, late frames, requests and frames per forward pass (from the inference
# service's statistics) and CPU ms per frame of the inference service and the compositor.
# Then lipsync-ref's inference CPU per frame at batch 1 against batch 8. CLOCK_TORCH_THREADS
# sets the inference service's --torch-threads (its default otherwise). Results in
# out/bench-clock/.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
out="$PWD/out/bench-clock"
mkdir -p "$out"
cargo build --release --bins
bin=$PWD/target/release
work=$out/work
source scripts/lib/services.sh
trap stop_services EXIT
demo_assets "$work"
start_inference 18301 "$out/inference.log" --repository "$work/models" --load talking-demo,lipsync-ref \
  ${CLOCK_TORCH_THREADS:+--torch-threads "$CLOCK_TORCH_THREADS"}
inference=$!
start_compositor 18311 18301 "$out/compositor-alone.log" --avatars "$work/avatars" --preload demo \
  --frame-tick-ms 0
alone=$!
# The clock set explicitly: its default (auto) is off for a model served on a CPU.
start_compositor 18321 18301 "$out/compositor-clock.log" --avatars "$work/avatars" --preload demo \
  --frame-tick-ms "${CLOCK_TICK_MS:-40}"
clock=$!
wait_ready 300 18301 18311 18321
# One short session on each compositor first: what a fresh process does once (the avatar's
# face inputs registered with the inference service, shared memory set up) is not what
# either side costs per session. (The compositor registers a preloaded avatar's face inputs
# by itself once the inference service is ready, but this run starts the moment it is.)
for port in 18311 18321; do
  "$bin/framecast-bench" speech --compositor "http://127.0.0.1:$port" --sessions 1 --seconds 2 \
    --paths stream --out "$out/warm-up" > /dev/null
done

for n in ${CLOCK_SESSIONS:-4 8 12 16}; do
  for side in alone clock; do
    if [ "$side" = alone ]; then port=18311 pid=$alone; else port=18321 pid=$clock; fi
    "$bin/framecast-bench" speech --compositor "http://127.0.0.1:$port" \
      --inference http://127.0.0.1:18301 --sessions "$n" --seconds "${CLOCK_SECONDS:-8}" \
      --paths stream --cpu "inference=$inference" --cpu "compositor=$pid" --out "$out/speech-$side" \
      | grep '^stream' | sed "s/^/$side /"
  done
done | tee "$out/speech.txt"

echo "== lipsync-ref: inference CPU per frame, one frame a request against 8"
for b in 1 8; do
  before=$(awk '{print $14 + $15}' "/proc/$inference/stat")
  "$bin/framecast-bench" kserve --url http://127.0.0.1:18301 --model lipsync-ref --batch "$b" \
    --concurrency 1 --duration-s "${CLOCK_LIPSYNC_S:-40}" --warmup-s 0 > "$out/lipsync-ref-batch$b.txt"
  after=$(awk '{print $14 + $15}' "/proc/$inference/stat")
  frames=$(grep -o '"frames": *[0-9]*' "$out/lipsync-ref-batch$b.txt" | head -1 | grep -o '[0-9]*$' || true)
  echo "batch $b: $((after - before)) CPU ticks; $(grep -iE 'frames/s|throughput' "$out/lipsync-ref-batch$b.txt" | head -2 | tr '\n' ' ')"
done | tee "$out/lipsync-ref.txt"

#!/usr/bin/env bash
# make bench-gateway: WebRTC sessions per machine, measured. Starts the inference service
# (talking-demo), the compositor and the gateway (release builds, all on this host), then
# `framecast-bench gateway` (str0m peers speaking espeak-ng's sentence as Opus, taking the
# video, H.264 or VP8):
#   1. --sweep 1:GW_MAX (default 8) with admission off: the largest count where every session
#      holds >= 24 frames/s with no gap over 500 ms;
#   2. twice that count offered at once with admission on (the gateway's default): how many
#      are admitted, whether every admitted one holds, how many were refused at once.
# Each level: frames/s, longest gap, onset-to-voice latency, the gateway's latency p99, CPU
# per delivered frame of each service. GW_CODEC (both, h264, vp8; default both: the gateway
# chooses H.264) sets the video codecs the peers offer. Results in out/bench-gateway/.
#
# GW_REV=<commit>: the "before": that commit's three services (scripts/lib/build_rev.sh)
# under this tree's load client, the sweep only (no admission stage: an earlier gateway may
# have none). Results in out/bench-gateway/before/.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
out="$PWD/out/bench-gateway"
rev=${GW_REV:-}
[ -z "$rev" ] || out=$out/before
mkdir -p "$out"
if [ -n "$rev" ]; then
  source scripts/lib/build_rev.sh
  build_rev "$rev" "$out/bin" framecast-inference framecast-compositor framecast-gateway framecast-bench
fi
cargo build --release --bins
bench=$PWD/target/release/framecast-bench
bin=$PWD/target/release
[ -z "$rev" ] || bin=$out/bin
work=$out/work
source scripts/lib/services.sh
trap stop_services EXIT
demo_assets "$work"
seconds=${GW_SECONDS:-12}
codec=${GW_CODEC:-both}

run_stack() { # admission headroom for the gateway
  start_inference 18501 "$out/inference.log" --repository "$work/models" --load talking-demo
  inference=$!
  start_compositor 18511 18501 "$out/compositor.log" --avatars "$work/avatars" --preload demo
  compositor=$!
  start_gateway 127.0.0.1:18521 "$out/gateway.log" --compositor-url http://127.0.0.1:18511 \
    --max-sessions 64 ${1:+--admission-headroom "$1"}
  gateway=$!
  wait_ready 300 18501 18511
  wait_http 60 http://127.0.0.1:18521/healthz
}
cpu() { echo --codec "$codec" --cpu "inference=$inference" --cpu "compositor=$compositor" --cpu "gateway=$gateway"; }

echo "== sweep, admission off${rev:+ (the services of $rev)}"
# An earlier gateway may not know --admission-headroom (it had no admission).
run_stack "$([ -n "$rev" ] || echo off)"
# shellcheck disable=SC2046
"$bench" gateway --url http://127.0.0.1:18521 --sweep "1:${GW_MAX:-8}" \
  --seconds "$seconds" $(cpu) --out "$out/sweep" | tee "$out/sweep.txt"
best=$(grep -o 'no gap over [0-9]* ms: [0-9]*' "$out/sweep.txt" | grep -o '[0-9]*$' || echo 0)
stop_services
service_pids=()
service_logs=()
[ "$best" -gt 0 ] || { echo "no count held; nothing to offer twice"; exit 0; }
[ -z "$rev" ] || exit 0

echo "== $((2 * best)) sessions offered at once (twice the sweep's $best), admission on"
run_stack 1.25
# One session first, so the gateway has measured what a session costs (a running gateway has).
"$bench" gateway --url http://127.0.0.1:18521 --sessions 1 --seconds 3 \
  --codec "$codec" --out "$out/warm" > "$out/warm.txt"
sleep 5
# shellcheck disable=SC2046
"$bench" gateway --url http://127.0.0.1:18521 --sessions $((2 * best)) \
  --seconds "$seconds" $(cpu) --out "$out/overload" | tee "$out/overload.txt"

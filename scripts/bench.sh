#!/usr/bin/env bash
# make bench: the standard suite, against servers this script starts; everything lands in
# out/bench/. Bounded: about 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
out="$PWD/out/bench"
mkdir -p "$out"
cargo build --release --bins

echo "== inference: served vs in-process, lipsync-ref at batch 24 (side by side, one run)"
BENCH_OUT="$out/inference-lipsync-ref.json" BENCH_SECONDS=${BENCH_SECONDS:-20} \
  cargo bench -p framecast-inference --bench served_vs_inprocess | tee "$out/inference-lipsync-ref.txt"
echo "== inference: transport cost with passthrough at the same payload (no compute to hide it)"
BENCH_OUT="$out/inference-passthrough.json" BENCH_MODEL=passthrough BENCH_SECONDS=10 \
  cargo bench -p framecast-inference --bench served_vs_inprocess | tee "$out/inference-passthrough.txt"
echo "== compositor: per-stage criterion benches and the side-by-side encode ratio"
cargo bench -p framecast-compositor --bench stages -- --warm-up-time 1 --measurement-time 3 \
  | tee "$out/compositor-stages.txt"

bin=target/release
work=$out/work
[ -f "$work/models/talking-demo/model.pt" ] || "$bin/framecast-inference" models --out "$work/models"
# An avatar made before speech (no [audio] table) is made again.
grep -qs '^\[audio\]' "$work/avatars/demo/avatar.toml" || "$bin/framecast-compositor" avatar make-demo --root "$work/avatars"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
"$bin/framecast-inference" serve --repository "$work/models" --listen 127.0.0.1:18101 \
  --metrics-listen 127.0.0.1:18102 --load talking-demo,passthrough >"$out/inference.log" 2>&1 &
pids+=($!)
"$bin/framecast-compositor" serve --avatars "$work/avatars" --listen 127.0.0.1:18111 \
  --metrics-listen 127.0.0.1:18112 --inference http://127.0.0.1:18101 --preload demo >"$out/compositor.log" 2>&1 &
pids+=($!)
# The same compositor without shared memory, for the side-by-side below.
"$bin/framecast-compositor" serve --avatars "$work/avatars" --listen 127.0.0.1:18121 \
  --metrics-listen 127.0.0.1:18122 --inference http://127.0.0.1:18101 --preload demo \
  --inference-shared-memory false >"$out/compositor-grpc.log" 2>&1 &
pids+=($!)
"$bin/framecast-bench" wait http://127.0.0.1:18101 http://127.0.0.1:18111 http://127.0.0.1:18121 --timeout-s 180

echo "== shared memory vs gRPC between compositor and inference: alternating, 3 rounds each"
for round in 1 2 3; do
  for port in 18111 18121; do
    printf 'port %s (%s) round %s: ' "$port" "$([ $port = 18111 ] && echo shm || echo grpc)" "$round"
    "$bin/framecast-bench" compositor --url "http://127.0.0.1:$port" --mode full --concurrency 2 \
      --duration-s 10 --warmup-s 2 | grep -A1 ' conc ' | tail -1
  done
done | tee "$out/shm-vs-grpc.txt"

echo "== end to end: Render streams, talking-demo, 1280x720, chunks of 24"
"$bin/framecast-bench" compositor --url http://127.0.0.1:18111 --mode sweep --sweep 1:4:1 \
  --duration-s 10 --warmup-s 2 --json "$out/compositor-sweep.json" --csv "$out/compositor-sweep.csv" \
  --charts "$out/charts" | tee "$out/compositor-sweep.txt"
echo "== real-time capacity: sessions at 25 fps asking for 1 s chunks"
"$bin/framecast-bench" compositor --url http://127.0.0.1:18111 --mode realtime --chunk 25 --fps 25 \
  --duration-s 8 --max-sessions 16 --json "$out/realtime.json" | tee "$out/realtime.txt"
echo "== speech: sessions at real-time pace, audio sessions vs 24-frame chunk requests"
"$bin/framecast-bench" speech --compositor http://127.0.0.1:18111 --inference http://127.0.0.1:18101 \
  --sessions 1,2,4,8 --seconds 8 --out "$out/speech" | tee "$out/speech.txt"
echo "== KServe load: passthrough at batch 24 over ModelInfer"
"$bin/framecast-bench" kserve --url http://127.0.0.1:18101 --model passthrough --batch 24 \
  --mode full --concurrency 2 --duration-s 10 --warmup-s 2 --json "$out/kserve-passthrough.json" \
  | tee "$out/kserve-passthrough.txt"
echo "all results in $out"

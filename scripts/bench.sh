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
source scripts/lib/services.sh
demo_assets "$work"
start_inference 18101 "$out/inference.log" --repository "$work/models" --load talking-demo,passthrough
start_compositor 18111 18101 "$out/compositor.log" --avatars "$work/avatars" --preload demo
# The same compositor without shared memory, for the side-by-side below.
start_compositor 18121 18101 "$out/compositor-grpc.log" --avatars "$work/avatars" --preload demo \
  --inference-shared-memory false
wait_ready 180 18101 18111 18121

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

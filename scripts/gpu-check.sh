#!/usr/bin/env bash
# make gpu-check: the one-shot GPU check. Run it on a GPU host with PyTorch 2.11 installed,
# from a checkout holding the bundle `make build-cuda` wrote (out/cuda-bundle: the CUDA
# framecast-inference, its models, and the CPU-only framecast-compositor and framecast-bench).
# It prints one table (also written to out/gpu-check/table.md) and fails loudly, never
# skips, when CUDA is absent. Bounded at about six minutes.
#
#   TORCH_LIB   libtorch directory (default: the installed torch package's lib/)
#   GPU_CHECK_SECONDS   measured seconds per throughput point (default 8)
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=out/cuda-bundle
out=out/gpu-check
mkdir -p "$out"
die() { echo "gpu-check: $*" >&2; exit 1; }

for f in framecast-inference framecast-compositor framecast-bench; do
  [ -e "$bundle/$f" ] || die "$bundle/$f is missing: run 'make build-cuda' on the build machine and copy $bundle here"
done
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this host has no NVIDIA driver, so no CUDA device"
nvidia-smi -L | grep -q GPU || die "nvidia-smi lists no GPU"
torch_lib=${TORCH_LIB:-$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)} \
  || die "PyTorch is not importable: set TORCH_LIB to a libtorch 2.11 lib/ directory"
[ -f "$torch_lib/libtorch_cuda.so" ] || die "$torch_lib has no libtorch_cuda.so: not a CUDA PyTorch"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
seconds=${GPU_CHECK_SECONDS:-8}
bin=$bundle
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)

# A repository with lipsync-ref at max batch 48, traced in fp32 and in fp16 (a built-in
# model's weights are graph constants: fp16 means traced in half), and talking-demo.
repo=$out/models
rm -rf "$repo" "$out/gen-fp32" "$out/gen-fp16" && mkdir -p "$repo"
"$bin/framecast-inference" models --out "$out/gen-fp32" --only lipsync-ref,talking-demo \
  --max-batch-size 48 >/dev/null || die "writing the fp32 models failed"
"$bin/framecast-inference" models --out "$out/gen-fp16" --only lipsync-ref \
  --max-batch-size 48 --precision fp16 >/dev/null || die "writing the fp16 model failed"
mv "$out/gen-fp32/lipsync-ref" "$repo/lipsync-ref-fp32"
mv "$out/gen-fp16/lipsync-ref" "$repo/lipsync-ref-fp16"
mv "$out/gen-fp32/talking-demo" "$repo/talking-demo"

source scripts/lib/services.sh
mem_before=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
start_inference 18401 "$out/inference.log" --log-format json --repository "$repo" --devices cuda:0 \
  --instances 2 --load talking-demo,lipsync-ref-fp32,lipsync-ref-fp16
wait_ready 240 18401
grep -q "model ready" "$out/inference.log" || die "no model became ready; see $out/inference.log"
mem_after=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)

{
  echo "## framecast gpu-check on $gpu ($(date -u +%F))"
  echo
  echo "| measure | value |"
  echo "| --- | --- |"
  python3 - "$out/inference.log" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        f = json.loads(line).get("fields", {})
    except ValueError:
        continue
    if f.get("message") == "model ready":
        print(f"| load + warm-up, {f['model']} | {f['load_ms']} ms (warm-up {f['warmup_ms']} ms) |")
    if f.get("message") == "model device memory":
        how = "measured (NVML, around the loads)" if f.get("measured") else "ESTIMATED: NVML measured nothing"
        print(f"| device memory, {f['model']} on {f['device']}, 2 instances | {f['mib']:.0f} MiB, {how} |")
PY
  echo "| device memory, the three models and the CUDA context (nvidia-smi) | $((mem_after - mem_before)) MiB |"
} | tee "$out/table.md"

throughput() { # model batch -> frames/s or FAILED
  "$bin/framecast-bench" kserve --url http://127.0.0.1:18401 --model "$1" --batch "$2" \
    --mode full --concurrency 2 --duration-s "$seconds" --warmup-s 2 --json "$out/$1-$2.json" \
    >"$out/$1-$2.txt" 2>&1 || { echo "FAILED (see $out/$1-$2.txt)"; return; }
  python3 - "$out/$1-$2.json" "$seconds" <<'PY'
import json, sys
l = json.load(open(sys.argv[1]))["levels"][0]
if l["requests_succeeded"] == 0:
    print(f"FAILED: no request completed in {sys.argv[2]} s ({l['requests_failed']} failed)")
else:
    print("%.0f frames/s, p99 %.1f ms, %d failed" % (l["frames_per_s"], l["latency_ms"]["p99"], l["requests_failed"]))
PY
}
inprocess() { # model -> one table row per batch: frames/s with no server, on one worker
  "$bin/framecast-inference" time --model "$repo/$1" --device cuda:0 --batch 8,24,48 \
    --seconds "$seconds" >"$out/$1-inprocess.txt" 2>&1 || { echo "| $1 in-process | FAILED (see $out/$1-inprocess.txt) |"; return; }
  awk -v m="$1" 'NR > 1 { printf "| %s in-process (one worker), batch %s | %s frames/s, forward %s ms |\n", m, $1, $3, $5 }' "$out/$1-inprocess.txt"
}
for p in fp32 fp16; do
  for b in 8 24 48; do
    echo "| lipsync-ref $p served (2 instances), batch $b | $(throughput lipsync-ref-$p $b) |"
  done
  inprocess lipsync-ref-$p
done | tee -a "$out/table.md"

"$bin/framecast-compositor" avatar make-demo --root "$out/avatars" >/dev/null
start_compositor 18411 18401 "$out/compositor.log" --avatars "$out/avatars" --preload demo
# The same without the frame clock (every request alone), for frames per forward pass.
start_compositor 18421 18401 "$out/compositor-alone.log" --avatars "$out/avatars" --preload demo \
  --frame-tick-ms 0
wait_ready 120 18411 18421
"$bin/framecast-bench" demo --compositor http://127.0.0.1:18411 --out "$out/demo" >"$out/demo.txt" 2>&1 \
  || die "the talking-demo render failed; see $out/demo.txt"
echo "| talking-demo end to end (1280x720) | $(grep -m1 '^throughput' "$out/demo.txt" | sed 's/^throughput *//') |" | tee -a "$out/table.md"
"$bin/framecast-bench" compositor --url http://127.0.0.1:18411 --mode realtime --chunk 25 --fps 25 \
  --duration-s 8 --max-sessions 64 >"$out/realtime.txt" 2>&1 || die "the real-time search failed; see $out/realtime.txt"
echo "| 25-fps real-time sessions, no late frame (1 s chunks) | $(grep -m1 'real-time capacity' "$out/realtime.txt" | sed 's/.*capacity: *//') |" | tee -a "$out/table.md"
for side in clock alone; do
  port=18411; [ "$side" = alone ] && port=18421
  "$bin/framecast-bench" speech --compositor "http://127.0.0.1:$port" --inference http://127.0.0.1:18401 \
    --sessions 1,8,32 --seconds 6 --paths stream --out "$out/speech" >"$out/speech-$side.txt" 2>&1 \
    || die "the speech sessions failed; see $out/speech-$side.txt"
  grep '^stream' "$out/speech-$side.txt" | sed "s/^/    $side /" | tee -a "$out/table.md"
done
failed=$(grep -c FAILED "$out/table.md" || true)
[ "$failed" = 0 ] || die "$failed measurement(s) FAILED; the table is in $out/table.md"
echo "gpu-check: done; table in $out/table.md"

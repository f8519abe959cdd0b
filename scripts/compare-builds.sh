#!/usr/bin/env bash
# make compare REV=<commit>: this tree's services against those of an earlier commit, side by
# side on this host: each build's inference server and compositor (shared memory on, as on
# one host), model `passthrough` at S = 320 (next to no compute, so the services' own costs
# show), the demo avatar (1280x720, 100 frames) prepared by each build for itself, then
# `framecast-bench compositor --mode full --concurrency 2` against each, alternating, rounds
# of BENCH_SECONDS. Reports frames/s, latency and the CPU per frame of each process (from
# /proc/PID/stat around each round). Results in out/compare/.
#
#   REV             the commit to compare against (required)
#   BENCH_SECONDS   measured seconds per round (default 8)
#   BENCH_ROUNDS    rounds per build (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${REV:?REV=<commit> to compare this tree against}
eval "$(scripts/setup.sh)"
out=$PWD/out/compare
seconds=${BENCH_SECONDS:-8}
rounds=${BENCH_ROUNDS:-3}
rm -rf "$out" && mkdir -p "$out/old" "$out/new"

# The old build (scripts/lib/build_rev.sh), then this tree's.
source scripts/lib/build_rev.sh
build_rev "$rev" "$out/old" framecast-inference framecast-compositor framecast-bench
cargo build --release --bins -p framecast-inference -p framecast-compositor -p framecast-bench
for b in framecast-inference framecast-compositor framecast-bench; do cp "target/release/$b" "$out/new/"; done

source scripts/lib/services.sh

# build port-base: its services, each with its own models and avatar.
start() {
  local build=$1 base=$2
  local bin=$out/$1
  "$bin/framecast-inference" models --out "$out/$build/models" --only passthrough --crop 320 \
    --max-batch-size 24 >/dev/null
  "$bin/framecast-compositor" avatar make-demo --root "$out/$build/avatars" --model passthrough \
    --frames 100 >/dev/null
  "$bin/framecast-compositor" avatar prepare "$out/$build/avatars/demo" >/dev/null
  start_inference "$base" "$out/$build/inference.log" --repository "$out/$build/models" --load passthrough
  echo $! >"$out/$build/inference.pid"
  start_compositor $((base + 10)) "$base" "$out/$build/compositor.log" --avatars "$out/$build/avatars" \
    --preload demo
  echo $! >"$out/$build/compositor.pid"
  wait_ready 180 "$base" $((base + 10))
}
start old 18900
start new 18950

# CPU seconds (user + system) a process has used.
cpu() { awk '{ print ($14 + $15) / '"$(getconf CLK_TCK)"' }' "/proc/$1/stat"; }
# Frames a compositor has streamed, from its metrics (port).
frames() {
  python3 -c 'import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
print(sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith("framecast_compositor_frames_total")))' \
    "http://127.0.0.1:$1/metrics"
}

echo "| build | round | frames/s | p50 / p99 | compositor CPU per frame | inference CPU per frame |" >"$out/table.md"
echo "| --- | --- | --- | --- | --- | --- |" >>"$out/table.md"
for round in $(seq "$rounds"); do
  for build in old new; do
    base=$([ $build = old ] && echo 18900 || echo 18950)
    comp=$(cat "$out/$build/compositor.pid")
    inf=$(cat "$out/$build/inference.pid")
    c0=$(cpu "$comp"); i0=$(cpu "$inf"); f0=$(frames $((base + 11)))
    "$out/new/framecast-bench" compositor --url "http://127.0.0.1:$((base + 10))" --mode full \
      --concurrency 2 --duration-s "$seconds" --warmup-s 0 --json "$out/$build/round-$round.json" \
      >"$out/$build/round-$round.txt" 2>&1
    c1=$(cpu "$comp"); i1=$(cpu "$inf"); f1=$(frames $((base + 11)))
    python3 - "$out/$build/round-$round.json" "$build" "$round" "$c0" "$c1" "$i0" "$i1" "$f0" "$f1" >>"$out/table.md" <<'PY'
import json, sys
path, build, rnd = sys.argv[1:4]
c0, c1, i0, i1, f0, f1 = (float(x) for x in sys.argv[4:10])
l = json.load(open(path))["levels"][0]
frames = max(f1 - f0, 1)
print(f"| {build} | {rnd} | {l['frames_per_s']:.0f} | {l['latency_ms']['p50']:.0f} / {l['latency_ms']['p99']:.0f} ms "
      f"| {(c1 - c0) / frames * 1e3:.3f} ms | {(i1 - i0) / frames * 1e3:.3f} ms |")
PY
    tail -n 1 "$out/table.md"
  done
done
echo "compare: $rev (old) against this tree (new); table in $out/table.md"

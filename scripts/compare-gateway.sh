#!/usr/bin/env bash
# make compare-gateway REV=<commit>: this tree's compositor and gateway against those of an
# earlier commit, side by side in one stack on this host. One inference service (this tree's,
# talking-demo) serves both; each build has its own compositor and gateway. Then
# `framecast-bench gateway --sessions N` (str0m peers speaking espeak-ng's sentence, H.264)
# against each gateway in turn, the order alternating each round. Round 0 lasts 35 s (the
# avatar's shared stream is built then: the first pass of its loop); the later rounds are the
# steady state. Reports, per round, the sessions held, the lowest frames/s and the CPU per
# delivered frame of each build's compositor and gateway (/proc/PID/stat), and the medians of
# the steady rounds. Results in out/compare-gateway/.
#
#   REV                 the commit to compare against (required)
#   COMPARE_SESSIONS    sessions per round (default 8)
#   COMPARE_SECONDS     measured seconds of the steady rounds (default 10)
#   COMPARE_ROUNDS      steady rounds per build (default 4)
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${REV:?REV=<commit> to compare this tree against}
eval "$(scripts/setup.sh)"
out=$PWD/out/compare-gateway
sessions=${COMPARE_SESSIONS:-8}
seconds=${COMPARE_SECONDS:-10}
rounds=${COMPARE_ROUNDS:-4}
rm -rf "$out" && mkdir -p "$out/old" "$out/new"

# The old build (scripts/lib/build_rev.sh), then this tree's.
source scripts/lib/build_rev.sh
build_rev "$rev" "$out/old" framecast-compositor framecast-gateway
cargo build --release --bins
for b in framecast-compositor framecast-gateway; do cp "target/release/$b" "$out/new/"; done

source scripts/lib/services.sh
trap stop_services EXIT
work=$out/work
bin=$PWD/target/release
demo_assets "$work"
start_inference 18601 "$out/inference.log" --repository "$work/models" --load talking-demo
# build compositor-port gateway-port
for side in "old 18611 18621" "new 18613 18623"; do
  read -r build cport gport <<<"$side"
  bin=$out/$build
  start_compositor "$cport" 18601 "$out/$build/compositor.log" --avatars "$work/avatars" --preload demo
  echo $! >"$out/$build/compositor.pid"
  start_gateway "127.0.0.1:$gport" "$out/$build/gateway.log" --compositor-url "http://127.0.0.1:$cport" \
    --max-sessions 64 --admission-headroom off
  echo $! >"$out/$build/gateway.pid"
done
bin=$PWD/target/release
wait_ready 300 18601 18611 18613
wait_http 60 http://127.0.0.1:18621/healthz
wait_http 60 http://127.0.0.1:18623/healthz

: >"$out/rounds.txt"
for round in $(seq 0 "$rounds"); do
  order="old new"
  [ $((round % 2)) = 1 ] && order="new old"
  for build in $order; do
    gport=$([ "$build" = old ] && echo 18621 || echo 18623)
    secs=$([ "$round" = 0 ] && echo 35 || echo "$seconds")
    "$bin/framecast-bench" gateway --url "http://127.0.0.1:$gport" --sessions "$sessions" \
      --seconds "$secs" --codec h264 --cpu "compositor=$(cat "$out/$build/compositor.pid")" \
      --cpu "gateway=$(cat "$out/$build/gateway.pid")" --out "$out/$build/round-$round" \
      >"$out/$build/round-$round.txt" 2>&1
    line=$(grep '^sessions' "$out/$build/round-$round.txt" | tail -n 1)
    echo "$build $round $line" | tee -a "$out/rounds.txt"
  done
done

python3 - "$out/rounds.txt" "$rev" >"$out/table.md" <<'PY'
import re, statistics, sys
rows = []
for line in open(sys.argv[1]):
    build, rnd, rest = line.split(" ", 2)
    num = lambda pat: float(re.search(pat, rest).group(1))
    rows.append((build, int(rnd), int(num(r"held +(\d+)")), num(r"fps min +([\d.]+)"),
                 num(r"compositor ([\d.]+) ms"), num(r"gateway ([\d.]+) ms")))
print(f"old: {sys.argv[2]}, new: this tree")
print("| build | round | held | fps min | compositor | gateway | compositor + gateway |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for b, r, held, fps, c, g in rows:
    print(f"| {b} | {r} | {held} | {fps:.1f} | {c:.2f} ms | {g:.2f} ms | {c + g:.2f} ms |")
for b in ("old", "new"):
    steady = [row for row in rows if row[0] == b and row[1] > 0]
    if steady:
        med = lambda i: statistics.median(row[i] for row in steady)
        tot = statistics.median(row[4] + row[5] for row in steady)
        print(f"| {b} | median of the steady rounds | | | {med(4):.2f} ms | {med(5):.2f} ms | {tot:.2f} ms |")
PY
cat "$out/table.md"

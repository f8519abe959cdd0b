#!/usr/bin/env bash
# Inference RSS across repeated bursts of concurrent ModelInfer, and after idling: does memory
# come back once a burst is over? (issue 13.9; figures in docs/performance.md)
#
#   scripts/burst-rss.sh [VARIANT...]
#
# Each VARIANT runs a fresh server: `default` (as shipped), `no-trim` (FRAMECAST_MALLOC_TRIM=0:
# glibc malloc without the idle trim, i.e. before the fix), `jemalloc` or `mimalloc` (the
# Debian library preloaded; installed with apt-get if missing). Default: all four.
#
# BURSTS (4), BURST_REQUESTS (1000, all at once), IDLE_S (15) tune it. Needs the release
# binaries (`make build`). Results: out/burst-rss/rss.csv and a table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
bursts=${BURSTS:-4}
requests=${BURST_REQUESTS:-1000}
idle=${IDLE_S:-15}
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(default no-trim jemalloc mimalloc)
bin=target/release
out=out/burst-rss
mkdir -p "$out"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# passthrough at 320 px moves what lipsync-ref moves (a 600 KB face and 32 KB of audio per
# element) at a fraction of the compute, so a burst stresses buffers, not the CPU.
"$bin/framecast-inference" models --out "$work/models" --only passthrough --crop 320 \
  --max-batch-size 24 >/dev/null

rss_mib() { awk '/^VmRSS/ {printf "%.0f", $2/1024}' "/proc/$1/status"; }

preload_for() {
  local lib pkg
  case $1 in
    jemalloc) lib=libjemalloc.so.2 pkg=libjemalloc2 ;;
    mimalloc) lib=libmimalloc.so.2 pkg=libmimalloc2.0 ;;
    *) return 0 ;;
  esac
  local path
  path=$(ldconfig -p | awk -v l="$lib" '$1 == l {print $NF; exit}')
  if [ -z "$path" ]; then
    echo "burst-rss: installing $pkg" >&2
    apt-get install -y -qq "$pkg" >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq "$pkg" >/dev/null; }
    path=$(ldconfig -p | awk -v l="$lib" '$1 == l {print $NF; exit}')
  fi
  echo "$path"
}

echo "variant,phase,rss_mib" >"$out/rss.csv"
for v in "${variants[@]}"; do
  port=$((18100 + RANDOM % 800))
  env=(RUST_LOG=warn FRAMECAST_MAX_QUEUE=$((requests + 24)))
  [ "$v" = no-trim ] && env+=(FRAMECAST_MALLOC_TRIM=0)
  preload=$(preload_for "$v")
  [ -n "$preload" ] && env+=(LD_PRELOAD="$preload")
  env "${env[@]}" "$bin/framecast-inference" serve --repository "$work/models" \
    --listen "127.0.0.1:$port" --metrics-listen 127.0.0.1:0 --load passthrough \
    >"$out/server-$v.log" 2>&1 &
  pid=$!
  "$bin/framecast-bench" wait "http://127.0.0.1:$port" --timeout-s 60 >/dev/null \
    || { tail -n 20 "$out/server-$v.log" >&2; exit 1; }
  echo "$v,loaded,$(rss_mib $pid)" >>"$out/rss.csv"
  for b in $(seq 1 "$bursts"); do
    "$bin/framecast-bench" kserve --url "http://127.0.0.1:$port" --model passthrough \
      --mode full --concurrency "$requests" --max-requests "$requests" --duration-s 60 \
      --warmup-s 0 --data zero >"$out/bench-$v-$b.txt" 2>&1
    echo "$v,burst $b,$(rss_mib $pid)" >>"$out/rss.csv"
  done
  sleep "$idle"
  echo "$v,idle ${idle} s,$(rss_mib $pid)" >>"$out/rss.csv"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
done
python3 - "$out/rss.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
variants = list(dict.fromkeys(r["variant"] for r in rows))
phases = list(dict.fromkeys(r["phase"] for r in rows))
val = {(r["variant"], r["phase"]): r["rss_mib"] for r in rows}
print("| RSS, MiB | " + " | ".join(phases) + " |")
print("| --- |" + " --- |" * len(phases))
for v in variants:
    print(f"| {v} | " + " | ".join(val.get((v, p), "") for p in phases) + " |")
PY

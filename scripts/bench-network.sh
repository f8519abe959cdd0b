#!/usr/bin/env bash
# make bench-network: the compositor-to-inference hop with and without framecast's extensions
# (the tensor cache: face inputs as row indices; I420 crops), side by side, on loopback and
# across two network namespaces joined by a veth pair shaped with tc (10 Gbit/s, 0.2 ms each
# way). Model `passthrough` at S = 320 (next to no compute, so a batch's round trip is its
# transport), the demo avatar (1280x720), shared memory off. Reports frames/s, latency, the
# inference round trip per batch and the bytes per frame on the hop; results in
# out/bench-network/. Needs root, iproute2 and tc for the veth part; without them that part
# is skipped with a message (loopback still runs).
#
#   BENCH_SECONDS   measured seconds per run (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
cargo build --release --bins
bin=$PWD/target/release
out=out/bench-network
seconds=${BENCH_SECONDS:-10}
rm -rf "$out" && mkdir -p "$out"
"$bin/framecast-inference" models --out "$out/models" --only passthrough --crop 320 --max-batch-size 24 >/dev/null
"$bin/framecast-compositor" avatar make-demo --root "$out/avatars" --model passthrough --frames 100 >/dev/null
"$bin/framecast-compositor" avatar prepare "$out/avatars/demo" >/dev/null

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del fc-inf 2>/dev/null || true
  ip netns del fc-comp 2>/dev/null || true
}
trap cleanup EXIT

# A compositor metric's value, summed over the series matching a pattern.
cat >"$out/metric.py" <<'PY'
import re, sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
print(sum(float(l.split()[-1]) for l in text.splitlines()
          if not l.startswith("#") and re.match(sys.argv[2], l)))
PY

# One run: inference (extensions on or off) where $1 says, compositor and client where $2
# says; prints a table row.
run() { # link inf_prefix comp_prefix inf_host extensions
  local link=$1 inf_ns=$2 comp_ns=$3 host=$4 ext=$5
  $inf_ns "$bin/framecast-inference" serve --repository "$out/models" --listen "$host:18601" \
    --metrics-listen "$host:18602" --load passthrough --framecast-extensions "$ext" \
    --shared-memory false >"$out/inference-$link-$ext.log" 2>&1 &
  local inf=$!; pids+=($inf)
  $comp_ns "$bin/framecast-compositor" serve --avatars "$out/avatars" --listen 127.0.0.1:18611 \
    --metrics-listen 127.0.0.1:18612 --inference "http://$host:18601" --preload demo \
    --inference-shared-memory false >"$out/compositor-$link-$ext.log" 2>&1 &
  local comp=$!; pids+=($comp)
  $comp_ns "$bin/framecast-bench" wait "http://$host:18601" http://127.0.0.1:18611 --timeout-s 120 >/dev/null
  $comp_ns "$bin/framecast-bench" compositor --url http://127.0.0.1:18611 --mode full --concurrency 2 \
    --duration-s "$seconds" --warmup-s 2 --json "$out/$link-$ext.json" >"$out/$link-$ext.txt" 2>&1
  local m=http://127.0.0.1:18612/metrics
  local frames sent received rt_sum rt_count
  local metric="$comp_ns python3 $out/metric.py $m"
  frames=$($metric 'framecast_compositor_frames_total')
  sent=$($metric 'framecast_compositor_inference_bytes_total\{direction="sent"')
  received=$($metric 'framecast_compositor_inference_bytes_total\{direction="received"')
  rt_sum=$($metric 'framecast_compositor_inference_seconds_sum')
  rt_count=$($metric 'framecast_compositor_inference_seconds_count')
  python3 - "$out/$link-$ext.json" "$link" "$ext" "$frames" "$sent" "$received" "$rt_sum" "$rt_count" <<'PY' | tee -a "$out/table.md"
import json, sys
l = json.load(open(sys.argv[1]))["levels"][0]
link, ext = sys.argv[2], sys.argv[3] == "true"
frames, sent, received, rt_sum, rt_count = map(float, sys.argv[4:9])
per = (sent + received) / max(frames, 1) / 1e6
print(f"| {link} | {'on' if ext else 'off'} | {l['frames_per_s']:.0f} | {l['latency_ms']['p50']:.0f} / {l['latency_ms']['p99']:.0f} ms "
      f"| {rt_sum / max(rt_count, 1) * 1e3:.1f} ms | {sent / max(frames, 1) / 1e6:.3f} + {received / max(frames, 1) / 1e6:.3f} = {per:.3f} MB "
      f"| {10e9 / 8 / (per * 1e6) / 25:.0f} |")
PY
  kill "$comp" "$inf" 2>/dev/null || true
  wait "$comp" "$inf" 2>/dev/null || true
}

{
  echo "| link | extensions | frames/s | latency p50 / p99 | inference round trip per 24-frame batch | MB per frame on the hop (sent + received) | 25-fps sessions per 10 Gbit/s |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
} | tee "$out/table.md"
for ext in false true; do
  run loopback "" "" 127.0.0.1 "$ext"
done

if ip netns add fc-inf 2>/dev/null && ip netns add fc-comp 2>/dev/null \
  && ip link add veth-inf type veth peer name veth-comp 2>/dev/null; then
  ip link set veth-inf netns fc-inf
  ip link set veth-comp netns fc-comp
  ip -n fc-inf addr add 10.77.0.1/24 dev veth-inf
  ip -n fc-comp addr add 10.77.0.2/24 dev veth-comp
  for ns in fc-inf fc-comp; do
    ip -n $ns link set lo up
  done
  ip -n fc-inf link set veth-inf up
  ip -n fc-comp link set veth-comp up
  # netem (rate and delay) where the kernel has it; else tbf (rate only); else unshaped.
  link=veth-10gbit-0.2ms
  shape() { # qdisc args...
    tc -n fc-inf qdisc add dev veth-inf root "$@" 2>/dev/null \
      && tc -n fc-comp qdisc add dev veth-comp root "$@" 2>/dev/null
  }
  if ! shape netem delay 0.2ms rate 10gbit; then
    tc -n fc-inf qdisc del dev veth-inf root 2>/dev/null || true
    if shape tbf rate 10gbit burst 4mb latency 50ms; then
      link=veth-10gbit
      echo "bench-network: this kernel has no netem: the veth is shaped to 10 Gbit/s without the 0.2 ms delay" | tee -a "$out/notes.txt"
    else
      tc -n fc-inf qdisc del dev veth-inf root 2>/dev/null || true
      link=veth-unshaped
      echo "bench-network: this kernel has neither netem nor tbf: the veth is not shaped" | tee -a "$out/notes.txt"
    fi
  fi
  for ext in false true; do
    run "$link" "ip netns exec fc-inf" "ip netns exec fc-comp" 10.77.0.1 "$ext"
  done
else
  echo "bench-network: cannot make network namespaces here (root and iproute2 needed): the veth runs are skipped" | tee -a "$out/table.md"
fi
echo "bench-network: table in $out/table.md"

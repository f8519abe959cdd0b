#!/usr/bin/env bash
# make bench-network: the compositor-to-inference hop with and without framecast's extensions
# (the tensor cache: face inputs as row indices; I420 crops), side by side, on loopback and
# across two network namespaces joined by a veth pair shaped with tc (10 Gbit/s, 0.2 ms each
# way). Model `passthrough` at S = 320 (next to no compute, so a batch's round trip is its
# transport), the demo avatar (1280x720), shared memory off. Reports frames/s, latency, the
# inference round trip per batch and the bytes per frame on the hop; results in
# out/bench-network/ (transport.md: one batch in flight, the transport per batch; table.md:
# throughput and bytes). Needs root, iproute2 and tc for the veth part; without them that part
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

# Sums of metric series, one per pattern: `metric.py URL PATTERN...` prints them on one line.
cat >"$out/metric.py" <<'PY'
import re, sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
lines = [l for l in text.splitlines() if not l.startswith("#")]
print(" ".join(str(sum(float(l.split()[-1]) for l in lines if re.match(p, l))) for p in sys.argv[2:]))
PY
# What the two phases read: frames and hop bytes, the compositor's round trip per batch, and
# the inference server's own time per request (arrival to answer, its queue and compute
# included): the difference is the transport, both ways, with its encoding and decoding.
comp_series=(framecast_compositor_frames_total 'framecast_compositor_inference_bytes_total\{direction="sent",kind="batch"'
  'framecast_compositor_inference_bytes_total\{direction="received",kind="batch"'
  framecast_compositor_inference_seconds_sum framecast_compositor_inference_seconds_count)
inf_series=(framecast_inference_request_seconds_sum framecast_inference_request_seconds_count)

# One run: inference (extensions on or off) where $2 says, compositor and client where $3
# says. Phase 1 keeps one 24-frame batch in flight (concurrency 1), so a round trip is the
# server's time plus the transport and nothing queues behind another batch; phase 2 is the
# throughput run (concurrency 2). Appends a row to each table.
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
  local snap="$comp_ns python3 $out/metric.py"
  local c0 i0 c1 i1 c2
  c0=$($snap http://127.0.0.1:18612/metrics "${comp_series[@]}")
  i0=$($snap "http://$host:18602/metrics" "${inf_series[@]}")
  $comp_ns "$bin/framecast-bench" compositor --url http://127.0.0.1:18611 --mode full --concurrency 1 \
    --duration-s "$seconds" --warmup-s 0 >"$out/$link-$ext-one.txt" 2>&1
  c1=$($snap http://127.0.0.1:18612/metrics "${comp_series[@]}")
  i1=$($snap "http://$host:18602/metrics" "${inf_series[@]}")
  $comp_ns "$bin/framecast-bench" compositor --url http://127.0.0.1:18611 --mode full --concurrency 2 \
    --duration-s "$seconds" --warmup-s 2 --json "$out/$link-$ext.json" >"$out/$link-$ext.txt" 2>&1
  c2=$($snap http://127.0.0.1:18612/metrics "${comp_series[@]}")
  python3 - "$out" "$link" "$ext" "$c0" "$i0" "$c1" "$i1" "$c2" <<'PY'
import json, sys
out, link, ext = sys.argv[1], sys.argv[2], sys.argv[3] == "true"
c0, i0, c1, i1, c2 = ([float(x) for x in a.split()] for a in sys.argv[4:9])
on = "on" if ext else "off"
# Phase 1: transport per batch = compositor round trip - the server's own time.
rt = (c1[3] - c0[3]) / max(c1[4] - c0[4], 1)
server = (i1[0] - i0[0]) / max(i1[1] - i0[1], 1)
batches = c1[4] - c0[4]
with open(f"{out}/transport.md", "a") as f:
    f.write(f"| {link} | {on} | {batches:.0f} | {rt * 1e3:.2f} ms | {server * 1e3:.2f} ms | **{(rt - server) * 1e3:.2f} ms** |\n")
# Phase 2: throughput and bytes.
frames, sent, received = (c2[i] - c1[i] for i in range(3))
rt2 = (c2[3] - c1[3]) / max(c2[4] - c1[4], 1)
l = json.load(open(f"{out}/{link}-{'true' if ext else 'false'}.json"))["levels"][0]
per = (sent + received) / max(frames, 1) / 1e6
with open(f"{out}/table.md", "a") as f:
    f.write(f"| {link} | {on} | {l['frames_per_s']:.0f} | {l['latency_ms']['p50']:.0f} / {l['latency_ms']['p99']:.0f} ms "
            f"| {rt2 * 1e3:.1f} ms | {sent / max(frames, 1) / 1e6:.3f} + {received / max(frames, 1) / 1e6:.3f} = {per:.3f} MB "
            f"| {10e9 / 8 / (per * 1e6) / 25:.0f} |\n")
PY
  tail -n 1 "$out/transport.md" "$out/table.md"
  kill "$comp" "$inf" 2>/dev/null || true
  wait "$comp" "$inf" 2>/dev/null || true
}

{
  echo "| link | extensions | frames/s | latency p50 / p99 | inference round trip per 24-frame batch | MB per frame on the hop (sent + received) | 25-fps sessions per 10 Gbit/s |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
} >"$out/table.md"
{
  echo "| link | extensions | batches | round trip per 24-frame batch | server's own time | transport (difference) |"
  echo "| --- | --- | --- | --- | --- | --- |"
} >"$out/transport.md"
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
  echo "bench-network: cannot make network namespaces here (root and iproute2 needed): the veth runs are skipped" | tee -a "$out/notes.txt"
fi
echo; echo "One batch in flight: the transport per 24-frame batch"; cat "$out/transport.md"
echo; echo "Two requests in flight: throughput and bytes"; cat "$out/table.md"
echo "bench-network: tables in $out/transport.md and $out/table.md"
if [ -f "$out/notes.txt" ]; then cat "$out/notes.txt"; fi

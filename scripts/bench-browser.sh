#!/usr/bin/env bash
# make bench-browser: the gateway measured with a real browser. Starts inference, compositor
# and gateway (release builds) with a demo avatar, opens the page in headless Chromium
# BENCH_RUNS times (time from page load to the first video frame), then watches one session
# for BENCH_SECONDS with a spoken sentence on the fake microphone and reports: frame rate,
# the gateway's share of mouth-to-ear latency (voice in -> its frame and voice out, p50/p99),
# the gateway's CPU per session split by stage, and sessions per core. Results in
# out/bench-browser/.
#
#   BENCH_RUNS      page loads for the time to first frame (default 20)
#   BENCH_SECONDS   seconds the watched session runs (default 20)
#   BENCH_SIZE      avatar size WxH (default 1280x720)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(FRAMECAST_BROWSER=1 scripts/setup.sh)"
cargo build --release --bins
bin=$PWD/target/release
out=out/bench-browser
runs=${BENCH_RUNS:-20}
seconds=${BENCH_SECONDS:-20}
size=${BENCH_SIZE:-1280x720}
w=${size%x*}
h=${size#*x}
rm -rf "$out" && mkdir -p "$out"
"$bin/framecast-inference" models --out "$out/models" --only talking-demo >/dev/null
"$bin/framecast-compositor" avatar make-demo --root "$out/avatars" --id bench --width "$w" --height "$h" --frames 1 >/dev/null
"$bin/framecast-compositor" avatar prepare "$out/avatars/bench" >/dev/null

source scripts/lib/services.sh
start_inference 18801 "$out/inference.log" --repository "$out/models" --load talking-demo
start_compositor 18811 18801 "$out/compositor.log" --avatars "$out/avatars" --preload bench
wait_ready 180 18801 18811
start_gateway 127.0.0.1:18821 "$out/gateway.log" --compositor-url http://127.0.0.1:18811
gateway=$!
wait_http 30 http://127.0.0.1:18821/healthz
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# The face box of the one background frame: the mouth is the middle of its lower third.
probe=$(python3 -c "
import json; x, y, bw, bh = json.load(open('$out/avatars/bench/boxes.json'))[0]
print(f'{x + bw * 3 // 10},{y + bh * 6 // 10},{bw * 4 // 10},{bh * 2 // 10}')")
before=$(cpu "$gateway")
start=$(date +%s.%N)
"$FRAMECAST_REFERENCE_PYTHON" scripts/browser_check.py --url http://127.0.0.1:18821 --avatar bench \
  --sentence "Hello there. I am the framecast avatar, and I speak as you listen." --probe "$probe" --seconds "$seconds" --runs "$runs" \
  --screenshot "$out/page.png" >"$out/result.json"
after=$(cpu "$gateway")
end=$(date +%s.%N)
python3 - "$out" "$before" "$after" "$start" "$end" "$(getconf CLK_TCK)" "$size" <<'PY' | tee "$out/table.md"
import json, statistics, sys
out, before, after, start, end, tck, size = sys.argv[1], *map(float, sys.argv[2:7]), sys.argv[7]
r = json.load(open(f"{out}/result.json"))
g = r["gateway"]
firsts = sorted(r["first_frame_ms_runs"])
frames = r["frames"]
span = (frames[-1] - frames[0]) / 1e3
fps = (len(frames) - 1) / span
gaps = [b - a for a, b in zip(frames, frames[1:])]
sent = max(g["frames_sent"], 1)
cpu_s = (after - before) / tck
wall = end - start
# The gateway ran one session at a time: its CPU over the whole run is that session's (and
# the page loads' signalling), per second of the run.
per_session = cpu_s / wall
print(f"avatar {size}, {len(firsts)} page loads, one session watched for {span:.1f} s")
print()
print("| figure | value |")
print("| --- | --- |")
print(f"| page load to first video frame, p50 (min..max) | {statistics.median(firsts):.0f} ms ({firsts[0]:.0f}..{firsts[-1]:.0f}) |")
print(f"| frames presented | {fps:.1f} frames/s, longest gap {max(gaps):.0f} ms |")
print(f"| frames lost (compositor to encoder) / dropped late | {g['frames_lost']} / {g['frames_dropped']} |")
lat = sorted(r["mouth_latency_ms"])
if lat:
    p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
    print(f"| mouth-to-ear: speech onset in the voice sent -> mouth moves on screen, p50 / p99 ({len(lat)} onsets) | {statistics.median(lat):.0f} / {p99:.0f} ms |")
print(f"| of which the gateway (voice in -> its frame and voice out), p50 / p99 | {g['latency_ms_p50']:.0f} / {g['latency_ms_p99']:.0f} ms |")
print(f"| gateway CPU per session | {per_session * 100:.1f}% of a core -> {1 / per_session:.0f} sessions per core |")
print(f"| per frame: H.264 encode | {g['encode_ms_total'] / sent:.2f} ms |")
print(f"| per frame: Opus decode (2 packets) | {g['decode_ms_total'] / sent:.3f} ms |")
print(f"| per frame: RTP packetise + SRTP (video and voice) | {g['packetize_ms_total'] / sent:.3f} ms |")
rest = cpu_s * 1e3 / sent - (g["encode_ms_total"] + g["decode_ms_total"] + g["packetize_ms_total"]) / sent
print(f"| per frame: the rest (I420 receive, ICE/DTLS, pacing, HTTP) | {rest:.2f} ms |")
PY

#!/usr/bin/env bash
# make bench-agent: agent sessions measured in a real browser. Starts inference, compositor
# and gateway (release builds) with a 1280x720 demo avatar, opens an agent session in
# headless Chromium and reports: speech call (audio, and text through espeak-ng) to the
# first moving mouth, interrupt to a still mouth and a silent voice (BENCH_CYCLES cycles,
# p50/p99), the three services' CPU with the session idle against speaking (BENCH_CPU_S s
# each), and a long session (BENCH_LONG_S s, default 300): frames lost and the lips-to-voice
# offset at its start and its end. Results in out/bench-agent/.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(FRAMECAST_BROWSER=1 scripts/setup.sh)"
cargo build --release --bins
bin=$PWD/target/release
out=out/bench-agent
cycles=${BENCH_CYCLES:-20}
cpu_s=${BENCH_CPU_S:-20}
long_s=${BENCH_LONG_S:-300}
rm -rf "$out" && mkdir -p "$out"
"$bin/framecast-inference" models --out "$out/models" --only talking-demo >/dev/null
"$bin/framecast-compositor" avatar make-demo --root "$out/avatars" --id bench --frames 1 >/dev/null
"$bin/framecast-compositor" avatar prepare "$out/avatars/bench" >/dev/null

source scripts/lib/services.sh
start_inference 18901 "$out/inference.log" --repository "$out/models" --load talking-demo
inference=$!
start_compositor 18911 18901 "$out/compositor.log" --avatars "$out/avatars" --preload bench
compositor=$!
wait_ready 180 18901 18911
start_gateway 127.0.0.1:18921 "$out/gateway.log" --compositor-url http://127.0.0.1:18911
gateway=$!
wait_http 30 http://127.0.0.1:18921/healthz
probe=$(python3 -c "
import json; x, y, bw, bh = json.load(open('$out/avatars/bench/boxes.json'))[0]
print(f'{x + bw * 3 // 10},{y + bh * 6 // 10},{bw * 4 // 10},{bh * 2 // 10}')")
"$FRAMECAST_REFERENCE_PYTHON" scripts/browser_check.py --url http://127.0.0.1:18921 --avatar bench \
  --bench "Hello there. I am the framecast avatar, and I speak for the application." \
  --probe "$probe" --cycles "$cycles" --cpu-pids "$inference" "$compositor" "$gateway" \
  --cpu-s "$cpu_s" --long-s "$long_s" >"$out/result.json"
python3 - "$out" <<'PY' | tee "$out/table.md"
import json, sys
r = json.load(open(f"{sys.argv[1]}/result.json"))
def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round((len(v) - 1) * p)))] if v else float("nan")
print("| figure | n | p50 | p99 |")
print("| --- | --- | --- | --- |")
for k in ("audio_to_mouth_ms", "text_to_mouth_ms", "interrupt_to_still_ms", "interrupt_to_silence_ms"):
    v = r[k]
    print(f"| {k} | {len(v)} | {pct(v, 0.5):.0f} | {pct(v, 0.99):.0f} |")
if "cpu_idle_s" in r:
    idle, speak = sum(r["cpu_idle_s"]), sum(r["cpu_speaking_s"])
    names = ("inference", "compositor", "gateway")
    print()
    print(f"CPU over {r['cpu_span_s']:.0f} s, seconds (inference, compositor, gateway): idle "
          + ", ".join(f"{x:.2f}" for x in r["cpu_idle_s"]) + "; speaking "
          + ", ".join(f"{x:.2f}" for x in r["cpu_speaking_s"])
          + f"; idle / speaking = {idle / max(speak, 1e-9):.0%}")
if "offset_start_ms" in r:
    g = r["gateway"]
    print(f"long session {r['long_s']:.0f} s: lips-to-voice offset (media clocks) {r['offset_start_ms']} ms "
          f"at the start, {r['offset_end_ms']} ms at the end; mouth-to-voice content lag "
          f"{r['content_lag_start_ms']} / {r['content_lag_end_ms']} ms; frames sent {g['frames_sent']}, "
          f"lost {g['frames_lost']}, dropped late {g['frames_dropped']}; the voice's playout delay "
          f"(its jitter buffer to the device, which the clocks above do not see) {r['playout_start_ms']} / "
          f"{r['playout_end_ms']} ms")
if r.get("offset_timeline"):
    print()
    print("offset through the session (s from the first cycle: lips-to-voice ms by the media "
          "clocks, the browser's hold of the frames ms, the voice's playout delay ms):")
    print("; ".join(f"{t}: {o}, {h}, {p}" for (t, o, h, p) in r["offset_timeline"]))
PY

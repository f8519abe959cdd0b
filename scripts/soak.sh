#!/usr/bin/env bash
# make soak: SOAK_SESSIONS real-time sessions (default 4) for SOAK_SECONDS (default 120) against
# both services, started here; reports errors (target 0), frames lost (target 0) and resident
# memory growth of each service after warm-up (target < 5%). Exits 1 when a target is missed.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
sessions=${SOAK_SESSIONS:-4}
seconds=${SOAK_SECONDS:-120}
out="$PWD/out/soak"
work="$PWD/out/bench/work"
mkdir -p "$out"
cargo build --release --bins
bin=target/release
[ -f "$work/models/talking-demo/model.pt" ] || "$bin/framecast-inference" models --out "$work/models"
[ -f "$work/avatars/demo/avatar.toml" ] || "$bin/framecast-compositor" avatar make-demo --root "$work/avatars"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
"$bin/framecast-inference" serve --repository "$work/models" --listen 127.0.0.1:18201 \
  --metrics-listen 127.0.0.1:18202 --load talking-demo >"$out/inference.log" 2>&1 &
pids+=($!); inference=$!
"$bin/framecast-compositor" serve --avatars "$work/avatars" --listen 127.0.0.1:18211 \
  --metrics-listen 127.0.0.1:18212 --inference http://127.0.0.1:18201 --preload demo \
  >"$out/compositor.log" 2>&1 &
pids+=($!); compositor=$!
"$bin/framecast-bench" wait http://127.0.0.1:18201 http://127.0.0.1:18211 --timeout-s 180

rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
realtime() {
  "$bin/framecast-bench" compositor --url http://127.0.0.1:18211 --mode realtime --chunk 25 \
    --fps 25 --sessions "$sessions" --duration-s "$1" --json "$2"
}
echo "== warm-up: $sessions sessions for 15 s"
realtime 15 "$out/warmup.json" >/dev/null
inf0=$(rss "$inference"); comp0=$(rss "$compositor")
echo "== soak: $sessions sessions for $seconds s"
realtime "$seconds" "$out/soak.json" | tee "$out/soak.txt"
inf1=$(rss "$inference"); comp1=$(rss "$compositor")

python3 - "$out/soak.json" "$inf0" "$inf1" "$comp0" "$comp1" <<'PY' | tee "$out/summary.txt"
import json, sys
report = json.load(open(sys.argv[1]))
t = report["realtime"]["trials"][0]
inf0, inf1, comp0, comp1 = map(int, sys.argv[2:])
lost = t["expected_frames"] - t["frames"]
growth = {"inference": (inf1 - inf0) / inf0 * 100, "compositor": (comp1 - comp0) / comp0 * 100}
print(f"sessions {t['sessions']}, frames {t['frames']} of {t['expected_frames']}, "
      f"lost {lost}, late {t['late_frames']}, errors {t['errors']}")
for name, (a, b) in {"inference": (inf0, inf1), "compositor": (comp0, comp1)}.items():
    print(f"{name} RSS {a / 1024:.0f} MiB after warm-up, {b / 1024:.0f} MiB at the end: "
          f"{growth[name]:+.2f}% (target < 5%)")
ok = t["errors"] == 0 and lost == 0 and all(g < 5 for g in growth.values())
print("soak: PASS" if ok else "soak: FAIL")
sys.exit(0 if ok else 1)
PY

#!/usr/bin/env bash
# make soak: SOAK_SESSIONS real-time sessions (default 4) for SOAK_SECONDS (default 120) against
# both services, started here; reports errors (target 0), frames lost (target 0) and resident
# memory growth of each service after warm-up (median RSS of the soak's last third against its
# first, target < 5%).
# Then an overload phase offers SOAK_OVERLOAD_SESSIONS (default twice SOAK_SESSIONS) for
# SOAK_OVERLOAD_SECONDS (default 60) to a compositor admitting SOAK_MAX_STREAMS (default
# SOAK_SESSIONS): the sessions past the limit must be refused at once with RESOURCE_EXHAUSTED,
# the admitted ones lose nothing, and each service's peak memory stays within 10% of its peak at
# the sustainable load. RSS is sampled every second into out/soak/rss.tsv.
# Exits 1 when a target is missed.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
sessions=${SOAK_SESSIONS:-4}
seconds=${SOAK_SECONDS:-120}
max_streams=${SOAK_MAX_STREAMS:-$sessions}
overload=${SOAK_OVERLOAD_SESSIONS:-$((2 * sessions))}
overload_seconds=${SOAK_OVERLOAD_SECONDS:-60}
out="$PWD/out/soak"
work="$PWD/out/bench/work"
mkdir -p "$out"
cargo build --release --bins
bin=target/release
source scripts/lib/services.sh
demo_assets "$work"
start_inference 18201 "$out/inference.log" --repository "$work/models" --load talking-demo
inference=$!
start_compositor 18211 18201 "$out/compositor.log" --avatars "$work/avatars" --preload demo \
  --max-streams "$max_streams"
compositor=$!
wait_ready 180 18201 18211

rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
# One line a second: phase, inference RSS KiB, compositor RSS KiB.
printf 'phase\tinference_kib\tcompositor_kib\n' >"$out/rss.tsv"
sample() {
  while kill -0 "$inference" 2>/dev/null && kill -0 "$compositor" 2>/dev/null; do
    printf '%s\t%s\t%s\n' "$(cat "$out/phase")" "$(rss "$inference")" "$(rss "$compositor")" >>"$out/rss.tsv"
    sleep 1
  done
}
set_phase() { echo "$1" >"$out/phase"; }
set_phase warmup
sample & service_pids+=($!)
realtime() {
  "$bin/framecast-bench" compositor --url http://127.0.0.1:18211 --mode realtime --chunk 25 \
    --fps 25 --sessions "$1" --duration-s "$2" --json "$3"
}
echo "== warm-up: $sessions sessions for 15 s"
realtime "$sessions" 15 "$out/warmup.json" >/dev/null
set_phase soak
echo "== soak: $sessions sessions for $seconds s"
realtime "$sessions" "$seconds" "$out/soak.json" | tee "$out/soak.txt"
# Streams of the last phase release their admission permits as they wind down.
set_phase pause
sleep 2
set_phase overload
echo "== overload: $overload sessions for $overload_seconds s against --max-streams $max_streams"
realtime "$overload" "$overload_seconds" "$out/overload.json" | tee "$out/overload.txt"
set_phase end

python3 - "$out" "$max_streams" <<'PY' | tee "$out/summary.txt"
import csv, json, statistics, sys
out, max_streams = sys.argv[1], int(sys.argv[2])
trial = lambda name: json.load(open(f"{out}/{name}.json"))["realtime"]["trials"][0]
rows = list(csv.DictReader(open(f"{out}/rss.tsv"), delimiter="\t"))
samples = lambda name, phase: [int(r[f"{name}_kib"]) for r in rows if r["phase"] == phase]
ok = True

t = trial("soak")
lost = t["expected_frames"] - t["frames"]
print(f"soak: sessions {t['sessions']}, frames {t['frames']} of {t['expected_frames']}, "
      f"lost {lost}, late {t['late_frames']}, errors {t['errors']}")
ok &= t["errors"] == 0 and lost == 0
for name in ("inference", "compositor"):
    # RSS swings with the batches in flight; medians of the first and last third of the soak
    # see a trend through that noise.
    s = samples(name, "soak")
    third = max(1, len(s) // 3)
    a, b = statistics.median(s[:third]), statistics.median(s[-third:])
    growth = (b - a) / a * 100
    ok &= growth < 5
    print(f"  {name} RSS median {a / 1024:.0f} MiB in the first third, {b / 1024:.0f} MiB in the "
          f"last: {growth:+.2f}% (target < 5%)")

o = trial("overload")
refused = max(0, o["sessions"] - max_streams)
lost = o["expected_frames"] - o["frames"]
print(f"overload: {o['sessions']} sessions offered, limit {max_streams}: {o['rejected']} refused "
      f"with RESOURCE_EXHAUSTED (target {refused}), admitted frames {o['frames']} of "
      f"{o['expected_frames']}, lost {lost}, late {o['late_frames']}, errors {o['errors']}")
ok &= o["rejected"] == refused and o["errors"] == 0 and lost == 0
for name in ("inference", "compositor"):
    base, over = max(samples(name, "soak")), max(samples(name, "overload"))
    growth = (over - base) / base * 100
    ok &= growth < 10
    print(f"  {name} peak RSS {base / 1024:.0f} MiB at {t['sessions']} sessions, "
          f"{over / 1024:.0f} MiB offered {o['sessions']}: {growth:+.2f}% (target < 10%)")
print("soak: PASS" if ok else "soak: FAIL")
sys.exit(0 if ok else 1)
PY

#!/usr/bin/env bash
# make demo: build, generate models and the demo avatar, start both servers, have the demo
# avatar (talking-demo) speak a sentence from espeak-ng over an audio session, write frames,
# an AVI with the speech as its sound track, and a contact sheet under out/demo, stop the servers.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"

cargo build --release --bins
bin=target/release
out=out/demo
mkdir -p "$out"

[ -f "$out/models/talking-demo/model.pt" ] || "$bin/framecast-inference" models --out "$out/models"
# An avatar made before speech (no [audio] table) is made again.
grep -qs '^\[audio\]' "$out/avatars/demo/avatar.toml" || "$bin/framecast-compositor" avatar make-demo --root "$out/avatars"
# Prepared once (every frame encoded with restart markers, its face region kept), so the
# server's load is a read; again whenever the bundle changed.
"$bin/framecast-compositor" avatar check "$out/avatars/demo" 2>/dev/null | grep -q "prepared file used" \
  || "$bin/framecast-compositor" avatar prepare "$out/avatars/demo"
"$bin/framecast-compositor" avatar check "$out/avatars/demo"

inf_port=${FRAMECAST_DEMO_INFERENCE_PORT:-18001}
comp_port=${FRAMECAST_DEMO_COMPOSITOR_PORT:-18011}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$bin/framecast-inference" serve --repository "$out/models" --listen "127.0.0.1:$inf_port" \
  --metrics-listen "127.0.0.1:$((inf_port + 1))" --load talking-demo >"$out/inference.log" 2>&1 &
pids+=($!)
"$bin/framecast-compositor" serve --avatars "$out/avatars" --listen "127.0.0.1:$comp_port" \
  --metrics-listen "127.0.0.1:$((comp_port + 1))" --inference "http://127.0.0.1:$inf_port" --preload demo >"$out/compositor.log" 2>&1 &
pids+=($!)

dump_logs() { tail -n 20 "$out/inference.log" "$out/compositor.log" >&2; }
"$bin/framecast-bench" wait "http://127.0.0.1:$inf_port" "http://127.0.0.1:$comp_port" --timeout-s 180 &
waiter=$!
while kill -0 "$waiter" 2>/dev/null; do
  for p in "${pids[@]}"; do
    if ! kill -0 "$p" 2>/dev/null; then
      echo "a server exited during start-up; logs:" >&2
      dump_logs
      exit 1
    fi
  done
  sleep 0.5
done
if ! wait "$waiter"; then
  echo "servers did not become healthy; logs:" >&2
  dump_logs
  exit 1
fi
"$bin/framecast-bench" demo --compositor "http://127.0.0.1:$comp_port" --out "$out" "$@"

#!/usr/bin/env bash
# make browser-demo: the three services on this host (inference, compositor, gateway) with the
# demo avatar, and the page's URL. Open it in a browser, pick the avatar, talk or play the
# sample sentence, watch the avatar answer. Ctrl-C stops everything.
#
#   FRAMECAST_BROWSER_DEMO_PORT   the page's port (default 18021)
#   FRAMECAST_GATEWAY_UDP_HOST    the address browsers reach this host on (default 127.0.0.1;
#                                 set it to this host's LAN address to open the page elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"

cargo build --release --bins
bin=target/release
out=out/browser-demo
mkdir -p "$out"

[ -f "$out/models/talking-demo/model.pt" ] || "$bin/framecast-inference" models --out "$out/models" --only talking-demo
grep -qs '^\[audio\]' "$out/avatars/demo/avatar.toml" || "$bin/framecast-compositor" avatar make-demo --root "$out/avatars"
"$bin/framecast-compositor" avatar check "$out/avatars/demo" 2>/dev/null | grep -q "prepared file used" \
  || "$bin/framecast-compositor" avatar prepare "$out/avatars/demo"
# The sample sentence the page offers.
[ -f "$out/sample.wav" ] || espeak-ng -w "$out/sample.wav" \
  "Hello. I am the framecast demo avatar. I speak with the voice you send me, in real time."

port=${FRAMECAST_BROWSER_DEMO_PORT:-18021}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

"$bin/framecast-inference" serve --repository "$out/models" --listen 127.0.0.1:18101 \
  --metrics-listen 127.0.0.1:18102 --load talking-demo >"$out/inference.log" 2>&1 &
pids+=($!)
"$bin/framecast-compositor" serve --avatars "$out/avatars" --listen 127.0.0.1:18111 \
  --metrics-listen 127.0.0.1:18112 --inference http://127.0.0.1:18101 --preload demo >"$out/compositor.log" 2>&1 &
pids+=($!)
"$bin/framecast-bench" wait http://127.0.0.1:18101 http://127.0.0.1:18111 --timeout-s 180 >/dev/null
"$bin/framecast-gateway" --listen "0.0.0.0:$port" --metrics-listen 127.0.0.1:18122 \
  --compositor-url http://127.0.0.1:18111 --sample-wav "$out/sample.wav" >"$out/gateway.log" 2>&1 &
pids+=($!)
sleep 1
kill -0 "${pids[2]}" 2>/dev/null || { tail -n 20 "$out/gateway.log" >&2; exit 1; }
echo "framecast browser demo: open http://127.0.0.1:$port/ (logs in $out/; Ctrl-C stops)"
wait

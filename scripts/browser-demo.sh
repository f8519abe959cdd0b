#!/usr/bin/env bash
# make browser-demo: the three services on this host (inference, compositor, gateway) with the
# demo avatar, and the page's URL. Open it in a browser, pick the avatar, talk or play the
# sample sentence, watch the avatar answer. Ctrl-C stops everything.
#
#   FRAMECAST_BROWSER_DEMO_PORT   the page's port (default 18021)
#   FRAMECAST_GATEWAY_UDP_HOST    the address browsers reach this host on (default 127.0.0.1;
#                                 set it to this host's LAN address to open the page elsewhere)
#   FRAMECAST_BROWSER_DEMO_TLS_CERT, FRAMECAST_BROWSER_DEMO_TLS_KEY
#                                 PEM certificate and key: the page over https, which a browser
#                                 on another machine needs to grant the microphone
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"

cargo build --release --bins
bin=target/release
out=out/browser-demo
mkdir -p "$out"

source scripts/lib/services.sh
demo_assets "$out" --only talking-demo
# The sample sentence the page offers.
[ -f "$out/sample.wav" ] || espeak-ng -w "$out/sample.wav" \
  "Hello. I am the framecast demo avatar. I speak with the voice you send me, in real time."

port=${FRAMECAST_BROWSER_DEMO_PORT:-18021}
trap 'stop_services; exit 130' INT TERM
start_inference 18101 "$out/inference.log" --repository "$out/models" --load talking-demo
start_compositor 18111 18101 "$out/compositor.log" --avatars "$out/avatars" --preload demo
wait_ready 180 18101 18111
tls=()
scheme=http
if [ -n "${FRAMECAST_BROWSER_DEMO_TLS_CERT:-}" ]; then
  tls=(--tls-cert "$FRAMECAST_BROWSER_DEMO_TLS_CERT"
    --tls-key "${FRAMECAST_BROWSER_DEMO_TLS_KEY:?is needed with FRAMECAST_BROWSER_DEMO_TLS_CERT}")
  scheme=https
fi
start_gateway "0.0.0.0:$port" "$out/gateway.log" --compositor-url http://127.0.0.1:18111 \
  --sample-wav "$out/sample.wav" "${tls[@]}"
wait_http 30 "$scheme://127.0.0.1:$port/healthz"
echo "framecast browser demo: open $scheme://${FRAMECAST_GATEWAY_UDP_HOST:-127.0.0.1}:$port/ (logs in $out/; Ctrl-C stops)"
wait

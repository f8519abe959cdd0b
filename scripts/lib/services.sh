# Sourced by the scripts that run framecast's services on this host (demo, browser-demo, bench,
# bench-browser, soak, compare-builds, gpu-check): one way to make the demo's assets, start a
# service, wait for it, and stop everything on exit. Uses $bin, the directory of the binaries
# (set it before calling; `bin=DIR start_inference ...` for another build).
#
#   demo_assets DIR [ARGS...]         built-in models (`models` ARGS) and the demo avatar under
#                                     DIR, made once, prepared again when the bundle changed
#   start_inference PORT LOG ARGS...  `framecast-inference serve` on 127.0.0.1:PORT, metrics on
#                                     PORT+1; $! is its pid afterwards
#   start_compositor PORT INFERENCE_PORT LOG ARGS...
#                                     `framecast-compositor serve` on PORT (metrics PORT+1)
#                                     against the inference service on INFERENCE_PORT
#   start_gateway HOST:PORT LOG ARGS...
#                                     `framecast-gateway` on HOST:PORT (metrics 127.0.0.1:PORT+1)
#   wait_ready TIMEOUT PORT...        until each gRPC service on 127.0.0.1:PORT is SERVING
#   wait_http TIMEOUT URL             until URL answers (the gateway's /healthz)
#                                     Both exit 1 with the logs' tails when a started service
#                                     exits first or the time runs out.
#   stop_services                     kills what was started (trapped on EXIT; a script with
#                                     more to clean calls it from its own trap)

service_pids=()
service_logs=()

stop_services() {
  local p
  for p in "${service_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop_services EXIT

# Each log's error (anyhow's chain of causes, without the backtrace RUST_BACKTRACE adds) or,
# when it has none, its tail.
service_failed() {
  echo "$(basename "$0"): $*; the services' logs say:" >&2
  local log
  for log in "${service_logs[@]}"; do
    echo "==> $log <==" >&2
    if grep -q -E '^Error: |panicked at' "$log"; then
      awk '/^Error: |panicked at/ { on = 1 } /^Stack backtrace:|^stack backtrace:/ { on = 0 } on' "$log" >&2
    else
      tail -n 20 "$log" >&2
    fi
  done
  exit 1
}

# LOG COMMAND...: in the background, remembered for wait_ready and stop_services.
start_service() {
  local log=$1
  shift
  "$@" >"$log" 2>&1 &
  service_pids+=($!)
  service_logs+=("$log")
}

# The scripts' services each have one client (the bench, the demo, one browser), so no
# per-client share stands below the limits they set; an earlier build ignores these.
export FRAMECAST_MAX_STREAMS_PER_CLIENT=${FRAMECAST_MAX_STREAMS_PER_CLIENT:-1000000}
export FRAMECAST_GATEWAY_MAX_SESSIONS_PER_CLIENT=${FRAMECAST_GATEWAY_MAX_SESSIONS_PER_CLIENT:-1000000}
# The benches load the compositor past what it holds on purpose (to find that point), with the
# load client and every service on one host: its admission by margin would refuse them first.
# Off here unless asked; the gateway's stays on (its scripts open one session at a time).
export FRAMECAST_ADMISSION_HEADROOM=${FRAMECAST_ADMISSION_HEADROOM:-off}

start_inference() {
  local port=$1 log=$2
  shift 2
  start_service "$log" "$bin/framecast-inference" serve --listen "127.0.0.1:$port" \
    --metrics-listen "127.0.0.1:$((port + 1))" "$@"
}

start_compositor() {
  local port=$1 inference=$2 log=$3
  shift 3
  start_service "$log" "$bin/framecast-compositor" serve --listen "127.0.0.1:$port" \
    --metrics-listen "127.0.0.1:$((port + 1))" --inference "http://127.0.0.1:$inference" "$@"
}

start_gateway() {
  local listen=$1 log=$2
  shift 2
  start_service "$log" "$bin/framecast-gateway" --listen "$listen" \
    --metrics-listen "127.0.0.1:$((${listen##*:} + 1))" "$@"
}

# DESCRIPTION COMMAND...: runs COMMAND (a wait) while watching the started services; fails with
# their logs when one exits first or COMMAND fails.
watch_start() {
  local what=$1
  shift
  "$@" >/dev/null 2>&1 &
  local waiter=$! p
  while kill -0 "$waiter" 2>/dev/null; do
    for p in "${service_pids[@]}"; do
      kill -0 "$p" 2>/dev/null || { kill "$waiter" 2>/dev/null; service_failed "a service exited during start-up"; }
    done
    sleep 0.5
  done
  wait "$waiter" || service_failed "$what"
}

wait_ready() {
  local timeout=$1
  shift
  local urls=() port
  for port in "$@"; do urls+=("http://127.0.0.1:$port"); done
  watch_start "the services on ports $* were not ready within $timeout s" \
    "$bin/framecast-bench" wait "${urls[@]}" --timeout-s "$timeout"
}

wait_http() {
  local timeout=$1 url=$2
  # The certificate is not checked: this asks our own service on this host whether it is up
  # (its certificate may name only the address browsers use).
  watch_start "$url did not answer within $timeout s" python3 -c '
import ssl, sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2, context=ssl._create_unverified_context())
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.2)' "$url" "$timeout"
}

demo_assets() {
  local dir=$1
  shift
  [ -f "$dir/models/talking-demo/model.pt" ] || "$bin/framecast-inference" models --out "$dir/models" "$@" >/dev/null
  # An avatar made before speech (no [audio] table) is made again.
  grep -qs '^\[audio\]' "$dir/avatars/demo/avatar.toml" \
    || "$bin/framecast-compositor" avatar make-demo --root "$dir/avatars" >/dev/null
  # Prepared once (every frame encoded with restart markers, its face region kept), so the
  # server's load is a read; again whenever the bundle changed.
  # (grep reads to the end: with -q it would close the pipe under `check`, and pipefail fail)
  "$bin/framecast-compositor" avatar check "$dir/avatars/demo" 2>/dev/null | grep "prepared file used" >/dev/null \
    || "$bin/framecast-compositor" avatar prepare "$dir/avatars/demo" >/dev/null
}

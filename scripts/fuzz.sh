#!/usr/bin/env bash
# make fuzz: runs each fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS (default 60) with
# libFuzzer, starting from the inputs kept in fuzz/regressions/<target>/. A crash stops the
# run and leaves its input in fuzz/artifacts/<target>/: fix it, then copy the input into
# fuzz/regressions/<target>/ so `cargo test` replays it from then on.
# Needs cargo-fuzz (installed here if missing) and a nightly compiler; without a nightly
# toolchain the stable one is used with RUSTC_BOOTSTRAP=1 for the sanitizer flags.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-"infer_request model_config avatar_manifest audio_chunks prepared_file sdp_offer"}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi
# libtorch is not built with ASan; its allocations look like leaks to LeakSanitizer.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0}
mkdir -p out/fuzz
for t in $targets; do
  mkdir -p "fuzz/corpus/$t"
  echo "== $t: ${seconds}s"
  set +e
  "${fuzz[@]}" run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" "fuzz/regressions/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 >"out/fuzz/$t.log" 2>&1
  status=$?
  set -e
  grep -E '^(#[0-9]+ +DONE|Done [0-9]+ runs|SUMMARY|Test unit written|==[0-9]+== ?ERROR)' "out/fuzz/$t.log" || true
  if [ "$status" -ne 0 ]; then
    echo "fuzz: $t failed (exit $status); input in fuzz/artifacts/$t/, log in out/fuzz/$t.log" >&2
    exit "$status"
  fi
done
echo "fuzz: no crash in $targets (${seconds}s each); logs in out/fuzz/"

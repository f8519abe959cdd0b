# framecast: `make demo` and `make test` work on a fresh machine (they install what is missing).
SHELL := /bin/bash
ENV = eval "$$(scripts/setup.sh)"
# The tests also drive a real browser: chromium and chromium-driver come with them.
TEST_ENV = eval "$$(FRAMECAST_BROWSER=1 scripts/setup.sh)"

.PHONY: demo browser-demo bench-browser bench-agent bench-clock bench-gateway bench-codecs test validate-deploy setup build build-cuda gpu-check lint fmt bench bench-network compare compare-gateway soak fuzz clean

## Render the demo avatar end to end; output in out/demo.
demo:
	scripts/demo.sh

## The three services and the page: talk to the demo avatar from a browser (prints the URL).
browser-demo:
	scripts/browser-demo.sh

## Every test: deploy/ validation, unit, integration, end to end (real servers on loopback,
## headless Chromium against the gateway).
test: validate-deploy
	$(TEST_ENV) && cargo test --workspace --all-targets --no-fail-fast

## deploy/ checked without a cluster: manifests, compose file, dashboard.
validate-deploy:
	scripts/validate-deploy.sh

## The standard benchmark suite; results in out/bench/ (about 10 minutes on 2 cores).
bench:
	scripts/bench.sh

## The compositor-to-inference hop with and without framecast's extensions, on loopback and
## across a veth pair shaped to 10 Gbit/s and 0.2 ms (needs root; results in out/bench-network/).
bench-network:
	scripts/bench-network.sh

## This tree's services against those of an earlier commit (REV=...), side by side on this
## host: frames/s, latency, CPU per frame of each process (results in out/compare/).
compare:
	scripts/compare-builds.sh

## This tree's compositor and gateway against an earlier commit's (REV=...), side by side in
## one stack: WebRTC sessions, CPU per delivered frame of each (results in out/compare-gateway/).
compare-gateway:
	scripts/compare-gateway.sh

## The gateway with a real browser: time to first frame, frame rate, latency, CPU per session
## (results in out/bench-browser/).
bench-browser:
	scripts/bench-browser.sh

## Agent sessions in headless Chromium: speech call to the moving mouth, interrupt to a still
## mouth and silence, CPU idle against speaking, a long session's sync (out/bench-agent/).
bench-agent:
	scripts/bench-agent.sh

## WebRTC sessions per machine: a sweep for the largest count that holds 24 frames/s, then
## twice that offered with admission on (out/bench-gateway/).
bench-gateway:
	scripts/bench-gateway.sh

## H.264 against VP8 as a session encodes a 720p avatar: encode ms per frame, bitrate made,
## PSNR, the bitrate each needs for the same quality, and libvpx's speeds (about 3 minutes).
bench-codecs:
	$(ENV) && cargo bench -p framecast-gateway --bench codecs

## The compositor's frame clock side by side with requests sent alone: frames per forward
## pass, latency and CPU per frame at 4-16 live sessions (out/bench-clock/).
bench-clock:
	scripts/bench-clock.sh

## Real-time sessions against both services for a bounded time: errors, lost frames, RSS
## growth (SOAK_SESSIONS, SOAK_SECONDS; results in out/soak/).
soak:
	scripts/soak.sh

## Fuzz the input parsers (tensor requests, model configs, avatar manifests) for FUZZ_SECONDS
## each (default 60); crashes go to fuzz/artifacts/, kept ones to fuzz/regressions/.
fuzz:
	scripts/fuzz.sh

## Install apt packages and the libtorch cache.
setup:
	scripts/setup.sh >/dev/null

build:
	$(ENV) && cargo build --release --bins

## CUDA-capable inference binary and a bundle for any GPU host with PyTorch 2.11.
build-cuda:
	scripts/build-cuda.sh

## On a GPU host with PyTorch 2.11 and the bundle from build-cuda: one table of GPU figures
## (fails, never skips, without CUDA; about six minutes).
gpu-check:
	scripts/gpu-check.sh

lint:
	$(ENV) && cargo fmt --all -- --check && cargo clippy --workspace --all-targets -- -D warnings \
	  && RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps -q

fmt:
	cargo fmt --all

clean:
	rm -rf out target

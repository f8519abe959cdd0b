#!/usr/bin/env bash
# Installs what a fresh machine lacks, idempotently:
#   - apt packages: cmake and nasm (turbojpeg builds its bundled libjpeg-turbo with them),
#     libopus-dev, libvpx-dev and pkg-config (the gateway), espeak-ng (speech for tests and the demo),
#     ffmpeg and opencv-data (`avatar import`: video decoding and OpenCV's face cascade);
#     with FRAMECAST_BROWSER=1 also chromium, chromium-driver and coturn (the browser tests)
#   - libtorch 2.11.0 (the pair of tch 0.24) unpacked from the PyPI torch wheel into a cache dir
# Prints the environment to use as `export` lines on stdout (everything else goes to stderr), so
#   eval "$(scripts/setup.sh)"
# leaves LIBTORCH, LIBTORCH_CXX11_ABI, LD_LIBRARY_PATH, FRAMECAST_REFERENCE_PYTHON and
# FRAMECAST_ASTRONAUT (the import tests' photograph, with FRAMECAST_BROWSER=1) set.
#
# FRAMECAST_CACHE   cache root (default ~/.cache/framecast)
# FRAMECAST_TORCH   cpu (default) or cuda: which libtorch variant to prepare
set -euo pipefail

TORCH_VERSION=2.11.0
CUDART_VERSION='13.0.96.*'
CUPTI_VERSION='13.0.85.*'
variant=${FRAMECAST_TORCH:-cpu}
cache=${FRAMECAST_CACHE:-$HOME/.cache/framecast}
libtorch="$cache/libtorch-$TORCH_VERSION-$variant"

log() { echo "setup: $*" >&2; }

# A fresh `make test` fills about 5 GB of target/ (plus ~2 GB of caches here); say so before
# a full disk turns into a linker's bus error.
free_kib=$(df -Pk . | awk 'NR == 2 { print $4 }')
if [ "${free_kib:-0}" -lt $((6 * 1024 * 1024)) ]; then
  log "warning: only $((free_kib / 1024)) MiB free here; a fresh build and test needs about 6 GiB"
fi

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v nasm >/dev/null || need_apt+=(nasm)
command -v unzip >/dev/null || need_apt+=(unzip)
command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
# The gateway decodes the browser's Opus with libopus.
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
[ -f /usr/include/opus/opus.h ] || need_apt+=(libopus-dev)
# ...and encodes VP8 (browsers without H.264) with libvpx.
[ -f /usr/include/vpx/vp8cx.h ] || need_apt+=(libvpx-dev)
# avatar import: ffmpeg decodes the user's video, opencv-data holds the face cascade.
command -v ffprobe >/dev/null || need_apt+=(ffmpeg)
[ -f /usr/share/opencv4/haarcascades/haarcascade_frontalface_default.xml ] || need_apt+=(opencv-data)
# make test drives a real browser against the gateway.
if [ "${FRAMECAST_BROWSER:-0}" = 1 ]; then
  command -v chromium >/dev/null || need_apt+=(chromium)
  command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
  # A TURN server the relay test starts (NAT traversal through coturn).
  command -v turnserver >/dev/null || need_apt+=(coturn)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} with apt-get"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -f "$libtorch/.complete" ]; then
  log "preparing libtorch $TORCH_VERSION ($variant) in $libtorch (one-time, ~530 MB download)"
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/tmp.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-cache-dir --no-deps --only-binary=:all: -d "$tmp/wheels" "torch==$TORCH_VERSION" >&2
  (cd "$tmp" && unzip -q wheels/torch-*.whl 'torch/lib/*' 'torch/include/*' 'torch/share/*')
  if [ "$variant" = cpu ]; then
    (cd "$tmp/torch/lib" && rm -f libtorch_cuda*.so libc10_cuda.so libtorch_python.so libtorch_nvshmem.so libcaffe2_nvrtc.so)
  else
    rm -f "$tmp/torch/lib/libtorch_python.so"
  fi
  # libtorch_cpu.so links these two CUDA runtime libraries even when no GPU is used.
  python3 -m pip download -q --no-cache-dir --no-deps --only-binary=:all: -d "$tmp/wheels" \
    "nvidia-cuda-runtime==$CUDART_VERSION" "nvidia-cuda-cupti==$CUPTI_VERSION" >&2
  # Each wheel holds one of the two; pull them out by name wherever they sit.
  python3 - "$tmp/wheels" "$tmp/torch/lib" <<'PY'
import pathlib, re, sys, zipfile
wheels, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
found = set()
for whl in wheels.glob("nvidia_cuda_*.whl"):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            m = re.search(r"/(libcudart|libcupti)\.so\.13(\.[0-9.]*)?$", name)
            if m:
                (dest / f"{m.group(1)}.so.13").write_bytes(z.read(name))
                found.add(m.group(1))
missing = {"libcudart", "libcupti"} - found
if missing:
    sys.exit(f"setup: {sorted(missing)} not found in the nvidia wheels")
PY
  rm -rf "$libtorch"
  mv "$tmp/torch" "$libtorch"
  rm -rf "$tmp/wheels"
  touch "$libtorch/.complete"
  log "libtorch ready"
fi

reference="$cache/reference-venv"
reference_pkgs=('librosa==0.11.0' 'tritonclient[grpc]==2.73.0' 'selenium==4.27.1' 'websockets==15.0.1')
# The marker names what is installed, so a changed list installs again.
marker="$reference/.complete-$(echo "${reference_pkgs[*]}" | md5sum | cut -c1-12)"
if [ ! -f "$marker" ]; then
  log "preparing the reference venv in $reference: ${reference_pkgs[*]} (one-time, ~200 MB)"
  rm -rf "$reference"
  python3 -m venv "$reference" >&2
  "$reference/bin/python" -m pip install -q "${reference_pkgs[@]}" >&2
  touch "$marker"
fi

# The import tests' real face: scikit-image's astronaut photograph (NASA, public domain),
# shipped inside its wheel; only that file is kept.
astronaut="$cache/test-data/astronaut.png"
if [ "${FRAMECAST_BROWSER:-0}" = 1 ] && [ ! -f "$astronaut" ]; then
  log "fetching the astronaut photograph from the scikit-image wheel (one-time, 14 MB download)"
  mkdir -p "$cache/test-data"
  tmp_img=$(mktemp -d "$cache/tmp.XXXXXX")
  python3 -m pip download -q --no-cache-dir --no-deps --only-binary=:all: -d "$tmp_img" \
    'scikit-image==0.26.0' >&2
  unzip -q -j -o "$tmp_img"/scikit_image-*.whl skimage/data/astronaut.png -d "$tmp_img"
  mv "$tmp_img/astronaut.png" "$astronaut"
  rm -rf "$tmp_img"
fi

echo "export LIBTORCH='$libtorch'"
echo "export FRAMECAST_ASTRONAUT='$astronaut'"
echo "export FRAMECAST_REFERENCE_PYTHON='$reference/bin/python'"
echo "export LIBTORCH_CXX11_ABI=1"
echo "export LD_LIBRARY_PATH='$libtorch/lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"

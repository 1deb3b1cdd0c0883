#!/usr/bin/env bash
# The GPU check (issue 10; recipe: ../shared/GPU.md): the one command to run on
# the GPU machine. It builds tlserve against the CUDA LibTorch inside that
# machine's Python torch and Debian's gRPC, Protobuf, Abseil and prometheus-cpp
# (carried there in .devdeps), makes the test fixtures there, runs the test
# suite with TLSERVE_TEST_DEVICE=cuda, then the benchmarks with --device=cuda
# --precision=bf16. Each step is time-boxed so that the whole run ends within
# GPU_CHECK_BUDGET seconds (default 530, under 9 minutes); a failing step is
# reported and the next one runs. Logs and summary.md (the table printed last)
# go into $OUT, or ./gpu-check-out.
#
#   scripts/gpu-check.sh --prepare   HERE, beside ../shared: fetches .devdeps (Debian
#                                    packages the GPU machine lacks, a slice of
#                                    Fashion-MNIST) and prints the device tool's call
#   scripts/gpu-check.sh             THERE, through the device tool's `run` with
#                                    carry [".devdeps"]
#
# Settings (environment; the defaults are for the GPU machine):
#   OUT                  folder for the logs and summary.md (./gpu-check-out)
#   GPU_CHECK_DEVICE     cuda; `cpu` runs the same steps on this machine as a dry run,
#                        with small benchmarks (give it a larger budget and build cap)
#   GPU_CHECK_PRECISION  bf16
#   GPU_CHECK_PYTHON     python3: the Python with torch and torchvision (fixtures, the
#                        Python tests and benchmarks, torch's CMake prefix)
#   GPU_CHECK_BUILD_DIR  build-gpu
#   GPU_CHECK_DEPS       .devdeps
#   GPU_CHECK_BUDGET     530: seconds for the whole run
#   GPU_CHECK_JOBS       build jobs (nproc); GPU_CHECK_CTEST_JOBS tests at once (4; 1 on cpu)
#   GPU_CHECK_CAP_<step> a step's own time cap in seconds (steps: configure build fixtures
#                        bench_inputs ctest embed_bench multi_tenant serving_during_training)
#
# Files in $OUT (the device tool brings back at most 8): setup.log (environment,
# configure, build, fixtures, benchmark inputs), ctest.log, bench.log,
# ctest-LastTest.log.gz, summary.md.
# shellcheck disable=SC2317  # the step_* functions are called as "step_$2"
set -u
set -o pipefail

SELF=$(readlink -f "$0")
ROOT=$(cd "$(dirname "$SELF")/.." && pwd)
cd "$ROOT" || exit 1

die() {
  echo "gpu-check: $*" >&2
  exit 1
}

# --- --prepare: runs on the development machine ------------------------------
# Debian bookworm packages the project needs beyond ../shared/device/debian-deps.sh's
# (which brings gRPC, Protobuf, Abseil, prometheus-cpp, OpenSSL, zlib): the GPU
# machine's image has CUDA, a compiler, CMake and ninja, but none of these -dev
# packages is known to be there. When it has one too, CMake still takes the
# carried one (CMAKE_PREFIX_PATH/INCLUDE_PATH/LIBRARY_PATH come before the
# system's), and LD_LIBRARY_PATH makes the run use the same.
# zlib1g: zlib1g-dev's libz.so points at /lib/x86_64-linux-gnu/libz.so.1.2.13, which Ubuntu
# 24.04 (zlib 1.3) does not have.
EXTRA_PACKAGES=(libgtest-dev nlohmann-json3-dev libturbojpeg0-dev libturbojpeg0 libpng-dev
  libpng16-16 libsqlite3-dev libsqlite3-0 pkgconf-bin libpkgconf3 zlib1g)
FMNIST=/usr/share/datasets/fashion-mnist # Debian's dataset-fashion-mnist; fixed in its readers

exclude_path() { # adds a line to .git/info/exclude once
  local exclude
  exclude=$(git rev-parse --git-path info/exclude 2>/dev/null) || return 0
  mkdir -p "$(dirname "$exclude")"
  grep -qxF "$1" "$exclude" 2>/dev/null || echo "$1" >>"$exclude"
}

# The first images of a Fashion-MNIST split, enough for `per_class` of every class
# (and at least `minimum`), as the same idx files: the fixtures, the Python tests and
# the benchmarks read at most the first few hundred of each class.
fmnist_slice() {
  local out=$1
  mkdir -p "$out"
  /usr/bin/python3 - "$FMNIST" "$out" <<'PY' || return 1
import gzip, os, struct, sys
src, out = sys.argv[1], sys.argv[2]
for prefix, per_class, minimum in (("train", 600, 6000), ("t10k", 300, 3000)):
    with gzip.open(os.path.join(src, prefix + "-labels-idx1-ubyte.gz")) as f:
        labels = f.read()[8:]
    with gzip.open(os.path.join(src, prefix + "-images-idx3-ubyte.gz")) as f:
        images = f.read()
    counts, n = [0] * 10, 0
    while n < len(labels) and (n < minimum or min(counts) < per_class):
        counts[labels[n]] += 1
        n += 1
    with gzip.open(os.path.join(out, prefix + "-labels-idx1-ubyte.gz"), "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels[:n])
    with gzip.open(os.path.join(out, prefix + "-images-idx3-ubyte.gz"), "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + images[16:16 + n * 784])
    print("fashion-mnist %s: first %d images (fewest of a class: %d)" % (prefix, n, min(counts)))
PY
}

prepare() {
  local deps=${GPU_CHECK_DEPS:-.devdeps}
  local fetch=$ROOT/../shared/device/debian-deps.sh
  [ -f "$fetch" ] || die "no $fetch: --prepare runs on the development machine, beside ../shared"
  if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
    die "--prepare needs apt-get and dpkg (Debian bookworm, as this machine)"
  fi
  [ -f "$FMNIST/train-images-idx3-ubyte.gz" ] ||
    die "no $FMNIST here: install Debian's dataset-fashion-mnist (scripts/install-deps.sh)"
  exclude_path "/${deps#./}/"
  exclude_path "/gpu-check-out/"
  if [ -f "$deps/.gpu-check-ready" ] && [ "${1:-}" != "--force" ]; then
    echo "gpu-check: $deps is already prepared (scripts/gpu-check.sh --prepare --force fetches it again)"
  else
    local tmp=$deps.tmp
    rm -rf "$tmp"
    echo "gpu-check: fetching Debian's gRPC, Protobuf, Abseil, prometheus-cpp into $deps ..."
    bash "$fetch" "$tmp" || die "$fetch failed (apt-get update first?)"
    local debs
    debs=$(mktemp -d)
    (cd "$debs" && apt-get download "${EXTRA_PACKAGES[@]}") ||
      die "apt-get download ${EXTRA_PACKAGES[*]} failed (apt-get update first?)"
    for deb in "$debs"/*.deb; do dpkg -x "$deb" "$tmp" || die "dpkg -x $deb failed"; done
    rm -rf "$debs" "$tmp/usr/share/doc" "$tmp/usr/share/man" "$tmp/usr/src"
    # Shared libraries only, as debian-deps.sh keeps them, but GoogleTest's (static only).
    find "$tmp" -name "*.a" ! -name "libgtest*.a" -delete
    # As debian-deps.sh does: relative symlinks and pkg-config prefixes.
    find "$tmp" -type l | while read -r link; do
      target=$(readlink "$link")
      if [[ $target == /* && -e "$tmp$target" ]]; then ln -sfr "$tmp$target" "$link"; fi
    done
    # shellcheck disable=SC2016  # ${pcfiledir} is pkg-config's, not the shell's
    find "$tmp" -name "*.pc" -exec sed -i -E 's#=/usr(/|$)#=${pcfiledir}/../../..\1#' {} +
    fmnist_slice "$tmp/fashion-mnist" || die "could not slice $FMNIST"
    local dangling
    dangling=$(find "$tmp" -type l -lname '/*')
    [ -z "$dangling" ] || die "links out of $tmp, which the GPU machine may lack: $dangling"
    for f in usr/lib/x86_64-linux-gnu/cmake/grpc usr/lib/x86_64-linux-gnu/cmake/GTest usr/bin/protoc \
      usr/bin/grpc_cpp_plugin usr/bin/grpc_python_plugin usr/bin/pkgconf usr/include/nlohmann/json.hpp \
      usr/include/turbojpeg.h usr/include/png.h usr/include/sqlite3.h; do
      [ -e "$tmp/$f" ] || die "$tmp/$f is missing after the fetch"
    done
    date -u +%FT%TZ >"$tmp/.gpu-check-ready"
    rm -rf "$deps"
    mv "$tmp" "$deps"
  fi
  local deps_mb tree_mb
  deps_mb=$(du -sm "$deps" | cut -f1)
  tree_mb=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 |
    awk '{printf "%d", $1 / 1048576 + 1}')
  echo "gpu-check: $deps is ${deps_mb} MiB; the working tree that travels ~${tree_mb} MiB (limit 64 MiB in all)"
  [ $((deps_mb + tree_mb)) -lt 64 ] || echo "gpu-check: WARNING: over the device tool's 64 MiB" >&2
  cat <<EOF

Now run it on the GPU machine with the device tool (one call; it must end within 10 minutes):

  run  command: bash scripts/gpu-check.sh
       carry:   [".devdeps"]
       timeout_s: 600

Its table comes last in output_tail and in \$OUT/summary.md; record it in docs/benchmarks.md.
EOF
}

# --- the run ------------------------------------------------------------------
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PRECISION=${GPU_CHECK_PRECISION:-bf16}
[ "$DEVICE" = cpu ] && PRECISION=${GPU_CHECK_PRECISION:-fp32} # reduced precision is CUDA's only
BUDGET=${GPU_CHECK_BUDGET:-530}
BUILD=$ROOT/${GPU_CHECK_BUILD_DIR:-build-gpu}
case ${GPU_CHECK_BUILD_DIR:-} in /*) BUILD=$GPU_CHECK_BUILD_DIR ;; esac
DEPS=$ROOT/${GPU_CHECK_DEPS:-.devdeps}
case ${GPU_CHECK_DEPS:-} in /*) DEPS=$GPU_CHECK_DEPS ;; esac
OUTDIR=${OUT:-$ROOT/gpu-check-out}
STATE=$BUILD/gpu-check # key figures of the steps, benchmark inputs
CORES=$(nproc 2>/dev/null || echo 4)
JOBS=${GPU_CHECK_JOBS:-$CORES}
if [ "$DEVICE" = cpu ]; then CTEST_JOBS=${GPU_CHECK_CTEST_JOBS:-1}; else CTEST_JOBS=${GPU_CHECK_CTEST_JOBS:-4}; fi
export DEVICE PRECISION BUILD DEPS OUTDIR STATE CORES JOBS CTEST_JOBS

# Step, its time cap (s) and its floor: the seconds kept back for it while the
# steps before it run (so that a slow build leaves the tests and benchmarks some time).
STEPS=(configure build fixtures bench_inputs ctest embed_bench multi_tenant serving_during_training)
declare -A CAP=([configure]=120 [build]=360 [fixtures]=120 [bench_inputs]=90 [ctest]=200
  [embed_bench]=120 [multi_tenant]=120 [serving_during_training]=120)
declare -A FLOOR=([configure]=0 [build]=0 [fixtures]=20 [bench_inputs]=10 [ctest]=90
  [embed_bench]=60 [multi_tenant]=55 [serving_during_training]=55)
declare -A LOG=([configure]=setup [build]=setup [fixtures]=setup [bench_inputs]=setup [ctest]=ctest
  [embed_bench]=bench [multi_tenant]=bench [serving_during_training]=bench)

key() { # the step's key figure, for the table
  mkdir -p "$STATE"
  echo "$*" >"$STATE/key.$CURRENT_STEP"
}

skip() { # ends the step as skipped, for the reason given
  key "$*"
  exit 4
}

# The Python tests read nothing but this Python; the servers need the carried libraries.
setup_env() {
  export LD_LIBRARY_PATH=$DEPS/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export PKG_CONFIG_PATH=$DEPS/usr/lib/x86_64-linux-gnu/pkgconfig:$DEPS/usr/share/pkgconfig
  # protoc and grpc_python_plugin for the Python client's stubs; after the system's tools.
  export PATH=$PATH:$DEPS/usr/bin
  if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
    export PATH=$PATH:/usr/local/cuda/bin
  fi
  export PYTHONUNBUFFERED=1
  export CMAKE_POLICY_VERSION_MINIMUM=3.5 # CMake 4 and old config files; ignored by CMake 3
  PY=$(command -v "${GPU_CHECK_PYTHON:-python3}") || PY=""
  export PY
  export TLSERVE_PY_STUBS=$BUILD/python-stubs
}

step_configure() {
  local tp gen
  tp=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)') || {
    echo "torch.utils.cmake_prefix_path failed"
    return 1
  }
  if command -v ninja >/dev/null; then gen=Ninja; else gen="Unix Makefiles"; fi
  # A build folder configured with another generator cannot be reused.
  if [ -f "$BUILD/CMakeCache.txt" ] && ! grep -qx "CMAKE_GENERATOR:INTERNAL=$gen" "$BUILD/CMakeCache.txt"; then
    rm -rf "$BUILD/CMakeCache.txt" "$BUILD/CMakeFiles"
  fi
  local args=(-S "$ROOT" -B "$BUILD" -G "$gen" -DCMAKE_BUILD_TYPE=Release
    "-DCMAKE_PREFIX_PATH=$tp;$DEPS/usr/lib/x86_64-linux-gnu/cmake;$DEPS/usr"
    "-DCMAKE_PROGRAM_PATH=$DEPS/usr/bin" "-DCMAKE_INCLUDE_PATH=$DEPS/usr/include"
    "-DCMAKE_LIBRARY_PATH=$DEPS/usr/lib/x86_64-linux-gnu" "-DTLSERVE_PYTHON=$PY"
    -DTLSERVE_WERROR=OFF) # g++ 13 and LibTorch 2.x warn about things this code has not met yet
  command -v pkg-config >/dev/null || args+=("-DPKG_CONFIG_EXECUTABLE=$DEPS/usr/bin/pkgconf")
  echo "+ cmake ${args[*]}"
  cmake "${args[@]}" || return 1
  local cuda="CPU-only LibTorch"
  if grep -rqs -- "-DTLSERVE_WITH_CUDA" "$BUILD/build.ninja" "$BUILD/CMakeFiles/tlserve_core.dir/flags.make"; then
    cuda="CUDA LibTorch (TLSERVE_WITH_CUDA)"
  fi
  key "$gen; $cuda; python $PY"
  if [ "$DEVICE" != cpu ] && [ "$cuda" = "CPU-only LibTorch" ]; then
    echo "configured without CUDA: torch's CMake config did not report CUDA (CAFFE2_USE_CUDA)"
    return 1
  fi
}

step_build() {
  [ -f "$BUILD/CMakeCache.txt" ] || skip "not configured"
  # -k 0 (ninja) / -k (make): build every target that can be built, so that a test
  # that does not compile does not keep the server and the benchmarks from running.
  local keep=(-k)
  grep -qx "CMAKE_GENERATOR:INTERNAL=Ninja" "$BUILD/CMakeCache.txt" && keep=(-k 0)
  cmake --build "$BUILD" -j "$JOBS" -- "${keep[@]}"
  local rc=$?
  local bins
  bins=$(find "$BUILD/bin" -maxdepth 1 -type f -executable 2>/dev/null | wc -l)
  key "$bins programs in bin/"
  return "$rc"
}

step_fixtures() {
  if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
    # scripts/sample_images.py and bench/tlbench.py read Debian's fixed path.
    [ -f "$DEPS/fashion-mnist/train-images-idx3-ubyte.gz" ] ||
      { echo "no $FMNIST and none carried in $DEPS/fashion-mnist (run --prepare)"; return 1; }
    if ! mkdir -p "$FMNIST" || ! cp "$DEPS"/fashion-mnist/*.gz "$FMNIST"/; then
      echo "cannot copy the carried Fashion-MNIST slice into $FMNIST"
      return 1
    fi
    echo "copied the carried Fashion-MNIST slice into $FMNIST"
  fi
  # As tests/CMakeLists.txt's make_fixtures test, with this machine's torch.
  local dir=$BUILD/tests/fixtures
  "$PY" "$ROOT/tests/fixtures/make_fixtures.py" "$dir" || return 1
  key "$(find "$dir" -type f | wc -l) files by torch $("$PY" -c 'import torch; print(torch.__version__)')"
}

step_bench_inputs() {
  mkdir -p "$STATE"
  local arch=resnet50 sizes=()
  # The dry run on a CPU: a 32-px ResNet-18, so that the benchmarks take seconds.
  [ "$DEVICE" = cpu ] && arch=resnet18 && sizes=(--resize 36 --crop 32)
  "$PY" "$ROOT/scripts/make_backbone.py" --arch "$arch" "${sizes[@]}" --out "$STATE/backbone.pt" || return 1
  "$PY" - "$STATE/photo.jpg" <<'PY' || return 1
import sys
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
h, w = 480, 640
img = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 50, h)[:, None, None] + rng.normal(0, 20, (h, w, 3))
Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(sys.argv[1], quality=90)
PY
  key "$arch backbone (random weights), a 640x480 JPEG"
}

step_ctest() {
  [ -x "$BUILD/bin/tlserve" ] || skip "no build-gpu/bin/tlserve"
  [ -f "$BUILD/tests/fixtures/manifest.json" ] || skip "no fixtures"
  # Tests that need what the GPU machine lacks and that exercise no device code.
  local skip=(make_fixtures) why=()
  if ! command -v prometheus >/dev/null; then
    skip+=(prometheus_test) why+=("prometheus_test (no prometheus binary)")
  fi
  if ! command -v go >/dev/null || ! "$PY" -c 'import kubernetes, yaml' 2>/dev/null; then
    skip+=(chart_test) why+=("chart_test (no Go or Python kubernetes)")
  fi
  local window=$1 # this step's time box
  # Each test ends by the time the box does (ctest kills it and reports a timeout),
  # whatever TIMEOUT tests/CMakeLists.txt gives it.
  local stop margin=$((window / 4))
  [ "$margin" -le 15 ] || margin=15 # for ctest to kill the tests and print its summary
  stop=$(date -d "@$(($(date +%s) + window - margin))" +%H:%M:%S)
  # make_fixtures is the fixtures step's work, done already: excluded, and -FS keeps ctest
  # from adding it back as the tests' fixture setup.
  local select=(-FS fixtures -E "^($(
    IFS='|'
    echo "${skip[*]}"
  ))\$")
  local args=(-j "$CTEST_JOBS" --output-on-failure --no-tests=error --stop-time "$stop" "${select[@]}")
  # Tests that the time box leaves unstarted are in no count of ctest's. (Before the run:
  # ctest -N writes Testing/Temporary/LastTest.log too.)
  local total
  total=$(cd "$BUILD" && ctest -N "${select[@]}" | sed -nE 's/^Total Tests: ([0-9]+)$/\1/p')
  echo "+ TLSERVE_TEST_DEVICE=$DEVICE ctest ${args[*]}   (skipped: ${why[*]:-none})"
  (cd "$BUILD" && TLSERVE_TEST_DEVICE=$DEVICE ctest "${args[@]}") | tee "$STATE/ctest.out"
  local rc=$?
  local line failed ran
  line=$(grep -E "tests passed, [0-9]+ tests? failed out of" "$STATE/ctest.out" | tail -1)
  ran=$(sed -nE 's/.* out of ([0-9]+)$/\1/p' <<<"$line")
  if [ -n "$total" ] && [ -n "$ran" ] && [ "$ran" -lt "$total" ]; then
    line="$line; $((total - ran)) of $total not started (time box)"
  fi
  failed=$(sed -n '/The following tests FAILED:/,$p' "$STATE/ctest.out" |
    sed -nE 's/^[[:space:]]*[0-9]+ - ([^ ]+) \((.*)\)$/\1 (\2)/p' | paste -sd, - | sed 's/,/, /g')
  key "${line:-no ctest summary}${failed:+; failed: $failed}${why:+; skipped: ${why[*]}}"
  return "$rc"
}

step_embed_bench() {
  local bin=$BUILD/bin/embed_bench
  [ -x "$bin" ] || skip "no build-gpu/bin/embed_bench"
  [ -f "$STATE/backbone.pt" ] || skip "no backbone (bench_inputs)"
  local sizes=(--batch=256 --batches=8 --rounds=2 --clients=2)
  [ "$DEVICE" = cpu ] && sizes=(--batch=8 --batches=2 --rounds=1 --clients=2)
  local args=(--backbone="$STATE/backbone.pt" --image="$STATE/photo.jpg" --device="$DEVICE"
    --precision="$PRECISION" --threads="$CORES" "${sizes[@]}")
  echo "+ $bin ${args[*]}"
  "$bin" "${args[@]}" | tee "$STATE/embed_bench.out"
  local rc=$?
  # | mode | images | mean batch | seconds | images/s | ratio to in-proc |
  local in served
  in=$(awk -F'|' '$2 ~ /in-process LibTorch forward, backbone/ {gsub(/ /, "", $6); print $6}' "$STATE/embed_bench.out")
  served=$(awk -F'|' '$2 ~ /served Embed, float32 tensors/ {gsub(/ /, "", $6); gsub(/ /, "", $7); print $6 " img/s = " $7}' "$STATE/embed_bench.out")
  key "in-process ${in:-?} img/s; served Embed (tensors) ${served:-?} of it"
  return "$rc"
}

# A Python benchmark of bench/ (bench/tlbench.py's server flags): --device and
# --precision must exist; the sizing flags are passed where its --help lists them.
python_bench() {
  local script=$ROOT/bench/$1.py
  shift
  [ -f "$script" ] || skip "no bench/$(basename "$script")"
  [ -x "$BUILD/bin/tlserve" ] || skip "no build-gpu/bin/tlserve"
  [ -f "$STATE/backbone.pt" ] || skip "no backbone (bench_inputs)"
  local help
  help=$("$PY" "$script" --help 2>&1) || { echo "$help"; echo "$script --help failed"; return 1; }
  local args=()
  for flag in "--device=$DEVICE" "--precision=$PRECISION" "--bin-dir=$BUILD/bin" "--backbone=$STATE/backbone.pt"; do
    grep -q -- "${flag%%=*}\b" <<<"$help" || { echo "$script has no ${flag%%=*} flag"; return 1; }
    args+=("$flag")
  done
  for flag in "$@"; do
    if grep -q -- "${flag%%=*}\b" <<<"$help"; then args+=("$flag"); else echo "(no ${flag%%=*} in its --help; not passed)"; fi
  done
  echo "+ $PY $script ${args[*]}"
  "$PY" "$script" "${args[@]}" | tee "$STATE/$CURRENT_STEP.out"
  local rc=$?
  local goals
  # Its lines about the issue's goals (e.g. "goal: Classify/Embed images/s >= 0.9: 0.95 -> met"),
  # else its lines with a ratio, else its last line; table rows aside.
  local text
  text=$(grep -v -e '^|' -e '^[[:space:]]*$' "$STATE/$CURRENT_STEP.out")
  goals=$(grep -i "goal" <<<"$text" | sed -E 's/^goal: //' | paste -sd';' - | sed 's/;/; /g')
  [ -n "$goals" ] || goals=$(grep -i "ratio" <<<"$text" | paste -sd';' - | sed 's/;/; /g')
  [ -n "$goals" ] || goals=$(tail -1 <<<"$text")
  key "${goals:0:160}"
  return "$rc"
}

step_multi_tenant() {
  if [ "$DEVICE" = cpu ]; then
    python_bench multi_tenant --models=4 --clients=4 --rounds=1 --seconds=3 --warmup=1 --epochs=1
  else
    python_bench multi_tenant --max_batch_size=256 --rounds=2 --seconds=6 --warmup=2
  fi
}

step_serving_during_training() {
  if [ "$DEVICE" = cpu ]; then
    python_bench serving_during_training --rounds=1 --seconds=3 --warmup=1 --per-class=10 \
      --busy-epochs=20 --ft-epochs=1
  else
    python_bench serving_during_training --max_batch_size=256 --rounds=2 --seconds=6 --warmup=2 \
      --per-class=200 --ft-epochs=2
  fi
}

if [ "${1:-}" = "--step" ]; then # one step, under `timeout` (below)
  setup_env
  CURRENT_STEP=$2
  "step_$2" "${@:3}"
  exit $?
fi
case "${1:-}" in
  --prepare)
    prepare "${2:-}"
    exit $?
    ;;
  "") ;;
  -h | --help)
    sed -n '2,/^# shellcheck/p' "$SELF" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
  *) die "unknown argument $1 (--prepare, --help, or none)" ;;
esac

# --- checks before anything runs ---------------------------------------------
START=$(date +%s)
DEADLINE=$((START + BUDGET))
mkdir -p "$OUTDIR" "$STATE" || die "cannot create $OUTDIR and $STATE"
OUTDIR=$(cd "$OUTDIR" && pwd)
rm -f "$STATE"/key.* "$STATE"/log.* "$STATE"/*.out "$OUTDIR"/setup.log "$OUTDIR"/ctest.log "$OUTDIR"/bench.log "$OUTDIR"/summary.md
[ "$OUTDIR" = "$ROOT/gpu-check-out" ] && exclude_path "/gpu-check-out/"
setup_env
declare -A STATUS SECONDS_OF
ROWS=(env)
ENV_PROBLEMS=()
{
  echo "gpu-check: $(date -u +%FT%TZ), device $DEVICE, precision $PRECISION, budget ${BUDGET}s"
  echo "repo: $ROOT at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "(no git here)")"
  echo "machine: $CORES cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo)," \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader
  for tool in cmake ninja g++ nvcc timeout; do
    printf '%-8s %s\n' "$tool" "$(command -v "$tool" >/dev/null && "$tool" --version 2>&1 | head -1 || echo MISSING)"
  done
  echo "python: ${PY:-MISSING (${GPU_CHECK_PYTHON:-python3})}"
} >>"$OUTDIR/setup.log" 2>&1

[ -n "$PY" ] || ENV_PROBLEMS+=("no ${GPU_CHECK_PYTHON:-python3} on PATH")
for tool in cmake g++ timeout; do command -v $tool >/dev/null || ENV_PROBLEMS+=("no $tool on PATH"); done
[ -d "$DEPS/usr/lib/x86_64-linux-gnu/cmake/grpc" ] ||
  ENV_PROBLEMS+=("no $DEPS (gRPC & co.): run scripts/gpu-check.sh --prepare on the development machine and carry .devdeps")
[ -f "$ROOT/CMakeLists.txt" ] && grep -q "project(tlserve" "$ROOT/CMakeLists.txt" ||
  ENV_PROBLEMS+=("$ROOT is not the tlserve repository")
ENV_KEY=""
if [ -n "$PY" ]; then
  PYINFO=$("$PY" - "$DEVICE" "$ROOT" 2>&1 <<'PY'
import os, sys
import torch, torchvision, numpy, PIL
dev, root = sys.argv[1], sys.argv[2]
line = "torch %s (CUDA %s), torchvision %s" % (torch.__version__, torch.version.cuda, torchvision.__version__)
if dev.startswith("cuda"):
    if not torch.cuda.is_available():
        print(line + "; torch.cuda.is_available() is False")
        sys.exit(2)
    line = "%s, %s" % (torch.cuda.get_device_name(0), line)
missing = []
for m in ("grpc", "google.protobuf", "sklearn"):
    try:
        __import__(m)
    except ImportError:
        missing.append(m)
if not missing:  # the Python client's stubs: the carried protoc's code on this protobuf
    sys.path.insert(0, os.path.join(root, "client", "python"))
    try:
        import tlserve_client  # noqa: F401
    except BaseException as e:  # _stubs exits when protoc is missing
        missing.append("working client stubs (%s: %s)" % (type(e).__name__, str(e)[:120]))
print(line + ("; Python lacks " + ", ".join(missing) if missing else ""))
PY
  )
  rc=$?
  echo "$PYINFO" >>"$OUTDIR/setup.log"
  ENV_KEY=$(tail -1 <<<"$PYINFO")
  [ $rc -eq 0 ] || ENV_PROBLEMS+=("$ENV_KEY")
fi
if [ ${#ENV_PROBLEMS[@]} -gt 0 ]; then
  STATUS[env]="FAILED"
  ENV_KEY=$(printf '%s; ' "${ENV_PROBLEMS[@]}")
  ENV_KEY=${ENV_KEY%; }
  printf 'gpu-check: %s\n' "${ENV_PROBLEMS[@]}" | tee -a "$OUTDIR/setup.log"
else
  STATUS[env]=ok
fi
SECONDS_OF[env]=$(($(date +%s) - START))
echo "$ENV_KEY" >"$STATE/key.env"

# --- the steps ----------------------------------------------------------------
for i in "${!STEPS[@]}"; do
  step=${STEPS[$i]}
  ROWS+=("$step")
  log=$OUTDIR/${LOG[$step]}.log
  if [ "${STATUS[env]}" != ok ]; then
    STATUS[$step]="skipped (env)"
    SECONDS_OF[$step]=0
    continue
  fi
  if [ "$step" = build ] && [ "${STATUS[configure]}" != ok ]; then
    STATUS[$step]=skipped
    SECONDS_OF[$step]=0
    echo "configure did not succeed" >"$STATE/key.$step"
    continue
  fi
  reserve=0
  for later in "${STEPS[@]:$((i + 1))}"; do reserve=$((reserve + FLOOR[$later])); done
  var=GPU_CHECK_CAP_$step
  cap=${!var:-${CAP[$step]}}
  now=$(date +%s)
  box=$((DEADLINE - now - reserve))
  [ "$box" -gt "$cap" ] && box=$cap
  if [ "$box" -lt 10 ]; then
    STATUS[$step]="skipped (no time left)"
    SECONDS_OF[$step]=0
    echo "gpu-check: $step skipped: no time left in the ${BUDGET}s budget" | tee -a "$log"
    continue
  fi
  echo "gpu-check: $step (up to ${box}s) ..."
  echo "==== $step: up to ${box}s, $(date -u +%T) ====" >>"$log"
  timeout -k 10 "$box" "$BASH" "$SELF" --step "$step" "$box" 2>&1 | tee "$STATE/log.$step" >>"$log"
  rc=$?
  SECONDS_OF[$step]=$(($(date +%s) - now))
  case $rc in
    0) STATUS[$step]=ok ;;
    4) STATUS[$step]=skipped ;;
    124 | 137) STATUS[$step]="TIMEOUT (${box}s)" ;;
    *) STATUS[$step]="FAILED (exit $rc)" ;;
  esac
  echo "==== $step: ${STATUS[$step]} in ${SECONDS_OF[$step]}s ====" >>"$log"
  if [ $rc -ne 0 ] && [ $rc -ne 4 ]; then
    if [ ! -s "$STATE/key.$step" ]; then # the first compiler or CMake error, else the last line
      first=$(grep -m1 -E "(error|Error)[: ]" "$STATE/log.$step")
      [ -n "$first" ] || first=$(grep -v '^[[:space:]]*$' "$STATE/log.$step" | tail -1)
      echo "${first:0:160}" >"$STATE/key.$step"
    fi
    echo "gpu-check: $step ${STATUS[$step]}; the end of its log ($(basename "$log")):"
    tail -n 15 "$STATE/log.$step" | sed 's/^/    /' | cut -c1-200
  fi
done

# --- what comes back ------------------------------------------------------------
[ -f "$BUILD/Testing/Temporary/LastTest.log" ] &&
  gzip -c "$BUILD/Testing/Temporary/LastTest.log" >"$OUTDIR/ctest-LastTest.log.gz"
for f in "$OUTDIR"/*.log; do # the device tool brings back files of up to 16 MiB
  if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt $((15 << 20)) ]; then
    { head -c $((1 << 20)) "$f"; echo; echo "[... cut ...]"; tail -c $((13 << 20)) "$f"; } >"$f.cut" && mv "$f.cut" "$f"
  fi
done
{
  echo "# GPU check, $(date -u +%F)"
  echo
  echo "device $DEVICE, precision $PRECISION; $(head -1 "$STATE/key.env" 2>/dev/null); $CORES cores;" \
    "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown); total $(($(date +%s) - START)) s"
  for b in embed_bench multi_tenant serving_during_training; do
    if [ -s "$STATE/$b.out" ] && [ "${STATUS[$b]:-}" != "skipped (env)" ]; then
      echo
      echo "## $b"
      echo
      grep -v '^[[:space:]]*$' "$STATE/$b.out" # its report (stdout; the servers' logs are in bench.log)
    fi
  done
  echo
  echo "| step | status | seconds | key figure |"
  echo "|---|---|---:|---|"
  for step in "${ROWS[@]}"; do
    k=$(head -1 "$STATE/key.$step" 2>/dev/null | tr '|' '/')
    echo "| $step | ${STATUS[$step]:-not run} | ${SECONDS_OF[$step]:-0} | ${k:-} |"
  done
} >"$OUTDIR/summary.md"
echo
cat "$OUTDIR/summary.md"
for step in "${ROWS[@]}"; do
  case ${STATUS[$step]:-} in ok) ;; *) exit 1 ;; esac
done
exit 0

#!/usr/bin/env bash
# Installs every Debian bookworm package tlserve needs to build, test and run its demo.
# Idempotent: packages already present are skipped; apt is only called when something is missing.
# Used by the README's two commands, by .ci/run and by docker/Dockerfile (one list, not several).
set -euo pipefail

BUILD_PACKAGES=(
  build-essential cmake ninja-build pkg-config git clang-format
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  libtorch-dev libopenblas0-pthread
  prometheus-cpp-dev libgtest-dev libgmock-dev
  libsqlite3-dev libpq-dev libturbojpeg0-dev libpng-dev libssl-dev nlohmann-json3-dev
)
# The checking builds of scripts/sanitize.sh (CI runs them after the tests): clang for
# libFuzzer and -Wthread-safety, its sanitizer and fuzzer runtimes, llvm-symbolizer-14 for reports.
CHECK_PACKAGES=(clang-14 libclang-rt-14-dev llvm-14)
# Python is only a test reference and fixture maker (the product is C++); Debian's interpreter.
TEST_PACKAGES=(
  python3 python3-torch python3-torchvision python3-numpy python3-pil python3-sklearn
  python3-grpcio python3-grpc-tools prometheus dataset-fashion-mnist
  # The store's PostgreSQL tests start a real server of their own (the scale-out mode).
  postgresql-15
  # The Helm chart's test: Go's text/template + sprig (Helm's engine), Kubernetes' models.
  golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v3-dev python3-kubernetes python3-yaml
)

want=("${BUILD_PACKAGES[@]}")
case "${1:-all}" in
  build) ;;
  all)
    want+=("${TEST_PACKAGES[@]}" "${CHECK_PACKAGES[@]}")
    # npm fetches the chart test's Kubernetes schemas; Debian's when none is on PATH.
    command -v npm >/dev/null || want+=(nodejs npm)
    ;;
  *) echo "usage: $0 [build|all]" >&2; exit 2 ;;
esac

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

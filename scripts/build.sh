#!/usr/bin/env bash
# Configures and builds tlserve into build/ (Release). Used by test.sh, demo.sh
# and docker/Dockerfile.
#   scripts/build.sh [build|all] [CMAKE_ARGS...]   (CMake arguments apply on first configure)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh "${1:-all}"
if [ ! -f build/build.ninja ]; then
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "${@:2}"
fi
cmake --build build

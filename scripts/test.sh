#!/usr/bin/env bash
# README's test command: installs what is missing, builds, checks formatting,
# runs every test (CTest), then the checking builds (scripts/sanitize.sh:
# ASan/UBSan tests, fuzzers, thread-safety analysis; TLSERVE_SKIP_SANITIZE=1
# skips them). Exit status 0 only when all of it passes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh all
bash scripts/check-format.sh
(cd build && ctest --output-on-failure --timeout 900 "$@")
bash scripts/sanitize.sh

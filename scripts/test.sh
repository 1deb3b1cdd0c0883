#!/usr/bin/env bash
# README's test command: installs what is missing, builds, checks formatting
# and runs every test (CTest). Exit status 0 only when all of it passes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh all
bash scripts/check-format.sh
cd build
ctest --output-on-failure --timeout 900 "$@"

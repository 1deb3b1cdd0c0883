#!/usr/bin/env bash
# Prints, one per line, the Debian packages that hold the shared libraries
# BINARY... link directly (apt brings what those need), plus
# libopenblas0-pthread (LibTorch reaches its BLAS through Debian's
# alternatives, not a direct link; without it a ResNet runs 8x slower).
# The runtime stage of docker/Dockerfile installs this list, so it is derived
# from the binaries instead of being a second list to keep in step.
# With --bundled DIR (an image that ships its own LibTorch, e.g. the CUDA one),
# libraries under DIR are skipped and no OpenBLAS is added.
#   scripts/runtime-packages.sh build/bin/tlserve build/bin/tlctl
#   scripts/runtime-packages.sh --bundled /opt/libtorch build/bin/tlserve build/bin/tlctl
set -euo pipefail
BUNDLED=""
if [ "${1:-}" = --bundled ]; then
  BUNDLED=$(readlink -f "$2")
  shift 2
fi
[ $# -gt 0 ] || { echo "usage: $0 [--bundled DIR] BINARY..." >&2; exit 2; }
{
  for bin in "$@"; do
    for lib in $(objdump -p "$bin" | awk '/NEEDED/{print $2}'); do
      path=$(ldd "$bin" | awk -v l="$lib" '$1 == l {print $3}')
      [ -n "$path" ] || { echo "runtime-packages: $bin needs $lib, which is not found" >&2; exit 1; }
      real=$(readlink -f "$path")
      [ -z "$BUNDLED" ] || [ "${real#"$BUNDLED"/}" = "$real" ] || continue
      # usrmerge: dpkg may know the file under /lib or /usr/lib.
      dpkg -S "$real" 2>/dev/null || dpkg -S "${real#/usr}" 2>/dev/null ||
        { echo "runtime-packages: no package holds $real" >&2; exit 1; }
    done
  done | cut -d: -f1
  [ -n "$BUNDLED" ] || echo libopenblas0-pthread
} | sort -u

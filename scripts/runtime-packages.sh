#!/usr/bin/env bash
# Prints, one per line, the Debian packages that hold the shared libraries
# BINARY... link directly (apt brings what those need), plus
# libopenblas0-pthread (LibTorch reaches its BLAS through Debian's
# alternatives, not a direct link; without it a ResNet runs 8x slower).
# The runtime stage of docker/Dockerfile installs this list, so it is derived
# from the binaries instead of being a second list to keep in step.
#   scripts/runtime-packages.sh build/bin/tlserve build/bin/tlctl
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 BINARY..." >&2; exit 2; }
{
  for bin in "$@"; do
    for lib in $(objdump -p "$bin" | awk '/NEEDED/{print $2}'); do
      path=$(ldd "$bin" | awk -v l="$lib" '$1 == l {print $3}')
      [ -n "$path" ] || { echo "runtime-packages: $bin needs $lib, which is not found" >&2; exit 1; }
      real=$(readlink -f "$path")
      # usrmerge: dpkg may know the file under /lib or /usr/lib.
      dpkg -S "$real" 2>/dev/null || dpkg -S "${real#/usr}" 2>/dev/null ||
        { echo "runtime-packages: no package holds $real" >&2; exit 1; }
    done
  done | cut -d: -f1
  echo libopenblas0-pthread
} | sort -u

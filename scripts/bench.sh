#!/usr/bin/env bash
# Runs the benchmarks (not tests) and prints their tables; record them in
# docs/benchmarks.md with the date and the machine.
#   scripts/bench.sh [embed_bench flags, e.g. --batches=16 --device=cuda]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh all
mkdir -p var/backbones var/bench
[ -f var/backbones/resnet50.pt ] ||
  /usr/bin/python3 scripts/make_backbone.py --arch resnet50 --out var/backbones/resnet50.pt
[ -f var/bench/photo.jpg ] || /usr/bin/python3 - <<'PY'
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
h, w = 480, 640
img = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 50, h)[:, None, None] + rng.normal(0, 20, (h, w, 3))
Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save("var/bench/photo.jpg", quality=90)
PY
echo "machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
build/bin/embed_bench --backbone=var/backbones/resnet50.pt --image=var/bench/photo.jpg "$@" 2>/dev/null

#!/usr/bin/env bash
# Runs the benchmarks (not tests) and prints their tables; record them in
# docs/benchmarks.md with the date and the machine.
#   scripts/bench.sh [embed_bench flags, e.g. --batches=16 --device=cuda]
#       served vs in-process Embed on a ResNet-50 (bench/embed_bench.cc; the default)
#   scripts/bench.sh multi_tenant [flags]
#       16 head-only models' Classify vs the same load as Embed (bench/multi_tenant.py)
#   scripts/bench.sh serving_during_training [flags]
#       Embed while a fine-tune runs vs idle; fine-tuning from a cached vs a
#       recomputed prefix (bench/serving_during_training.py)
#   scripts/bench.sh load_abuse [flags]      (bench/load_abuse.py)
# The Python benchmarks take --device, --precision, --max_batch_size, --threads,
# --train_threads, --backbone (default var/backbones/resnet18.pt, made here) and
# --help. TLSERVE_BENCH_NO_BUILD=1 skips the build (when build/ is already built).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${TLSERVE_BENCH_NO_BUILD:-0}" = 1 ] || bash scripts/build.sh all
mkdir -p var/backbones var/bench
echo "machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
case "${1:-}" in
  multi_tenant | serving_during_training | load_abuse)
    name=$1
    shift
    [ -f var/backbones/resnet18.pt ] ||
      /usr/bin/python3 scripts/make_backbone.py --arch resnet18 --out var/backbones/resnet18.pt
    exec /usr/bin/python3 "bench/$name.py" "$@"
    ;;
esac
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
build/bin/embed_bench --backbone=var/backbones/resnet50.pt --image=var/bench/photo.jpg "$@" 2>/dev/null

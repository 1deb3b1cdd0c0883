#!/usr/bin/env bash
# README's first command: installs what is missing, builds, makes the default
# backbone if needed (a ResNet-18 that tlserve itself pretrains on
# Fashion-MNIST classes 0-4, cached in var/backbones), starts tlserve on it,
# and runs the whole story on classes it has never seen (5-9): upload, train
# a head, unfreeze layer4 and fine-tune, classify held-out test images, an
# accuracy table, the metrics. Then keeps serving until Ctrl-C (or exits at
# once with --no-wait).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${TLSERVE_PORT:-50051}
METRICS_PORT=${TLSERVE_METRICS_PORT:-9090}
VAR=var
PY=/usr/bin/python3
START=$SECONDS
step() { printf '\n\033[1m==> [%3ds] %s\033[0m\n' "$((SECONDS - START))" "$*" >&2; }

step "installing packages and building (first time: several minutes)"
bash scripts/build.sh all

mkdir -p "$VAR/backbones"
BACKBONE="$VAR/backbones/fmnist-resnet18.pt"
step "the default backbone $BACKBONE (made once, by tlserve; about 2 minutes)"
$PY scripts/pretrain_backbone.py --bin build/bin --out "$BACKBONE"
if [ ! -d "$VAR/target-test" ]; then
  # Target classes 5-9: sandal, shirt, sneaker, bag, ankle-boot.
  $PY scripts/sample_images.py "$VAR/target-train" --count 100 --classes 5,6,7,8,9 --split train
  $PY scripts/sample_images.py "$VAR/target-test" --count 100 --classes 5,6,7,8,9 --split test
fi

step "starting tlserve on port $PORT (metrics on $METRICS_PORT), log in $VAR/tlserve.log"
build/bin/tlserve --backbone="$BACKBONE" --port="$PORT" --metrics_port="$METRICS_PORT" \
  --data_dir="$VAR/tlserve-data" 2> "$VAR/tlserve.log" &
SERVER=$!
stop() { kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }
trap 'echo; echo "stopping tlserve" >&2; stop; exit 130' INT TERM
trap stop EXIT
TLCTL="build/bin/tlctl --server=localhost:$PORT"
for _ in $(seq 1 120); do
  $TLCTL health >/dev/null 2>&1 && break
  kill -0 "$SERVER" 2>/dev/null || { echo "tlserve exited; see $VAR/tlserve.log" >&2; exit 1; }
  sleep 0.5
done
$TLCTL health

step "tlctl summary: the backbone's stages"
$TLCTL summary
step "tlctl embed: one vector per image"
$TLCTL embed "$VAR/target-test/sandal/"0000*.png 2>/dev/null | cut -c1-100 | head -3

step "upload 500 labelled images of 5 classes the backbone never saw"
$TLCTL delete-model demo >/dev/null 2>&1 || true
$TLCTL delete-dataset demo >/dev/null 2>&1 || true
$TLCTL upload "$VAR/target-train" --dataset demo

step "transfer learning 1 (feature extraction): train a new head on the frozen backbone -> v1"
$TLCTL create-model demo --dataset demo >/dev/null
$TLCTL train demo --dataset demo --wait

step "transfer learning 2 (fine-tuning): unfreeze layer4 (a private copy), train it with the head -> v2"
$TLCTL unfreeze demo --from layer4 | grep -E "layer4|stages:" || true
$TLCTL train demo --dataset demo --epochs 15 --optimizer adamw --freeze-batchnorm --wait

step "classify 500 held-out test images with both versions"
for v in 1 2; do
  $TLCTL classify demo "$VAR/target-test" --version "$v" --top-k 1 --json > "$VAR/demo-v$v.predictions.json"
done
$PY - "$VAR" <<'PY'
import json, os, sys
print("| version                          | held-out accuracy |")
print("|----------------------------------|-------------------|")
for v, what in ((1, "v1: new head, frozen backbone"), (2, "v2: + layer4 fine-tuned")):
    p = json.load(open(os.path.join(sys.argv[1], "demo-v%d.predictions.json" % v)))["predictions"]
    ok = sum(x["top"][0]["label"] == os.path.basename(os.path.dirname(x["name"])) for x in p)
    print("| %-32s | %3d/%d = %.3f   |" % (what, ok, len(p), ok / len(p)))
PY

step "metrics"
echo "Prometheus metrics: http://localhost:$METRICS_PORT/metrics, e.g.:"
$PY - "$METRICS_PORT" <<'PY' || true
import sys, urllib.request
text = urllib.request.urlopen("http://localhost:%s/metrics" % sys.argv[1], timeout=5).read().decode()
print("\n".join(l for l in text.splitlines() if l.startswith(("tlserve_images_total", "tlserve_backbone_info", "tlserve_training_jobs", "tlserve_models "))))
PY
step "done in $((SECONDS - START)) s. Export a model: $TLCTL export demo --out demo.pt"
if [ "${1:-}" = "--no-wait" ]; then
  exit 0
fi
step "tlserve is serving on localhost:$PORT; try: build/bin/tlctl classify demo IMAGE.png. Ctrl-C stops it."
wait "$SERVER"

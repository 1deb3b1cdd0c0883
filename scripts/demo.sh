#!/usr/bin/env bash
# README's first command: installs what is missing, builds, makes the default
# backbone if needed, starts tlserve, shows its layers and an embedding with
# tlctl, and keeps serving until Ctrl-C (or exits at once with --no-wait).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${TLSERVE_PORT:-50051}
METRICS_PORT=${TLSERVE_METRICS_PORT:-9090}
VAR=var
step() { printf '\n\033[1m==> %s\033[0m\n' "$*" >&2; }

step "installing packages and building (first time: several minutes)"
bash scripts/build.sh all

mkdir -p "$VAR/backbones"
BACKBONE="$VAR/backbones/resnet50.pt"
if [ ! -f "$BACKBONE" ]; then
  step "making the default backbone $BACKBONE (ResNet-50; no weights can be downloaded here)"
  /usr/bin/python3 scripts/make_backbone.py --arch resnet50 --out "$BACKBONE"
fi
if [ ! -d "$VAR/samples" ]; then
  /usr/bin/python3 scripts/sample_images.py "$VAR/samples" --count 2
  /usr/bin/python3 scripts/sample_images.py "$VAR/demo-train" --count 30 --classes 0,1,5 --split train
  /usr/bin/python3 scripts/sample_images.py "$VAR/demo-test" --count 10 --classes 0,1,5 --split test
fi

step "starting tlserve on port $PORT (metrics on $METRICS_PORT), log in $VAR/tlserve.log"
build/bin/tlserve --backbone="$BACKBONE" --port="$PORT" --metrics_port="$METRICS_PORT" \
  --data_dir="$VAR/tlserve-data" 2> >(tee "$VAR/tlserve.log" >&2) &
SERVER=$!
stop() { kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }
trap 'stop; exit 130' INT TERM
trap stop EXIT
TLCTL="build/bin/tlctl --server=localhost:$PORT"
for _ in $(seq 1 120); do
  $TLCTL health >/dev/null 2>&1 && break
  kill -0 "$SERVER" 2>/dev/null || { echo "tlserve exited; see $VAR/tlserve.log" >&2; exit 1; }
  sleep 1
done
$TLCTL health

step "tlctl layers"
$TLCTL layers
step "tlctl summary --input 3x224x224"
$TLCTL summary --input 3x224x224
step "tlctl embed $VAR/samples (Fashion-MNIST test images)"
$TLCTL embed "$VAR/samples"
step "transfer learning: upload 90 labelled images, train a head, classify 30 held-out ones"
$TLCTL delete-model demo >/dev/null 2>&1 || true
$TLCTL delete-dataset demo >/dev/null 2>&1 || true
$TLCTL upload "$VAR/demo-train" --dataset demo
$TLCTL create-model demo --dataset demo >/dev/null
$TLCTL train demo --dataset demo --wait
$TLCTL classify demo "$VAR/demo-test" --top-k 1 --json | /usr/bin/python3 -c '
import json, os, sys
p = json.load(sys.stdin)["predictions"]
ok = sum(x["top"][0]["label"] == os.path.basename(os.path.dirname(x["name"])) for x in p)
print("held-out accuracy: %d/%d = %.2f (random-weight backbone: see README)" % (ok, len(p), ok / len(p)))'

step "metrics"
echo "Prometheus metrics: http://localhost:$METRICS_PORT/metrics, e.g.:"
/usr/bin/python3 - "$METRICS_PORT" <<'PY' || true
import sys, urllib.request
text = urllib.request.urlopen("http://localhost:%s/metrics" % sys.argv[1], timeout=5).read().decode()
print("\n".join(l for l in text.splitlines() if l.startswith(("tlserve_images_total", "tlserve_backbone_info", "tlserve_training_jobs", "tlserve_models "))))
PY
if [ "${1:-}" = "--no-wait" ]; then
  exit 0
fi
step "tlserve is serving on localhost:$PORT; try: build/bin/tlctl embed IMAGE.jpg. Ctrl-C stops it."
wait "$SERVER"

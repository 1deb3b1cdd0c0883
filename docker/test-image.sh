#!/usr/bin/env bash
# Builds docker/Dockerfile here, where there is no Docker engine and no
# registry, and runs it: podman + buildah with runc, on a debian:bookworm-slim
# base made by debootstrap from this machine's own apt mirror and imported
# under its standard name (so the Dockerfile keeps `FROM debian:bookworm-slim`).
# Then it starts a container (non-root, read-only root filesystem) with a
# small random-weight ResNet-18 backbone mounted, checks health, `tlctl
# summary` and `tlctl embed` against it (from the host and from inside the
# image) and the metrics endpoint, a clean exit on SIGTERM, then builds it again
# with the backbone baked in (--build-arg BACKBONE) and checks that it serves;
# and removes what it made. The last line
# gives the image size and the times.
#
#   bash docker/test-image.sh            (as root, or with sudo; needs the network to Debian's mirror)
#   KEEP_IMAGE=1 bash docker/test-image.sh   keeps tlserve:test afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
T0=$SECONDS
say() { printf '\n==> [%4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }

say "packages: podman buildah debootstrap runc (and the project's, for tlctl and the backbone)"
bash scripts/build.sh all >/dev/null
missing=()
for p in podman buildah debootstrap runc; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# crun refuses this machine's cgroup layout; runc with explicit ulimits works.
RUNTIME=(--runtime runc)
ULIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=32768:32768)
PODMAN="$SUDO podman"

WORK=$(mktemp -d /tmp/tlserve-image-test.XXXXXX)
NAME=tlserve-image-test-$$
IMPORTED=""
cleanup() {
  $PODMAN rm -f "$NAME" "$NAME-baked" >/dev/null 2>&1 || true
  $PODMAN rmi -f tlserve:test-baked >/dev/null 2>&1 || true
  rm -f var/backbones/.test-image-$$.pt
  $PODMAN volume rm -f "$NAME-data" >/dev/null 2>&1 || true
  [ -n "${KEEP_IMAGE:-}" ] || $PODMAN rmi -f tlserve:test >/dev/null 2>&1 || true
  [ -z "$IMPORTED" ] || $PODMAN rmi -f docker.io/library/debian:bookworm-slim >/dev/null 2>&1 || true
  $PODMAN image prune -f >/dev/null 2>&1 || true
  $SUDO rm -rf "$WORK"
}
trap cleanup EXIT

T_BASE=$SECONDS
if ! $PODMAN image exists docker.io/library/debian:bookworm-slim; then
  # The machine's own mirror: no host name is written into the repository.
  MIRROR=$( { cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true; } |
           awk '$1 == "URIs:" || $1 == "deb" {print ($1 == "deb" && $2 ~ /^\[/) ? $3 : $2}' |
           grep -v security | head -1 || true)
  [ -n "$MIRROR" ] || { echo "test-image: no apt mirror found in /etc/apt" >&2; exit 1; }
  say "base image: debootstrap --variant=minbase bookworm from $MIRROR"
  $SUDO debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  $SUDO tar -C "$WORK/rootfs" -c . | $PODMAN import - docker.io/library/debian:bookworm-slim >/dev/null
  IMPORTED=1
fi
T_BASE=$((SECONDS - T_BASE))

say "podman build -f docker/Dockerfile -t tlserve:test ."
T_BUILD=$SECONDS
$PODMAN build "${RUNTIME[@]}" "${ULIMITS[@]}" -f docker/Dockerfile -t tlserve:test . 2>&1 |
  grep -E 'STEP|COMMIT|Successfully|rror' >&2
T_BUILD=$((SECONDS - T_BUILD))
SIZE=$($PODMAN image inspect tlserve:test --format '{{.Size}}')

say "the runtime image: user, files, no build tools"
[ "$($PODMAN run --rm "${RUNTIME[@]}" "${ULIMITS[@]}" --entrypoint id tlserve:test -u)" = 10001 ]
$PODMAN run --rm "${RUNTIME[@]}" "${ULIMITS[@]}" --entrypoint sh tlserve:test -c \
  'command -v tlserve && command -v tlctl && ! command -v g++ && ! command -v cmake && test -d /var/lib/tlserve'

say "a backbone to mount: ResNet-18, random weights, 64x64 input"
/usr/bin/python3 scripts/make_backbone.py --arch resnet18 --resize 72 --crop 64 --out "$WORK/backbone.pt"
chmod 644 "$WORK/backbone.pt"
/usr/bin/python3 scripts/sample_images.py "$WORK/images" --count 2 --classes 0,5

PORT=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
MPORT=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
say "podman run: gRPC on 127.0.0.1:$PORT, metrics on $MPORT, read-only root"
T_START=$SECONDS
$PODMAN run -d --name "$NAME" "${RUNTIME[@]}" "${ULIMITS[@]}" --read-only --tmpfs /tmp \
  -p "127.0.0.1:$PORT:50051" -p "127.0.0.1:$MPORT:9090" \
  -v "$WORK/backbone.pt:/models/backbone.pt:ro" -v "$NAME-data:/var/lib/tlserve" \
  tlserve:test --threads=2 >/dev/null
TLCTL="build/bin/tlctl --server=127.0.0.1:$PORT"
for _ in $(seq 1 120); do
  $TLCTL health >/dev/null 2>&1 && break
  [ "$($PODMAN inspect -f '{{.State.Running}}' "$NAME")" = true ] || { $PODMAN logs "$NAME" >&2; exit 1; }
  sleep 0.5
done
T_START=$((SECONDS - T_START))
$TLCTL health
$TLCTL summary | head -16
$TLCTL embed "$WORK/images" | cut -c1-90
say "tlctl inside the container"
$PODMAN exec "$NAME" tlctl --server=localhost:50051 layers | head -3
say "metrics"
/usr/bin/python3 - "$MPORT" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % sys.argv[1], timeout=10).read().decode()
lines = [l for l in text.splitlines() if l.startswith(("tlserve_images_total", "tlserve_backbone_info"))]
assert lines, "no tlserve metrics"
print("\n".join(lines))
PY
$PODMAN logs "$NAME" 2>&1 | tail -3
$PODMAN stop -t 30 "$NAME" >/dev/null
[ "$($PODMAN inspect -f '{{.State.ExitCode}}' "$NAME")" = 0 ] || { echo "tlserve did not exit 0 on SIGTERM" >&2; exit 1; }
say "baked in: --build-arg BACKBONE=... (the builder's layers come from the cache)"
mkdir -p var/backbones
BAKED=var/backbones/.test-image-$$.pt
cp "$WORK/backbone.pt" "$BAKED"
T_BAKED=$SECONDS
$PODMAN build "${RUNTIME[@]}" "${ULIMITS[@]}" -f docker/Dockerfile --build-arg BACKBONE="$BAKED" \
  -t tlserve:test-baked . 2>&1 | grep -E 'STEP|COMMIT|Successfully|rror' >&2 || true
rm -f "$BAKED"
$PODMAN run -d --name "$NAME-baked" "${RUNTIME[@]}" "${ULIMITS[@]}" --read-only --tmpfs /tmp \
  tlserve:test-baked --threads=2 >/dev/null
for _ in $(seq 1 120); do
  $PODMAN exec "$NAME-baked" tlctl health >/dev/null 2>&1 && break
  sleep 0.5
done
$PODMAN exec "$NAME-baked" tlctl health
$PODMAN exec "$NAME-baked" tlctl --json summary | /usr/bin/python3 -c '
import json, sys
s = json.load(sys.stdin)
assert s["embedding_dim"] == 512, s
print("baked backbone serves: %d stages, embedding dim %d" % (len(s["stages"]), s["embedding_dim"]))'
$PODMAN rm -f "$NAME-baked" >/dev/null
$PODMAN rmi -f tlserve:test-baked >/dev/null
T_BAKED=$((SECONDS - T_BAKED))
printf 'test-image: PASS: image tlserve:test %.0f MB; base image %ds, build %ds, container healthy in %ds, baked-backbone build and run %ds, total %ds\n' \
  "$(awk -v s="$SIZE" 'BEGIN{print s/1e6}')" "$T_BASE" "$T_BUILD" "$T_START" "$T_BAKED" "$((SECONDS - T0))"

#!/usr/bin/env bash
# Builds docker/Dockerfile here, where there is no Docker engine and no
# registry, and runs it: podman + buildah with runc, on a debian:bookworm-slim
# base made by debootstrap from this machine's own apt mirror and imported
# under its standard name (so the Dockerfile keeps `FROM debian:bookworm-slim`).
# Then it starts a container (non-root, read-only root filesystem) with a
# small random-weight ResNet-18 backbone mounted, checks health, `tlctl
# summary` and `tlctl embed` against it (from the host and from inside the
# image) and the metrics endpoint, a clean exit on SIGTERM; then runs it with
# TLS (a CA and a server certificate for localhost/127.0.0.1 made here with
# openssl), an API key and a metrics token, and checks that tlctl with the CA
# and the key works, that no key or a wrong one gets UNAUTHENTICATED (and is
# in the audit log), that plaintext gets nowhere, that the plaintext health
# port answers, and that /metrics wants HTTPS and the token; then builds it again with the backbone
# baked in (--build-arg BACKBONE) and checks that it serves; and removes what it
# made. The last line gives the image size and the times.
#
#   bash docker/test-image.sh            (as root, or with sudo; needs the network to Debian's mirror)
#   KEEP_IMAGE=1 bash docker/test-image.sh   keeps tlserve:test afterwards
#   TLSERVE_HOST_BIN=DIR bash docker/test-image.sh   the host's tlctl from DIR (already built)
#                                        instead of building build/ here first
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
T0=$SECONDS
say() { printf '\n==> [%4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }

say "packages: podman buildah debootstrap runc openssl (and the project's, for tlctl and the backbone)"
if [ -n "${TLSERVE_HOST_BIN:-}" ]; then
  HOST_BIN=$(cd "$TLSERVE_HOST_BIN" && pwd)
else
  bash scripts/build.sh all >/dev/null
  HOST_BIN=$PWD/build/bin
fi
missing=()
for p in podman buildah debootstrap runc openssl; do
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
  # One at a time: podman 4.3's `rm -f` of several names removes none when one
  # is missing. -v: the anonymous volume each gets for VOLUME /var/lib/tlserve.
  for c in "$NAME" "$NAME-tls" "$NAME-baked"; do $PODMAN rm -f -v "$c" >/dev/null 2>&1 || true; done
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
TLCTL="$HOST_BIN/tlctl --server=127.0.0.1:$PORT"
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

say "TLS and an API key: a CA and a server certificate for localhost and 127.0.0.1 (openssl)"
T_TLS=$SECONDS
SEC=$WORK/secrets
mkdir -p "$SEC"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=tlserve-test-ca \
  -keyout "$WORK/ca.key" -out "$SEC/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
  -keyout "$SEC/tls.key" -out "$WORK/tls.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' \
  >"$WORK/san.ext"
openssl x509 -req -in "$WORK/tls.csr" -CA "$SEC/ca.crt" -CAkey "$WORK/ca.key" -CAcreateserial \
  -CAserial "$WORK/ca.srl" -days 2 -extfile "$WORK/san.ext" -out "$SEC/tls.crt" 2>/dev/null
KEY=$(openssl rand -hex 32)
printf 'acme admin %s image-test\n' "$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)" >"$SEC/api_keys"
METRICS_TOKEN=$(openssl rand -hex 16)
printf %s "$METRICS_TOKEN" >"$SEC/metrics_token"
chmod 755 "$SEC"
chmod 644 "$SEC"/*   # the container's user (10001) reads them; throw-away secrets
TPORT=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
HPORT=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
TMPORT=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
say "podman run: gRPC over TLS on $TPORT, plaintext health on $HPORT, HTTPS metrics with a token on $TMPORT"
$PODMAN run -d --name "$NAME-tls" "${RUNTIME[@]}" "${ULIMITS[@]}" --read-only --tmpfs /tmp \
  -p "127.0.0.1:$TPORT:50051" -p "127.0.0.1:$HPORT:8081" -p "127.0.0.1:$TMPORT:9090" \
  -v "$WORK/backbone.pt:/models/backbone.pt:ro" -v "$SEC:/etc/tlserve-secrets:ro" \
  tlserve:test --threads=2 --tls_cert=/etc/tlserve-secrets/tls.crt --tls_key=/etc/tlserve-secrets/tls.key \
  --api_keys=/etc/tlserve-secrets/api_keys --health_port=8081 --audit_log=/var/lib/tlserve/audit.log \
  --metrics_tls --metrics_token_file=/etc/tlserve-secrets/metrics_token >/dev/null
HEALTH=("$HOST_BIN/tlctl" --server="127.0.0.1:$HPORT" health)
for _ in $(seq 1 120); do
  env -u TLSERVE_TOKEN "${HEALTH[@]}" >/dev/null 2>&1 && break
  [ "$($PODMAN inspect -f '{{.State.Running}}' "$NAME-tls")" = true ] || { $PODMAN logs "$NAME-tls" >&2; exit 1; }
  sleep 0.5
done
echo "the plaintext health port, no key: $(env -u TLSERVE_TOKEN "${HEALTH[@]}")"
TLS_TLCTL=("$HOST_BIN/tlctl" --server="localhost:$TPORT" --tls_ca="$SEC/ca.crt")
env -u TLSERVE_TOKEN "${TLS_TLCTL[@]}" --token="$KEY" summary | sed -n 1,4p
TLSERVE_TOKEN=$KEY "$HOST_BIN/tlctl" --server="127.0.0.1:$TPORT" --tls_ca="$SEC/ca.crt" --json summary |
  /usr/bin/python3 -c 'import json, sys; print("with TLSERVE_TOKEN set, to 127.0.0.1: embedding dim", json.load(sys.stdin)["embedding_dim"])'
# expect_fail WORDS COMMAND...: the command must fail, saying WORDS.
expect_fail() {
  local words=$1 out
  shift
  if out=$(env -u TLSERVE_TOKEN "$@" 2>&1); then
    echo "test-image: '$*' worked, but should have failed with $words" >&2
    exit 1
  fi
  grep -q -- "$words" <<<"$out" || { echo "test-image: '$*' failed without $words: $out" >&2; exit 1; }
  echo "refused as it should be ($words): $(head -1 <<<"$out")"
}
expect_fail UNAUTHENTICATED "${TLS_TLCTL[@]}" summary
expect_fail UNAUTHENTICATED "${TLS_TLCTL[@]}" --token="wrong-$KEY" summary
expect_fail UNAVAILABLE "$HOST_BIN/tlctl" --server="127.0.0.1:$TPORT" --token="$KEY" summary
$PODMAN exec "$NAME-tls" cat /var/lib/tlserve/audit.log | /usr/bin/python3 -c '
import json, sys
lines = [json.loads(l) for l in sys.stdin]
denied = [l for l in lines if l["outcome"] == "UNAUTHENTICATED"]
assert len(denied) >= 2, lines
print("audit log on the data volume: %d JSON lines, %d UNAUTHENTICATED" % (len(lines), len(denied)))'
/usr/bin/python3 - "$TMPORT" "$SEC/ca.crt" "$METRICS_TOKEN" <<'EOF'
import http.client, ssl, sys, urllib.error, urllib.request
port, ca, token = sys.argv[1:]
url = "https://localhost:%s/metrics" % port
ctx = ssl.create_default_context(cafile=ca)


def get(headers):
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10, context=ctx)


text = get({"Authorization": "Bearer " + token}).read().decode()
assert any(l.startswith("tlserve_") for l in text.splitlines()), "no tlserve metrics over HTTPS"
for headers in ({}, {"Authorization": "Bearer wrong"}):
    try:
        get(headers)
        raise SystemExit("/metrics answered without the right token (%s)" % headers)
    except urllib.error.HTTPError as e:
        assert e.code in (401, 403), e.code
try:
    urllib.request.urlopen("http://127.0.0.1:%s/metrics" % port, timeout=10).read()
    raise SystemExit("/metrics answered plain HTTP")
except (OSError, http.client.HTTPException):  # URLError is an OSError
    pass
print("metrics: HTTPS with the token; refused without it, with a wrong one, and over plain HTTP")
EOF
$PODMAN stop -t 30 "$NAME-tls" >/dev/null
[ "$($PODMAN inspect -f '{{.State.ExitCode}}' "$NAME-tls")" = 0 ] ||
  { $PODMAN logs "$NAME-tls" 2>&1 | tail -5 >&2; echo "tlserve (TLS) did not exit 0 on SIGTERM" >&2; exit 1; }
$PODMAN rm -v "$NAME-tls" >/dev/null
T_TLS=$((SECONDS - T_TLS))
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
$PODMAN rm -f -v "$NAME-baked" >/dev/null
$PODMAN rmi -f tlserve:test-baked >/dev/null
T_BAKED=$((SECONDS - T_BAKED))
printf 'test-image: PASS: image tlserve:test %.0f MB; base image %ds, build %ds, container healthy in %ds, TLS and keys %ds, baked-backbone build and run %ds, total %ds\n' \
  "$(awk -v s="$SIZE" 'BEGIN{print s/1e6}')" "$T_BASE" "$T_BUILD" "$T_START" "$T_TLS" "$T_BAKED" "$((SECONDS - T0))"

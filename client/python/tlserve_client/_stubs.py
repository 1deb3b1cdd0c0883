"""Python stubs for tlserve's proto/, generated on first use with Debian's
protoc and grpc_python_plugin (packages protobuf-compiler and
protobuf-compiler-grpc; the bundled protoc of python3-grpc-tools, 3.5, is too
old for proto3 `optional` fields) into a cache directory and put on sys.path.
Regenerated when a .proto file is newer than the stubs.

Set TLSERVE_PY_STUBS to choose the directory (default: _gen beside this
package, or ~/.cache/tlserve/py-stubs when that is not writable).
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "..", "proto"))
PROTOS = [
    "tlserve/v1/inference.proto",
    "tlserve/v1/datasets.proto",
    "tlserve/v1/evaluation.proto",
    "tlserve/v1/models.proto",
]


def _target():
    if os.environ.get("TLSERVE_PY_STUBS"):
        return os.environ["TLSERVE_PY_STUBS"]
    local = os.path.join(HERE, "..", "_gen")
    if os.access(os.path.dirname(local), os.W_OK):
        return os.path.normpath(local)
    return os.path.join(os.path.expanduser("~"), ".cache", "tlserve", "py-stubs")


def _stale(out):
    stamp = os.path.join(out, "tlserve", "v1", "models_pb2_grpc.py")
    if not os.path.exists(stamp):
        return True
    newest = max(os.path.getmtime(os.path.join(PROTO_DIR, p)) for p in PROTOS)
    return os.path.getmtime(stamp) < newest


def generate(out=None):
    """Generates the stubs into `out` (atomically: a temporary directory
    renamed into place) and returns it."""
    out = out or _target()
    if not _stale(out):
        return out
    protoc, plugin = shutil.which("protoc"), shutil.which("grpc_python_plugin")
    if not protoc or not plugin:
        sys.exit("tlserve_client: the gRPC code generator is missing; install it with "
                 "`apt-get install protobuf-compiler protobuf-compiler-grpc` (Debian)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".stubs-", dir=parent)
    cmd = [protoc, "-I" + PROTO_DIR, "--python_out=" + tmp, "--grpc_python_out=" + tmp,
           "--plugin=protoc-gen-grpc_python=" + plugin] + [os.path.join(PROTO_DIR, p) for p in PROTOS]
    subprocess.run(cmd, check=True)
    for d in ("tlserve", os.path.join("tlserve", "v1")):
        open(os.path.join(tmp, d, "__init__.py"), "a").close()
    old = out + ".old-%d" % os.getpid()
    if os.path.exists(out):
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:  # another process won the race: its stubs are as good
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    for leftover in glob.glob(os.path.join(parent, ".stubs-*")):
        if os.path.getmtime(leftover) < os.path.getmtime(out) - 3600:
            shutil.rmtree(leftover, ignore_errors=True)
    return out


def load():
    out = generate()
    if out not in sys.path:
        sys.path.insert(0, out)

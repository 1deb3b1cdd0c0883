#!/usr/bin/env python3
"""The Python example client (client/python/example.py, stubs generated from
proto/ by Debian's protoc + grpc_python_plugin, stock grpcio) against a live server: embed,
upload, train with progress, classify, export; its printed results are
checked, and what it claims is checked against the server with tlctl.

usage: python_client_test.py BIN_DIR FIXTURES_DIR
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "client", "python"))
from tlserve_client.local_server import LocalServer  # noqa: E402

BIN, FIX = sys.argv[1], sys.argv[2]
# The server's device: TLSERVE_TEST_DEVICE=cuda runs the suite on the GPU (the flag
# comes after LocalServer's own --device=cpu, and the last one counts).
DEVICE_FLAGS = ["--device=" + (os.environ.get("TLSERVE_TEST_DEVICE") or "cpu")]


def main():
    tmp = tempfile.mkdtemp(prefix="tlserve-pyclient-")
    try:
        with LocalServer(BIN, os.path.join(FIX, "r18small.pt"), os.path.join(tmp, "data"),
                         extra_flags=DEVICE_FLAGS) as s:
            r = subprocess.run(
                [sys.executable, os.path.join(HERE, "..", "..", "client", "python", "example.py"),
                 "--server", s.target, "--train", os.path.join(FIX, "fmnist", "train"),
                 "--test", os.path.join(FIX, "fmnist", "test"), "--model", "py",
                 "--export", os.path.join(tmp, "py.pt")],
                capture_output=True, text=True, timeout=600)
            print(r.stdout)
            assert r.returncode == 0, r.stderr
            out = r.stdout
            assert re.search(r"embed: 4 images -> \(4, 512\) vectors", out), out
            assert "upload: 120 accepted, 0 rejected into dataset py (120 images)" in out, out
            assert re.search(r"features \d+/\d+", out) and "SUCCEEDED" in out, "no progress shown"
            m = re.search(r"classify: (\d+)/60 held-out images right", out)
            assert m and int(m.group(1)) >= 45, out  # 3 classes; measured 58/60
            model = json.loads(s.tlctl("describe-model", "py", "--json"))
            assert model["served_version"] == 1, model
            assert os.path.getsize(os.path.join(tmp, "py.pt")) > 1 << 20
            # A server that is not there: a clear message, not a hang.
            r = subprocess.run(
                [sys.executable, "-c",
                 "import sys; sys.path.insert(0, %r); from tlserve_client import Client; Client('127.0.0.1:1', timeout=2)"
                 % os.path.join(HERE, "..", "..", "client", "python")],
                capture_output=True, text=True, timeout=60)
            assert r.returncode != 0 and "no tlserve server answers at 127.0.0.1:1" in r.stderr, r.stderr
            # Client-side balancing: round_robin over a list of addresses (here the same
            # server twice; replicas_test spreads calls over two replicas); another policy
            # is refused before any connection.
            code = ("import sys; sys.path.insert(0, %r); from tlserve_client import Client; "
                    "c = Client('ipv4:%s,%s', lb_policy='round_robin'); "
                    "print(len(c.embed([open(%r, 'rb').read()] * 3)))" % (
                        os.path.join(HERE, "..", "..", "client", "python"), s.target, s.target,
                        os.path.join(FIX, "rgb_png.png")))
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and r.stdout.strip() == "3", (r.stdout, r.stderr)
            r = subprocess.run(
                [sys.executable, "-c",
                 "import sys; sys.path.insert(0, %r); from tlserve_client import Client; "
                 "Client('127.0.0.1:1', lb_policy='random')"
                 % os.path.join(HERE, "..", "..", "client", "python")],
                capture_output=True, text=True, timeout=60)
            assert r.returncode != 0 and "lb_policy 'random'" in r.stderr, r.stderr
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""API keys and TLS from the client side: tlctl and the Python client against
live servers with --tls_cert/--tls_key, --tls_client_ca and --api_keys.

Certificates are made with the openssl CLI: a CA, a server certificate for
localhost and 127.0.0.1, a client certificate (CN acme-client), and a second,
untrusted CA with a client certificate of its own. Three servers run:
  tls   TLS + keys (acme write, acme read, globex write, ops admin)
  mtls  TLS + client certificates from the CA + keys (acme-client's CN is an
        acme read key)
  plain plaintext + keys (a token over plaintext must still work)

usage: security_test.py BIN_DIR FIXTURES_DIR
"""
import hashlib
import os
import secrets
import shutil
import socket
import signal
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "client", "python"))
import grpc  # noqa: E402
from tlserve_client import Client, models_pb2  # noqa: E402

BIN, FIX = sys.argv[1], sys.argv[2]
DEVICE = os.environ.get("TLSERVE_TEST_DEVICE") or "cpu"
KEYS = {name: secrets.token_hex(16) for name in ("acme_write", "acme_read", "globex_write", "admin")}
HAS_TENANT = "tenant" in models_pb2.Model.DESCRIPTOR.fields_by_name


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(key):
    return hashlib.sha256(key.encode()).hexdigest()


def openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=cwd, check=True, capture_output=True)


def make_certificates(d):
    if not shutil.which("openssl"):
        sys.exit("security_test makes its certificates with the openssl CLI: install openssl")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "rogue-ca"):
        openssl("req", "-x509", *ec, "-keyout", ca + ".key", "-out", ca + ".pem", "-days", "2",
                "-subj", "/CN=tlserve test " + ca, "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    leaves = [("server", "ca", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                            "extendedKeyUsage=serverAuth\n"),
              ("client", "ca", "acme-client", "extendedKeyUsage=clientAuth\n"),
              ("rogue-client", "rogue-ca", "acme-client", "extendedKeyUsage=clientAuth\n")]
    for name, ca, cn, ext in leaves:
        with open(os.path.join(d, name + ".ext"), "w") as f:
            f.write("basicConstraints=CA:FALSE\n" + ext)
        openssl("req", *ec, "-keyout", name + ".key", "-out", name + ".csr", "-subj", "/CN=" + cn,
                cwd=d)
        openssl("x509", "-req", "-in", name + ".csr", "-CA", ca + ".pem", "-CAkey", ca + ".key",
                "-CAcreateserial", "-out", name + ".pem", "-days", "2", "-extfile", name + ".ext",
                cwd=d)


class Server:
    def __init__(self, tmp, name, flags, client_flags):
        self.name, self.port = name, free_port()
        self.client_flags = client_flags  # what tlctl needs to reach it, less the token
        self.log_path = os.path.join(tmp, name + ".log")
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [os.path.join(BIN, "tlserve"), "--backbone=" + os.path.join(FIX, "r18tiny.pt"),
             "--port=%d" % self.port, "--metrics_port=0", "--host=127.0.0.1",
             "--device=" + DEVICE, "--data_dir=" + os.path.join(tmp, name + "-data")] + flags,
            stdout=self.log, stderr=self.log)

    def wait_healthy(self, token):
        for _ in range(1200):
            if self.process.poll() is not None:
                raise RuntimeError("%s server exited with %d: %s" % (
                    self.name, self.process.returncode, open(self.log_path).read()[-4000:]))
            r = subprocess.run(self.tlctl_cmd("--token=" + token, "health"), capture_output=True)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("%s server did not become healthy: %s" % (
            self.name, open(self.log_path).read()[-4000:]))

    def tlctl_cmd(self, *args, host="127.0.0.1", plain=False):
        return ([os.path.join(BIN, "tlctl"), "--server=%s:%d" % (host, self.port)] +
                ([] if plain else self.client_flags) + list(args))

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


class SecurityTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="tlserve-security-")
        cls.certs = os.path.join(cls.tmp, "certs")
        os.makedirs(cls.certs)
        make_certificates(cls.certs)
        keys = os.path.join(cls.tmp, "api_keys")
        with open(keys, "w") as f:
            f.write("# TENANT ROLE SHA256HEX [LABEL]\n"
                    "acme write %s acme-ci\n" % sha256(KEYS["acme_write"]) +
                    "acme read %s acme-dashboard\n" % sha256(KEYS["acme_read"]) +
                    "globex write %s globex-ci\n" % sha256(KEYS["globex_write"]) +
                    "ops admin %s ops\n" % sha256(KEYS["admin"]) +
                    "acme read cn:acme-client acme-client-cert\n")
        ca = ["--tls_ca=" + cls.cert("ca.pem")]
        tls = ["--tls_cert=" + cls.cert("server.pem"), "--tls_key=" + cls.cert("server.key"),
               "--api_keys=" + keys]
        cls.servers = [
            Server(cls.tmp, "tls", tls, ca),
            Server(cls.tmp, "mtls", tls + ["--tls_client_ca=" + cls.cert("ca.pem")],
                   ca + ["--tls_cert=" + cls.cert("client.pem"), "--tls_key=" + cls.cert("client.key")]),
            Server(cls.tmp, "plain", ["--api_keys=" + keys], []),
        ]
        cls.tls, cls.mtls, cls.plain = cls.servers
        for s in cls.servers:
            s.wait_healthy(KEYS["acme_write"])

    @classmethod
    def tearDownClass(cls):
        for s in cls.servers:
            s.stop()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def cert(cls, name):
        return os.path.join(cls.certs, name)

    def tlctl(self, server, *args, token=None, env_token=None, host="127.0.0.1", plain=False):
        env = {k: v for k, v in os.environ.items() if k != "TLSERVE_TOKEN"}
        if env_token is not None:
            env["TLSERVE_TOKEN"] = env_token
        cmd = server.tlctl_cmd(*args, host=host, plain=plain)
        if token is not None:
            cmd.insert(2, "--token=" + token)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)

    def client(self, server=None, token=None, timeout=10.0, **tls):
        server = server or self.tls
        if server is not self.plain and not tls:
            tls = {"root_certificates": self.cert("ca.pem")}
        return Client("127.0.0.1:%d" % server.port, token=token, timeout=timeout, **tls)

    def assertCode(self, code, fn, *args):
        with self.assertRaises(grpc.RpcError) as e:
            fn(*args)
        self.assertEqual(e.exception.code(), code, e.exception.details())

    # --- tlctl -------------------------------------------------------------
    def test_tlctl_with_a_key_over_tls(self):
        r = self.tlctl(self.tls, "summary", token=KEYS["acme_read"], host="localhost")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("Total params: 11,689,512", r.stdout)
        r = self.tlctl(self.tls, "create-model", "tlctl-m", "--classes", "a,b", "--json",
                       token=KEYS["acme_write"])
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.tlctl(self.tls, "models", token=KEYS["acme_read"])
        self.assertEqual(r.returncode, 0, r.stderr)
        # One tenant's list: no TENANT column.
        self.assertTrue(any(line.startswith("tlctl-m\t2 classes") for line in r.stdout.splitlines()),
                        r.stdout)

    def test_tlctl_streams_carry_the_key(self):
        images = os.path.join(self.tmp, "upload")
        for label in ("sandal", "trouser"):
            shutil.copytree(os.path.join(FIX, "fmnist", "train", label), os.path.join(images, label))
        r = self.tlctl(self.tls, "upload", images, "--dataset", "tlctl-ds", token=KEYS["acme_write"])
        self.assertEqual(r.returncode, 0, r.stderr)  # client streaming
        r = self.tlctl(self.tls, "datasets", token=KEYS["acme_read"])
        self.assertIn("tlctl-ds\t", r.stdout)
        png = os.path.join(FIX, "rgb_png.png")
        r = self.tlctl(self.tls, "embed", png, token=KEYS["acme_read"])  # bidirectional
        self.assertEqual(r.returncode, 0, r.stderr)
        for args in (("classify", "no-such-model", png), ("watch", "no-such-job")):
            r = self.tlctl(self.tls, *args, token=KEYS["acme_read"])  # NOT_FOUND, past the key check
            self.assertIn("NOT_FOUND", r.stderr, args)

    def test_tlctl_without_a_key_is_unauthenticated_with_a_hint(self):
        r = self.tlctl(self.tls, "models")
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("UNAUTHENTICATED", r.stderr)
        self.assertIn("--token", r.stderr)
        self.assertIn("$TLSERVE_TOKEN", r.stderr)
        r = self.tlctl(self.tls, "models", token="not-a-key")
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("UNAUTHENTICATED", r.stderr)

    def test_tlctl_read_key_cannot_write(self):
        r = self.tlctl(self.tls, "create-model", "tlctl-denied", "--classes", "a,b",
                       token=KEYS["acme_read"])
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("PERMISSION_DENIED", r.stderr)
        self.assertIn("hint: the API key's role", r.stderr)

    def test_tlctl_takes_the_key_from_the_environment(self):
        r = self.tlctl(self.tls, "models", env_token=KEYS["acme_read"])
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.tlctl(self.tls, "models", env_token="not-a-key", token=KEYS["acme_read"])
        self.assertEqual(r.returncode, 0, r.stderr)  # --token wins
        r = self.tlctl(self.tls, "create-model", "env-denied", "--classes", "a,b",
                       env_token=KEYS["acme_read"])
        self.assertIn("PERMISSION_DENIED", r.stderr)

    def test_tlctl_plaintext_to_a_tls_port_fails(self):
        r = self.tlctl(self.tls, "models", token=KEYS["acme_read"], plain=True)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("UNAVAILABLE", r.stderr)

    def test_tlctl_checks_the_server_certificate(self):
        r = self.tlctl(self.tls, "models", "--tls_ca=" + self.cert("rogue-ca.pem"),
                       token=KEYS["acme_read"])
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("over TLS", r.stderr)
        # tlctl's hyphenated spelling of the flags works too.
        r = self.tlctl(self.tls, "models", "--tls-ca", self.cert("ca.pem"), plain=True,
                       token=KEYS["acme_read"])
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_tlctl_unreadable_files_exit_2(self):
        for flag in ("--tls_ca=/no/such/ca.pem", "--tls_cert=/no/such/cert.pem"):
            r = self.tlctl(self.tls, "models", flag, token=KEYS["acme_read"])
            self.assertEqual(r.returncode, 2, r.stderr)
            self.assertIn("/no/such/", r.stderr)
        r = self.tlctl(self.tls, "models", "--tls_ca=" + os.path.join(self.tmp, "api_keys"),
                       token=KEYS["acme_read"])
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("not PEM", r.stderr)
        r = self.tlctl(self.tls, "models", "--tls_cert=" + self.cert("client.pem"),
                       token=KEYS["acme_read"])  # no --tls_key
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("--tls_key", r.stderr)

    def test_tlctl_tenants_are_apart_and_admin_lists_show_them(self):
        self.assertEqual(self.tlctl(self.tls, "create-model", "acme-only", "--classes", "a,b",
                                    token=KEYS["acme_write"]).returncode, 0)
        self.assertEqual(self.tlctl(self.tls, "create-model", "globex-only", "--classes", "a,b",
                                    token=KEYS["globex_write"]).returncode, 0)
        r = self.tlctl(self.tls, "describe-model", "acme-only", token=KEYS["globex_write"])
        self.assertIn("NOT_FOUND", r.stderr)
        r = self.tlctl(self.tls, "models", token=KEYS["globex_write"])
        self.assertNotIn("acme-only", r.stdout)
        self.assertIn("globex-only", r.stdout)
        if not HAS_TENANT:
            self.skipTest("proto/ has no `tenant` field yet")
        r = self.tlctl(self.tls, "models", token=KEYS["admin"])
        self.assertEqual(r.returncode, 0, r.stderr)
        rows = {line.split("\t")[1].split("/")[-1]: line.split("\t")[0]
                for line in r.stdout.splitlines()}
        self.assertEqual(rows.get("acme-only"), "acme", r.stdout)  # the TENANT column
        self.assertEqual(rows.get("globex-only"), "globex", r.stdout)
        r = self.tlctl(self.tls, "describe-model", "acme-only", "--json", token=KEYS["acme_read"])
        self.assertIn('"tenant":"acme"', r.stdout)

    def test_tlctl_client_certificates(self):
        r = self.tlctl(self.mtls, "models")  # the certificate's CN is an acme read key
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.tlctl(self.mtls, "create-model", "by-cert", "--classes", "a,b")
        self.assertIn("PERMISSION_DENIED", r.stderr)
        r = self.tlctl(self.mtls, "models", "--tls_ca=" + self.cert("ca.pem"), plain=True)
        self.assertEqual(r.returncode, 1, r.stderr)  # no client certificate
        r = self.tlctl(self.mtls, "models", "--tls_ca=" + self.cert("ca.pem"),
                       "--tls_cert=" + self.cert("rogue-client.pem"),
                       "--tls_key=" + self.cert("rogue-client.key"), plain=True)
        self.assertEqual(r.returncode, 1, r.stderr)  # one the server's CA did not sign

    def test_tlctl_token_over_plaintext(self):
        r = self.tlctl(self.plain, "models", token=KEYS["acme_read"])
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.tlctl(self.plain, "models")
        self.assertIn("UNAUTHENTICATED", r.stderr)

    # --- Python client -----------------------------------------------------
    def test_python_with_a_key_over_tls(self):
        with open(self.cert("ca.pem"), "rb") as f:
            ca = f.read()
        with self.client(token=KEYS["acme_write"], root_certificates=ca) as c:  # PEM bytes
            self.assertGreater(len(c.describe_backbone().stages), 0)
            c.create_model("py-m", classes=["a", "b"])
            m = c.models.GetModel(models_pb2.GetModelRequest(name="py-m"))
            self.assertEqual(list(m.classes), ["a", "b"])
            if HAS_TENANT:
                self.assertEqual(m.tenant, "acme")
        with self.client(token=KEYS["acme_read"]) as c:  # a file name
            names = [m.name for m in c.models.ListModels(models_pb2.ListModelsRequest()).models]
            self.assertIn("py-m", names)

    def test_python_streams_carry_the_key(self):
        with open(os.path.join(FIX, "rgb_png.png"), "rb") as f:
            png = f.read()
        with self.client(token=KEYS["acme_write"]) as c:
            r = c.upload("py-ds", [("a", "x.png", png), ("b", "y.png", png)])  # stream-unary
            self.assertEqual(r.accepted, 2)
            self.assertCode(grpc.StatusCode.NOT_FOUND, c.classify, "no-such-model", [png])  # stream-stream
            self.assertCode(grpc.StatusCode.NOT_FOUND, lambda: list(  # unary-stream
                c.models.WatchJob(models_pb2.WatchJobRequest(id="no-such-job"))))

    def test_python_without_or_with_a_wrong_key_is_unauthenticated(self):
        for token in (None, "not-a-key"):
            with self.client(token=token) as c:
                self.assertCode(grpc.StatusCode.UNAUTHENTICATED, c.describe_backbone)
                self.assertCode(grpc.StatusCode.UNAUTHENTICATED, c.upload, "py-x", [])

    def test_python_read_key_cannot_write(self):
        with self.client(token=KEYS["acme_read"]) as c:
            self.assertCode(grpc.StatusCode.PERMISSION_DENIED, c.create_model, "py-denied",
                            "", ["a", "b"])

    def test_python_plaintext_to_a_tls_port_fails(self):
        try:
            c = Client("127.0.0.1:%d" % self.tls.port, token=KEYS["acme_read"], timeout=5)
        except ConnectionError:
            return
        with c:
            self.assertCode(grpc.StatusCode.UNAVAILABLE, c.describe_backbone)

    def test_python_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "cannot read root_certificates file /no/such"):
            self.client(root_certificates="/no/such/ca.pem")
        with self.assertRaisesRegex(ValueError, "go together"):
            self.client(certificate_chain=self.cert("client.pem"))
        with self.assertRaisesRegex(ValueError, "printable ASCII"):
            self.client(token=KEYS["acme_read"] + "\n")

    def test_python_client_certificates(self):
        with self.client(self.mtls, root_certificates=self.cert("ca.pem"),
                         certificate_chain=self.cert("client.pem"),
                         private_key=self.cert("client.key")) as c:
            c.models.ListModels(models_pb2.ListModelsRequest())
        for chain, key in ((None, None), ("rogue-client.pem", "rogue-client.key")):
            extra = {"certificate_chain": self.cert(chain), "private_key": self.cert(key)} if chain else {}
            try:
                c = self.client(self.mtls, root_certificates=self.cert("ca.pem"), timeout=5, **extra)
            except ConnectionError:
                continue
            with c:
                with self.assertRaises(grpc.RpcError) as e:
                    c.models.ListModels(models_pb2.ListModelsRequest())
                self.assertEqual(e.exception.code(), grpc.StatusCode.UNAVAILABLE, chain)

    def test_python_token_over_plaintext(self):
        with self.client(self.plain, token=KEYS["acme_read"]) as c:
            c.models.ListModels(models_pb2.ListModelsRequest())
        with self.client(self.plain) as c:
            self.assertCode(grpc.StatusCode.UNAUTHENTICATED, c.models.ListModels,
                            models_pb2.ListModelsRequest())


class SighupTest(unittest.TestCase):
    """SIGHUP re-reads --api_keys at once, even a change the 1 s watcher cannot
    see (same inode, size and mtime): what an operator's `kill -HUP` is for."""

    def test_sighup_rereads_the_keys(self):
        tmp = tempfile.mkdtemp(prefix="tlserve-sighup-")
        try:
            keys = os.path.join(tmp, "api_keys")
            old, new = "old-key-1", "new-key-1"  # same length: the file keeps its size
            with open(keys, "w") as f:
                f.write("acme write %s ci\n" % sha256(old))
            server = Server(tmp, "sighup", ["--api_keys=" + keys], [])
            try:
                server.wait_healthy(old)
                st = os.stat(keys)
                with open(keys, "r+") as f:  # in place: the same inode
                    f.write("acme write %s ci\n" % sha256(new))
                os.utime(keys, ns=(st.st_atime_ns, st.st_mtime_ns))
                self.assertEqual(os.stat(keys).st_size, st.st_size)

                def models(key):
                    return subprocess.run(server.tlctl_cmd("--token=" + key, "models"),
                                          capture_output=True, text=True, timeout=60)
                time.sleep(2.5)  # the watcher's polls see nothing
                self.assertIn("UNAUTHENTICATED", models(new).stderr)
                server.process.send_signal(signal.SIGHUP)
                for _ in range(100):
                    if models(new).returncode == 0:
                        break
                    time.sleep(0.1)
                self.assertEqual(models(new).returncode, 0, open(server.log_path).read()[-2000:])
                self.assertIn("UNAUTHENTICATED", models(old).stderr)
                self.assertIn("received SIGHUP", open(server.log_path).read())
            finally:
                server.stop()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)

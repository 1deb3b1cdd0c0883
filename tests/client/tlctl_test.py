#!/usr/bin/env python3
"""tlctl against a live tlserve: every command, --json shapes, files out, errors.

usage: tlctl_test.py BIN_DIR FIXTURES_DIR
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np

BIN, FIX = sys.argv[1], sys.argv[2]
# The server's device: TLSERVE_TEST_DEVICE=cuda runs the suite on the GPU.
DEVICE = os.environ.get("TLSERVE_TEST_DEVICE") or "cpu"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TlctlTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="tlctl-test-")
        cls.port = free_port()
        cls.log = open(os.path.join(cls.tmp, "server.log"), "w")
        cls.server = subprocess.Popen(
            [os.path.join(BIN, "tlserve"), "--backbone=" + os.path.join(FIX, "r18small.pt"),
             "--port=%d" % cls.port, "--metrics_port=0", "--host=127.0.0.1", "--device=" + DEVICE,
             "--data_dir=" + os.path.join(cls.tmp, "data")], stderr=cls.log)
        for _ in range(600):
            if cls.server.poll() is not None:  # e.g. a device it cannot use: fail now, not in minutes
                raise RuntimeError("server exited with %d: %s" % (cls.server.returncode, open(cls.log.name).read()))
            if cls.run_tlctl("health").returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("server did not become healthy: " + open(cls.log.name).read())
        cls.images = os.path.join(cls.tmp, "images")
        os.makedirs(os.path.join(cls.images, "sub"))
        for f in ["rgb_png.png", "gray_jpg.jpg"]:
            shutil.copy(os.path.join(FIX, f), cls.images)
        shutil.copy(os.path.join(FIX, "small_png.png"), os.path.join(cls.images, "sub"))

    @classmethod
    def tearDownClass(cls):
        cls.server.terminate()
        cls.server.wait(timeout=60)
        cls.log.close()
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def run_tlctl(cls, *args):
        return subprocess.run([os.path.join(BIN, "tlctl"), "--server=127.0.0.1:%d" % cls.port] + list(args),
                              capture_output=True, text=True, timeout=120)

    def test_health(self):
        r = self.run_tlctl("health")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), "SERVING")

    def test_lb_round_robin_over_a_list_of_addresses_and_unknown_policies_refused(self):
        addr = "127.0.0.1:%d" % self.port
        r = subprocess.run([os.path.join(BIN, "tlctl"), "--server=ipv4:%s,%s" % (addr, addr),
                            "--lb=round_robin", "health"], capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), "SERVING")
        r = self.run_tlctl("--lb=random", "health")
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("round_robin", r.stderr)

    def test_layers_lists_modules_in_order(self):
        r = self.run_tlctl("layers")
        self.assertEqual(r.stdout.split(), ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2",
                                            "layer3", "layer4", "avgpool", "fc"])

    def test_summary_table_and_json(self):
        r = self.run_tlctl("summary", "--input", "3x128x128")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("Total params: 11,689,512", r.stdout)
        self.assertIn("[-1, 64, 64, 64]", r.stdout)
        j = json.loads(self.run_tlctl("summary", "--json").stdout)
        self.assertEqual(j["embedding_dim"], 512)
        self.assertEqual([s["name"] for s in j["stages"]][-1], "fc")
        for s in j["stages"]:
            self.assertEqual(set(s), {"name", "type", "output_shape", "params", "trainable", "head"})
        self.assertEqual(sum(s["params"] for s in j["stages"]), 11689512)

    def test_embed_json_csv_and_npy_agree(self):
        d = os.path.join(self.tmp, "out")
        os.makedirs(d, exist_ok=True)
        j = json.loads(self.run_tlctl("embed", self.images, "--json").stdout)
        self.assertEqual(j["dim"], 512)
        names = [e["name"] for e in j["embeddings"]]
        self.assertEqual(names, sorted(os.path.join(self.images, p) for p in
                                       ["rgb_png.png", "gray_jpg.jpg", "sub/small_png.png"]))
        r = self.run_tlctl("embed", self.images, "--out", os.path.join(d, "e.npy"))
        self.assertEqual(r.returncode, 0, r.stderr)
        npy = np.load(os.path.join(d, "e.npy"))
        self.assertEqual(npy.shape, (3, 512))
        np.testing.assert_array_equal(npy, np.array([e["vector"] for e in j["embeddings"]], np.float32))
        self.run_tlctl("embed", self.images, "--out", os.path.join(d, "e.csv"))
        with open(os.path.join(d, "e.csv")) as f:
            rows = [line.split(",") for line in f.read().splitlines()]
        self.assertEqual([r[0] for r in rows], names)
        np.testing.assert_allclose(np.array([[float(x) for x in r[1:]] for r in rows]), npy, rtol=1e-6)
        # The embedding equals PyTorch's for the same pipeline (tensor path).
        ref = np.fromfile(os.path.join(FIX, "img_rgb_png.tensor.r18small.f32"), np.float32)
        got = npy[names.index(os.path.join(self.images, "rgb_png.png"))]
        self.assertLess(np.abs(got - ref).max(), 1e-4 * np.abs(ref).max())

    def test_embed_layer_option(self):
        j = json.loads(self.run_tlctl("embed", os.path.join(self.images, "rgb_png.png"),
                                      "--layer", "layer2", "--pool", "max", "--json").stdout)
        self.assertEqual(j["dim"], 128)

    def test_errors_name_the_file_and_exit_nonzero(self):
        bad = os.path.join(FIX, "bad_crc.png")
        r = self.run_tlctl("embed", os.path.join(self.images, "rgb_png.png"), bad, "--json")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn(bad, r.stderr)
        self.assertIn("CRC", r.stderr)
        self.assertEqual(len(json.loads(r.stdout)["embeddings"]), 1)  # the good one still comes back
        r = self.run_tlctl("embed", "/no/such/file.png")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("/no/such/file.png", r.stderr)
        r = self.run_tlctl("embed", os.path.join(self.images, "rgb_png.png"), "--layer", "fc")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("dropped head", r.stderr)

    def test_upload_datasets_dataset_and_delete(self):
        root = os.path.join(self.tmp, "folder")
        for label, files in {"coat": ["rgb_png.png", "gray_jpg.jpg"], "shirt": ["palette_png.png", "bad_crc.png"]}.items():
            os.makedirs(os.path.join(root, label), exist_ok=True)
            for f in files:
                shutil.copy(os.path.join(FIX, f), os.path.join(root, label))
        r = self.run_tlctl("upload", root, "--dataset", "clothes", "--json")
        self.assertEqual(r.returncode, 1, r.stderr)  # a reject makes the exit status 1
        self.assertIn("bad_crc.png", r.stderr)
        j = json.loads(r.stdout)
        self.assertEqual(j["accepted"], 3)
        self.assertEqual(j["dataset"]["classes"], {"coat": 2, "shirt": 1})
        self.assertEqual(len(j["rejected"]), 1)
        self.assertEqual(json.loads(self.run_tlctl("datasets", "--json").stdout)["datasets"][0]["name"], "clothes")
        r = self.run_tlctl("dataset", "clothes")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("coat: 2", r.stdout)
        r = self.run_tlctl("upload", root, "--dataset", "strict", "--strict")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("nothing was stored", r.stderr)
        self.assertEqual(self.run_tlctl("delete-dataset", "clothes").returncode, 0)
        r = self.run_tlctl("dataset", "clothes")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("NOT_FOUND", r.stderr)

    def test_models_train_and_classify(self):
        train = os.path.join(FIX, "fmnist", "train")
        r = self.run_tlctl("upload", train, "--dataset", "fm")
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.run_tlctl("create-model", "shoes", "--dataset", "fm", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["classes"], ["sandal", "t-shirt", "trouser"])
        r = self.run_tlctl("train", "shoes", "--dataset", "fm", "--wait", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        job = json.loads(r.stdout)
        self.assertEqual(job["state"], "succeeded")
        self.assertGreater(job["validation_accuracy"], 0.6)
        self.assertTrue(job["resumes_after_restart"])
        test = os.path.join(FIX, "fmnist", "test", "trouser")
        r = self.run_tlctl("classify", "shoes", test, "--top-k", "2", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        preds = json.loads(r.stdout)["predictions"]
        self.assertEqual(len(preds), 20)
        self.assertEqual(set(preds[0]), {"name", "label", "unknown", "top"})
        self.assertFalse(preds[0]["unknown"])  # no thresholds: never "unknown"
        self.assertEqual(preds[0]["label"], preds[0]["top"][0]["label"])
        self.assertEqual(len(preds[0]["top"]), 2)
        self.assertGreater(sum(p["top"][0]["label"] == "trouser" for p in preds), 15)
        r = self.run_tlctl("unfreeze", "shoes", "--from", "layer4", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.run_tlctl("describe-model", "shoes", "--json")
        d = json.loads(r.stdout)
        layer4 = [s for s in d["stages"] if s["name"] == "layer4"][0]
        self.assertEqual(layer4, {"name": "layer4", "private": True, "trainable": True, "params": 8393728})
        self.assertEqual([v["version"] for v in d["versions"]], [1])
        self.assertIn("unknown", self.run_tlctl("unfreeze", "shoes", "layer9").stderr)
        r = self.run_tlctl("train", "shoes", "--dataset", "fm", "--epochs", "2", "--freeze-batchnorm",
                           "--no-resume", "--wait", "--json")
        self.assertEqual(json.loads(r.stdout)["version"], 2, r.stderr)
        self.assertFalse(json.loads(r.stdout)["resumes_after_restart"])  # --no-resume
        jobs = json.loads(self.run_tlctl("jobs", "--model", "shoes", "--json").stdout)["jobs"]
        self.assertEqual(len(jobs), 2)
        r = self.run_tlctl("classify", "nope", test)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("NOT_FOUND", r.stderr)

    def test_evaluate_serve_thresholds_and_suggest(self):
        train = os.path.join(FIX, "fmnist", "train")
        test = os.path.join(FIX, "fmnist", "test")
        for args in (("upload", train, "--dataset", "fm"), ("upload", test, "--dataset", "held"),
                     ("upload", test, "--dataset", "pool", "--unlabelled"),
                     ("create-model", "m", "--dataset", "fm"),
                     ("train", "m", "--dataset", "fm", "--wait"),
                     ("train", "m", "--dataset", "fm", "--sweep", "--l2", "0.1,1,10", "--folds", "3",
                      "--heads", "linear,8", "--layers", "layer3,embedding", "--serve", "never",
                      "--wait")):
            r = self.run_tlctl(*args)
            self.assertEqual(r.returncode, 0, (args, r.stderr))
        self.assertIn("<- the version", r.stdout)  # the sweep's leaderboard
        board = [line.split() for line in r.stdout.splitlines() if line[:1].isdigit()]
        self.assertEqual(sorted(row[2] for row in board), ["8"] * 6 + ["linear"] * 6, r.stdout)
        self.assertEqual(sorted(row[3] for row in board), ["embedding"] * 6 + ["layer3"] * 6, r.stdout)
        winner = board[0]
        v2 = json.loads(self.run_tlctl("describe-model", "m", "--json").stdout)["versions"][1]
        self.assertEqual(v2["feature_layer"], "" if winner[3] == "embedding" else winner[3], v2)
        self.assertEqual(v2["hidden"], [] if winner[2] == "linear" else [int(winner[2])], v2)
        self.assertGreater(v2["temperature"], 0)
        self.assertIn("validation_ece_uncalibrated", v2)
        self.assertIn("temperature", self.run_tlctl("describe-model", "m").stdout)
        self.assertIn("v2 is not served", r.stdout)
        # Flags given as "--flag value" (space-separated) as well as "--flag=value".
        r = self.run_tlctl("evaluate", "m", "--dataset", "held", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        e = json.loads(r.stdout)
        self.assertEqual(set(e) >= {"accuracy", "top5_accuracy", "log_loss", "ece", "classes", "confusion"}, True, e)
        self.assertEqual(len(e["confusion"]), 3)
        self.assertEqual(sum(map(sum, e["confusion"])), sum(c["support"] for c in e["classes"]))
        self.assertEqual(set(e["classes"][0]), {"label", "precision", "recall", "f1", "support"})
        r = self.run_tlctl("evaluate", "m", "--dataset", "held", "--versions", "1,2")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("v1 vs v2", r.stdout)
        r = self.run_tlctl("serve", "m", "--version", "2", "--json")
        self.assertEqual(json.loads(r.stdout)["served_version"], 2, r.stderr)
        r = self.run_tlctl("thresholds", "m", "--global", "0.5", "--json")
        self.assertEqual(json.loads(r.stdout)["thresholds"], [0.5, 0.5, 0.5], r.stderr)
        r = self.run_tlctl("thresholds", "m", "--class", "nope=0.5")
        self.assertEqual(r.returncode, 1)
        self.assertIn("INVALID_ARGUMENT", r.stderr)
        # Chosen for a precision on held-out images: what evaluate reports is what is set.
        r = self.run_tlctl("evaluate", "m", "--dataset", "held", "--target-precision", "0.8", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        chosen = json.loads(r.stdout)
        self.assertEqual(set(chosen["thresholds"]), {c["label"] for c in chosen["classes"]})
        self.assertTrue(0 <= chosen["coverage"] <= 1, chosen)
        r = self.run_tlctl("thresholds", "m", "--target-precision", "0.8", "--dataset", "held",
                           "--split", "all", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        labels = [c["label"] for c in chosen["classes"]]
        self.assertEqual(json.loads(r.stdout)["thresholds"],
                         [chosen["thresholds"][label] for label in labels])
        r = self.run_tlctl("thresholds", "m", "--target-precision", "0.8")
        self.assertEqual(r.returncode, 1)
        self.assertIn("--dataset", r.stderr)
        r = self.run_tlctl("suggest", "m", "--dataset", "pool", "--count", "5", "--duplicate-cosine", "1", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        s = json.loads(r.stdout)["suggestions"]
        self.assertEqual(len(s), 5)
        margins = [x["margin"] for x in s]
        self.assertEqual(margins, sorted(margins))
        self.assertEqual(set(s[0]), {"name", "margin", "entropy", "top"})

    def test_unreachable_server_is_reported(self):
        r = subprocess.run([os.path.join(BIN, "tlctl"), "--server=127.0.0.1:%d" % free_port(), "health"],
                           capture_output=True, text=True, timeout=60)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("no tlserve answers", r.stderr)

    def test_unknown_command_prints_usage(self):
        r = self.run_tlctl("frobnicate")
        self.assertEqual(r.returncode, 2)
        self.assertIn("usage: tlctl", r.stderr)


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)

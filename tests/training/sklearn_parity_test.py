#!/usr/bin/env python3
"""Head training through tlserve (upload, create-model, train, classify with
tlctl) against scikit-learn's LogisticRegression on features of the same
TorchScript backbone computed by PyTorch, on the same train split of real
Fashion-MNIST images. tlserve must reach sklearn's test accuracy within
3 points; both are printed.

usage: sklearn_parity_test.py BIN_DIR FIXTURES_DIR
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

BIN, FIX = sys.argv[1], sys.argv[2]
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "client", "python"))
from tlserve_client import is_validation  # noqa: E402
from tlserve_client.local_server import LocalServer  # noqa: E402


def main():
    tmp = tempfile.mkdtemp(prefix="tlserve-parity-")
    sample = os.path.join(HERE, "..", "..", "scripts", "sample_images.py")
    train_dir, test_dir = os.path.join(tmp, "train"), os.path.join(tmp, "test")
    subprocess.run([sys.executable, sample, train_dir, "--count", "60", "--split", "train"], check=True)
    subprocess.run([sys.executable, sample, test_dir, "--count", "40", "--split", "test"], check=True)
    backbone = os.path.join(FIX, "r18small.pt")
    with LocalServer(BIN, backbone, os.path.join(tmp, "data")) as server:
        server.tlctl("upload", train_dir, "--dataset", "fm")
        server.tlctl("create-model", "fm", "--dataset", "fm")
        start = time.time()
        job = json.loads(server.tlctl("train", "fm", "--dataset", "fm", "--wait", "--json"))
        tl_train_seconds = time.time() - start
        assert job["state"] == "succeeded", job
        preds = json.loads(server.tlctl("classify", "fm", test_dir, "--top-k", "1", "--json"))["predictions"]
        tl_acc = np.mean([p["top"][0]["label"] == os.path.basename(os.path.dirname(p["name"])) for p in preds])

    # The same backbone and split in PyTorch and scikit-learn.
    files = {"preprocess.json": ""}
    m = torch.jit.load(backbone, _extra_files=files)
    spec = json.loads(files["preprocess.json"])
    pipeline = T.Compose([T.Resize(spec["resize"]), T.CenterCrop(spec["crop"]), T.ToTensor(),
                          T.Normalize(spec["mean"], spec["std"])])

    def features(paths):
        with torch.no_grad():
            x = torch.stack([pipeline(Image.open(p).convert("RGB")) for p in paths])
            for _, child in list(m.named_children())[:-1]:
                x = child(x)
            return torch.flatten(x, 1).numpy()

    def listing(root):
        out = []
        for label in sorted(os.listdir(root)):
            for f in sorted(os.listdir(os.path.join(root, label))):
                out.append((os.path.join(root, label, f), label))
        return out

    train = [(p, l) for p, l in listing(train_dir) if not is_validation(p, open(p, "rb").read())]
    test = listing(test_dir)
    xtr, ytr = features([p for p, _ in train]), [l for _, l in train]
    xte, yte = features([p for p, _ in test]), [l for _, l in test]
    start = time.time()
    sk = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(xtr, ytr)
    sk_seconds = time.time() - start
    sk_acc = sk.score(xte, yte)
    print("measured: %d train (after the 15%% validation split), %d test images, 10 classes" % (len(train), len(test)))
    print("measured: tlserve test accuracy %.4f (train job %.1f s incl. features), "
          "scikit-learn LogisticRegression %.4f (fit %.2f s)" % (tl_acc, tl_train_seconds, sk_acc, sk_seconds))
    shutil.rmtree(tmp, ignore_errors=True)
    if tl_acc < sk_acc - 0.03:
        print("FAIL: tlserve is more than 3 points below scikit-learn")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A head sweep on features of real images: tlserve's Sweep (bench/sweep_bench.cc:
10 L2 values x 5 folds of a linear head trained as one batched L-BFGS run, the
winner refitted) against scikit-learn's StandardScaler + LogisticRegressionCV
(Cs=10, cv=5) on the same features: penultimate-layer (pooled layer4)
features of Fashion-MNIST images from a TorchScript ResNet-18. Both use the
same C grid (l2 = 1/C), the same folds (StratifiedKFold without shuffling) and
the same iteration cap; both run with the same number of threads (LibTorch's
intra-op threads, OpenMP and OpenBLAS for both) and OMP_WAIT_POLICY=PASSIVE
(--omp-wait-policy ""leaves it unset): on this shared 2-core machine, two
OpenMP threads spinning at each barrier while other builds held the cores made
single runs 5-40x slower and run-to-run times meaningless. Runs alternate, the
median of --repeats is reported. Prints one table.

usage: /usr/bin/python3 bench/sweep_bench.py BIN_DIR [--backbone var/backbones/fmnist-resnet18.pt]
           [--classes 5,6,7,8,9] [--train 2000] [--test 1000] [--threads 2] [--repeats 3]
           [--omp-wait-policy PASSIVE]
"""
import argparse
import os
import sys



def _early(flag, default):
    """A flag's value, read before argparse: it must be in the environment before numpy loads."""
    for i, a in enumerate(sys.argv):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return default


_threads = _early("--threads", "2")
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = _threads
_wait_policy = _early("--omp-wait-policy", "PASSIVE")
if _wait_policy:
    os.environ["OMP_WAIT_POLICY"] = _wait_policy

import gzip  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegressionCV  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FMNIST = "/usr/share/datasets/fashion-mnist"


def read_idx(name):
    with gzip.open(os.path.join(FMNIST, name)) as f:
        data = f.read()
    if data[2] != 8:
        raise ValueError("unexpected idx type in " + name)
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def sample(split, classes, count, seed):
    """`count` images of `classes`, drawn at random (balanced by chance)."""
    prefix = "train" if split == "train" else "t10k"
    images, labels = read_idx(prefix + "-images-idx3-ubyte.gz"), read_idx(prefix + "-labels-idx1-ubyte.gz")
    rows = np.flatnonzero(np.isin(labels, classes))
    rows = np.random.default_rng(seed).choice(rows, count, replace=False)
    y = np.searchsorted(np.array(sorted(classes)), labels[rows]).astype(np.int64)
    return images[rows], y


def features(module, spec, images, batch=250):
    """The pooled output of the last stage (the backbone's embedding), as tlserve computes it."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch].copy()).unsqueeze(1).expand(-1, 3, -1, -1)
            x = TF.resize(x, spec["resize"], antialias=True)
            x = TF.center_crop(x, spec["crop"]).float() / 255
            x = TF.normalize(x, spec["mean"], spec["std"])
            for _, child in list(module.named_children())[:-1]:
                x = child(x)
            out.append(torch.flatten(x, 1))
    return torch.cat(out).numpy().astype(np.float32)


def run_sklearn(xtr, ytr, xte, yte, max_iter):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        start = time.perf_counter()
        scaler = StandardScaler().fit(xtr)
        clf = LogisticRegressionCV(Cs=10, cv=5, max_iter=max_iter).fit(scaler.transform(xtr), ytr)
        seconds = time.perf_counter() - start
    unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    return {"seconds": seconds, "test_accuracy": clf.score(scaler.transform(xte), yte),
            "C": float(clf.C_[0]), "unconverged": unconverged}


def run_tlserve(cmd):
    env = dict(os.environ)  # the threads and wait policy set above, as scikit-learn's
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    wall = time.perf_counter() - start
    r = json.loads(out)
    r["wall"] = wall
    r["C"] = 1 / r["l2"]
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bin")
    p.add_argument("--backbone", default=os.path.join(HERE, "..", "var", "backbones", "fmnist-resnet18.pt"))
    p.add_argument("--classes", default="5,6,7,8,9")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--omp-wait-policy", default="PASSIVE")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    classes = [int(c) for c in a.classes.split(",")]
    if not os.path.exists(a.backbone):
        sys.exit("no backbone at %s: make one with scripts/pretrain_backbone.py (or "
                 "scripts/make_backbone.py for random weights)" % a.backbone)
    extra = {"preprocess.json": "", "tlserve.json": ""}
    module = torch.jit.load(a.backbone, _extra_files=extra)
    spec, info = json.loads(extra["preprocess.json"]), json.loads(extra["tlserve.json"] or "{}")
    itr, ytr = sample("train", classes, a.train, seed=0)
    ite, yte = sample("test", classes, a.test, seed=1)
    xtr, xte = features(module, spec, itr), features(module, spec, ite)

    tmp = tempfile.mkdtemp(prefix="sweep-bench-")
    files = {}
    for name, arr in [("train", xtr), ("train_labels", ytr), ("test", xte), ("test_labels", yte)]:
        files[name] = os.path.join(tmp, name + ".bin")
        np.ascontiguousarray(arr).tofile(files[name])
    cmd = [os.path.join(a.bin, "sweep_bench"), "--dim=%d" % xtr.shape[1], "--classes=%d" % len(classes),
           "--threads=%d" % a.threads, "--folds=5", "--max_iterations=%d" % a.max_iter] + \
        ["--%s=%s" % kv for kv in files.items()]
    ours, theirs = [], []
    for _ in range(a.repeats):  # alternating, so that other load falls on both alike
        ours.append(run_tlserve(cmd))
        theirs.append(run_sklearn(xtr, ytr, xte, yte, a.max_iter))
    t, s = ours[-1], theirs[-1]  # accuracies are the same every run; times: the median
    t_sec = statistics.median(r["seconds"] for r in ours)
    t_wall = statistics.median(r["wall"] for r in ours)
    s_sec = statistics.median(r["seconds"] for r in theirs)
    print("features: %s (%s, %s), %d-d pooled layer4; Fashion-MNIST classes %s, %d train / %d test images"
          % (os.path.basename(a.backbone), info.get("backbone", "?"),
             "pretrained" if info.get("pretrained") else "random weights", xtr.shape[1], a.classes,
             len(ytr), len(yte)))
    print("threads: %d for both (LibTorch intra-op; OMP/OPENBLAS/MKL_NUM_THREADS=%d; OMP_WAIT_POLICY=%s); "
          "median of %d alternating runs; max_iter %d; scikit-learn's ConvergenceWarnings in its last run: %d"
          % (a.threads, a.threads, a.omp_wait_policy or "unset", a.repeats, a.max_iter, s["unconverged"]))
    print("seconds per run: tlserve %s; scikit-learn %s" % (
        " ".join("%.2f" % r["seconds"] for r in ours), " ".join("%.2f" % r["seconds"] for r in theirs)))
    print("| | test accuracy | chosen C | seconds (fit, in-process) | seconds (process wall) |")
    print("|---|---|---|---|---|")
    print("| scikit-learn LogisticRegressionCV(Cs=10, cv=5) | %.4f | %.4g | %.2f | - |" % (s["test_accuracy"], s["C"], s_sec))
    print("| tlserve Sweep (10 l2 x 5 folds, batched) | %.4f | %.4g | %.2f | %.2f |" % (t["test_accuracy"], t["C"], t_sec, t_wall))
    print("| difference (tlserve - sklearn), speed-up | %+.2f pts | | %.2fx | %.2fx |"
          % (100 * (t["test_accuracy"] - s["test_accuracy"]), s_sec / t_sec, s_sec / t_wall))


if __name__ == "__main__":
    main()

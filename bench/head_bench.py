#!/usr/bin/env python3
"""Head training on cached features: tlserve (bench/head_bench.cc, float32
full-batch L-BFGS in LibTorch) against scikit-learn's LogisticRegression
(lbfgs) on the same synthetic features, for 10k and 50k examples x 512 and
2048 dimensions, 10 classes. Prints a table of times, accuracies and ratios.

usage: head_bench.py BIN_DIR [--sizes 10000x512,50000x2048] [--threads N]
"""
import argparse
import json
import os
import subprocess
import tempfile
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler


def make(n, d, k, seed):
    """Gaussian classes with overlapping means: accuracy well below 100%."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (k, d)) * (3.0 / np.sqrt(d))
    y = rng.integers(0, k, n)
    x = (means[y] + rng.normal(0, 1, (n, d))) * rng.uniform(0.5, 5, d) + rng.normal(0, 3, d)
    return x.astype(np.float32), y.astype(np.int64)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("bin")
    p.add_argument("--sizes", default="10000x512,10000x2048,50000x512,50000x2048")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="head-bench-")
    rows = []
    for size in a.sizes.split(","):
        n, d = map(int, size.split("x"))
        x, y = make(n + n // 5, d, 10, seed=n + d)
        xtr, ytr, xte, yte = x[:n], y[:n], x[n:], y[n:]
        files = {}
        for name, arr in [("train", xtr), ("train_labels", ytr), ("test", xte), ("test_labels", yte)]:
            files[name] = os.path.join(tmp, "%s_%s.bin" % (size, name))
            arr.tofile(files[name])
        cmd = [os.path.join(a.bin, "head_bench"), "--dim=%d" % d, "--classes=10",
               "--threads=%d" % a.threads] + ["--%s=%s" % kv for kv in files.items()]
        ours = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        start = time.time()
        scaler = StandardScaler().fit(xtr)
        sk = LogisticRegression(max_iter=1000).fit(scaler.transform(xtr), ytr)
        sk_seconds = time.time() - start
        sk_acc = sk.score(scaler.transform(xte), yte)
        rows.append((size, ours["seconds"], ours["test_accuracy"], ours["epochs"], sk_seconds, sk_acc))
        threads = ours["threads"]
    print("LibTorch intra-op threads: %d; scikit-learn: numpy's BLAS default" % threads)
    print("| examples x dim | tlserve s | tlserve acc | L-BFGS epochs (x20 it) | sklearn s | sklearn acc | speed-up | acc diff (pts) |")
    print("|---|---|---|---|---|---|---|---|")
    for size, ts, ta, te, ss, sa in rows:
        print("| %s | %.2f | %.4f | %d | %.2f | %.4f | %.2fx | %+.2f |" % (size, ts, ta, te, ss, sa, ss / ts, 100 * (ta - sa)))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Writes Fashion-MNIST test images (Debian's dataset-fashion-mnist) as PNG
files, DIR/<class>/<index>.png, for demos and tests.

usage: sample_images.py DIR [--count N] [--classes 0,1,...] [--split test|train]
"""
import argparse
import gzip
import os

import numpy as np
from PIL import Image

DATA = "/usr/share/datasets/fashion-mnist"
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle-boot"]


def load(split):
    prefix = "t10k" if split == "test" else "train"
    with gzip.open(os.path.join(DATA, prefix + "-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(DATA, prefix + "-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--count", type=int, default=10, help="images per class")
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--split", default="test", choices=["test", "train"])
    a = p.parse_args()
    images, labels = load(a.split)
    for c in [int(x) for x in a.classes.split(",")]:
        d = os.path.join(a.dir, CLASSES[c])
        os.makedirs(d, exist_ok=True)
        for i in np.flatnonzero(labels == c)[: a.count]:
            Image.fromarray(images[i], "L").save(os.path.join(d, "%05d.png" % i))


if __name__ == "__main__":
    main()

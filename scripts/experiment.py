#!/usr/bin/env python3
"""The transfer-learning experiment of docs/experiments.md.

Source: the default backbone, a ResNet-18 that tlserve trained from scratch
on Fashion-MNIST classes 0-4 (scripts/pretrain_backbone.py). Target: classes
5-9 (sandal, shirt, sneaker, bag, ankle-boot), never seen by the backbone,
with 10, 100 and 1,000 labelled training images per class (the first ones of
the train split), tested on the whole official test split of those classes
(1,000 per class). Four ways:
  (a) tlserve, head only, on the pretrained backbone (L-BFGS, the default);
  (b) tlserve, the head of (a) first, then layer4 unfrozen and fine-tuned
      with it (AdamW, 15 epochs, warm start from that head, layer4's
      BatchNorm statistics frozen unless --train-batchnorm);
  (c) tlserve, head only, on a random-weight ResNet-18 of the same shape
      (the pretraining's own starting point);
  (d) scikit-learn LogisticRegression on features of the pretrained backbone
      computed by PyTorch/torchvision, trained on the same rows tlserve
      trains on (tlserve holds 15% out for validation; the rows are
      recomputed with tlserve_client.is_validation).
Writes the table into docs/experiments.md between its markers.

  /usr/bin/python3 scripts/experiment.py --bin build/bin --backbone var/backbones/fmnist-resnet18.pt
"""
import argparse
import datetime
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "client", "python"))
from tlserve_client import Client, image_folder, is_validation, models_pb2  # noqa: E402
from tlserve_client.local_server import LocalServer  # noqa: E402

TARGET = "5,6,7,8,9"
BEGIN, END = "<!-- experiment:begin -->", "<!-- experiment:end -->"


def accuracy(client, model, test):
    start = time.time()
    preds = client.classify(model, [b for _, _, b in test], top_k=1)
    seconds = time.time() - start
    acc = float(np.mean([p[0][0] == label for (label, _, _), p in zip(test, preds)]))
    return acc, len(test) / seconds


def train(client, model, dataset, **options):
    start = time.time()
    job = client.train(model, dataset, **options)
    if job.state != models_pb2.Job.SUCCEEDED:
        raise RuntimeError("%s: %s %s" % (model, models_pb2.Job.State.Name(job.state), job.error))
    return time.time() - start, job


class TorchFeatures:
    """The backbone's embedding in PyTorch, preprocessing by torchvision."""

    def __init__(self, path):
        extra = {"preprocess.json": ""}
        self.module = torch.jit.load(path, _extra_files=extra).eval()
        self.spec = json.loads(extra["preprocess.json"])

    def __call__(self, examples, batch=256):
        out = []
        with torch.no_grad():
            for i in range(0, len(examples), batch):
                xs = []
                for _, _, data in examples[i:i + batch]:
                    t = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
                    if self.spec["resize"]:
                        t = TF.resize(t, self.spec["resize"], antialias=True)
                    t = TF.center_crop(t, self.spec["crop"])
                    xs.append(TF.normalize(TF.convert_image_dtype(t, torch.float32), self.spec["mean"], self.spec["std"]))
                x = torch.stack(xs)
                for _, child in list(self.module.named_children())[:-1]:
                    x = child(x)
                out.append(x.flatten(1).numpy())
        return np.concatenate(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=os.path.join(HERE, "..", "build", "bin"))
    p.add_argument("--backbone", required=True, help="the pretrained backbone (pretrain_backbone.py)")
    p.add_argument("--sizes", default="10,100,1000", help="training images per class")
    p.add_argument("--finetune-epochs", type=int, default=15)
    p.add_argument("--finetune-lr", type=float, default=0, help="head learning rate; 0: the server's")
    p.add_argument("--train-batchnorm", action="store_true",
                   help="let layer4's BatchNorm statistics move while fine-tuning (default: frozen)")
    p.add_argument("--doc", default=os.path.join(HERE, "..", "docs", "experiments.md"))
    p.add_argument("--threads", type=int, default=0, help="torch threads for (d); 0: torch's default")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    sizes = [int(s) for s in a.sizes.split(",")]
    tmp = tempfile.mkdtemp(prefix="tlserve-experiment-")
    rows = []
    try:
        for split, count in (("train", max(sizes)), ("test", 1000)):
            subprocess.run([sys.executable, os.path.join(HERE, "sample_images.py"), os.path.join(tmp, split),
                            "--count", str(count), "--classes", TARGET, "--split", split], check=True)
        test = image_folder(os.path.join(tmp, "test"))
        # The random-weight twin: same architecture and preprocessing, the
        # pretraining's own seed-0 initialisation.
        random_bb = os.path.join(tmp, "random.pt")
        extra = {"preprocess.json": ""}
        torch.jit.load(a.backbone, _extra_files=extra)
        spec = json.loads(extra["preprocess.json"])
        subprocess.run([sys.executable, os.path.join(HERE, "make_backbone.py"), "--arch", "resnet18", "--out",
                        random_bb, "--num-classes", "5", "--resize", str(spec["resize"]), "--crop", str(spec["crop"]),
                        "--mean"] + [str(v) for v in spec["mean"]] + ["--std"] + [str(v) for v in spec["std"]],
                       check=True)
        torch_features = TorchFeatures(a.backbone)
        start = time.time()
        x_test = torch_features(test)
        test_ips = len(test) / (time.time() - start)
        y_test = [l for l, _, _ in test]

        with LocalServer(a.bin, a.backbone, os.path.join(tmp, "pre")) as pre, \
                LocalServer(a.bin, random_bb, os.path.join(tmp, "rnd")) as rnd, \
                Client(pre.target) as cp, Client(rnd.target) as cr:
            for n in sizes:
                train_set = image_folder(os.path.join(tmp, "train"), n)
                ds = "target-%d" % n
                cp.upload(ds, train_set)
                cr.upload(ds, train_set)
                print("== %d per class (%d images)" % (n, len(train_set)), flush=True)

                cp.create_model("head-%d" % n, dataset=ds)
                secs, job = train(cp, "head-%d" % n, ds)
                acc, ips = accuracy(cp, "head-%d" % n, test)
                rows.append((n, "(a) tlserve head only, pretrained", acc, secs, len(train_set) / secs, ips))
                print(rows[-1], flush=True)

                # The notebook's second recipe: the head first, then layer4
                # unfrozen and fine-tuned with it (warm start from that head).
                cp.create_model("ft-%d" % n, dataset=ds)
                head_secs, _ = train(cp, "ft-%d" % n, ds)
                cp.unfreeze("ft-%d" % n, from_stage="layer4")
                secs, job = train(cp, "ft-%d" % n, ds, epochs=a.finetune_epochs,
                                  optimizer=models_pb2.TrainingOptions.ADAMW, batch_size=64, seed=0,
                                  learning_rate=a.finetune_lr, freeze_batchnorm=not a.train_batchnorm)
                acc, ips = accuracy(cp, "ft-%d" % n, test)
                rows.append((n, "(b) tlserve head, then layer4 fine-tuned, pretrained", acc, head_secs + secs,
                             len(train_set) * a.finetune_epochs / secs, ips))
                print(rows[-1], flush=True)

                cr.create_model("head-%d" % n, dataset=ds)
                secs, job = train(cr, "head-%d" % n, ds)
                acc, ips = accuracy(cr, "head-%d" % n, test)
                rows.append((n, "(c) tlserve head only, random weights", acc, secs, len(train_set) / secs, ips))
                print(rows[-1], flush=True)

                fit_rows = [e for e in train_set if not is_validation(e[1], e[2])]
                start = time.time()
                x_train = torch_features(fit_rows)
                sk = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
                sk.fit(x_train, [l for l, _, _ in fit_rows])
                secs = time.time() - start
                acc = sk.score(x_test, y_test)
                rows.append((n, "(d) scikit-learn on PyTorch features, pretrained", acc, secs,
                             len(fit_rows) / secs, test_ips))
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    cpu = "unknown CPU"
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read()).group(1)
    except (OSError, AttributeError):
        pass
    lines = [BEGIN,
             "Made on %s by `/usr/bin/python3 scripts/experiment.py --backbone %s` (%d cores, %s, %s)." % (
                 datetime.date.today().isoformat(), os.path.relpath(a.backbone), os.cpu_count(), cpu,
                 platform.machine()),
             "",
             "| per class | method | test accuracy | training s | training img/s | classify img/s |",
             "|---:|---|---:|---:|---:|---:|"]
    for n, method, acc, secs, tips, ips in rows:
        lines.append("| %d | %s | %.4f | %.1f | %.0f | %.0f |" % (n, method, acc, secs, tips, ips))
    lines.append(END)
    table = "\n".join(lines)
    print(table)
    text = open(a.doc).read() if os.path.exists(a.doc) else "# Experiments\n\n%s\n%s\n" % (BEGIN, END)
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + table + text[text.index(END) + len(END):]
    else:
        text += "\n" + table + "\n"
    with open(a.doc, "w") as f:
        f.write(text)
    print("wrote the table into %s" % a.doc)


if __name__ == "__main__":
    main()

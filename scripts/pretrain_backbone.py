#!/usr/bin/env python3
"""Makes tlserve's default backbone, by tlserve itself: a randomly
initialised ResNet-18 is served, every stage is unfrozen, and the server
trains it from scratch on the *source* classes of Fashion-MNIST (t-shirt,
trouser, pullover, dress, coat: classes 0-4, train split); the trained model
is exported (ExportModel) and that file is the backbone (its head, the last
stage, is dropped when tlserve loads it). The target classes 5-9 are never
seen, so transfer to them (scripts/experiment.py, the demo) is real.

Cached: when OUT exists and was made with the same recipe, nothing is done.

  /usr/bin/python3 scripts/pretrain_backbone.py --bin build/bin --out var/backbones/fmnist-resnet18.pt
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "client", "python"))
from tlserve_client import Client, image_folder, models_pb2  # noqa: E402
from tlserve_client.local_server import LocalServer  # noqa: E402

SOURCE = "0,1,2,3,4"
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530  # over the train split's pixels


def bar(done, total, width=30):
    n = int(width * done / max(1, total))
    return "[" + "#" * n + "." * (width - n) + "]"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=os.path.join(HERE, "..", "build", "bin"))
    p.add_argument("--out", required=True)
    p.add_argument("--per-class", type=int, default=2000, help="source images per class")
    p.add_argument("--size", type=int, default=32, help="input size (Fashion-MNIST's 28 px resized)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    recipe = {"arch": "resnet18", "source_classes": SOURCE, "per_class": a.per_class, "size": a.size,
              "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed}
    stamp = a.out + ".recipe.json"
    if os.path.exists(a.out) and os.path.exists(stamp) and json.load(open(stamp)).get("recipe") == recipe:
        print("default backbone %s is already made (%s)" % (a.out, stamp))
        return

    tmp = tempfile.mkdtemp(prefix="tlserve-pretrain-")
    try:
        init = os.path.join(tmp, "resnet18-init.pt")
        subprocess.run([sys.executable, os.path.join(HERE, "make_backbone.py"), "--arch", "resnet18",
                        "--out", init, "--seed", str(a.seed), "--num-classes", "5",
                        "--resize", str(a.size), "--crop", str(a.size),
                        "--mean"] + [str(FMNIST_MEAN)] * 3 + ["--std"] + [str(FMNIST_STD)] * 3,
                       check=True)
        src = os.path.join(tmp, "source")
        subprocess.run([sys.executable, os.path.join(HERE, "sample_images.py"), src, "--count",
                        str(a.per_class), "--classes", SOURCE, "--split", "train"], check=True)
        examples = image_folder(src)

        start = time.time()
        with LocalServer(a.bin, init, os.path.join(tmp, "data")) as s, Client(s.target) as c:
            print("pretraining a ResNet-18 from scratch on %d Fashion-MNIST images of classes %s "
                  "(%d px, %d epochs), by tlserve" % (len(examples), SOURCE, a.size, a.epochs), flush=True)
            c.upload("source", examples)
            c.create_model("fmnist-resnet18", dataset="source")
            c.unfreeze("fmnist-resnet18", from_stage=c.describe_backbone().stages[0].name)
            total = a.epochs

            def progress(job):
                e = job.epochs[-1] if job.epochs else None
                line = "  %s %s" % (bar(e.epoch if e else 0, total),
                                    ("epoch %d/%d  loss %.3f  train %.3f  val %.3f  %.0f img/s  eta %.0f s"
                                     % (e.epoch, total, e.train_loss, e.train_accuracy,
                                        e.validation_accuracy, e.images_per_second, e.eta_seconds))
                                    if e else job.phase)
                print("\r" + line.ljust(100), end="" if sys.stdout.isatty() else "\n", flush=True)

            job = c.train("fmnist-resnet18", "source", on_progress=progress, epochs=a.epochs,
                          batch_size=a.batch_size, optimizer=models_pb2.TrainingOptions.ADAMW,
                          learning_rate=a.lr, stage_learning_rate=a.lr, seed=a.seed,
                          # From scratch: the statistics must train, and a head fitted on
                          # random features would only get in the way.
                          freeze_batchnorm=False, head_first=False)
            print()
            if job.state != models_pb2.Job.SUCCEEDED:
                sys.exit("pretraining %s: %s" % (models_pb2.Job.State.Name(job.state), job.error))
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            info = c.export("fmnist-resnet18", a.out)
            best = max(job.epochs, key=lambda e: e.validation_accuracy)
        seconds = time.time() - start
        with open(stamp + ".tmp", "w") as f:
            json.dump({"recipe": recipe, "seconds": round(seconds, 1), "sha256": info.sha256,
                       "source_validation_accuracy": round(best.validation_accuracy, 4)}, f, indent=1)
        os.replace(stamp + ".tmp", stamp)
        print("made %s in %.0f s: source-class validation accuracy %.3f (epoch %d), sha256 %s" % (
            a.out, seconds, best.validation_accuracy, best.epoch, info.sha256[:12]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

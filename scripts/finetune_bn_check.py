#!/usr/bin/env python3
"""Why fine-tuning's BatchNorm statistics are frozen by default: trains every
stage of a model (unfrozen from conv1) on the test fixtures' small ResNet-18
and Fashion-MNIST images, with the statistics training and with them frozen,
and prints the training and validation accuracy of every epoch (epoch 0 is the
starting point, after the head was fitted alone).

  /usr/bin/python3 scripts/finetune_bn_check.py BUILD_DIR
(BUILD_DIR: build/, with bin/tlserve and tests/fixtures made by its tests.)
"""
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "client", "python"))
from tlserve_client import Client, image_folder  # noqa: E402
from tlserve_client.local_server import LocalServer  # noqa: E402


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "build")
    fixtures = os.path.join(build, "tests", "fixtures")
    tmp = tempfile.mkdtemp(prefix="tlserve-bn-")
    runs = [("statistics train, lr 1e-4", dict(learning_rate=1e-4, stage_learning_rate=1e-5,
                                                 freeze_batchnorm=False)),
            ("statistics train, lr 1e-5", dict(learning_rate=1e-5, stage_learning_rate=1e-5,
                                                 freeze_batchnorm=False)),
            ("statistics frozen, lr 1e-4", dict(learning_rate=1e-4, stage_learning_rate=1e-5,
                                                  freeze_batchnorm=True))]
    try:
        with LocalServer(os.path.join(build, "bin"), os.path.join(fixtures, "r18small.pt"),
                         os.path.join(tmp, "data")) as s, Client(s.target) as c:
            c.upload("fm", image_folder(os.path.join(fixtures, "fmnist", "train")))
            for i, (label, options) in enumerate(runs):
                name = "m%d" % i
                c.create_model(name, dataset="fm")
                c.unfreeze(name, from_stage="conv1")
                job = c.train(name, "fm", epochs=3, optimizer=2, seed=1, batch_size=32, **options)
                tuned = [e for e in job.epochs][-4:]  # epoch 0..3, after the head-only epochs
                print("%-28s %s" % (label, "  ".join(
                    "e%d train %.3f val %.3f" % (e.epoch, e.train_accuracy, e.validation_accuracy)
                    for e in tuned)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

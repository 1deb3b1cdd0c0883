#!/usr/bin/env python3
"""The label-suggestion (active learning) experiment of docs/experiments.md.

Backbone: the default one (var/backbones/fmnist-resnet18.pt, pretrained by
tlserve on Fashion-MNIST classes 0-4). Target: classes 5-9 (sandal, shirt,
sneaker, bag, ankle-boot). Test: the official test split of those classes
(1,000 per class unless --test-per-class), uploaded once as a labelled
dataset and scored with Evaluate on the version each round's job made.

Pool: --pool training images of classes 5-9 drawn once (fixed RNG, the same
for every seed), held as unlabelled images. Per seed, the initial labelled
set is --initial images per class drawn from the training images outside the
pool; both strategies start from it. Then --rounds rounds of:
  pick --per-round images from the pool not yet labelled
    suggested: SuggestLabels (tlctl suggest --strategy margin) on the model's
               newest version, one run per --duplicate-cosine value (default
               0.95, 0.99 and 1 = no near-duplicate skipped);
    random:    uniformly at random (numpy, seeded);
  "label" them (append them with their true labels to the run's training
  dataset), train a new head (L-BFGS, the default, serve always), evaluate it.

Removing chosen images from the pool: the pool dataset cannot delete single
images, so every round uploads a fresh pool dataset holding only the images
not yet chosen by this run (and deletes the previous one). Suggestions then
rank exactly the remaining unlabelled images and the near-duplicate filter
compares only them (no already-labelled image can shadow a candidate).

  /usr/bin/python3 scripts/active_learning_experiment.py --bin /tmp/exp2/bin \
      --backbone var/backbones/fmnist-resnet18.pt --out /tmp/al.json
Prints markdown tables (mean +- sample std over seeds; suggested - random
paired by seed), near-duplicates skipped and the classes picked, and writes
every number to --out as JSON. About 15 min on 2 cores.
"""
import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "client", "python"))
from sample_images import CLASSES, load  # noqa: E402
from tlserve_client import Client, models_pb2  # noqa: E402
from tlserve_client.local_server import LocalServer  # noqa: E402

TARGET = [5, 6, 7, 8, 9]


def png(image):
    b = io.BytesIO()
    Image.fromarray(image, "L").save(b, format="PNG")
    return b.getvalue()


def name_of(index):
    return "train-%05d.png" % index


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=os.path.join(HERE, "..", "build", "bin"))
    p.add_argument("--backbone", default=os.path.join(HERE, "..", "var", "backbones", "fmnist-resnet18.pt"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--initial", type=int, default=10, help="labelled images per class at round 0")
    p.add_argument("--per-round", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pool", type=int, default=2000, help="unlabelled pool size")
    p.add_argument("--pool-seed", type=int, default=1234)
    p.add_argument("--test-per-class", type=int, default=1000)
    p.add_argument("--strategy", default="margin", choices=["margin", "entropy"])
    p.add_argument("--duplicate-cosine", default="0.95,0.99,1",
                   help="one suggested run per value (comma list); >= 1: no near-duplicate skipped")
    p.add_argument("--no-random", action="store_true", help="skip the random baseline")
    p.add_argument("--out", default="", help="write all results here as JSON")
    p.add_argument("--keep", default="", help="keep the server's data dir and log here")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    cosines = [float(c) for c in a.duplicate_cosine.split(",")]
    methods = [("suggested@%g" % c, c) for c in cosines] + ([] if a.no_random else [("random", None)])

    train_x, train_y = load("train")
    test_x, test_y = load("test")
    label = {c: CLASSES[c] for c in TARGET}
    candidates = np.flatnonzero(np.isin(train_y, TARGET))
    pool = np.sort(np.random.RandomState(a.pool_seed).choice(candidates, a.pool, replace=False))
    outside = np.setdiff1d(candidates, pool)
    pool_png = {int(i): png(train_x[i]) for i in pool}
    test = []
    for c in TARGET:
        for i in np.flatnonzero(test_y == c)[:a.test_per_class]:
            test.append((label[c], "test-%05d.png" % i, png(test_x[i])))

    tmp = a.keep or tempfile.mkdtemp(prefix="tlserve-al-")
    results = {"args": vars(a), "runs": []}
    started = time.time()
    try:
        with LocalServer(a.bin, a.backbone, os.path.join(tmp, "data")) as server, Client(server.target) as client:
            def tlctl_json(*args):
                # --flag=value throughout: this tlctl takes "--count 50" as
                # --count=true and a stray "50" (its TakesValue list lacks
                # count, strategy, duplicate-cosine, ...).
                return json.loads(server.tlctl(*args, "--json"))

            r = client.upload("test", test)
            print("test: %d images accepted, %d rejected" % (r.accepted, len(r.rejected)), flush=True)
            for seed in seeds:
                rng = np.random.RandomState(seed)
                initial = np.concatenate([rng.choice(outside[train_y[outside] == c], a.initial, replace=False)
                                          for c in TARGET])
                for method, cosine in methods:
                    run = {"seed": seed, "method": method, "rounds": []}
                    results["runs"].append(run)
                    tag = "s%d-%s" % (seed, method.replace("@", "-c"))
                    ds, model = "lab-" + tag, "m-" + tag
                    pick_rng = np.random.RandomState(1000 + seed)
                    chosen = set()
                    new = [int(i) for i in initial]
                    client.create_model(model, classes=[label[c] for c in TARGET])
                    labelled = 0
                    pool_ds = None
                    for rnd in range(a.rounds + 1):
                        info = {"round": rnd}
                        if rnd > 0:
                            remaining = [int(i) for i in pool if int(i) not in chosen]
                            if cosine is not None:
                                if pool_ds:
                                    server.tlctl("delete-dataset", pool_ds)
                                pool_ds = "pool-%s-r%d" % (tag, rnd)
                                up = client.upload(pool_ds, [("", name_of(i), pool_png[i]) for i in remaining])
                                if up.accepted != len(remaining):
                                    raise RuntimeError("pool upload: %d of %d accepted" % (up.accepted, len(remaining)))
                                s = tlctl_json("suggest", model, "--dataset=" + pool_ds, "--count=%d" % a.per_round,
                                               "--strategy=" + a.strategy,
                                               "--duplicate-cosine=%g" % cosine)
                                names = [x["name"] for x in s["suggestions"]]
                                by_name = {name_of(i): i for i in remaining}
                                new = [by_name[n] for n in names]
                                if len(new) != a.per_round or len(set(new)) != len(new):
                                    raise RuntimeError("suggest gave %d (%d distinct) of %d" % (
                                        len(new), len(set(new)), a.per_round))
                                info["duplicates_skipped"] = s["duplicates_skipped"]
                                info["margins"] = [x["margin"] for x in s["suggestions"]]
                            else:
                                new = [int(i) for i in pick_rng.choice(remaining, a.per_round, replace=False)]
                            chosen.update(new)
                            info["picked_per_class"] = {label[c]: int(sum(train_y[i] == c for i in new)) for c in TARGET}
                        up = client.upload(ds, [(label[int(train_y[i])], name_of(i), png(train_x[i])) for i in new])
                        if up.accepted != len(new):
                            raise RuntimeError("upload to %s: %d of %d accepted" % (ds, up.accepted, len(new)))
                        labelled += len(new)
                        t0 = time.time()
                        job = client.train(model, ds, seed=seed, serve=models_pb2.TrainingOptions.SERVE_ALWAYS)
                        if job.state != models_pb2.Job.SUCCEEDED:
                            raise RuntimeError("%s round %d: %s %s" % (model, rnd, models_pb2.Job.State.Name(job.state),
                                                                      job.error))
                        info["train_s"] = time.time() - t0
                        ev = tlctl_json("evaluate", model, "--dataset=test", "--version=%d" % job.version)
                        if ev["version"] != job.version or ev["images"] != len(test):
                            raise RuntimeError("evaluate answered version %s on %s images" % (ev["version"], ev["images"]))
                        info.update(labelled=labelled, version=job.version, accuracy=ev["accuracy"],
                                    log_loss=ev["log_loss"], ece=ev["ece"])
                        run["rounds"].append(info)
                        print("seed %d %-14s round %d labelled %4d v%d acc %.4f%s (%.0f s)" % (
                            seed, method, rnd, labelled, job.version, ev["accuracy"],
                            "  dup skipped %d, picks %s" % (info["duplicates_skipped"], info["picked_per_class"])
                            if "duplicates_skipped" in info else "", time.time() - started), flush=True)
                    if pool_ds:
                        server.tlctl("delete-dataset", pool_ds)
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(results, f, indent=1)

    names = [m for m, _ in methods]
    print("\nheld-out accuracy, mean ± sample std over seeds %s (%s ranking)" % (a.seeds, a.strategy))
    print("| round | labelled | " + " | ".join(names) + " |")
    print("|---:|---:|" + "---:|" * len(names))
    for rnd in range(a.rounds + 1):
        acc = {m: np.array([r["rounds"][rnd]["accuracy"] for r in results["runs"] if r["method"] == m])
               for m in names}
        cells = ["%.4f ± %.4f" % (acc[m].mean(), acc[m].std(ddof=1) if len(acc[m]) > 1 else 0) for m in names]
        print("| %d | %d | %s |" % (rnd, results["runs"][0]["rounds"][rnd]["labelled"], " | ".join(cells)))
    if "random" in names:
        print("\nsuggested − random, paired by seed: mean ± sample std")
        for rnd in range(a.rounds + 1):
            rand = np.array([r["rounds"][rnd]["accuracy"] for r in results["runs"] if r["method"] == "random"])
            cells = []
            for m in names[:-1]:
                d = np.array([r["rounds"][rnd]["accuracy"] for r in results["runs"] if r["method"] == m]) - rand
                cells.append("%+.4f ± %.4f" % (d.mean(), d.std(ddof=1) if len(d) > 1 else 0))
            print("| %d | %s |" % (rnd, " | ".join(cells)))
    print("\nnear-duplicates skipped per suggestion round (mean over seeds and rounds 1..%d):" % a.rounds)
    for m in names[:-1] if "random" in names else names:
        d = [x["duplicates_skipped"] for r in results["runs"] if r["method"] == m for x in r["rounds"][1:]]
        print("  %s: %.0f (min %d, max %d)" % (m, np.mean(d), min(d), max(d)))
    print("\nclasses of the images picked in rounds 1..%d (%d per run, summed over seeds):" % (a.rounds, a.per_round * a.rounds))
    for m in names:
        tot = {}
        for r in results["runs"]:
            if r["method"] == m:
                for x in r["rounds"][1:]:
                    for k, v in x["picked_per_class"].items():
                        tot[k] = tot.get(k, 0) + v
        print("  %s: %s" % (m, tot))
    print("total %.0f s" % (time.time() - started))


if __name__ == "__main__":
    main()

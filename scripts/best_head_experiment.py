#!/usr/bin/env python3
"""Does fine-tuning still beat the best head once the sweep may read an
earlier layer? (docs/experiments.md, "Fine-tuning against the best head").

The recipe experiment compared fine-tuning with heads on the embedding only;
the sweep can now also fit heads on earlier stages (--layers), which scored
about as much above the embedding's head as fine-tuning did, on another
pretraining run of the default backbone. Here both on one backbone, same
target classes, sizes and test set as scripts/recipe_experiment.py (whose
helpers it uses):
  (s)     sweep, embedding, linear heads (the recipe experiment's (s));
  (layers) sweep over layer2, layer3 and the embedding, linear heads (10 L2
          values x 3 layers, 5-fold CV): the best linear head tlserve can fit;
  (c-new) a linear head, then layer3 + layer4 fine-tuned with the default
          recipe (the recipe experiment's best fine-tune).

  /usr/bin/python3 scripts/best_head_experiment.py --bin build/bin \
      --backbone var/backbones/fmnist-resnet18.pt --seeds 1000=2
"""
import hashlib
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from recipe_experiment import (NEW, T, evaluate, experiment_parser, fmt, made_on,  # noqa: E402
                               run_experiment, train)
from tlserve_client import models_pb2  # noqa: E402

BEGIN, END = "<!-- best-head-experiment:begin -->", "<!-- best-head-experiment:end -->"
METHODS = [
    ("s", "(s) sweep, embedding, linear"),
    ("layers", "(layers) sweep, layer2 / layer3 / embedding, linear"),
    ("c-new", "(c-new) head, then layer3+layer4 fine-tuned, default recipe"),
]


def run_one(c, n, seed, ds, epochs, out):
    def record(key, **kv):
        row = dict(n=n, seed=seed, method=key, **kv)
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")

    for key, layers in (("s", []), ("layers", ["layer2", "layer3", "embedding"])):
        m = "%s-%d-%d" % (key, n, seed)
        c.create_model(m, dataset=ds)
        secs, job = train(c, m, ds, seed=seed, sweep=models_pb2.SweepOptions(layers=layers))
        w = job.leaderboard[0]
        record(key, acc=evaluate(c, m, job.version, "test"), secs=secs, winner=w.layer or "embedding",
               l2=w.l2, cv=w.accuracy)
    m = "c-new-%d-%d" % (n, seed)
    c.create_model(m, dataset=ds)
    head_secs, _ = train(c, m, ds, seed=seed)
    c.unfreeze(m, from_stage="layer3")
    secs, job = train(c, m, ds, seed=seed, epochs=epochs, optimizer=T.ADAMW, batch_size=64, **NEW)
    record("c-new", acc=evaluate(c, m, job.version, "test"), secs=head_secs + secs, winner="",
           published_epoch=max(job.epochs, key=lambda e: (e.validation_accuracy, -e.epoch)).epoch)


def table(rows, command, backbone):
    with open(backbone, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()[:16]
    lines = [BEGIN,
             made_on(command, "backbone SHA-256 %s…" % sha),
             "",
             "| per class | method | seeds | test accuracy (mean ± std) | per seed | chosen layer per seed "
             "| CV accuracy of the winner per seed | published epoch per seed | training s (mean) |",
             "|---:|---|---:|---:|---|---|---|---|---:|"]
    for n in sorted({r["n"] for r in rows}):
        for key, name in METHODS:
            rs = sorted((r for r in rows if r["n"] == n and r["method"] == key), key=lambda r: r["seed"])
            if not rs:
                continue
            accs = [r["acc"] for r in rs]
            lines.append("| %d | %s | %d | %s | %s | %s | %s | %s | %.1f |" % (
                n, name, len(rs), fmt(accs), " / ".join("%.4f" % x for x in accs),
                " / ".join(r["winner"] for r in rs) if rs[0]["winner"] else "—",
                " / ".join("%.4f" % r["cv"] for r in rs) if "cv" in rs[0] else "—",
                " / ".join(str(r["published_epoch"]) for r in rs) if "published_epoch" in rs[0] else "—",
                statistics.mean(r["secs"] for r in rs)))
    lines.append("")
    lines.append("Std: sample standard deviation over the seeds; *CV accuracy*: the sweep winner's mean 5-fold "
                 "accuracy on the training split (what it chose by); *published epoch*: the fine-tune's best "
                 "validation epoch (first of ties; 0 would be the head it started from); *training s*: wall "
                 "time of the job(s) seen by the client (for (c-new) the head job plus the fine-tuning job).")
    lines.append(END)
    return "\n".join(lines)


def main():
    p = experiment_parser(__doc__, "best_head_experiment", "1000=2")
    p.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs")
    a = p.parse_args()
    if not a.table_only:
        open(a.results, "w").close()  # this run's rows only (the table's seeds are its own)
    command = "/usr/bin/python3 scripts/best_head_experiment.py --seeds %s" % a.seeds
    run_experiment(a, lambda c, n, seed, ds: run_one(c, n, seed, ds, a.epochs, a.results), BEGIN, END,
                   lambda rows: table(rows, command, a.backbone))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The sweep's layers and head shapes, on real features (docs/experiments.md).

Same backbone, target classes and test set as scripts/recipe_experiment.py
(whose helpers it uses): the default backbone, classes 5-9, the first N
train-split images per class, the whole official test split of those classes
(5,000 images) scored with Evaluate on the version each job made. Per size
and seed, four sweep jobs (TrainingOptions.sweep, the default 10 L2 values,
5-fold CV on the training split):
  (s)   the embedding, linear heads (the sweep of the recipe experiment);
  (l3)  layer3's output average-pooled, linear heads;
  (h)   the embedding, heads with one hidden layer of 256 units;
  (all) layers layer2, layer3 and the embedding x linear and 256 hidden: the
        sweep chooses among 60 candidates by CV.
Each run is appended to a JSON-lines file (--results); the table is written
between markers in docs/experiments.md.

  /usr/bin/python3 scripts/sweep_experiment.py --bin build/bin \
      --backbone var/backbones/fmnist-resnet18.pt --seeds 100=3,1000=3
"""
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from recipe_experiment import evaluate, experiment_parser, fmt, made_on, run_experiment, train  # noqa: E402
from tlserve_client import models_pb2  # noqa: E402

BEGIN, END = "<!-- sweep-experiment:begin -->", "<!-- sweep-experiment:end -->"
METHODS = [
    ("s", "(s) embedding, linear", dict(layers=[], hidden=[])),
    ("l3", "(l3) layer3 pooled, linear", dict(layers=["layer3"], hidden=[])),
    ("h", "(h) embedding, hidden 256", dict(layers=[], hidden=[256])),
    ("all", "(all) layer2 / layer3 / embedding × linear / hidden 256", dict(
        layers=["layer2", "layer3", "embedding"], hidden=[0, 256])),
]


def run_one(c, n, seed, ds, out):
    for key, _, sweep in METHODS:
        m = "%s-%d-%d" % (key, n, seed)
        c.create_model(m, dataset=ds)
        secs, job = train(c, m, ds, seed=seed, sweep=models_pb2.SweepOptions(**sweep))
        w = job.leaderboard[0]
        row = dict(n=n, seed=seed, method=key, acc=evaluate(c, m, job.version, "test"), secs=secs,
                   version=job.version, layer=w.layer, hidden=list(w.hidden), l2=w.l2, cv=w.accuracy,
                   candidates=len(job.leaderboard))
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def table(rows, command):
    lines = [BEGIN,
             made_on(command),
             "",
             "| per class | sweep | seeds | candidates | test accuracy (mean ± std) | per seed | CV accuracy "
             "of the winner | winner (layer, head) per seed | training s (mean) |",
             "|---:|---|---:|---:|---:|---|---:|---|---:|"]
    for n in sorted({r["n"] for r in rows}):
        for key, name, _ in METHODS:
            rs = sorted((r for r in rows if r["n"] == n and r["method"] == key), key=lambda r: r["seed"])
            if not rs:
                continue
            accs = [r["acc"] for r in rs]
            winners = " / ".join("%s, %s" % (r["layer"], "hidden %d" % r["hidden"][0] if r["hidden"] else "linear")
                                 for r in rs)
            lines.append("| %d | %s | %d | %d | %s | %s | %s | %s | %.1f |" % (
                n, name, len(rs), rs[0]["candidates"], fmt(accs), " / ".join("%.4f" % x for x in accs),
                fmt([r["cv"] for r in rs]), winners, statistics.mean(r["secs"] for r in rs)))
    lines.append("")
    lines.append("Std: sample standard deviation over the seeds; *CV accuracy*: the winner's mean 5-fold accuracy "
                 "on the training split (what the sweep chose by); *training s*: the job's wall time seen by "
                 "the client (features of each layer, then the sweep).")
    lines.append(END)
    return "\n".join(lines)


def main():
    a = experiment_parser(__doc__, "sweep_experiment", "100=3,1000=3").parse_args()
    command = "/usr/bin/python3 scripts/sweep_experiment.py --seeds %s" % a.seeds
    run_experiment(a, lambda c, n, seed, ds: run_one(c, n, seed, ds, a.results), BEGIN, END,
                   lambda rows: table(rows, command))


if __name__ == "__main__":
    main()

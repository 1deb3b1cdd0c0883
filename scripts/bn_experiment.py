#!/usr/bin/env python3
"""BatchNorm statistics when fine-tuning, by batch size and data size
(docs/experiments.md, "BatchNorm statistics by batch size and data size").

Same backbone, target classes and test set as scripts/recipe_experiment.py
(whose helpers it uses): the default backbone, classes 5-9, the first N
train-split images per class, the whole official test split of those classes
(5,000 images) scored with Evaluate on the version each job made. Per size,
seed and batch size, the recipe experiment's (c-new): a linear head first, then
layer3 + layer4 unfrozen and fine-tuned with the server's default recipe
(AdamW, head 1e-3, stage 1e-4, warm-up + cosine, layer decay 0.5, gradual
unfreezing), once with the private stages' BatchNorm statistics frozen and
once training (freeze_batchnorm false). Every job gets the run's seed and
SERVE_ALWAYS; the version published is the best validation epoch (epoch 0, the
head, included), so the table also gives the last epoch's validation accuracy,
which says what training the statistics did to the model, not only whether
the job fell back to its start.

  /usr/bin/python3 scripts/bn_experiment.py --bin build/bin \
      --backbone var/backbones/fmnist-resnet18.pt --seeds 100=1,1000=1 --batches 16,64,256
"""
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from recipe_experiment import (epochs_of, evaluate, experiment_parser, fmt, made_on,  # noqa: E402
                               run_experiment, train)
from tlserve_client import models_pb2  # noqa: E402

BEGIN, END = "<!-- bn-experiment:begin -->", "<!-- bn-experiment:end -->"
T = models_pb2.TrainingOptions


def run_one(c, n, seed, ds, batches, epochs, out):
    for batch in batches:
        for frozen in (True, False):
            m = "bn-%s-%d-%d-%d" % ("frozen" if frozen else "train", batch, n, seed)
            c.create_model(m, dataset=ds)
            head_secs, head_job = train(c, m, ds, seed=seed)
            c.unfreeze(m, from_stage="layer3")
            secs, job = train(c, m, ds, seed=seed, epochs=epochs, optimizer=T.ADAMW, batch_size=batch,
                              freeze_batchnorm=frozen)
            row = dict(n=n, seed=seed, batch=batch, frozen=frozen, acc=evaluate(c, m, job.version, "test"),
                       head_acc=evaluate(c, m, head_job.version, "test"), secs=secs, version=job.version,
                       head_version=head_job.version, epochs=epochs_of(job))
            print(json.dumps(row), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")


def table(rows, command, epochs):
    lines = [BEGIN,
             made_on(command, "fine-tunes %d epochs" % epochs),
             "",
             "| per class | batch | BatchNorm statistics | seeds | test accuracy (mean ± std) | head's test accuracy "
             "| published epoch | validation: epoch 0 → epoch 1 → last | fine-tune s (mean) |",
             "|---:|---:|---|---:|---:|---:|---|---|---:|"]
    for n in sorted({r["n"] for r in rows}):
        for batch in sorted({r["batch"] for r in rows if r["n"] == n}):
            for frozen in (True, False):
                rs = sorted((r for r in rows if r["n"] == n and r["batch"] == batch and r["frozen"] == frozen),
                            key=lambda r: r["seed"])
                if not rs:
                    continue
                best = [max(r["epochs"], key=lambda e: (e["val"], -e["epoch"]))["epoch"] for r in rs]
                path = " / ".join("%.3f → %.3f → %.3f" % (r["epochs"][0]["val"], r["epochs"][1]["val"],
                                                           r["epochs"][-1]["val"]) for r in rs)
                lines.append("| %d | %d | %s | %d | %s | %s | %s | %s | %.1f |" % (
                    n, batch, "frozen" if frozen else "training", len(rs), fmt([r["acc"] for r in rs]),
                    fmt([r["head_acc"] for r in rs]), " / ".join(map(str, best)), path,
                    statistics.mean(r["secs"] for r in rs)))
    lines.append("")
    lines.append("*Published epoch*: the job's best validation epoch (0 = the head it started from, which the "
                 "job then publishes); *validation*: the validation split's accuracy at the start, after the "
                 "first fine-tuning epoch and after the last, per seed.")
    lines.append(END)
    return "\n".join(lines)


def main():
    p = experiment_parser(__doc__, "bn_experiment", "100=1,1000=1")
    p.add_argument("--batches", default="16,64,256", help="fine-tuning batch sizes")
    p.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs")
    a = p.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    command = "/usr/bin/python3 scripts/bn_experiment.py --seeds %s --batches %s --epochs %d" % (
        a.seeds, a.batches, a.epochs)
    run_experiment(a, lambda c, n, seed, ds: run_one(c, n, seed, ds, batches, a.epochs, a.results), BEGIN,
                   END, lambda rows: table(rows, command, a.epochs))


if __name__ == "__main__":
    main()

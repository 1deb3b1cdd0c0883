#!/usr/bin/env python3
"""The fine-tuning recipe's experiment of docs/experiments.md.

Same source, target and test set as scripts/experiment.py: the default
backbone (ResNet-18 pretrained by tlserve on Fashion-MNIST classes 0-4),
target classes 5-9 with the first 10, 100 and 1,000 train-split images per
class, tested on the whole official test split of those classes (5,000
images) with the Evaluate RPC on the version each job made. Five ways:
  (a)     head only: a linear head, L-BFGS (the default);
  (s)     sweep: one linear head per L2 strength (the default 10), 5-fold CV
          on the training split, the winner refitted (TrainingOptions.sweep);
  (b-old) the head of (a), then layer4 unfrozen and fine-tuned with the old
          recipe: constant learning rates (SCHEDULE_CONSTANT), layer_decay 1,
          no gradual unfreezing;
  (b-new) the same with the new default recipe: warm-up (10% of the steps) +
          cosine decay, layer-wise decay 0.5, gradual unfreezing (with one
          private stage only the schedule differs from (b-old));
  (c-new) the head, then layer3 + layer4 unfrozen (--from layer3), new recipe.
Fine-tunes: AdamW, batch 64, head lr 1e-3 and stage lr 1e-4 (the server's
defaults), BatchNorm statistics frozen (the default), the same epochs for all.
Every job gets the run's seed and SERVE_ALWAYS. Each run is appended to a
JSON-lines file as it finishes (--results), so a run cut short keeps what it
measured; --table-only rewrites the table from that file.

  /usr/bin/python3 scripts/recipe_experiment.py --bin build/bin \
      --backbone var/backbones/fmnist-resnet18.pt --seeds 10=3,100=3,1000=3
"""
import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "client", "python"))
from tlserve_client import Client, image_folder, models_pb2  # noqa: E402
from tlserve_client.local_server import LocalServer  # noqa: E402
from tlserve.v1 import evaluation_pb2  # noqa: E402

TARGET = "5,6,7,8,9"
BEGIN, END = "<!-- recipe-experiment:begin -->", "<!-- recipe-experiment:end -->"
T = models_pb2.TrainingOptions
METHODS = [
    ("a", "(a) head only, L-BFGS"),
    ("s", "(s) sweep head (10 L2, 5-fold CV)"),
    ("b-old", "(b-old) head, then layer4 fine-tuned, old recipe"),
    ("b-new", "(b-new) head, then layer4 fine-tuned, new recipe"),
    ("c-new", "(c-new) head, then layer3+layer4 fine-tuned, new recipe"),
]
OLD = dict(schedule=T.SCHEDULE_CONSTANT, layer_decay=1.0, gradual_unfreezing=False)
NEW = {}  # the server's defaults


def train(client, model, dataset, **options):
    start = time.time()
    job = client.train(model, dataset, serve=T.SERVE_ALWAYS, **options)
    if job.state != models_pb2.Job.SUCCEEDED:
        raise RuntimeError("%s: %s %s" % (model, models_pb2.Job.State.Name(job.state), job.error))
    return time.time() - start, job


def evaluate(client, model, version, dataset):
    last = None
    for r in client.models.Evaluate(evaluation_pb2.EvaluateRequest(model=model, versions=[version],
                                                                   dataset=dataset)):
        last = r
    (e,) = last.evaluations
    if e.version != version or e.images != 5000:
        raise RuntimeError("%s v%d: evaluated version %d on %d images" % (model, version, e.version, e.images))
    return e.accuracy


def epochs_of(job):
    return [dict(epoch=e.epoch, val=round(e.validation_accuracy, 4), train=round(e.train_accuracy, 4),
                 loss=round(e.train_loss, 4)) for e in job.epochs]


def run_one(c, n, seed, ds, epochs, out):
    def record(key, **kv):
        row = dict(n=n, seed=seed, method=key, **kv)
        print(json.dumps(row), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")

    m = "a-%d-%d" % (n, seed)
    c.create_model(m, dataset=ds)
    secs, job = train(c, m, ds, seed=seed)
    record("a", acc=evaluate(c, m, job.version, "test"), secs=secs, version=job.version)

    m = "s-%d-%d" % (n, seed)
    c.create_model(m, dataset=ds)
    secs, job = train(c, m, ds, seed=seed, sweep=models_pb2.SweepOptions())
    lb = job.leaderboard
    record("s", acc=evaluate(c, m, job.version, "test"), secs=secs, version=job.version,
           l2=lb[0].l2 if lb else None, cv=lb[0].accuracy if lb else None,
           leaderboard=[(round(x.l2, 6), round(x.accuracy, 4)) for x in lb])

    for key, stage, recipe in (("b-old", "layer4", OLD), ("b-new", "layer4", NEW), ("c-new", "layer3", NEW)):
        m = "%s-%d-%d" % (key, n, seed)
        c.create_model(m, dataset=ds)
        head_secs, head_job = train(c, m, ds, seed=seed)
        c.unfreeze(m, from_stage=stage)
        secs, job = train(c, m, ds, seed=seed, epochs=epochs, optimizer=T.ADAMW, batch_size=64, **recipe)
        record(key, acc=evaluate(c, m, job.version, "test"), secs=head_secs + secs, head_secs=head_secs,
               ft_secs=secs, version=job.version, head_version=head_job.version,
               head_acc=evaluate(c, m, head_job.version, "test"), outcome=job.outcome, epochs=epochs_of(job))


def fmt(values, digits=4):
    if len(values) == 1:
        return "%.*f" % (digits, values[0])
    return "%.*f ± %.*f" % (digits, statistics.mean(values), digits, statistics.stdev(values))


def table(rows, command, epochs):
    lines = [BEGIN,
             made_on(command, "fine-tunes %d epochs" % epochs),
             "",
             "| per class | method | seeds | test accuracy (mean ± std) | per seed | training s (mean) |"
             " best validation epoch |",
             "|---:|---|---:|---:|---|---:|---|"]
    for n in sorted({r["n"] for r in rows}):
        for key, name in METHODS:
            rs = sorted((r for r in rows if r["n"] == n and r["method"] == key), key=lambda r: r["seed"])
            if not rs:
                continue
            accs = [r["acc"] for r in rs]
            # The epoch with the best validation accuracy (the first of ties;
            # 0 is the head it started from), per seed; "—" for heads.
            best = [max(r["epochs"], key=lambda e: (e["val"], -e["epoch"]))["epoch"] for r in rs if "epochs" in r]
            lines.append("| %d | %s | %d | %s | %s | %.1f | %s |" % (
                n, name, len(rs), fmt(accs), " / ".join("%.4f" % x for x in accs),
                statistics.mean(r["secs"] for r in rs), " / ".join(map(str, best)) if best else "—"))
    lines.append("")
    lines.append("Std: sample standard deviation over the seeds (0, 1, 2, ...); *training s*: wall time of the "
                 "job(s) seen by the client, for fine-tunes the head job plus the fine-tuning job.")
    lines.append(END)
    return "\n".join(lines)


def made_on(command, extra=""):
    """The first line of an experiment's table: the date, the command, the machine."""
    cpu = "unknown CPU"
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read()).group(1)
    except (OSError, AttributeError):
        pass
    return "Made on %s by `%s` (%d cores, %s%s)." % (datetime.date.today().isoformat(), command,
                                                    os.cpu_count(), cpu, "; " + extra if extra else "")


def experiment_parser(doc, name, seeds):
    """The options every experiment script takes; the script adds its own,
    then parses and calls run_experiment."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=os.path.join(HERE, "..", "build", "bin"))
    p.add_argument("--backbone", default=os.path.join(HERE, "..", "var", "backbones", "fmnist-resnet18.pt"))
    p.add_argument("--seeds", default=seeds, help="SIZE=SEEDS,...: images per class and seeds")
    p.add_argument("--results", default=os.path.join(tempfile.gettempdir(), name + ".jsonl"),
                   help="JSON lines, one per run, appended")
    p.add_argument("--table-only", action="store_true", help="only rewrite the table from --results")
    p.add_argument("--doc", default=os.path.join(HERE, "..", "docs", "experiments.md"))
    return p


def run_experiment(a, run_one, begin, end, make_table):
    """Runs `run_one(client, n, seed, dataset)` over the plan of --seeds
    (unless --table-only), then writes make_table(rows of --results) between
    the markers of --doc."""
    plan = [(int(k), int(v)) for k, v in (x.split("=") for x in a.seeds.split(","))]
    if not a.table_only:
        run_plan(a.bin, a.backbone, plan, run_one)
    rows = [json.loads(line) for line in open(a.results) if line.strip()]
    write_table(a.doc, begin, end, make_table(rows))


def run_plan(bin_dir, backbone, plan, run_one):
    """Samples the target images, serves `backbone`, uploads the test set and,
    per (images per class, seeds) of `plan`, the training set; then calls
    run_one(client, n, seed, dataset) for each seed. Also used by
    scripts/sweep_experiment.py."""
    tmp = tempfile.mkdtemp(prefix="tlserve-experiment-")
    try:
        for split, count in (("train", max(n for n, _ in plan)), ("test", 1000)):
            subprocess.run([sys.executable, os.path.join(HERE, "sample_images.py"), os.path.join(tmp, split),
                            "--count", str(count), "--classes", TARGET, "--split", split], check=True)
        with LocalServer(bin_dir, backbone, os.path.join(tmp, "data")) as server, Client(server.target) as c:
            c.upload("test", image_folder(os.path.join(tmp, "test")))
            for n, seeds in plan:
                ds = "target-%d" % n
                c.upload(ds, image_folder(os.path.join(tmp, "train"), n))
                for seed in range(seeds):
                    print("== %d per class, seed %d" % (n, seed), flush=True)
                    run_one(c, n, seed, ds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_table(doc_path, begin, end, text):
    """Prints `text` and puts it between the markers in doc_path (appended
    when they are missing)."""
    print(text)
    doc = open(doc_path).read()
    if begin in doc and end in doc:
        doc = doc[:doc.index(begin)] + text + doc[doc.index(end) + len(end):]
    else:
        doc += "\n" + text + "\n"
    with open(doc_path, "w") as f:
        f.write(doc)
    print("wrote the table into %s" % doc_path)


def main():
    p = experiment_parser(__doc__, "recipe_experiment", "10=3,100=3,1000=3")
    p.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs")
    a = p.parse_args()
    command = "/usr/bin/python3 scripts/recipe_experiment.py --seeds %s --epochs %d" % (a.seeds, a.epochs)
    run_experiment(a, lambda c, n, seed, ds: run_one(c, n, seed, ds, a.epochs, a.results), BEGIN, END,
                   lambda rows: table(rows, command, a.epochs))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Serving during training, and fine-tuning from a cached vs a recomputed
prefix (issue 10). Not a test: it measures and prints two tables; it asserts
nothing about timings.

It starts a real server (build/bin/tlserve on free loopback ports), uploads one
labelled Fashion-MNIST dataset (--classes x --per-class training images),
creates a model on it, trains its head (a head-only job), then unfreezes
`layer4` (UnfreezeLayers from layer4: the model gets a private layer4).

1. Serving during training, in --rounds rounds (idle first in odd rounds,
   fine-tuning first in even ones, so that drift in the machine's load falls
   on both alike):
     idle         --clients threads, each on its own channel, send Embed
                  requests of --batch images, one at a time, for a window of
                  --seconds (after each client's first call);
     fine-tuning  a fine-tuning job of the model starts (--busy-epochs epochs,
                  augment as --busy-augment); once it has reported its epoch 0
                  (the starting point evaluated, the prefix cache filled), the
                  same Embed load runs for a window of --seconds; then the job
                  is cancelled (CancelJob) unless it has ended.
   Reported: Embed images/s of each, the ratio fine-tuning/idle, and the job's
   images/s (EpochProgress.images_per_second of its last epoch, which the
   server computes over the job so far, epoch 0 included; and the rate of its
   training epochs alone, from elapsed_seconds: images x epochs / (elapsed at
   the last epoch - elapsed at epoch 0)).

2. Fine-tune throughput, nothing else running: --ft-rounds rounds of two jobs
   of --ft-epochs epochs each (alternating which goes first): augment off (the
   frozen prefix's activations are cached at epoch 0 and reused) and augment on
   (random resized crops and flips: the prefix is recomputed for every batch).
   Reported: each job's images/s as above, and the ratio cached/recomputed.

  /usr/bin/python3 bench/serving_during_training.py
  /usr/bin/python3 bench/serving_during_training.py --device=cuda --precision=bf16 --train_threads=4
  scripts/bench.sh serving_during_training --rounds=3

--train_threads (LibTorch threads for training jobs; a flag of the device
engine) is passed only when given, so that the script also runs against a
server without it. Default backbone: var/backbones/resnet18.pt (random-weight
ResNet-18, 224x224; scripts/bench.sh makes it).
"""
import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tlbench  # noqa: E402
from tlbench import Client, inference_pb2, models_pb2  # noqa: E402

import grpc  # noqa: E402
from tlserve.v1 import inference_pb2_grpc, models_pb2_grpc  # noqa: E402

RUN = "%x" % int(time.time())


class EmbedClient:
    def __init__(self, i, target, images, batch, timeout):
        self.ch = tlbench.channel(target, "sdt-%d" % i)
        self.inf = inference_pb2_grpc.InferenceStub(self.ch)
        self.timeout = timeout
        self.requests = []
        for r in range(4):
            pick = [images[(i * 31 + r * batch + k) % len(images)] for k in range(batch)]
            self.requests.append(inference_pb2.EmbedRequest(
                images=[inference_pb2.Image(name="e%d-%d" % (i, k), encoded=b) for k, b in enumerate(pick)]))
        self.n = 0

    def call(self):
        self.n += 1
        return len(self.inf.Embed(self.requests[self.n % 4], timeout=self.timeout).embeddings)


class JobFollower(threading.Thread):
    """Follows a job with WatchJob; `latest` is its last update, `epoch0` is set
    once it has reported epoch 0 (or ended)."""

    def __init__(self, stub, job_id):
        super().__init__(daemon=True)
        self.stub, self.job_id = stub, job_id
        self.latest, self.error = None, None
        self.epoch0, self.done = threading.Event(), threading.Event()

    def run(self):
        try:
            for job in self.stub.WatchJob(models_pb2.WatchJobRequest(id=self.job_id), timeout=3600):
                self.latest = job
                if any(e.epoch == 0 for e in job.epochs):
                    self.epoch0.set()
                if job.state in tlbench.FINAL:
                    break
        except grpc.RpcError as e:
            self.error = "%s: %s" % (e.code().name, e.details())
        self.epoch0.set()
        self.done.set()


def job_rates(job):
    """(reported images/s of the last epoch, training-epochs images/s, epochs
    after 0, seconds from epoch 0 to the last) from a job's EpochProgress."""
    eps = list(job.epochs) if job is not None else []
    start = next((i for i, e in enumerate(eps) if e.epoch == 0), None)
    if start is None or len(eps) <= start + 1:
        return None, None, 0, None
    tune = eps[start:]
    last, zero = tune[-1], tune[0]
    n = last.images_per_second * last.elapsed_seconds / last.epoch  # training images an epoch
    span = last.elapsed_seconds - zero.elapsed_seconds
    return last.images_per_second, (n * last.epoch / span if span > 0 else None), last.epoch, span


def start_job(stub, model, dataset, epochs, augment, seed):
    return stub.StartTraining(models_pb2.StartTrainingRequest(
        model=model, dataset=dataset,
        options=models_pb2.TrainingOptions(epochs=epochs, augment=augment, seed=seed)), timeout=60)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8, help="Embed client threads (default 8)")
    p.add_argument("--batch", type=int, default=8, help="images an Embed request (default 8)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (idle, fine-tuning) phases (default 2)")
    p.add_argument("--seconds", type=float, default=15, help="measured window of each phase (default 15)")
    p.add_argument("--warmup", type=float, default=3,
                   help="an idle Embed phase with this window first, not counted (default 3; 0: none)")
    p.add_argument("--busy-epochs", type=int, default=1000,
                   help="epochs of the job that runs beside serving (cancelled after the window; default 1000)")
    p.add_argument("--busy-augment", action="store_true", help="augment that job (default: off, cached prefix)")
    p.add_argument("--ft-rounds", type=int, default=1,
                   help="rounds of (cached, recomputed) fine-tuning jobs alone (default 1; 0: skip)")
    p.add_argument("--ft-epochs", type=int, default=3, help="epochs of those jobs (default 3)")
    p.add_argument("--classes", type=int, default=5, help="classes in the dataset (default 5)")
    p.add_argument("--per-class", type=int, default=50, help="training images a class (default 50)")
    p.add_argument("--timeout", type=float, default=120, help="deadline of each Embed call, s (default 120)")
    tlbench.add_server_args(p)
    a = p.parse_args()

    t_all = time.monotonic()
    load_before = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="tlserve-sdt-")
    server = tlbench.start_server(a, work)
    try:
        target, metrics_port = server.target, server.metrics_port
        print("server %s (metrics port %d): %s" % (target, metrics_port, tlbench.server_log_line(server)), flush=True)
        c = Client(target, timeout=60)
        desc = c.describe_backbone()
        stub = models_pb2_grpc.ModelsStub(c.channel)

        # --- setup: dataset, model, its head, layer4 unfrozen ---------------------------------
        t = time.monotonic()
        ds, model = "sdt-%s-data" % RUN, "sdt-%s-ft" % RUN
        r = c.upload(ds, tlbench.fmnist("train", range(a.classes), a.per_class), batch=64)
        c.create_model(model, dataset=ds)
        head = c.train(model, ds)
        if head.state != models_pb2.Job.SUCCEEDED:
            raise SystemExit("head-only training ended %s: %s" % (tlbench.state_name(head), head.error))
        c.unfreeze(model, from_stage="layer4")
        print("setup: %d images (%d classes), head trained (v%d, validation %.3f), layer4 unfrozen in %.1f s" % (
            r.accepted, a.classes, head.version,
            head.epochs[-1].validation_accuracy if head.epochs else float("nan"), time.monotonic() - t), flush=True)

        images = [b for _, _, b in tlbench.fmnist("test", range(10), 10)]
        clients = [EmbedClient(i, target, images, a.batch, a.timeout) for i in range(a.clients)]
        callers = [cl.call for cl in clients]

        # --- 1. serving during training ---------------------------------------------------------
        if a.warmup > 0:
            tlbench.measure(callers, a.warmup, metrics_port, a.timeout)
        phases = {"idle": [], "busy": []}
        busy_jobs = []
        seed = 1
        for rnd in range(a.rounds):
            order = ("idle", "busy") if rnd % 2 == 0 else ("busy", "idle")
            line = []
            for kind in order:
                if kind == "idle":
                    ph = tlbench.measure(callers, a.seconds, metrics_port, a.timeout)
                else:
                    job = start_job(stub, model, ds, a.busy_epochs, a.busy_augment, seed)
                    seed += 1
                    follower = JobFollower(stub, job.id)
                    follower.start()
                    follower.epoch0.wait(timeout=1800)
                    running = follower.latest is not None and follower.latest.state == models_pb2.Job.RUNNING
                    ph = tlbench.measure(callers, a.seconds, metrics_port, a.timeout)
                    ended_inside = follower.done.is_set()
                    try:
                        stub.CancelJob(models_pb2.CancelJobRequest(id=job.id), timeout=60)
                    except grpc.RpcError as e:
                        if e.code() != grpc.StatusCode.FAILED_PRECONDITION:  # it had ended
                            raise
                    follower.done.wait(timeout=600)
                    final = stub.GetJob(models_pb2.GetJobRequest(id=job.id), timeout=60)
                    ph.update(job=final, running_at_start=running, ended_inside=ended_inside)
                    busy_jobs.append(final)
                phases[kind].append(ph)
                line.append("%s %.1f img/s" % ("idle" if kind == "idle" else "during fine-tuning", tlbench.rate(ph)))
                if kind == "busy":
                    rep, steady, n, _ = job_rates(ph["job"])
                    line[-1] += " (job %s, %d epochs, %s img/s%s)" % (
                        tlbench.state_name(ph["job"]), n, tlbench.fmt(rep),
                        "; it ENDED inside the window" if ph["ended_inside"] else "")
            print("round %d: %s; ratio %.3f" % (rnd + 1, ", ".join(line),
                                               tlbench.ratio(phases["busy"][-1], phases["idle"][-1])),
                  flush=True)
        for cl in clients:
            cl.ch.close()

        # --- 2. fine-tuning alone: cached vs recomputed prefix -------------------------------------
        ft = {False: [], True: []}
        for rnd in range(a.ft_rounds):
            for augment in ((False, True) if rnd % 2 == 0 else (True, False)):
                t = time.monotonic()
                job = start_job(stub, model, ds, a.ft_epochs, augment, seed)
                seed += 1
                job = tlbench.wait_job(stub, job.id)
                rep, steady, n, span = job_rates(job)
                ft[augment].append({"job": job, "seconds": time.monotonic() - t, "reported": rep,
                                    "steady": steady, "epochs": n, "span": span})
                print("fine-tune alone, augment %s: %s in %.1f s, %s img/s reported, %s img/s over epochs 1..%d" % (
                    "on" if augment else "off", tlbench.state_name(job), time.monotonic() - t,
                    tlbench.fmt(rep), tlbench.fmt(steady), n), flush=True)
        c.close()

        # --- report ----------------------------------------------------------------------------------
        idle, busy = tlbench.merge(phases["idle"]), tlbench.merge(phases["busy"])
        ratio = tlbench.ratio(busy, idle)
        print()
        print(tlbench.backbone_line(a, desc, server))
        print("%d Embed clients x %d images, %d rounds x %.0f s a phase; dataset %d images (%d classes); %s" % (
            a.clients, a.batch, a.rounds, a.seconds, r.accepted, a.classes, tlbench.machine_line()))
        print("load average (1 min) %.2f before the run; total %.0f s" % (load_before, time.monotonic() - t_all))
        print()
        busy_rates = [job_rates(ph["job"]) for ph in phases["busy"]]
        print("| phase | Embed calls | images | seconds | Embed images/s | p50 ms | ratio to idle "
              "| fine-tune job images/s (reported) | fine-tune images/s (epochs after 0) |")
        print("|---|---|---|---|---|---|---|---|---|")
        print("| idle | %d | %d | %.1f | %.1f | %.0f | 1.000 | - | - |" % (
            idle["calls"], idle["images"], idle["seconds"], tlbench.rate(idle), 1000 * tlbench.pct(idle["lat"], 50)))
        print("| during a layer4 fine-tune (augment %s) | %d | %d | %.1f | %.1f | %.0f | %.3f | %s | %s |" % (
            "on" if a.busy_augment else "off", busy["calls"], busy["images"], busy["seconds"], tlbench.rate(busy),
            1000 * tlbench.pct(busy["lat"], 50), ratio,
            " / ".join(tlbench.fmt(x[0]) for x in busy_rates), " / ".join(tlbench.fmt(x[1]) for x in busy_rates)))
        bad = sorted(("%s %s" % (name, k), v) for name, ph in (("idle", idle), ("during fine-tuning", busy))
                     for k, v in ph["codes"].items() if k != "OK")
        if bad:
            print("non-OK Embed answers: %s" % ", ".join("%s %d" % kv for kv in bad))
        notes = []
        for k, ph in enumerate(phases["busy"]):
            if not ph["running_at_start"] or ph["ended_inside"]:
                notes.append("round %d: the job was %s when the window started%s" % (
                    k + 1, "running" if ph["running_at_start"] else "NOT running",
                    " and ended inside it" if ph["ended_inside"] else ""))
        for n in notes:
            print("note: " + n)
        print("per round, during/idle Embed images/s: %s" % ", ".join(
            "%.3f" % tlbench.ratio(x, y) for x, y in zip(phases["busy"], phases["idle"])))
        goal = "goal (issue 10, on CUDA): Embed images/s during a fine-tune >= 0.8 x idle: %.3f -> %s" % (
            ratio, "met" if ratio >= 0.8 else "NOT met")
        if a.ft_rounds > 0:
            print()
            print("| fine-tune alone (layer4 + head, %d epochs) | prefix | jobs | seconds a job "
                  "| images/s (reported, last epoch) | images/s (epochs after 0) | ratio to recomputed |"
                  % a.ft_epochs)
            print("|---|---|---|---|---|---|---|")

            def avg(xs):
                xs = [x for x in xs if x is not None]
                return sum(xs) / len(xs) if xs else None
            rec = avg(j["steady"] for j in ft[True])
            for augment in (False, True):
                js = ft[augment]
                steady = avg(j["steady"] for j in js)
                print("| augment %s | %s | %s | %s | %s | %s | %s |" % (
                    "on" if augment else "off", "recomputed" if augment else "cached", ", ".join(
                        tlbench.state_name(j["job"]) for j in js), tlbench.fmt(avg(j["seconds"] for j in js)),
                    tlbench.fmt(avg(j["reported"] for j in js)), tlbench.fmt(steady),
                    tlbench.fmt(steady / rec if steady is not None and rec else None, 3)))
        print()
        print(goal + ("" if a.device.startswith("cuda") else " (device %s: reported, the goal is for CUDA)" % a.device))
        if a.ft_rounds > 0:
            cached = avg(j["steady"] for j in ft[False])
            print("fine-tune images/s (epochs after 0): cached prefix %s, recomputed %s (%s x); issue 10's CUDA "
                  "reference, ResNet-50 layer4 + head bf16: ~21,000 cached, ~9,800 recomputed" % (
                      tlbench.fmt(cached), tlbench.fmt(rec),
                      tlbench.fmt(cached / rec if cached is not None and rec else None, 2)))
        failed = [tlbench.state_name(j["job"]) for js in ft.values() for j in js
                  if j["job"].state != models_pb2.Job.SUCCEEDED]
        failed += [tlbench.state_name(j) for j in busy_jobs
                   if j.state not in (models_pb2.Job.SUCCEEDED, models_pb2.Job.CANCELLED)]
        if bad or not idle["images"] or not busy["images"] or failed:
            print("PROBLEMS: %s; the figures above are not valid" % "; ".join(
                x for x in ("non-OK Embed answers" if bad else "", "a phase served no images"
                            if not idle["images"] or not busy["images"] else "",
                            "fine-tuning jobs ended %s" % ", ".join(failed) if failed else "") if x))
            return 1
        return 0
    finally:
        server.stop()
        if a.keep:
            print("kept %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env /usr/bin/python3
"""Scale-out benchmark (issue 13): Classify and Embed throughput with 1, 2
and 3 tlserve replicas sharing one PostgreSQL database, and the database's
own load per request. Not a test: it measures and prints a table; it
asserts nothing about timings.

It starts a throwaway PostgreSQL (scripts/pg-temp.sh) and replica 1
(build/bin/tlserve --database=...), which runs the jobs; uploads a small
labelled Fashion-MNIST dataset through it, creates a head-only model and
trains it once. Then for N = 1, 2, 3 replicas (replicas 2 and 3 are
serving-only, --max_concurrent_jobs=0, started when first needed) and for
each mode (Classify, Embed), --clients client threads send --batch-image
requests, client i to replica i mod N, each on its own connection; a warm-up
call each, then a window of --seconds. Reported: images/s, p50 latency, and
the statements the database ran from the phase's start to its end (the
throwaway cluster logs every statement; marks bound the phases), per
second, beside an idle window's after the phases (no calls: what the
replicas do by themselves). The job queue's upkeep (a replica that runs jobs
looks for a claimable one every lease/2, and renews its running jobs' leases)
is not counted.
Before that, the write path: the statements of an upload, a head-only job
and a fine-tune, the bytes of each version and the largest checkpoint seen,
and the connections per replica. Every replica of this machine shares its
2 cores: more replicas cannot serve much more here; the table shows what
they cost and that the hot path does not touch the database.

  /usr/bin/python3 bench/replicas.py
  /usr/bin/python3 bench/replicas.py --seconds=20 --clients=6 --threads=1
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tlbench  # noqa: E402
from tlbench import Client, inference_pb2, models_pb2  # noqa: E402
from tlserve_client.local_server import LocalServer  # noqa: E402

from tlserve.v1 import inference_pb2_grpc, models_pb2_grpc  # noqa: E402


def sql(uri, query):
    r = subprocess.run(["psql", uri, "-Atc", query], capture_output=True, text=True, check=True)
    return r.stdout.strip()


class Statements:
    """Counts the statements the database runs, exactly: the throwaway
    cluster logs every one (log_statement = all), and marks written through
    it bound each window. (pg_stat_database's transaction counts lag: idle
    backends flush their statistics up to 10 s late.)"""

    def __init__(self, uri, log_path):
        self.uri, self.log_path, self.n = uri, log_path, 0
        sql(uri, "ALTER SYSTEM SET log_statement = 'all'")
        sql(uri, "SELECT pg_reload_conf()")

    def mark(self):
        self.n += 1
        sql(self.uri, "SELECT 'tlbench-mark-%d'" % self.n)
        return self.n

    def between(self, first, last):
        with open(self.log_path, errors="replace") as f:
            text = f.read()
        a = text.index("tlbench-mark-%d'" % first)
        b = text.rindex("\n", 0, text.index("tlbench-mark-%d'" % last))  # the mark's line is out
        lines = text[a:b].splitlines()[1:]
        # Not the job queue's upkeep: the workers' look for a claimable job
        # (one SELECT every lease/2, 5 s by default) and the renewals of the
        # leases of running jobs: counted apart.
        self.upkeep = sum(1 for l in lines if re.search(
            r"LOG:  (statement|execute [^:]*): (SELECT 1 FROM job_queue WHERE|"
            r"UPDATE job_queue SET lease_until)", l))
        return sum(1 for l in lines if re.search(r"LOG:  (statement|execute [^:]*):", l)) - self.upkeep



def blob_bytes(uri, like):
    return int(sql(uri, "SELECT coalesce(sum(octet_length(bytes)), 0) FROM blobs WHERE name LIKE '%s'" % like))


def checkpoint_watch(uri, stop, out):
    """The checkpoint bytes seen every 0.2 s while `stop` is unset (one
    transaction each: None when the query failed)."""
    while not stop.is_set():
        try:
            out.append(blob_bytes(uri, "checkpoints/%"))
        except subprocess.CalledProcessError:
            out.append(None)
        time.sleep(0.2)


class BenchClient:
    def __init__(self, i, target, model, images, batch, timeout):
        self.ch = tlbench.channel(target, "rep-%d" % i)
        self.inf = inference_pb2_grpc.InferenceStub(self.ch)
        self.mod = models_pb2_grpc.ModelsStub(self.ch)
        self.timeout = timeout
        self.classify, self.embed = [], []
        for r in range(4):
            pick = [images[(i * 31 + r * batch + k) % len(images)] for k in range(batch)]
            imgs = [inference_pb2.Image(name="c%d-%d" % (i, k), encoded=b) for k, b in enumerate(pick)]
            self.classify.append(models_pb2.ClassifyRequest(model=model, images=imgs, top_k=1))
            self.embed.append(inference_pb2.EmbedRequest(images=imgs))
        self.n = 0

    def call_classify(self):
        self.n += 1
        return len(self.mod.Classify(self.classify[self.n % 4], timeout=self.timeout).results)

    def call_embed(self):
        self.n += 1
        return len(self.inf.Embed(self.embed[self.n % 4], timeout=self.timeout).embeddings)

    def close(self):
        self.ch.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", default="1,2,3", help="replica counts to measure (default 1,2,3)")
    p.add_argument("--clients", type=int, default=6, help="client threads (default 6)")
    p.add_argument("--batch", type=int, default=8, help="images a request (default 8)")
    p.add_argument("--seconds", type=float, default=15, help="measured window of each phase (default 15)")
    p.add_argument("--timeout", type=float, default=120, help="deadline of each call, s (default 120)")
    tlbench.add_server_args(p)
    a = p.parse_args()
    counts = [int(n) for n in a.replicas.split(",")]

    work = tempfile.mkdtemp(prefix="tlserve-replicas-", dir="/tmp")
    os.chmod(work, 0o755)
    pg_dir = os.path.join(work, "pg")
    pg = os.path.join(tlbench.ROOT, "scripts", "pg-temp.sh")
    uri = subprocess.run(["bash", pg, "start", pg_dir], capture_output=True, text=True, check=True).stdout.strip()
    log = Statements(uri, os.path.join(pg_dir, "server.log"))
    servers = []
    t_all = time.monotonic()
    try:
        def start(i):
            flags = tlbench.server_flags(a) + ["--database=" + uri]
            if i > 0:
                flags.append("--max_concurrent_jobs=0")
            s = LocalServer(a.bin_dir, a.backbone, os.path.join(work, "data%d" % i),
                            log_path=os.path.join(work, "tlserve%d.log" % i), extra_flags=flags)
            s.start()
            servers.append(s)
            print("replica %d at %s: %s" % (i + 1, s.target, tlbench.server_log_line(s)), flush=True)

        start(0)
        c = Client(servers[0].target, timeout=60)
        desc = c.describe_backbone()
        # The write path's load on the database: an upload, a head-only job,
        # a fine-tune of a private layer4 (each measured alone).
        writes = []
        before = log.mark()
        r = c.upload("rep-data", tlbench.fmnist("train", range(5), 12), batch=64)
        time.sleep(1)  # the last writes of what just ended
        after = log.mark()
        image_bytes = int(sql(uri, "SELECT sum(octet_length(bytes)) FROM examples"))
        writes.append(("upload of %d images (%d a message)" % (r.accepted, 64), log.between(before, after),
                       "%d bytes of images" % image_bytes))
        c.create_model("rep-model", dataset="rep-data")
        before = log.mark()
        job = c.train("rep-model", "rep-data", epochs=5)
        time.sleep(1)  # the last writes of what just ended
        after = log.mark()
        if job.state != models_pb2.Job.SUCCEEDED:
            raise SystemExit("training ended %s: %s" % (tlbench.state_name(job), job.error))
        writes.append(("head-only job, 5 epochs (v%d)" % job.version, log.between(before, after),
                       "version weights %d bytes" % blob_bytes(uri, "models/rep-model/v1.%")))
        c.create_model("rep-tuned", dataset="rep-data")
        job = c.train("rep-tuned", "rep-data", epochs=5)
        c.unfreeze("rep-tuned", ["layer4"])
        stop, sizes = threading.Event(), []
        watcher = threading.Thread(target=checkpoint_watch, args=(uri, stop, sizes))
        before = log.mark()
        watcher.start()
        job = c.train("rep-tuned", "rep-data", epochs=2, batch_size=32)
        stop.set()
        watcher.join()
        time.sleep(1)  # the last writes of what just ended
        after = log.mark()
        if job.state != models_pb2.Job.SUCCEEDED:
            raise SystemExit("fine-tuning ended %s: %s" % (tlbench.state_name(job), job.error))
        # The watcher's own queries are not the server's.
        writes.append(("fine-tune of layer4, 2 epochs (v%d)" % job.version, log.between(before, after) - len(sizes),
                       "version weights %d bytes; largest checkpoint seen %d bytes" % (
                           blob_bytes(uri, "models/rep-tuned/v%d.%%" % job.version), max(sizes or [0]))))
        print("setup: %d images, models trained" % r.accepted, flush=True)
        images = [b for _, _, b in tlbench.fmnist("test", range(10), 10)]

        rows, connections = [], {}
        for n in counts:
            while len(servers) < n:
                start(len(servers))
            connections[n] = int(sql(uri, "SELECT count(*) FROM pg_stat_activity "
                                          "WHERE datname = current_database()")) - 1
            for mode in ("classify", "embed"):
                clients = [BenchClient(i, servers[i % n].target, "rep-model", images, a.batch, a.timeout)
                           for i in range(a.clients)]
                callers = [cl.call_classify if mode == "classify" else cl.call_embed for cl in clients]
                # Warm-up (every replica loads the model on its first Classify).
                tlbench.measure(callers, 2, None, a.timeout)
                before, t0 = log.mark(), time.monotonic()
                ph = tlbench.measure(callers, a.seconds, None, a.timeout)
                after, t1 = log.mark(), time.monotonic()
                for cl in clients:
                    cl.close()
                tx = log.between(before, after)
                errors = {k: v for k, v in ph["codes"].items() if k != "OK"}
                rows.append((n, mode, ph["calls"], ph["images"], tlbench.rate(ph),
                             1000 * tlbench.pct(ph["lat"], 50), tx, tx / (t1 - t0), errors))
                print("%d replica(s) %-8s %6.1f images/s, p50 %.0f ms, %d database statements in %.1f s%s"
                      % (n, mode, tlbench.rate(ph), 1000 * tlbench.pct(ph["lat"], 50), tx, t1 - t0,
                         (", errors %s" % errors) if errors else ""), flush=True)
            # The idle baseline, after the calls (a replica just started is
            # still busy with its own start): a window without calls.
            before, t0 = log.mark(), time.monotonic()
            time.sleep(a.seconds)
            idle = log.between(before, log.mark())
            t1 = time.monotonic()
            rows.append((n, "idle", 0, 0, float("nan"), float("nan"), idle, idle / (t1 - t0), {}))
            print("%d replica(s) idle: %d database statements in %.1f s" % (n, idle, t1 - t0), flush=True)

        print()
        print(tlbench.backbone_line(a, desc, servers[0]))
        print("clients %d, %d images a request, %.0f s windows; %s; run took %.0f s" % (
            a.clients, a.batch, a.seconds, tlbench.machine_line(), time.monotonic() - t_all))
        base = {mode: rate for n, mode, _, _, rate, *_ in rows if n == counts[0]}
        idle = {n: per_s for n, mode, _, _, _, _, _, per_s, _ in rows if mode == "idle"}
        print()
        print("write path (statements; the job queue's upkeep — a look for a claimable job every 5 s, "
              "lease renewals — not counted):")
        print("| write | database statements | size |")
        print("| --- | ---: | --- |")
        for what, tx, size in writes:
            print("| %s | %d | %s |" % (what, tx, size))
        print()
        print("database connections (pg_stat_activity, the probe's own excluded): %s" % ", ".join(
            "%d with %d replica(s)" % (v, k) for k, v in sorted(connections.items())))
        print()
        print("| replicas | mode | calls | images/s | vs %d replica(s) | p50 ms | db statements | per s "
              "(idle: per s) |" % counts[0])
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for n, mode, calls, _, rate, p50, tx, per_s, errors in rows:
            if mode == "idle":
                continue
            print("| %d | %s | %d | %.1f | %.2f | %.0f | %d | %.2f (%.2f) |%s" % (
                n, mode, calls, rate, rate / base[mode] if base[mode] else float("nan"), p50, tx, per_s,
                idle[n], (" errors %s" % errors) if errors else ""))
    finally:
        for s in reversed(servers):
            s.stop()
        subprocess.run(["bash", pg, "stop", pg_dir])
        if a.keep:
            print("kept %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

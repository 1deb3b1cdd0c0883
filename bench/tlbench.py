"""Shared pieces of the Python benchmarks in bench/ (multi_tenant.py,
serving_during_training.py): server flags and start-up, Fashion-MNIST images,
client channels, the Prometheus endpoint, jobs, the machine line.

Benchmarks are not tests: they measure and print, and assert nothing about
timings.
"""
import collections
import gzip
import io
import os
import re
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "client", "python"))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tlserve_client import Client, inference_pb2, models_pb2  # noqa: E402,F401
from tlserve_client.local_server import LocalServer  # noqa: E402

MiB = 1 << 20
FMNIST = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle-boot"]
DEFAULT_BACKBONE = os.path.join(ROOT, "var", "backbones", "resnet18.pt")
FINAL = (models_pb2.Job.SUCCEEDED, models_pb2.Job.FAILED, models_pb2.Job.CANCELLED)


# --- the server ---------------------------------------------------------------------
def add_server_args(p):
    """The flags every benchmark passes to the tlserve it starts."""
    g = p.add_argument_group("server (passed through to build/bin/tlserve)")
    g.add_argument("--bin-dir", default=os.path.join(ROOT, "build", "bin"),
                   help="where tlserve and tlctl are (default build/bin)")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help="TorchScript backbone (default var/backbones/resnet18.pt: "
                        "scripts/make_backbone.py --arch resnet18, random weights, 224x224)")
    g.add_argument("--device", default="cpu", help="--device (default cpu)")
    g.add_argument("--precision", help="--precision (fp32 | bf16 | fp16); server default when absent")
    g.add_argument("--max_batch_size", type=int, help="--max_batch_size; server default when absent")
    g.add_argument("--threads", type=int, help="--threads (LibTorch intra-op threads for serving)")
    g.add_argument("--train_threads", type=int,
                   help="--train_threads (LibTorch threads for training; passed only when given)")
    g.add_argument("--server-flag", action="append", default=[],
                   help="any other tlserve flag, e.g. --server-flag=--max_queue_delay_us=5000 (repeatable)")
    g.add_argument("--keep", action="store_true", help="keep the server's data directory and log")


def server_flags(a):
    flags = ["--device=" + a.device]  # after LocalServer's --device=cpu: the last one wins
    for name in ("precision", "max_batch_size", "threads", "train_threads"):
        v = getattr(a, name)
        if v is not None:
            flags.append("--%s=%s" % (name, v))
    return flags + list(a.server_flag)


def start_server(a, work):
    """A tlserve on free loopback ports (gRPC and metrics), its data in `work`."""
    if not os.path.exists(a.backbone):
        raise SystemExit("no backbone %s; make it with: /usr/bin/python3 scripts/make_backbone.py "
                         "--arch resnet18 --out %s (or scripts/bench.sh makes it)" % (a.backbone, a.backbone))
    s = LocalServer(a.bin_dir, a.backbone, os.path.join(work, "data"),
                    log_path=os.path.join(work, "tlserve.log"), extra_flags=server_flags(a))
    s.start()
    return s


def server_log_line(server, needle="starting tlserve"):
    """The server's own start-up line (device, precision, threads, max batch),
    without its data directory."""
    try:
        with open(server.log_path) as f:
            for line in f:
                if needle in line:
                    return line.strip().split(" ", 2)[-1].split(", data dir")[0]
    except OSError:
        pass
    return "?"


def backbone_line(a, desc, server):
    path = os.path.relpath(a.backbone, ROOT) if os.path.abspath(a.backbone).startswith(ROOT) else a.backbone
    return "backbone %s (sha256 %s, %s, %s, input %dx%d, embedding %d); server: %s" % (
        path, desc.sha256[:12], desc.device, desc.dtype, desc.preprocessing.crop, desc.preprocessing.crop,
        desc.embedding_dim, server_log_line(server))


# --- images ---------------------------------------------------------------------------
def _load(split):
    prefix = "t10k" if split == "test" else "train"
    with gzip.open(os.path.join(FMNIST, prefix + "-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(FMNIST, prefix + "-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def png_bytes(array):
    b = io.BytesIO()
    Image.fromarray(array, "L").save(b, "PNG")
    return b.getvalue()


def fmnist(split, classes, per_class, skip=0):
    """(label, name, PNG bytes) of Fashion-MNIST images: `per_class` of each class."""
    images, labels = _load(split)
    out = []
    for c in classes:
        for i in [int(i) for i in (labels == c).nonzero()[0][skip:skip + per_class]]:
            out.append((CLASSES[c], "%s/%05d.png" % (split, i), png_bytes(images[i])))
    return out


# --- clients ----------------------------------------------------------------------------
def channel(target, tag):
    """A channel with its own TCP connection (a local subchannel pool: by default
    gRPC shares one connection between channels to the same target)."""
    return grpc.insecure_channel(target, options=[
        ("grpc.use_local_subchannel_pool", 1), ("tlserve.bench.client", tag),
        ("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)])


def measure(callers, seconds, metrics_port=None, timeout=120):
    """Runs each of `callers` (a function making one call and returning its
    images; raising grpc.RpcError on failure) in a loop on a thread of its own.
    Once every caller has finished one call (the synchronised start is over) it
    measures a window of `seconds`: OK calls that ended inside it and their
    images, and, with a metrics port, the tlserve_batch_size deltas between
    scrapes at the window's ends. Returns a dict (see `merge`)."""
    stop = threading.Event()
    results = [[] for _ in callers]

    def loop(call, out):
        while not stop.is_set():
            t = time.monotonic()
            try:
                images, code = call(), "OK"
            except grpc.RpcError as e:
                images, code = 0, e.code().name
            end = time.monotonic()
            out.append((end, images, end - t, code))

    threads = [threading.Thread(target=loop, args=(c, results[i])) for i, c in enumerate(callers)]
    t_start = time.monotonic()
    for th in threads:
        th.start()
    while not all(results) and time.monotonic() - t_start < timeout:
        time.sleep(0.05)
    before = scrape(metrics_port) if metrics_port else None
    t0 = time.monotonic()
    time.sleep(seconds)
    after = scrape(metrics_port) if metrics_port else None
    t1 = time.monotonic()
    stop.set()
    for th in threads:
        th.join()
    calls = [c for r in results for c in r]
    inside = [c for c in calls if t0 < c[0] <= t1]
    bsum, bcount = histogram_delta(before, after, "tlserve_batch_size") if metrics_port else (0.0, 0.0)
    codes = collections.Counter(c[3] for c in calls)
    return {"seconds": t1 - t0, "images": sum(c[1] for c in inside if c[3] == "OK"),
            "calls": len(inside), "lat": [c[2] for c in inside], "codes": dict(codes),
            "batch_sum": bsum, "batch_count": bcount, "t0": t0, "t1": t1}


def merge(phases):
    """Phases of one kind added up (their windows, images, calls, batches)."""
    m = {"seconds": 0.0, "images": 0, "calls": 0, "lat": [], "codes": collections.Counter(),
         "batch_sum": 0.0, "batch_count": 0.0}
    for p in phases:
        for k in ("seconds", "images", "calls", "batch_sum", "batch_count"):
            m[k] += p[k]
        m["lat"] += p["lat"]
        m["codes"].update(p["codes"])
    return m


def rate(p):
    return p["images"] / p["seconds"] if p["seconds"] > 0 else float("nan")


def ratio(x, y):
    """rate(x) / rate(y); nan when y served nothing."""
    return rate(x) / rate(y) if rate(y) > 0 else float("nan")


def mean_batch(p):
    return p["batch_sum"] / p["batch_count"] if p["batch_count"] > 0 else None


def pct(values, p):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


# --- Prometheus ----------------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(port, timeout=10):
    """name -> sum over every label set, from the server's /metrics."""
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=timeout).read().decode()
    out = collections.defaultdict(float)
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            try:
                out[m.group(1)] += float(m.group(3))
            except ValueError:
                pass
    return out


def histogram_delta(before, after, name):
    """(sum, count) of a histogram's observations between two scrapes."""
    return after[name + "_sum"] - before[name + "_sum"], after[name + "_count"] - before[name + "_count"]


# --- jobs -----------------------------------------------------------------------------------
def wait_job(stub, job_id, timeout=3600, on_update=None):
    """Follows a job with WatchJob until it ends; returns the last Job."""
    job = None
    for job in stub.WatchJob(models_pb2.WatchJobRequest(id=job_id), timeout=timeout):
        if on_update:
            on_update(job)
        if job.state in FINAL:
            break
    return job


def state_name(job):
    return models_pb2.Job.State.Name(job.state)


# --- reporting -------------------------------------------------------------------------------
def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine_line():
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 1048576.0
    except (OSError, ValueError, IndexError):
        pass
    return "machine: %d CPUs (%s), %.0f GiB; load average (1 min) %.2f" % (
        os.cpu_count(), cpu_model(), mem, os.getloadavg()[0])


def fmt(x, digits=1):
    return "-" if x is None else ("%.*f" % (digits, x))


def now_utc():
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

#!/usr/bin/env python3
"""Load and abuse run against a live tlserve server (issue 9). Not a test: it
measures and reports, and exits non-zero only when the server died or a
client got an answer that the server's documented behaviour does not allow.

For --duration seconds, --clients threads (each on its own channel and TCP
connection) call Embed and unary Classify in turn with --batch Fashion-MNIST
PNGs each, while at the same time
  * fine-tuning jobs run back to back (the last one is waited for): a model
    with `unfreeze --from layer4`, trained --ft-epochs epochs a job on the
    setup dataset (300 Fashion-MNIST training images, 5 classes);
  * an upload streams --upload-images images in small, paced messages;
  * abusers, each a thread of its own:
      thin       Embed of the thin fixtures (thin_1x30000.png, thin_100000x1.png,
                 thin_1000000x1.png), one image a request; the expected answer is
                 computed from the backbone's preprocessing and --max_image_pixels
                 (the server's rule: width*height and resize*floor(resize*long/short)
                 both within the limit -> OK, else INVALID_ARGUMENT);
      big        Embed of requests with many big images (64 x 4000x4000 PNGs of
                 ~16 KB each: over --max_request_pixels), one 7000x7000 image (over
                 --max_image_pixels), bad_bomb.png (20000x20000 header), a
                 truncated 3000x3000 PNG (decoding fails): INVALID_ARGUMENT;
      slowscrape --slow-scrapers sockets to the metrics port, each trickling one byte
                 of "GET /metrics ..." a second (the server drops it after 2 s);
                 meanwhile the `scrape` row is an honest scraper, once a second;
      cutupload  uploads that never send their commit message: a stream that ends
                 without it (ABORTED), a request iterator that raises (the client
                 cancels: UNKNOWN), a call cancelled mid-stream (CANCELLED); after
                 each, GetDataset must say NOT_FOUND (nothing stored);
      export     up to --unread-exports ExportModel streams open at once that are
                 never read (held 8 s, then cancelled): RESOURCE_EXHAUSTED beyond
                 --max_concurrent_exports, CANCELLED for those we cancel.
Before the abuse phase, --baseline seconds of the same Embed/Classify clients
alone give latencies to compare with. The server's VmRSS is polled every
0.1 s and VmHWM read at the end (from /proc/PID/status).

  /usr/bin/python3 bench/load_abuse.py                      # starts build/bin/tlserve
  /usr/bin/python3 bench/load_abuse.py --duration 60 --clients 16
  /usr/bin/python3 bench/load_abuse.py --server 127.0.0.1:50051 --pid 1234 --metrics-port 9090

With --server, the server must have been started with its defaults for the
limits the expectations use (or pass --max-image-pixels to match).
"""
import argparse
import collections
import io
import os
import random
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "client", "python"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import grpc  # noqa: E402
from PIL import Image  # noqa: E402

from tlserve_client import Client, datasets_pb2, inference_pb2, models_pb2  # noqa: E402
from tlserve_client.local_server import LocalServer  # noqa: E402
from tlserve.v1 import datasets_pb2_grpc, inference_pb2_grpc, models_pb2_grpc  # noqa: E402

MiB = 1 << 20
OK = "OK"
RUN = "%x" % int(time.time())  # in every dataset and model name: a running server can be reused


# --- images -------------------------------------------------------------------
def png_bytes(array):
    b = io.BytesIO()
    Image.fromarray(array, "L").save(b, "PNG")
    return b.getvalue()


def fmnist(split, classes, per_class, skip=0):
    """(label, name, png) from Debian's Fashion-MNIST (scripts/sample_images.py)."""
    import sample_images
    images, labels = sample_images.load(split)
    out = []
    for c in classes:
        for i in [int(i) for i in (labels == c).nonzero()[0][skip:skip + per_class]]:
            out.append((sample_images.CLASSES[c], "%s/%05d.png" % (split, i), png_bytes(images[i])))
    return out


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_png(width, height, truncate=False):
    """A gray PNG of zeros, written row by row (no width*height buffer in Python):
    ~1 KB per million pixels. truncate: the IDAT stops a third of the way."""
    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    parts = [z.compress(row) for _ in range(height if not truncate else height // 3)]
    parts.append(z.flush() if not truncate else z.flush(zlib.Z_SYNC_FLUSH))
    idat = b"".join(parts)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + (b"" if truncate else _chunk(b"IEND", b"")))


MAX_ASPECT_RATIO = 50


def expected_for_size(width, height, resize, max_pixels):
    """The server's budget rule (CheckPreprocessBudget) for an image's header."""
    if width * height > max_pixels:
        return "INVALID_ARGUMENT"
    if resize > 0:
        short, long_ = min(width, height), max(width, height)
        if resize * (resize * long_ // short) > max_pixels:
            return "INVALID_ARGUMENT"
        if long_ > MAX_ASPECT_RATIO * short:  # kMaxAspectRatio in preprocess.h
            return "INVALID_ARGUMENT"
    return OK


# --- bookkeeping ----------------------------------------------------------------
class Stats:
    """Per operation kind: latencies and outcomes (codes), expected or not."""

    def __init__(self):
        self.lock = threading.Lock()
        self.kinds = collections.OrderedDict()
        self.notes = collections.defaultdict(list)

    def kind(self, name, expected):
        with self.lock:
            if name not in self.kinds:
                self.kinds[name] = {"lat": [], "codes": collections.Counter(), "images": 0,
                                    "expected": set(expected), "unexpected_msgs": []}

    def add(self, name, seconds, code, images=0, expected=None, message=""):
        with self.lock:
            k = self.kinds[name]
            k["lat"].append(seconds)
            ok_codes = k["expected"] if expected is None else expected
            k["codes"][(code, code in ok_codes)] += 1
            if code == OK:
                k["images"] += images
            if code not in ok_codes and len(k["unexpected_msgs"]) < 3:
                k["unexpected_msgs"].append("%s: %s" % (code, message[:300]))

    def note(self, name, text):
        with self.lock:
            self.notes[name].append(text)


def code_name(e):
    try:
        return e.code().name
    except Exception:  # noqa: BLE001 - anything that is not an RpcError with a code
        return type(e).__name__


def pct(values, p):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


def channel(target, tag):
    # A local subchannel pool: each channel gets its own TCP connection (by default
    # gRPC shares one between channels with the same target and arguments).
    return grpc.insecure_channel(target, options=[
        ("grpc.use_local_subchannel_pool", 1), ("tlserve.bench.client", tag),
        ("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)])


class MemoryPoller(threading.Thread):
    def __init__(self, pid, period=0.1):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.stop_event = threading.Event()
        self.max_rss_kb, self.samples, self.phase_max = 0, 0, collections.OrderedDict()
        self.phase = "setup"

    def read(self):
        out = {}
        try:
            with open("/proc/%d/status" % self.pid) as f:
                for line in f:
                    if line.startswith(("VmRSS:", "VmHWM:")):
                        out[line.split(":")[0]] = int(line.split()[1])
        except OSError:
            pass
        return out

    def run(self):
        while not self.stop_event.is_set():
            rss = self.read().get("VmRSS")
            if rss is not None:
                self.max_rss_kb = max(self.max_rss_kb, rss)
                self.phase_max[self.phase] = max(self.phase_max.get(self.phase, 0), rss)
                self.samples += 1
            self.stop_event.wait(self.period)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def alive(pid, process):
    if process is not None:
        return process.poll() is None
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        with open("/proc/%d/status" % pid) as f:
            return not any(l.startswith("State:") and "Z" in l.split()[1] for l in f)
    except OSError:
        return False


# --- workers ----------------------------------------------------------------------
def legit_client(i, target, model, images, batch, stats, stop, prefix, timeout):
    ch = channel(target, "%s-%d" % (prefix, i))
    inf, mod = inference_pb2_grpc.InferenceStub(ch), models_pb2_grpc.ModelsStub(ch)
    rng = random.Random(i)
    n = 0
    while not stop.is_set():
        pick = [inference_pb2.Image(name="img%d" % k, encoded=rng.choice(images)) for k in range(batch)]
        kind = prefix + ("embed" if n % 2 == 0 else "classify")
        t = time.monotonic()
        try:
            if n % 2 == 0:
                r = inf.Embed(inference_pb2.EmbedRequest(images=pick), timeout=timeout)
                assert len(r.embeddings) == batch
            else:
                r = mod.Classify(models_pb2.ClassifyRequest(model=model, images=pick, top_k=1),
                                 timeout=timeout)
                assert len(r.results) == batch
            stats.add(kind, time.monotonic() - t, OK, images=batch)
        except grpc.RpcError as e:
            stats.add(kind, time.monotonic() - t, code_name(e), message=e.details() or "")
        n += 1
    ch.close()


def thin_abuser(target, fixtures, resize, max_pixels, stats, stop, timeout):
    ch = channel(target, "thin")
    inf = inference_pb2_grpc.InferenceStub(ch)
    files = []
    for name in ("thin_1x30000.png", "thin_100000x1.png", "thin_1000000x1.png"):
        with open(os.path.join(fixtures, name), "rb") as f:
            data = f.read()
        w, h = struct.unpack(">II", data[16:24])
        files.append((name, data, expected_for_size(w, h, resize, max_pixels)))
        stats.kind("abuse: thin " + name, [files[-1][2]])
        short, long_ = min(w, h), max(w, h)
        stats.note("abuse: thin " + name, "%dx%d, %d bytes; resized for the backbone: %d x %d = %.1f M "
                   "pixels vs --max_image_pixels %.1f M: expect %s" % (
                       w, h, len(data), resize, resize * long_ // short,
                       resize * (resize * long_ // short) / 1e6, max_pixels / 1e6, files[-1][2]))
    n = 0
    while not stop.is_set():
        name, data, exp = files[n % len(files)]
        t = time.monotonic()
        try:
            inf.Embed(inference_pb2.EmbedRequest(images=[inference_pb2.Image(name=name, encoded=data)]),
                      timeout=timeout)
            code, msg = OK, ""
        except grpc.RpcError as e:
            code, msg = code_name(e), e.details() or ""
        stats.add("abuse: thin " + name, time.monotonic() - t, code, message=msg)
        n += 1
    ch.close()


def big_abuser(target, fixtures, stats, stop, timeout):
    ch = channel(target, "big")
    inf = inference_pb2_grpc.InferenceStub(ch)
    with open(os.path.join(fixtures, "bad_bomb.png"), "rb") as f:
        bomb = f.read()
    many = blank_png(4000, 4000)
    requests = [
        ("64 x 4000x4000", [many] * 64),
        ("1 x 7000x7000", [blank_png(7000, 7000)]),
        ("bad_bomb 20000x20000", [bomb]),
        ("truncated 3000x3000", [blank_png(3000, 3000, truncate=True)]),
    ]
    for label, imgs in requests:
        stats.kind("abuse: big " + label, ["INVALID_ARGUMENT"])
        stats.note("abuse: big " + label, "%.0f KB a request" % (sum(map(len, imgs)) / 1024.0))
    n = 0
    while not stop.is_set():
        label, imgs = requests[n % len(requests)]
        req = inference_pb2.EmbedRequest(images=[inference_pb2.Image(name="big%d" % k, encoded=b)
                                                 for k, b in enumerate(imgs)])
        t = time.monotonic()
        try:
            inf.Embed(req, timeout=timeout)
            code, msg = OK, ""
        except grpc.RpcError as e:
            code, msg = code_name(e), e.details() or ""
        stats.add("abuse: big " + label, time.monotonic() - t, code, message=msg)
        n += 1
        stop.wait(0.05)
    ch.close()


def http_get_metrics(port, timeout=5.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while True:
            part = s.recv(65536)
            if not part:
                break
            data += part
    return data


def honest_scraper(port, stats, stop):
    stats.kind("scrape /metrics (honest, 1/s)", ["200"])
    while not stop.is_set():
        t = time.monotonic()
        try:
            data = http_get_metrics(port)
            code = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "no-response"
        except socket.timeout:
            code = "timeout"
        except OSError as e:
            code = type(e).__name__
        stats.add("scrape /metrics (honest, 1/s)", time.monotonic() - t, code)
        stop.wait(1.0)


def slow_scraper(i, port, stats, stop):
    """Trickles one byte a second; a connection's life ends when the server drops it."""
    kind = "abuse: slow scrape (1 byte/s)"
    stats.kind(kind, ["dropped"])
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    while not stop.is_set():
        t = time.monotonic()
        code = None
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.settimeout(1.0)
                for k in range(len(request)):
                    if stop.is_set():
                        code = "ended-by-us"
                        break
                    try:
                        s.sendall(request[k:k + 1])
                    except OSError:
                        code = "dropped"
                        break
                    try:
                        got = s.recv(4096)
                        if got == b"":
                            code = "dropped"  # the server closed it
                        else:
                            code = "answered"  # it should not answer an incomplete request
                        break
                    except socket.timeout:
                        continue
                    except OSError:
                        code = "dropped"
                        break
                else:
                    code = "completed"  # the whole request trickled through
        except OSError as e:
            code = "connect " + type(e).__name__
        if code != "ended-by-us":
            stats.add(kind, time.monotonic() - t, code)


def cut_upload_abuser(target, images, stats, stop, timeout):
    ch = channel(target, "cut")
    ds = datasets_pb2_grpc.DatasetsStub(ch)
    ex = [datasets_pb2.Example(label=l, name=n, encoded=b) for l, n, b in images[:24]]
    kinds = [("abuse: upload without commit (ends)", ["ABORTED"]),
             ("abuse: upload without commit (iterator raises)", ["UNKNOWN", "CANCELLED"]),
             ("abuse: upload without commit (cancelled)", ["CANCELLED"])]
    for k, e in kinds:
        stats.kind(k, e)
    stats.kind("abuse: cut upload then GetDataset", ["NOT_FOUND"])
    n = 0
    while not stop.is_set():
        name = "load-%s-cut-%d" % (RUN, n)
        variant = n % 3
        kind = kinds[variant][0]

        def requests():
            for m in range(3):
                yield datasets_pb2.UploadDatasetRequest(dataset=name, examples=ex[m * 8:(m + 1) * 8],
                                                        commit=False)
                time.sleep(0.05)
            if variant == 1:
                raise RuntimeError("client dies mid-upload")
            if variant == 2:
                time.sleep(30)  # cancelled before this ends

        t = time.monotonic()
        try:
            if variant == 2:
                fut = ds.UploadDataset.future(requests(), timeout=timeout)
                time.sleep(0.5)
                fut.cancel()
                fut.result()
                code, msg = OK, ""
            else:
                ds.UploadDataset(requests(), timeout=timeout)
                code, msg = OK, ""
        except grpc.FutureCancelledError:
            code, msg = "CANCELLED", ""
        except grpc.RpcError as e:
            code, msg = code_name(e), e.details() or ""
        stats.add(kind, time.monotonic() - t, code, message=msg)
        time.sleep(0.3)  # let the server see the end of the stream
        t = time.monotonic()
        try:
            d = ds.GetDataset(datasets_pb2.GetDatasetRequest(name=name), timeout=timeout)
            code, msg = OK, "dataset %s exists with %d images after a cut upload" % (name, d.images)
        except grpc.RpcError as e:
            code, msg = code_name(e), e.details() or ""
        stats.add("abuse: cut upload then GetDataset", time.monotonic() - t, code, message=msg)
        n += 1
        stop.wait(0.2)
    ch.close()


def export_abuser(target, model, max_open, stats, stop, hold=8.0):
    """Starts ExportModel streams and never reads a message from them."""
    kind = "abuse: unread export"
    stats.kind(kind, ["RESOURCE_EXHAUSTED", "CANCELLED", OK])
    open_calls = collections.deque()  # (start time, call, channel)
    n = 0
    while not stop.is_set():
        now = time.monotonic()
        while open_calls and (now - open_calls[0][0] > hold or open_calls[0][1].done()):
            t, call, ch = open_calls.popleft()
            if not call.done():
                call.cancel()
            try:
                call.code()
                code, msg = call.code().name, call.details() or ""
            except Exception as e:  # noqa: BLE001
                code, msg = type(e).__name__, str(e)
            stats.add(kind, time.monotonic() - t, code, message=msg)
            ch.close()
        if len(open_calls) < max_open:
            ch = channel(target, "export-%d" % n)
            stub = models_pb2_grpc.ModelsStub(ch)
            call = stub.ExportModel(models_pb2.ExportModelRequest(model=model), timeout=120)
            open_calls.append((time.monotonic(), call, ch))
            n += 1
        stop.wait(0.5)
    for t, call, ch in open_calls:
        if not call.done():
            call.cancel()
        stats.add(kind, time.monotonic() - t, call.code().name, message=call.details() or "")
        ch.close()


def streaming_upload(target, dataset, examples, per_message, span, stats, result):
    kind = "upload stream (%d images, %d a message)" % (len(examples), per_message)
    stats.kind(kind, [OK])
    result["kind"] = kind
    ch = channel(target, "upload")
    ds = datasets_pb2_grpc.DatasetsStub(ch)
    starts = list(range(0, len(examples), per_message))
    pause = span / max(1, len(starts))

    def requests():
        for i in starts:
            yield datasets_pb2.UploadDatasetRequest(
                dataset=dataset, commit=(i == starts[-1]),
                examples=[datasets_pb2.Example(label=l, name=n, encoded=b)
                          for l, n, b in examples[i:i + per_message]])
            time.sleep(pause)

    t = time.monotonic()
    try:
        r = ds.UploadDataset(requests(), timeout=span + 120)
        result.update(code=OK, accepted=r.accepted, rejected=r.rejected_total,
                      seconds=time.monotonic() - t)
        stats.add(kind, time.monotonic() - t, OK, images=r.accepted)
        d = ds.GetDataset(datasets_pb2.GetDatasetRequest(name=dataset), timeout=30)
        result["stored"] = d.images
    except grpc.RpcError as e:
        result.update(code=code_name(e), message=e.details(), seconds=time.monotonic() - t)
        stats.add(kind, time.monotonic() - t, code_name(e), message=e.details() or "")
    ch.close()


def fine_tune_job(stub, model, dataset, epochs, result):
    t = time.monotonic()
    try:
        job = stub.StartTraining(models_pb2.StartTrainingRequest(
            model=model, dataset=dataset, options=models_pb2.TrainingOptions(epochs=epochs)), timeout=60)
        result["id"] = job.id
        for job in stub.WatchJob(models_pb2.WatchJobRequest(id=job.id), timeout=1800):
            result["state"] = models_pb2.Job.State.Name(job.state)
            result["phase"] = job.phase
            if job.state in (models_pb2.Job.SUCCEEDED, models_pb2.Job.FAILED, models_pb2.Job.CANCELLED):
                break
        result.update(state=models_pb2.Job.State.Name(job.state), error=job.error, version=job.version,
                      epochs=[(e.epoch, e.validation_accuracy) for e in job.epochs],
                      seconds=time.monotonic() - t)
    except grpc.RpcError as e:
        result.update(state="RPC " + code_name(e), error=e.details(), seconds=time.monotonic() - t)
    result["done"] = True


def fine_tune(target, model, dataset, epochs, jobs, stop):
    """Fine-tuning jobs back to back until `stop` (the last one is left to finish)."""
    ch = channel(target, "finetune")
    stub = models_pb2_grpc.ModelsStub(ch)
    while not stop.is_set():
        jobs.append({})
        fine_tune_job(stub, model, dataset, epochs, jobs[-1])
        if not jobs[-1]["state"] == "SUCCEEDED":
            break
    ch.close()


# --- report -------------------------------------------------------------------------
def table(stats, durations):
    lines = ["| operation | calls | OK | expected non-OK | unexpected | p50 ms | p99 ms | calls/s | images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    unexpected_total = 0
    for name, k in stats.kinds.items():
        dur = durations.get(name.split(":")[0] if name.startswith("baseline") else "load", 1.0)
        calls = len(k["lat"])
        ok = sum(c for (code, _), c in k["codes"].items() if code in (OK, "200"))
        exp = ", ".join("%s %d" % (code, c) for (code, good), c in sorted(k["codes"].items())
                        if good and code not in (OK, "200"))
        bad = ", ".join("%s %d" % (code, c) for (code, good), c in sorted(k["codes"].items()) if not good)
        unexpected_total += sum(c for (code, good), c in k["codes"].items() if not good)
        lines.append("| %s | %d | %d | %s | %s | %.0f | %.0f | %.2f | %s |" % (
            name, calls, ok, exp or "-", bad or "-", 1000 * pct(k["lat"], 50), 1000 * pct(k["lat"], 99),
            calls / dur, ("%.1f" % (k["images"] / dur)) if k["images"] else "-"))
    return lines, unexpected_total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=30, help="seconds of load and abuse (default 30)")
    p.add_argument("--clients", type=int, default=8, help="Embed/Classify client threads (default 8)")
    p.add_argument("--batch", type=int, default=4, help="images a request (default 4)")
    p.add_argument("--baseline", type=float, default=10,
                   help="seconds of the same clients alone first, without abuse (0: none; default 10)")
    p.add_argument("--server", help="ADDRESS of a running server (default: start build/bin/tlserve)")
    p.add_argument("--pid", type=int, help="its process id (with --server), for memory and liveness")
    p.add_argument("--metrics-port", type=int, help="its --metrics_port (with --server; default 9090)")
    p.add_argument("--bin-dir", default=os.path.join(ROOT, "build", "bin"))
    p.add_argument("--fixtures", default=os.path.join(ROOT, "build", "tests", "fixtures"))
    p.add_argument("--backbone", help="backbone .pt (default: FIXTURES/r18tiny.pt, a 32-px ResNet-18 "
                   "with the preprocessing of the default var/backbones/fmnist-resnet18.pt)")
    p.add_argument("--server-flag", action="append", default=[], help="extra tlserve flag (repeatable)")
    p.add_argument("--max-image-pixels", type=int, default=40000000,
                   help="the server's --max_image_pixels, for the thin images' expected answers")
    p.add_argument("--train-images", type=int, default=60, help="per class, 5 classes (default 60)")
    p.add_argument("--upload-images", type=int, default=400, help="images in the streamed upload")
    p.add_argument("--ft-epochs", type=int, default=3, help="fine-tuning epochs (default 3)")
    p.add_argument("--slow-scrapers", type=int, default=1, help="slow metrics sockets (default 1)")
    p.add_argument("--unread-exports", type=int, default=6, help="unread exports open at once (default 6)")
    p.add_argument("--timeout", type=float, default=60, help="deadline of each Embed/Classify call (s)")
    p.add_argument("--keep", action="store_true", help="keep the data directory and log")
    p.add_argument("--skip", default="", help="comma list of parts to leave out, to attribute costs: "
                   "thin,big,scrape,slowscrape,cutupload,export,finetune,upload")
    a = p.parse_args()
    skip = set(x for x in a.skip.split(",") if x)
    if a.server_flag:
        for f in a.server_flag:
            if f.startswith("--max_image_pixels="):
                a.max_image_pixels = int(f.split("=", 1)[1])

    stats = Stats()
    load_before = os.getloadavg()[0]
    backbone = a.backbone or os.path.join(a.fixtures, "r18tiny.pt")
    work = tempfile.mkdtemp(prefix="tlserve-load-")
    server, process = None, None
    t_all = time.monotonic()
    if a.server:
        target, pid, metrics_port = a.server, a.pid, a.metrics_port or 9090
        if pid is None:
            print("warning: no --pid: memory and liveness are not measured", file=sys.stderr)
    else:
        server = LocalServer(a.bin_dir, backbone, os.path.join(work, "data"),
                             log_path=os.path.join(work, "tlserve.log"), extra_flags=a.server_flag)
        server.start()
        target, pid, process, metrics_port = server.target, server.process.pid, server.process, server.metrics_port
    poller = MemoryPoller(pid) if pid else None
    if poller:
        poller.start()
    rc = 0
    try:
        # --- setup ------------------------------------------------------------------
        print("server %s (pid %s, metrics port %d); setting up" % (target, pid, metrics_port), flush=True)
        c = Client(target, timeout=30)
        desc = c.describe_backbone()
        resize = desc.preprocessing.resize
        t = time.monotonic()
        train = fmnist("train", [0, 1, 5, 7, 9], a.train_images)
        train_ds, stream_ds = "load-%s-train" % RUN, "load-%s-stream" % RUN
        r = c.upload(train_ds, train, batch=64)
        head_model, ft_model = "load-%s-head" % RUN, "load-%s-finetune" % RUN
        c.create_model(head_model, dataset=train_ds)
        head_job = c.train(head_model, train_ds)
        c.create_model(ft_model, dataset=train_ds)
        c.unfreeze(ft_model, from_stage="layer4")
        setup_s = time.monotonic() - t
        print("setup: %d train images accepted, head-only model %s (validation %.3f, job %s) in %.1f s" % (
            r.accepted, head_job.version and "v%d" % head_job.version,
            head_job.epochs[-1].validation_accuracy if head_job.epochs else float("nan"),
            models_pb2.Job.State.Name(head_job.state), setup_s), flush=True)
        if head_job.state != models_pb2.Job.SUCCEEDED:
            raise RuntimeError("head-only training failed: " + head_job.error)
        client_images = [b for _, _, b in fmnist("test", range(10), 10)]
        upload_images = fmnist("test", [0, 1, 5, 7, 9], a.upload_images // 5, skip=10)
        durations = {}

        # --- baseline -------------------------------------------------------------------
        if a.baseline > 0:
            if poller:
                poller.phase = "baseline"
            stats.kind("baseline embed", [OK])
            stats.kind("baseline classify", [OK])
            stop = threading.Event()
            threads = [threading.Thread(target=legit_client, args=(
                i, target, head_model, client_images, a.batch, stats, stop, "baseline ", a.timeout))
                for i in range(a.clients)]
            t = time.monotonic()
            for th in threads:
                th.start()
            time.sleep(a.baseline)
            stop.set()
            for th in threads:
                th.join()
            durations["baseline embed"] = durations["baseline classify"] = time.monotonic() - t
            durations["baseline"] = durations["baseline embed"]

        # --- load and abuse --------------------------------------------------------------
        if poller:
            poller.phase = "load"
        rss_before = poller.read().get("VmRSS", 0) if poller else 0
        stats.kind("embed", [OK])
        stats.kind("classify", [OK])
        stop = threading.Event()
        ft_jobs, up = [], {}
        threads = [threading.Thread(target=legit_client, args=(
            i, target, head_model, client_images, a.batch, stats, stop, "", a.timeout))
            for i in range(a.clients)]
        parts = {
            "thin": [threading.Thread(target=thin_abuser, args=(
                target, a.fixtures, resize, a.max_image_pixels, stats, stop, a.timeout))],
            "big": [threading.Thread(target=big_abuser, args=(target, a.fixtures, stats, stop, a.timeout))],
            "scrape": [threading.Thread(target=honest_scraper, args=(metrics_port, stats, stop))],
            "cutupload": [threading.Thread(target=cut_upload_abuser, args=(target, train, stats, stop, 30))],
            "export": [threading.Thread(target=export_abuser, args=(
                target, head_model, a.unread_exports, stats, stop))],
            "slowscrape": [threading.Thread(target=slow_scraper, args=(i, metrics_port, stats, stop))
                           for i in range(a.slow_scrapers)],
            "finetune": [threading.Thread(target=fine_tune, args=(target, ft_model, train_ds,
                                                                  a.ft_epochs, ft_jobs, stop))],
            "upload": [threading.Thread(target=streaming_upload, args=(
                target, stream_ds, upload_images, 8, a.duration * 0.6, stats, up))],
        }
        unknown = skip - set(parts)
        if unknown:
            raise SystemExit("--skip: unknown %s (choose from %s)" % (",".join(unknown), ",".join(parts)))
        side = [th for name in ("finetune", "upload") if name not in skip for th in parts[name]]
        threads += [th for name, ths in parts.items() if name not in skip and name not in ("finetune", "upload")
                    for th in ths]
        t_load = time.monotonic()
        for th in side + threads:
            th.start()
        while time.monotonic() - t_load < a.duration:
            if pid and not alive(pid, process):
                print("the server died during the load", flush=True)
                break
            time.sleep(0.2)
        running_at_end = [dict(j) for j in ft_jobs if not j.get("done")]
        stop.set()
        for th in threads:
            th.join(timeout=a.timeout + 30)
        durations["load"] = time.monotonic() - t_load
        if poller:
            poller.phase = "after load (waiting for fine-tune)"
        for th in side:
            th.join(timeout=300)

        # --- report -------------------------------------------------------------------------
        is_alive = alive(pid, process) if pid else None
        health = None
        try:
            with Client(target, timeout=10) as c2:
                c2.embed(client_images[:1])
                health = "Embed OK"
        except Exception as e:  # noqa: BLE001
            detail = e.details() if isinstance(e, grpc.RpcError) else str(e)
            health = "Embed after the run failed: %s %s" % (code_name(e), detail)
        if poller:
            poller.stop_event.set()
            poller.join()
        mem = poller.read() if poller else {}

        print()
        print("clients %d, batch %d, load %.1f s (baseline %.1f s), backbone %s (resize %d, crop %d)" % (
            a.clients, a.batch, durations["load"], durations.get("baseline", 0), os.path.basename(backbone),
            resize, desc.preprocessing.crop))
        if skip:
            print("left out: %s" % ",".join(sorted(skip)))
        print("machine: %d CPUs (%s); load average (1 min) %.2f before setup, %.2f at the end" % (
            os.cpu_count(), cpu_model(), load_before, os.getloadavg()[0]))
        print("latency: every call of the kind, whatever its answer; calls/s and images/s over its phase")
        print()
        lines, unexpected = table(stats, durations)
        print("\n".join(lines))
        print()
        for name, k in stats.kinds.items():
            for m in k["unexpected_msgs"]:
                print("  unexpected in %s: %s" % (name, m))
            if stats.notes.get(name):
                print("  %s: %s" % (name, "; ".join(stats.notes[name])))
        print()
        if "finetune" not in skip:
            print("fine-tuning (%s, unfreeze --from layer4, %d epochs a job): %d jobs back to back; %s" % (
                ft_model, a.ft_epochs, len(ft_jobs), "one was running when the load ended (%s)" % (
                    running_at_end[0].get("phase") or running_at_end[0].get("state", "starting"))
                if running_at_end else "none was running when the load ended"))
        for n, job in enumerate(ft_jobs):
            print("  job %d: %s after %.1f s%s" % (n + 1, job.get("state", "?"), job.get("seconds", float("nan")),
                                                  (", model version %d" % job["version"]) if job.get("version") else ""))
            eps = job.get("epochs", [])
            # A cold head is fitted alone first; its epochs come before epoch 0 (the starting point).
            zero = next((i for i, e in enumerate(eps) if e[0] == 0), None)
            head, tune = (eps[:zero], eps[zero:]) if zero is not None else ([], eps)
            if head:
                print("    head-only warm-up epochs, validation accuracy: %s" % " ".join("%d:%.3f" % e for e in head))
            if tune:
                print("    fine-tuning epochs (0 = starting point), validation accuracy: %s" % " ".join(
                    "%d:%.3f" % e for e in tune))
            if job.get("error"):
                print("    error: %s" % job["error"])
        print("upload stream: %s in %.1f s, accepted %s, rejected %s, GetDataset images %s%s" % (
            up.get("code"), up.get("seconds", float("nan")), up.get("accepted"), up.get("rejected"),
            up.get("stored"), (": " + up["message"]) if up.get("message") else ""))
        if poller:
            print("server memory: VmHWM %.0f MiB (peak RSS over the whole life, setup included); "
                  "VmRSS %.0f MiB before the load, polled max %s; %.0f MiB at the end (%d samples)" % (
                      mem.get("VmHWM", 0) / 1024.0, rss_before / 1024.0,
                      ", ".join("%s %.0f MiB" % (ph, v / 1024.0) for ph, v in poller.phase_max.items()),
                      mem.get("VmRSS", 0) / 1024.0, poller.samples))
        print("server alive at the end: %s; %s" % (
            {True: "yes", False: "NO", None: "unknown (no --pid)"}[is_alive], health))
        print("total %.0f s" % (time.monotonic() - t_all))
        problems = []
        if is_alive is False:
            problems.append("the server died")
        if unexpected:
            problems.append("%d unexpected answers" % unexpected)
        bad_jobs = [j.get("state") for j in ft_jobs if j.get("state") != "SUCCEEDED"]
        if bad_jobs:
            problems.append("fine-tuning jobs ended %s" % ", ".join(map(str, bad_jobs)))
        if "upload" not in skip and up.get("code") != OK:
            problems.append("the upload ended %s" % up.get("code"))
        if problems:
            print("PROBLEMS: " + "; ".join(problems))
            rc = 1
        if is_alive is False and server:
            print("server log tail:\n" + server.log()[-3000:])
    finally:
        if poller:
            poller.stop_event.set()
        if server:
            server.stop()
        if a.keep:
            print("kept %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())

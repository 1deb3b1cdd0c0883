#!/usr/bin/env python3
"""Monitoring, checked against real Prometheus (Debian's `prometheus`):
- a Prometheus server scrapes a live tlserve; through its HTTP API, `up` is 1,
  tlserve_requests_total has series and a latency histogram_quantile answers;
- monitoring/alerts.yml passes `promtool check rules`;
- every query of monitoring/grafana-dashboard.json runs in that Prometheus,
  and every metric it names is one tlserve exports;
- the device engine's metrics (issue 10, ENGINE_METRICS below) have panels on
  the dashboard and are exported all together or not at all: until the engine
  exports them, their panels' queries must still run (and are empty); once any
  is exported, all must be, with their types, label values and invariants
  (images >= forwards per queue, batch fill within 0..1).

usage: prometheus_test.py BIN_DIR FIXTURES_DIR
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse
import urllib.request

BIN, FIX = sys.argv[1], sys.argv[2]
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


# The device engine's metrics (issue 10) and their types. The dashboard's
# "Device engine" row charts them.
ENGINE_METRICS = {
    "tlserve_engine_forwards_total": "counter",       # {queue}
    "tlserve_engine_images_total": "counter",         # {queue}
    "tlserve_engine_batch_fill": "histogram",         # images per forward / max batch size
    "tlserve_engine_device_wait_seconds": "histogram",  # a ready batch waiting for the device
    "tlserve_model_residency": "gauge",               # {state}
    "tlserve_model_evictions_total": "counter",
}
ENGINE_QUEUES = {"prefix", "private", "head", "train"}
RESIDENCY_STATES = {"device", "host"}
SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})?\s+(\S+)", re.M)


def samples(text, name):
    """[(labels dict, value)] of the series called exactly `name`."""
    out = []
    for m in SAMPLE.finditer(text):
        if m.group(1) == name:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out.append((labels, float(m.group(3))))
    return out


def load_dashboard():
    with open(os.path.join(ROOT, "monitoring", "grafana-dashboard.json")) as f:
        return json.load(f)


def with_suffixes(names, types):
    return set(names) | {n + s for n in names if types.get(n) == "histogram" for s in ("_bucket", "_sum", "_count")}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=5):
    return urllib.request.urlopen(url, timeout=timeout).read().decode()


class PrometheusTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="tlserve-prom-")
        cls.port, cls.metrics_port, cls.prom_port = free_port(), free_port(), free_port()
        cls.procs = []
        cls.server = cls.start([os.path.join(BIN, "tlserve"), "--backbone=" + os.path.join(FIX, "r18small.pt"),
                                "--port=%d" % cls.port, "--metrics_port=%d" % cls.metrics_port,
                                "--host=127.0.0.1", "--device=" + os.environ.get("TLSERVE_TEST_DEVICE", "cpu"), "--data_dir=" + os.path.join(cls.tmp, "data")],
                               "tlserve.log")
        config = os.path.join(cls.tmp, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - %s\n"
                    "scrape_configs:\n  - job_name: tlserve\n    static_configs:\n      - targets: ['127.0.0.1:%d']\n"
                    % (os.path.abspath(os.path.join(ROOT, "monitoring", "alerts.yml")), cls.metrics_port))
        cls.prom = cls.start(["prometheus", "--config.file=" + config,
                              "--storage.tsdb.path=" + os.path.join(cls.tmp, "tsdb"),
                              "--web.listen-address=127.0.0.1:%d" % cls.prom_port], "prometheus.log")
        cls.tlctl = [os.path.join(BIN, "tlctl"), "--server=127.0.0.1:%d" % cls.port]
        cls.wait_for(lambda: subprocess.run(cls.tlctl + ["health"], capture_output=True).returncode == 0, "tlserve")
        cls.wait_for(lambda: get("http://127.0.0.1:%d/-/ready" % cls.prom_port) is not None, "prometheus")
        # A trained model, so that the training series exist.
        for args in (["upload", os.path.join(FIX, "fmnist", "train"), "--dataset", "fm"],
                     ["create-model", "fm", "--dataset", "fm"], ["train", "fm", "--dataset", "fm", "--wait"]):
            subprocess.run(cls.tlctl + args, capture_output=True, check=True)
        # Traffic over several scrapes, so that rates and quantiles have data;
        # Classify too, so that a model version runs (the engine's residency series).
        for _ in range(6):
            subprocess.run(cls.tlctl + ["embed", os.path.join(FIX, "rgb_png.png"), "--json"], capture_output=True)
            subprocess.run(cls.tlctl + ["classify", "fm", os.path.join(FIX, "rgb_png.png")], capture_output=True)
            time.sleep(0.6)

    @classmethod
    def start(cls, cmd, log):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(os.path.join(cls.tmp, log), "w"))
        cls.procs.append(p)
        return p

    @classmethod
    def wait_for(cls, ready, what, seconds=60):
        deadline = time.time() + seconds
        while time.time() < deadline:
            try:
                if ready():
                    return
            except Exception:  # not up yet
                pass
            time.sleep(0.2)
        raise RuntimeError("%s did not start; logs in %s" % (what, cls.tmp))

    @classmethod
    def tearDownClass(cls):
        for p in cls.procs:
            p.terminate()
            p.wait(timeout=60)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def query(self, expr):
        url = "http://127.0.0.1:%d/api/v1/query?%s" % (self.prom_port, urllib.parse.urlencode({"query": expr}))
        body = json.loads(get(url))
        self.assertEqual(body["status"], "success", body)
        return body["data"]["result"]

    def eventually(self, expr, check, seconds=30, traffic=False):
        deadline = time.time() + seconds
        result = None
        while time.time() < deadline:
            if traffic:  # keep requests coming, so that rates are not zero
                subprocess.run(self.tlctl + ["embed", os.path.join(FIX, "rgb_png.png")], capture_output=True)
            result = self.query(expr)
            if check(result):
                return result
            time.sleep(0.5)
        debug = self.query("tlserve_request_duration_seconds_count")
        self.fail("%s never satisfied the check; last result %s; counts %s" % (expr, result, debug))

    def test_prometheus_scrapes_tlserve(self):
        self.eventually('up{job="tlserve"}', lambda r: r and r[0]["value"][1] == "1")
        r = self.eventually('tlserve_requests_total{method="StreamEmbed",code="OK"}',
                            lambda r: r and float(r[0]["value"][1]) >= 1)
        self.assertGreaterEqual(float(r[0]["value"][1]), 1)
        q = self.eventually(
            "histogram_quantile(0.5, sum by (le) (rate(tlserve_request_duration_seconds_bucket[1m])))",
            lambda r: r and r[0]["value"][1] not in ("NaN", "+Inf"), traffic=True)
        self.assertGreater(float(q[0]["value"][1]), 0)

    def test_alert_rules_pass_promtool_and_load(self):
        r = subprocess.run(["promtool", "check", "rules", os.path.join(ROOT, "monitoring", "alerts.yml")],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        rules = json.loads(get("http://127.0.0.1:%d/api/v1/rules" % self.prom_port))
        names = {rule["name"] for g in rules["data"]["groups"] for rule in g["rules"]}
        self.assertIn("TlserveDown", names)

    def exported_types(self):
        text = get("http://127.0.0.1:%d/metrics" % self.metrics_port)
        return text, dict(re.findall(r"^# TYPE (\w+) (\w+)", text, re.M))

    def test_dashboard_queries_run_and_use_exported_metrics(self):
        dash = load_dashboard()
        _, types = self.exported_types()
        exported = with_suffixes(types, types)
        # Until the device engine exports its metrics (none of them is), their
        # panels may name them; test_engine_metrics checks all-or-none.
        pending = set() if set(ENGINE_METRICS) & set(types) else with_suffixes(ENGINE_METRICS, ENGINE_METRICS)
        exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]  # rows have none
        self.assertGreaterEqual(len(exprs), 10)
        for expr in exprs:
            for name in set(re.findall(r"\btlserve_\w+", expr)):
                self.assertIn(name, exported | pending, "%s: %s is not exported" % (expr, name))
            self.query(expr.replace("$__rate_interval", "1m"))  # parses and runs

    def test_dashboard_charts_engine_metrics(self):
        dash = load_dashboard()
        named = {n for p in dash["panels"] for t in p.get("targets", []) for n in re.findall(r"\btlserve_\w+", t["expr"])}
        for name in ENGINE_METRICS:
            self.assertTrue(with_suffixes([name], ENGINE_METRICS) & named, "no dashboard panel charts " + name)
        ids = [p["id"] for p in dash["panels"]]
        self.assertEqual(len(ids), len(set(ids)), "panel ids are unique")

    def test_engine_metrics(self):
        text, types = self.exported_types()
        present = set(ENGINE_METRICS) & set(types)
        if not present:
            print("\n  note: the device engine's metrics are not exported yet (issue 10): %s"
                  % ", ".join(sorted(ENGINE_METRICS)), file=sys.stderr)
            return
        # All of them, with their types (after this test's Embed and Classify traffic and training job).
        for name, kind in ENGINE_METRICS.items():
            self.assertEqual(types.get(name), kind, "%s: exported as %s, expected %s (exported: %s)"
                             % (name, types.get(name), kind, ", ".join(sorted(present))))
        forwards = {l.get("queue"): v for l, v in samples(text, "tlserve_engine_forwards_total")}
        images = {l.get("queue"): v for l, v in samples(text, "tlserve_engine_images_total")}
        self.assertLessEqual(set(forwards) | set(images), ENGINE_QUEUES, "queue label values")
        self.assertGreaterEqual(forwards.get("prefix", 0), 1, "Embeds ran forwards of the prefix queue")
        for q, n in forwards.items():
            self.assertGreaterEqual(images.get(q, 0), n, "queue %s: at least one image a forward" % q)
        fill_count = sum(v for _, v in samples(text, "tlserve_engine_batch_fill_count"))
        fill_sum = sum(v for _, v in samples(text, "tlserve_engine_batch_fill_sum"))
        self.assertGreaterEqual(fill_count, 1, "batch fill observed")
        self.assertLessEqual(fill_sum, fill_count + 1e-9, "batch fill within 0..1 (mean)")
        self.assertGreater(fill_sum, 0, "batch fill above 0")
        buckets = {}  # le -> count, summed over label sets
        for l, v in samples(text, "tlserve_engine_batch_fill_bucket"):
            buckets[float(l["le"])] = buckets.get(float(l["le"]), 0) + v
        top = min((le for le in buckets if 1 <= le < float("inf")), default=None)
        if top is not None:
            self.assertEqual(buckets[top], buckets[float("inf")], "every batch fill observation <= %g" % top)
        wait = samples(text, "tlserve_engine_device_wait_seconds_sum")
        self.assertTrue(wait and all(v >= 0 for _, v in wait), "device wait observed, >= 0")
        residency = samples(text, "tlserve_model_residency")
        self.assertLessEqual({l.get("state") for l, _ in residency}, RESIDENCY_STATES, "residency states")
        self.assertTrue(all(v >= 0 for _, v in residency), "residency counts >= 0")
        self.assertTrue(all(v >= 0 for _, v in samples(text, "tlserve_model_evictions_total")))


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)

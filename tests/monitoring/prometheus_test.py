#!/usr/bin/env python3
"""Monitoring, checked against real Prometheus (Debian's `prometheus`):
- a Prometheus server scrapes a live tlserve; through its HTTP API, `up` is 1,
  tlserve_requests_total has series and a latency histogram_quantile answers;
- monitoring/alerts.yml passes `promtool check rules`;
- every query of monitoring/grafana-dashboard.json runs in that Prometheus,
  and every metric it names is one tlserve exports.

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
                                "--host=127.0.0.1", "--device=cpu", "--data_dir=" + os.path.join(cls.tmp, "data")],
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
        # Traffic over several scrapes, so that rates and quantiles have data.
        for _ in range(6):
            subprocess.run(cls.tlctl + ["embed", os.path.join(FIX, "rgb_png.png"), "--json"], capture_output=True)
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

    def test_dashboard_queries_run_and_use_exported_metrics(self):
        dash = json.load(open(os.path.join(ROOT, "monitoring", "grafana-dashboard.json")))
        text = get("http://127.0.0.1:%d/metrics" % self.metrics_port)
        exported = set(re.findall(r"^# TYPE (\w+)", text, re.M))
        histograms = {m + s for m in re.findall(r"^# TYPE (\w+) histogram", text, re.M)
                      for s in ("_bucket", "_sum", "_count")}
        exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
        self.assertGreaterEqual(len(exprs), 10)
        for expr in exprs:
            for name in set(re.findall(r"\btlserve_\w+", expr)):
                self.assertIn(name, exported | histograms, "%s: %s is not exported" % (expr, name))
            self.query(expr.replace("$__rate_interval", "1m"))  # parses and runs


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)

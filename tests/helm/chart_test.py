#!/usr/bin/env python3
"""The Helm chart, checked without a helm binary (none is packaged here):

- templates are rendered by tests/helm/render (Go's text/template + sprig,
  Helm's engine) for the default values and for GPU, ServiceMonitor +
  dashboard + PodDisruptionBudget, autoscaling (stateless, with the
  prometheus-adapter metric) and a mounted backbone;
- every output must parse as YAML; every object is validated against
  Kubernetes' schemas by npm's kubernetes-models (apiVersion, kind, required
  fields, types) and has only field names that Kubernetes' models know
  (python3-kubernetes, k8s 1.22, plus the newer fields listed in NEWER);
- specific promises: probes on the gRPC health service, non-root, read-only
  root, dropped capabilities, named ports, nvidia.com/gpu with gpu.enabled,
  the dashboard ConfigMap equal to monitoring/grafana-dashboard.json, every
  flag in the flags ConfigMap known to `tlserve --help`;
- more than one replica with persistence, or autoscaling with persistence,
  fails rendering with a message that says why.

usage: chart_test.py BIN_DIR FIXTURES_DIR   (BIN_DIR for tlserve --helpfull)
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import kubernetes.client as k8s
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
CHART = os.path.join(ROOT, "helm", "tlserve")
BIN = sys.argv[1]
CACHE = os.environ.get("TLSERVE_CHART_TEST_CACHE", os.path.join(BIN, "..", "chart-test"))

# Fields newer than python3-kubernetes 22's models (Kubernetes 1.22).
NEWER = {"V1Probe": {"grpc": "V1GRPCAction"}}
GRPC_ACTION = {"port": "int", "service": "str"}
API_CLASS = {("apps/v1", "Deployment"): "V1Deployment", ("v1", "Service"): "V1Service",
             ("v1", "ConfigMap"): "V1ConfigMap", ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
             ("v1", "ServiceAccount"): "V1ServiceAccount",
             ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
             # autoscaling/v2 has v2beta2's fields.
             ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2beta2HorizontalPodAutoscaler"}

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what)


def unknown_fields(obj, cls_name, path):
    """Field names that the model class (and the ones it nests) does not have."""
    if cls_name == "V1GRPCAction":
        return ["%s.%s" % (path, k) for k in obj if k not in GRPC_ACTION]
    cls = getattr(k8s, cls_name)
    by_json = {v: k for k, v in cls.attribute_map.items()}
    bad = []
    for key, value in obj.items():
        if key in NEWER.get(cls_name, {}):
            bad += unknown_fields(value, NEWER[cls_name][key], path + "." + key)
            continue
        if key not in by_json:
            bad.append("%s.%s" % (path, key))
            continue
        kind = cls.openapi_types[by_json[key]]
        m = re.match(r"list\[(\w+)\]$", kind)
        if m and hasattr(k8s, m.group(1)) and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    bad += unknown_fields(item, m.group(1), "%s.%s[%d]" % (path, key, i))
        elif hasattr(k8s, kind) and isinstance(value, dict):
            bad += unknown_fields(value, kind, path + "." + key)
    return bad


def build_tools(tmp):
    render = os.path.join(tmp, "render")
    env = dict(os.environ, GOPATH="/usr/share/gocode", GO111MODULE="off", GOFLAGS="",
               GOCACHE=os.path.join(tmp, "gocache"))
    subprocess.run(["go", "build", "-o", render, "./tests/helm/render"], cwd=ROOT, env=env, check=True)
    os.makedirs(CACHE, exist_ok=True)
    shutil.copy(os.path.join(HERE, "package.json"), CACHE)
    shutil.copy(os.path.join(HERE, "validate.mjs"), CACHE)
    if not os.path.isdir(os.path.join(CACHE, "node_modules", "kubernetes-models")):
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=CACHE, check=True)
    return render


def render(tool, tmp, values, notes=False):
    path = os.path.join(tmp, "values.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(values, f)
    args = [tool, "-chart", CHART, "-f", path] + (["-notes"] if notes else [])
    return subprocess.run(args, capture_output=True, text=True)


def validate(name, text):
    docs = [d for d in yaml.safe_load_all(text) if d]
    print("%s: %d objects: %s" % (name, len(docs), ", ".join(d["kind"] for d in docs)))
    r = subprocess.run(["node", os.path.join(CACHE, "validate.mjs")], input=json.dumps(docs),
                       capture_output=True, text=True)
    print("  " + r.stdout.strip().replace("\n", "\n  "))
    check(r.returncode == 0, "%s: kubernetes-models validation: %s %s" % (name, r.stdout, r.stderr))
    for d in docs:
        cls = API_CLASS.get((d["apiVersion"], d["kind"]))
        if cls:
            bad = unknown_fields(d, cls, d["kind"])
            check(not bad, "%s: unknown fields %s" % (name, bad))
    return {d["kind"]: d for d in docs}


def main():
    tmp = tempfile.mkdtemp(prefix="tlserve-chart-")
    try:
        tool = build_tools(tmp)
        known_flags = set(re.findall(r"-(\w+) \(", subprocess.run(
            [os.path.join(BIN, "tlserve"), "--helpfull"], capture_output=True, text=True).stdout))
        check("backbone" in known_flags, "tlserve --helpfull lists its flags")

        r = render(tool, tmp, {})
        check(r.returncode == 0, "default values render: " + r.stderr)
        objs = validate("default", r.stdout)
        check(set(objs) == {"ConfigMap", "Deployment", "PersistentVolumeClaim", "Service", "ServiceAccount"},
              "default objects: %s" % sorted(objs))
        dep = objs["Deployment"]
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            check(c[probe].get("grpc", {}).get("port") == 50051, probe + " uses the gRPC health service")
        check(c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300,
              "the startup probe allows at least 5 minutes to load a backbone")
        check(pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001, "non-root")
        check(c["securityContext"]["readOnlyRootFilesystem"], "read-only root filesystem")
        check(c["securityContext"]["capabilities"]["drop"] == ["ALL"], "capabilities dropped")
        check([p["name"] for p in c["ports"]] == ["grpc", "metrics"], "named container ports")
        check([p["name"] for p in objs["Service"]["spec"]["ports"]] == ["grpc", "metrics"], "named service ports")
        check("nvidia.com/gpu" not in json.dumps(c["resources"]), "no GPU by default")
        check(dep["spec"]["strategy"]["type"] == "Recreate", "one pod owns the data volume")
        flags = objs["ConfigMap"]["data"]["tlserve.flags"].split()
        names = [f[2:].split("=")[0] for f in flags]
        check(all(n in known_flags for n in names), "every flag is tlserve's: %s" % (set(names) - known_flags))
        check(c["args"] == ["--flagfile=/etc/tlserve/tlserve.flags"], "flags come from the ConfigMap")

        r = render(tool, tmp, {"gpu": {"enabled": True, "count": 2, "repository": "tlserve-cuda"},
                               "nodeSelector": {"nvidia.com/gpu.present": "true"},
                               "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                "effect": "NoSchedule"}]})
        check(r.returncode == 0, "gpu values render: " + r.stderr)
        objs = validate("gpu", r.stdout)
        pod = objs["Deployment"]["spec"]["template"]["spec"]
        check(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2, "nvidia.com/gpu limit")
        check(pod["containers"][0]["image"].startswith("tlserve-cuda:"), "the CUDA image")
        check(pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["nodeSelector"], "tolerations, nodeSelector")
        check("--device=cuda" in objs["ConfigMap"]["data"]["tlserve.flags"], "--device=cuda on GPU")

        r = render(tool, tmp, {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
                               "grafana": {"dashboard": {"enabled": True}},
                               "podDisruptionBudget": {"enabled": True}})
        check(r.returncode == 0, "monitoring values render: " + r.stderr)
        objs = validate("monitoring", r.stdout)
        check("ServiceMonitor" in objs and "PodDisruptionBudget" in objs, "ServiceMonitor and PDB rendered")
        sm = objs["ServiceMonitor"]["spec"]["endpoints"][0]
        check(sm["port"] == "metrics" and sm["path"] == "/metrics", "ServiceMonitor scrapes /metrics")
        dash = [d for d in yaml.safe_load_all(r.stdout) if d and d["metadata"]["name"].endswith("-dashboard")]
        check(len(dash) == 1 and dash[0]["metadata"]["labels"].get("grafana_dashboard") == "1",
              "dashboard ConfigMap labelled for the sidecar")
        with open(os.path.join(ROOT, "monitoring", "grafana-dashboard.json")) as f:
            check(json.loads(dash[0]["data"]["tlserve.json"]) == json.load(f),
                  "the dashboard ConfigMap holds monitoring/grafana-dashboard.json")

        r = render(tool, tmp, {"persistence": {"enabled": False},
                               "autoscaling": {"enabled": True, "maxReplicas": 6,
                                               "queueTimeMetric": {"name": "tlserve_queue_seconds_p95"}}})
        check(r.returncode == 0, "autoscaling values render: " + r.stderr)
        objs = validate("autoscaling", r.stdout)
        hpa = objs["HorizontalPodAutoscaler"]["spec"]
        check([m["type"] for m in hpa["metrics"]] == ["Resource", "Pods"], "HPA on CPU and queue time")
        check("replicas" not in objs["Deployment"]["spec"], "the HPA owns the replica count")
        check("PersistentVolumeClaim" not in objs, "no claim for stateless replicas")

        r = render(tool, tmp, {"backbone": {"volume": {"persistentVolumeClaim": {"claimName": "backbones"}},
                                            "path": "/models/fmnist-resnet18.pt"}})
        check(r.returncode == 0, "backbone volume renders: " + r.stderr)
        objs = validate("backbone-volume", r.stdout)
        vols = {v["name"]: v for v in objs["Deployment"]["spec"]["template"]["spec"]["volumes"]}
        check(vols["backbone"]["persistentVolumeClaim"]["claimName"] == "backbones", "backbone volume")

        for values, words in (({"replicaCount": 2}, "replicaCount > 1 with persistence.enabled"),
                              ({"autoscaling": {"enabled": True}}, "autoscaling.enabled with persistence.enabled")):
            r = render(tool, tmp, values)
            print("refused %s: %s" % (values, r.stderr.strip()))
            check(r.returncode != 0 and words in r.stderr and "SQLite" in r.stderr,
                  "refuses %s with a reason" % values)
        r = render(tool, tmp, {"replicaCount": 3, "persistence": {"enabled": False}})
        check(r.returncode == 0, "stateless replicas are allowed")

        r = render(tool, tmp, {}, notes=True)
        check(r.returncode == 0 and "port-forward svc/tlserve 50051 9090" in r.stdout, "NOTES.txt renders")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("%d failures" % len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

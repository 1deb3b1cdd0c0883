#!/usr/bin/env python3
"""The Helm chart, checked without a helm binary (none is packaged here):

- templates are rendered by tests/helm/render (Go's text/template + sprig,
  Helm's engine, with values' numbers as float64 as Helm reads them) for the
  default values and for GPU, ServiceMonitor + dashboard, autoscaling
  (stateless, with the prometheus-adapter metric), PostgreSQL mode (replicas,
  HPA, PodDisruptionBudget, headless Service), a mounted backbone, TLS + API keys + quotas + audit, mTLS with a
  cert-manager Certificate, mTLS with a separate client CA, metrics over
  HTTPS with a token (and the ServiceMonitor that scrapes them), and
  NetworkPolicy variants;
- every output must parse as YAML; every object is validated against
  Kubernetes' schemas by npm's kubernetes-models (apiVersion, kind, required
  fields, types; cert-manager's and the Prometheus Operator's too) and has
  only field names that Kubernetes' models know (python3-kubernetes, k8s
  1.22, plus the newer fields listed in NEWER);
- specific promises: probes on the gRPC health service (on the plaintext
  health port), non-root, read-only root, dropped capabilities, named ports,
  nvidia.com/gpu with gpu.enabled, the dashboard ConfigMap equal to
  monitoring/grafana-dashboard.json, every flag in the flags ConfigMap and
  the container's args known to `tlserve --help` and printed as tlserve parses
  it; every file flag (--tls_cert, --api_keys, ...) names a file of the
  right Secret or ConfigMap, mounted as a whole directory (so updates reach
  tlserve); the NetworkPolicy's rules; the ServiceMonitor's https, CA and
  bearer token;
- more than one replica with persistence, autoscaling with persistence, or
  a PodDisruptionBudget for SQLite's one replica, fails rendering with a
  message that says why (PostgreSQL mode allows all three, keeps the URI in
  a Secret and out of the pod spec, and has no claim); so do settings that would
  leave TLS or keys half set up or the probes unable to reach tlserve.

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
# (ServiceMonitor and Certificate have no model there: their endpoint's and
# spec's fields are checked by name below.)
NEWER = {"V1Probe": {"grpc": "V1GRPCAction"}}
GRPC_ACTION = {"port": "int", "service": "str"}
API_CLASS = {("apps/v1", "Deployment"): "V1Deployment", ("v1", "Service"): "V1Service",
             ("v1", "ConfigMap"): "V1ConfigMap", ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
             ("v1", "ServiceAccount"): "V1ServiceAccount",
             ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
             ("networking.k8s.io/v1", "NetworkPolicy"): "V1NetworkPolicy",
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
    shutil.copy(os.path.join(HERE, "kserve-schemas.json"), CACHE)
    with open(os.path.join(HERE, "package.json")) as f:
        wanted = json.load(f)["dependencies"]
    if not all(os.path.isdir(os.path.join(CACHE, "node_modules", d)) for d in wanted):
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=CACHE, check=True)
    return render


def render(tool, tmp, values, notes=False):
    path = os.path.join(tmp, "values.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(values, f)
    args = [tool, "-chart", CHART, "-f", path] + (["-notes"] if notes else [])
    return subprocess.run(args, capture_output=True, text=True)


class Objects(dict):
    """A rendering's objects by kind (the first of each kind: for ConfigMap,
    the flags'), and all of them in .docs."""

    def __init__(self, docs):
        super().__init__()
        for d in docs:
            self.setdefault(d["kind"], d)
        self.docs = docs


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
    return Objects(docs)


def parse_args(args):
    """{flag: value} of --flag=value and bare --flag (True) arguments."""
    out = {}
    for a in args:
        name, eq, value = a[2:].partition("=")
        out[name] = value if eq else True
    return out


def mounted_file(pod, path):
    """(volume kind, object name, key) that the container reads at path, or a
    string saying why it reads nothing there. The directory must be a whole
    volume: a subPath mount would never see the Secret's updates."""
    c = pod["containers"][0]
    d, base = os.path.split(path)
    mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == d]
    if len(mounts) != 1:
        return "%d mounts at %s" % (len(mounts), d)
    if "subPath" in mounts[0] or not mounts[0].get("readOnly"):
        return "%s is a subPath or writable mount" % d
    vol = {v["name"]: v for v in pod["volumes"]}[mounts[0]["name"]]
    kind = "secret" if "secret" in vol else "configMap" if "configMap" in vol else None
    if not kind:
        return "%s is neither a Secret nor a ConfigMap" % d
    src = vol[kind]
    key = base
    if "items" in src:
        keys = [i["key"] for i in src["items"] if i["path"] == base]
        if not keys:
            return "no item of %s is %s" % (d, base)
        key = keys[0]
    return (kind, src.get("secretName") or src.get("name"), key)


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
        check(set(objs) == {"ConfigMap", "Deployment", "NetworkPolicy", "PersistentVolumeClaim", "Service",
                            "ServiceAccount"}, "default objects: %s" % sorted(objs))
        dep = objs["Deployment"]
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        check(c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300,
              "the startup probe allows at least 5 minutes to load a backbone")
        check(pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001, "non-root")
        check(c["securityContext"]["readOnlyRootFilesystem"], "read-only root filesystem")
        check(c["securityContext"]["capabilities"]["drop"] == ["ALL"], "capabilities dropped")
        check([p["name"] for p in c["ports"]] == ["grpc", "metrics", "health"], "named container ports")
        check([p["name"] for p in objs["Service"]["spec"]["ports"]] == ["grpc", "metrics"], "named service ports")
        check("nvidia.com/gpu" not in json.dumps(c["resources"]), "no GPU by default")
        check(dep["spec"]["strategy"]["type"] == "Recreate", "one pod owns the data volume")
        check("rollingUpdate" in dep["spec"]["strategy"] and dep["spec"]["strategy"]["rollingUpdate"] is None,
              "rollingUpdate: null, so that an upgrade from PostgreSQL mode's rolling update is accepted")
        flags = objs["ConfigMap"]["data"]["tlserve.flags"].split()
        names = [f[2:].split("=")[0] for f in flags] + list(parse_args(c["args"]))
        check(all(n in known_flags for n in names), "every flag is tlserve's: %s" % (set(names) - known_flags))
        check("--max_message_bytes=67108864" in flags,
              "a large number is printed as an integer, not as Helm's float64 (6.7108864e+07)")
        check(c["args"] == ["--flagfile=/etc/tlserve/tlserve.flags", "--health_port=8081"],
              "flags come from the ConfigMap, the health port from the chart: %s" % c["args"])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            check(c[probe].get("grpc", {}).get("port") == 8081, probe + " uses the health port")
        check({p["name"]: p["containerPort"] for p in c["ports"]}.get("health") == 8081, "the health port is named")
        np = objs["NetworkPolicy"]["spec"]
        check(np["podSelector"]["matchLabels"] == objs["Deployment"]["spec"]["selector"]["matchLabels"],
              "the NetworkPolicy selects tlserve's pods")
        rules = {r["ports"][0]["port"]: r for r in np["ingress"]}
        check(sorted(rules) == [8081, 9090, 50051], "ingress rules for gRPC, metrics and health: %s" % sorted(rules))
        check(rules[50051].get("from") == [{"podSelector": {}}], "gRPC from the release's namespace only")
        check(rules[9090].get("from") == [{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "monitoring"}}}], "metrics from the monitoring namespace only")
        check("from" not in rules[8081], "health from anywhere (the kubelet probes from the node)")
        check(np["policyTypes"] == ["Ingress"], "egress left alone")

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
                               "grafana": {"dashboard": {"enabled": True}}})
        check(r.returncode == 0, "monitoring values render: " + r.stderr)
        objs = validate("monitoring", r.stdout)
        check("ServiceMonitor" in objs, "ServiceMonitor rendered")
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

        postgres_mode(tool, tmp, known_flags)

        for values, words in (({"replicaCount": 2}, "replicaCount > 1 with persistence.enabled"),
                              ({"autoscaling": {"enabled": True}}, "autoscaling.enabled with persistence.enabled"),
                              ({"podDisruptionBudget": {"enabled": True}},
                               "podDisruptionBudget.enabled with persistence.enabled")):
            r = render(tool, tmp, values)
            print("refused %s: %s" % (values, r.stderr.strip()))
            check(r.returncode != 0 and words in r.stderr and "SQLite" in r.stderr,
                  "refuses %s with a reason" % values)
        r = render(tool, tmp, {"replicaCount": 3, "persistence": {"enabled": False}})
        check(r.returncode == 0, "stateless replicas are allowed")

        r = render(tool, tmp, {}, notes=True)
        check(r.returncode == 0 and "port-forward svc/tlserve 50051 9090" in r.stdout, "NOTES.txt renders")

        security_tests(tool, tmp, known_flags)
        kserve_manifests(known_flags)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("%d failures" % len(failures))
    return 1 if failures else 0


def postgres_mode(tool, tmp, known_flags):
    """database.url: several replicas (or an HPA) and a PDB on one shared
    PostgreSQL, the URI from a Secret through the environment, no claim."""
    db = {"url": {"secretName": "tlserve-db", "key": "uri"}, "password": {"secretName": "tlserve-db-pass"}}
    objs, pod, args = rendered(tool, tmp, "postgresql", {
        "database": db, "replicaCount": 3, "podDisruptionBudget": {"enabled": True, "minAvailable": 2},
        "service": {"headless": True}}, known_flags)
    if objs is None:
        return
    dep = objs["Deployment"]["spec"]
    check(dep["replicas"] == 3, "three replicas on one database")
    check("strategy" not in dep, "a rolling update: no replica owns a volume")
    check("PersistentVolumeClaim" not in objs, "no claim in PostgreSQL mode")
    check("emptyDir" in {v["name"]: v for v in pod["volumes"]}["data"], "the data directory is scratch space")
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in pod["containers"][0].get("env", [])}
    check(env.get("TLSERVE_DATABASE") == {"name": "tlserve-db", "key": "uri"}, "the URI from its Secret: %s" % env)
    check(env.get("PGPASSWORD") == {"name": "tlserve-db-pass", "key": "password"}, "the password from its Secret")
    flags = objs["ConfigMap"]["data"]["tlserve.flags"]
    check("database" not in args and "--database" not in flags, "the URI is not in the pod spec or the ConfigMap")
    check(objs["PodDisruptionBudget"]["spec"]["minAvailable"] == 2, "a PodDisruptionBudget")
    services = {d["metadata"]["name"]: d["spec"] for d in objs.docs if d["kind"] == "Service"}
    check(services.get("tlserve-headless", {}).get("clusterIP") == "None"
          and [p["name"] for p in services["tlserve-headless"]["ports"]] == ["grpc"],
          "a headless Service for client-side balancing: %s" % sorted(services))
    check(services["tlserve"].get("clusterIP") is None, "the main Service keeps its cluster IP")
    r = render(tool, tmp, {"database": db}, notes=True)
    check(r.returncode == 0 and "PostgreSQL database of Secret tlserve-db" in r.stdout, "NOTES.txt in PostgreSQL mode")
    objs, pod, args = rendered(tool, tmp, "postgresql-hpa", {
        "database": db, "autoscaling": {"enabled": True, "maxReplicas": 8}}, known_flags)
    if objs is not None:
        check(objs["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] == 8, "an autoscaler in PostgreSQL mode")
        check("replicas" not in objs["Deployment"]["spec"], "the HPA owns the replica count")


def rendered(tool, tmp, name, values, known_flags):
    """The objects of one rendering, validated, plus the pod and its args."""
    r = render(tool, tmp, values)
    check(r.returncode == 0, "%s values render: %s" % (name, r.stderr))
    if r.returncode != 0:
        return None, None, {}
    objs = validate(name, r.stdout)
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = parse_args(c["args"])
    flags = objs["ConfigMap"]["data"]["tlserve.flags"].split()
    unknown = (set(args) | {f[2:].split("=")[0] for f in flags}) - known_flags
    check(not unknown, "%s: every flag is tlserve's: %s" % (name, sorted(unknown)))
    sci = [f for f in flags + c["args"] if re.search(r"=[-+]?\d(\.\d+)?e[-+]\d+$", f)]
    check(not sci, "%s: no number in scientific notation: %s" % (name, sci))
    port = int(args.get("health_port", 50051))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        check(c[probe]["grpc"]["port"] == port, "%s: %s on port %d" % (name, probe, port))
    if "tls_cert" in args or "api_keys" in args:
        check(port != 50051, "%s: with TLS or keys the probes use the plaintext health port" % name)
    return objs, pod, args


def security_tests(tool, tmp, known_flags):
    # TLS from an existing Secret, API keys, quotas, audit to stdout.
    objs, pod, args = rendered(tool, tmp, "tls-keys", {
        "tls": {"enabled": True, "secretName": "tlserve-cert"},
        "auth": {"apiKeysSecret": "tlserve-keys"},
        "quotas": {"defaults": {"storage_mb": 10240, "jobs": 2},
                   "tenants": {"acme": {"storage_mb": 51200, "private_params": 50000000}, "beta": {"jobs": 0}}},
        "audit": {"enabled": True, "output": "stdout"}}, known_flags)
    if objs:
        check(mounted_file(pod, args.get("tls_cert", "")) == ("secret", "tlserve-cert", "tls.crt"),
              "--tls_cert is tls.crt of the Secret: %s" % (mounted_file(pod, args.get("tls_cert", "")),))
        check(mounted_file(pod, args.get("tls_key", "")) == ("secret", "tlserve-cert", "tls.key"),
              "--tls_key is tls.key of the Secret")
        check("tls_client_ca" not in args, "no client certificates asked for without tls.clientAuth")
        check(mounted_file(pod, args.get("api_keys", "")) == ("secret", "tlserve-keys", "api_keys"),
              "--api_keys is key api_keys of auth.apiKeysSecret: %s" % (mounted_file(pod, args.get("api_keys", "")),))
        modes = {v["name"]: v["secret"].get("defaultMode") for v in pod["volumes"] if "secret" in v}
        check(modes and all(m == 0o440 for m in modes.values()), "secrets readable by tlserve's group only: %s" % modes)
        check(mounted_file(pod, args.get("quotas", "")) == ("configMap", "tlserve-quotas", "quotas"),
              "--quotas is key quotas of ConfigMap tlserve-quotas: %s" % (mounted_file(pod, args.get("quotas", "")),))
        qmap = [d for d in objs.docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "tlserve-quotas"]
        quotas = sorted(qmap[0]["data"]["quotas"].strip().splitlines()) if qmap else []
        check(quotas == ["acme private_params 50000000", "acme storage_mb 51200", "beta jobs 0"],
              "the quotas file: %s" % quotas)
        r = render(tool, tmp, {"tls": {"enabled": True, "secretName": "tlserve-cert"},
                               "auth": {"apiKeysSecret": "tlserve-keys"},
                               "quotas": {"defaults": {"storage_mb": 10240, "jobs": 2},
                                          "tenants": {"acme": {"storage_mb": 1}}},
                               "audit": {"enabled": True, "output": "stdout"}})
        other = [d for d in yaml.safe_load_all(r.stdout) if d and d["kind"] == "Deployment"]
        annotations = lambda d: d["spec"]["template"]["metadata"]["annotations"]
        check(other and annotations(other[0]) == annotations(objs["Deployment"]),
              "a quota change leaves the pod template alone (tlserve re-reads the file; no restart)")
        flags = objs["ConfigMap"]["data"]["tlserve.flags"].split()
        check("--tenant_storage_mb=10240" in flags and "--tenant_jobs=2" in flags, "default quotas as flags")
        check(args.get("audit_log") == "/dev/stdout", "audit to stdout")
        check("Certificate" not in objs, "no Certificate without tls.certManager")
        check(objs["Service"]["spec"]["ports"][1]["appProtocol"] == "http", "metrics stay http without metrics.tls")

    objs, pod, args = rendered(tool, tmp, "audit-file", {"audit": {"enabled": True}}, known_flags)
    if objs:
        check(args.get("audit_log") == "/var/lib/tlserve/audit.log", "audit log on the data volume")

    # mTLS with the CA of a cert-manager Certificate.
    objs, pod, args = rendered(tool, tmp, "mtls-cert-manager", {
        "tls": {"enabled": True, "clientAuth": True,
                "certManager": {"enabled": True, "issuerRef": {"name": "tlserve-ca", "kind": "ClusterIssuer"},
                                "dnsNames": ["tlserve.example.com"]}}}, known_flags)
    if objs:
        cert = objs.get("Certificate", {}).get("spec", {})
        check(cert.get("secretName") == "tlserve-tls", "the Certificate writes tlserve-tls")
        check(cert.get("issuerRef") == {"name": "tlserve-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"},
              "the Certificate's issuer: %s" % cert.get("issuerRef"))
        check({"tlserve", "tlserve.default.svc", "tlserve.default.svc.cluster.local",
               "tlserve.example.com"} <= set(cert.get("dnsNames", [])), "the Service's names and the extra one")
        check(cert.get("privateKey", {}).get("rotationPolicy") == "Always", "a new key at each renewal")
        unknown = set(cert) - {"secretName", "issuerRef", "dnsNames", "ipAddresses", "duration", "renewBefore",
                               "privateKey", "usages", "commonName"}
        check(not unknown, "Certificate fields: %s" % unknown)
        check(mounted_file(pod, args.get("tls_cert", "")) == ("secret", "tlserve-tls", "tls.crt"),
              "--tls_cert from the Certificate's Secret")
        check(mounted_file(pod, args.get("tls_client_ca", "")) == ("secret", "tlserve-tls", "ca.crt"),
              "--tls_client_ca is ca.crt of the Certificate's Secret: %s" % args.get("tls_client_ca"))

    # mTLS with a separate client CA.
    objs, pod, args = rendered(tool, tmp, "mtls-client-ca", {
        "tls": {"enabled": True, "secretName": "tlserve-cert", "clientAuth": True,
                "clientCASecret": "clients-ca", "clientCAKey": "ca.pem"}}, known_flags)
    if objs:
        check(mounted_file(pod, args.get("tls_client_ca", "")) == ("secret", "clients-ca", "ca.pem"),
              "--tls_client_ca is ca.pem of tls.clientCASecret: %s" % (mounted_file(pod, args.get("tls_client_ca", "")),))

    # Metrics over HTTPS with a token, scraped by a ServiceMonitor.
    for field in ("authorization", "bearerTokenSecret"):
        objs, pod, args = rendered(tool, tmp, "metrics-tls-token-" + field, {
            "tls": {"enabled": True, "secretName": "tlserve-cert"},
            "metrics": {"tls": True, "tokenSecret": "metrics-token", "modelLabels": True,
                        "serviceMonitor": {"enabled": True, "tokenField": field}}}, known_flags)
        if not objs:
            continue
        check(args.get("metrics_tls") is True and args.get("metrics_model_labels") is True,
              "--metrics_tls, --metrics_model_labels")
        check(mounted_file(pod, args.get("metrics_token_file", "")) == ("secret", "metrics-token", "token"),
              "--metrics_token_file is key token of metrics.tokenSecret")
        ep = objs["ServiceMonitor"]["spec"]["endpoints"][0]
        check(ep.get("scheme") == "https", "the ServiceMonitor scrapes https")
        check(ep.get("tlsConfig") == {"ca": {"secret": {"name": "tlserve-cert", "key": "ca.crt"}},
                                      "serverName": "tlserve.default.svc"},
              "the ServiceMonitor checks the certificate: %s" % ep.get("tlsConfig"))
        if field == "authorization":
            check(ep.get("authorization") == {"type": "Bearer", "credentials": {"name": "metrics-token",
                                                                              "key": "token"}},
                  "the ServiceMonitor sends the token: %s" % ep.get("authorization"))
        else:
            check(ep.get("bearerTokenSecret") == {"name": "metrics-token", "key": "token"},
                  "the ServiceMonitor sends the token as bearerTokenSecret")
        unknown = set(ep) - {"port", "path", "interval", "scrapeTimeout", "scheme", "tlsConfig", "authorization",
                             "bearerTokenSecret"}
        check(not unknown, "ServiceMonitor endpoint fields: %s" % unknown)
        check(objs["Service"]["spec"]["ports"][1]["appProtocol"] == "https", "metrics port says https")

    # NetworkPolicy: more callers; from anywhere; off.
    objs, pod, args = rendered(tool, tmp, "networkpolicy", {"networkPolicy": {
        "grpc": {"fromNamespace": False, "namespaceSelectors": [{"matchLabels": {"team": "ml"}}],
                 "podSelectors": [{"matchLabels": {"role": "client"}}],
                 "extraFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]},
        "metrics": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "prom"}},
                    "podSelector": {"matchLabels": {"app": "prometheus"}}}}}, known_flags)
    if objs:
        rules = {r["ports"][0]["port"]: r for r in objs["NetworkPolicy"]["spec"]["ingress"]}
        check(rules[50051].get("from") == [{"namespaceSelector": {"matchLabels": {"team": "ml"}}},
                                           {"podSelector": {"matchLabels": {"role": "client"}}},
                                           {"ipBlock": {"cidr": "10.0.0.0/8"}}],
              "gRPC from the listed callers only: %s" % rules[50051].get("from"))
        check(rules[9090].get("from") == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "prom"}},
                                          "podSelector": {"matchLabels": {"app": "prometheus"}}}],
              "metrics from Prometheus' pods in its namespace (one peer: both selectors)")
    objs, pod, args = rendered(tool, tmp, "networkpolicy-anywhere",
                               {"networkPolicy": {"grpc": {"fromAnywhere": True}}}, known_flags)
    if objs:
        rules = {r["ports"][0]["port"]: r for r in objs["NetworkPolicy"]["spec"]["ingress"]}
        check("from" not in rules[50051] and "from" in rules[9090], "gRPC from anywhere, metrics still restricted")
    objs, pod, args = rendered(tool, tmp, "networkpolicy-off", {"networkPolicy": {"enabled": False}}, known_flags)
    if objs:
        check("NetworkPolicy" not in objs, "networkPolicy.enabled=false: none")

    # No health port: the probes use the gRPC port, which is fine only while
    # it speaks plaintext without keys.
    objs, pod, args = rendered(tool, tmp, "no-health-port", {"healthPort": 0}, known_flags)
    if objs:
        c = pod["containers"][0]
        check("health_port" not in args and c["livenessProbe"]["grpc"]["port"] == 50051, "probes on the gRPC port")
        rules = {r["ports"][0]["port"] for r in objs["NetworkPolicy"]["spec"]["ingress"]}
        check(rules == {50051, 9090}, "no rule for a health port that is not there")
    for values, words in (
            ({"healthPort": 0, "tls": {"enabled": True, "secretName": "s"}}, "healthPort: 0 with tls.enabled"),
            ({"healthPort": 0, "auth": {"apiKeysSecret": "k"}}, "healthPort: 0 with tls.enabled or auth.apiKeysSecret"),
            ({"tls": {"enabled": True}}, "tls.enabled needs tls.secretName"),
            ({"tls": {"clientAuth": True}}, "tls.clientAuth (mTLS) needs tls.enabled"),
            ({"tls": {"enabled": True, "certManager": {"enabled": True}}}, "needs tls.certManager.issuerRef.name"),
            ({"tls": {"certManager": {"enabled": True, "issuerRef": {"name": "ca"}}}},
             "tls.certManager.enabled needs tls.enabled"),
            ({"metrics": {"tls": True}}, "metrics.tls serves /metrics with the gRPC certificate"),
            ({"quotas": {"defaults": {"storage_gb": 1}}}, "quotas.defaults.storage_gb: no such quota"),
            ({"quotas": {"tenants": {"acme": {"model": 1}}}}, "quotas.tenants.acme.model: no such quota"),
            ({"audit": {"enabled": True, "output": "syslog"}}, "audit.output must be file or stdout"),
            ({"metrics": {"tokenSecret": "t", "serviceMonitor": {"enabled": True, "tokenField": "basicAuth"}}},
             "tokenField must be authorization or bearerTokenSecret")):
        r = render(tool, tmp, values)
        print("refused %s: %s" % (values, r.stderr.strip()))
        check(r.returncode != 0 and words in r.stderr, "refuses %s with a reason" % values)

    r = render(tool, tmp, {"tls": {"enabled": True, "secretName": "tlserve-cert", "clientAuth": True},
                           "auth": {"apiKeysSecret": "k"}, "metrics": {"tls": True, "tokenSecret": "t"}}, notes=True)
    check(r.returncode == 0 and "--tls_ca=ca.crt --tls_cert=client.crt --tls_key=client.key summary" in r.stdout
          and "TLSERVE_TOKEN=" in r.stdout and "https://localhost:9090" in r.stdout,
          "NOTES.txt tells how to connect with TLS and a key: " + r.stdout + r.stderr)


def kserve_manifests(known_flags):
    """deploy/kserve/: valid KServe objects (schema) whose container is valid
    Kubernetes, runs tlserve with flags it knows on the h2c port, speaks
    grpc-v2, is the image the chart deploys, and is what the example
    InferenceService asks for (runtime name and model format)."""
    deploy = os.path.join(ROOT, "deploy", "kserve")
    docs = []
    for name in ("servingruntime.yaml", "inferenceservice.yaml"):
        with open(os.path.join(deploy, name)) as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    r = subprocess.run(["node", os.path.join(CACHE, "validate.mjs")], input=json.dumps(docs),
                       capture_output=True, text=True)
    print("deploy/kserve: " + r.stdout.strip().replace("\n", "; "))
    check(r.returncode == 0 and r.stdout.count("valid ") == 2,
          "deploy/kserve validates: %s %s" % (r.stdout, r.stderr))
    runtime = next(d for d in docs if d["kind"] == "ServingRuntime")
    isvc = next(d for d in docs if d["kind"] == "InferenceService")
    c = runtime["spec"]["containers"][0]
    flags = {a[2:].split("=")[0]: a.split("=", 1)[1] if "=" in a else "" for a in c["args"]}
    check(set(flags) <= known_flags, "ServingRuntime flags are tlserve's: %s" % (set(flags) - known_flags))
    h2c = [p for p in c["ports"] if p.get("name") == "h2c"]
    check(len(h2c) == 1 and flags.get("port") == str(h2c[0]["containerPort"]),
          "tlserve listens on the h2c port: %s %s" % (flags.get("port"), h2c))
    check(flags.get("backbone", "").startswith("/mnt/models/"), "the backbone comes from /mnt/models")
    check("grpc-v2" in runtime["spec"]["protocolVersions"], "the runtime speaks grpc-v2")
    with open(os.path.join(CHART, "Chart.yaml")) as f:
        app_version = yaml.safe_load(f)["appVersion"]
    check(c["image"] == "tlserve:" + app_version, "the runtime's image is the chart's appVersion")
    model = isvc["spec"]["predictor"]["model"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    check(model["runtime"] == runtime["metadata"]["name"] and model["modelFormat"]["name"] in formats
          and model["protocolVersion"] in runtime["spec"]["protocolVersions"],
          "the InferenceService asks for the runtime, a format and a protocol it has")
    # The schema refuses a misspelt field and a protocol KServe does not know.
    bad = json.loads(json.dumps(docs))
    bad[0]["spec"]["protocolVersion"] = ["grpc-v2"]
    bad[1]["spec"]["predictor"]["model"]["protocolVersion"] = "grpc-v3"
    r = subprocess.run(["node", os.path.join(CACHE, "validate.mjs")], input=json.dumps(bad),
                       capture_output=True, text=True)
    check(r.returncode != 0 and r.stdout.count("INVALID") == 2, "typos are refused: " + r.stdout)
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        m = re.search(r"project\(tlserve VERSION ([\d.]+)", f.read())
    check(m and m.group(1) == app_version,
          "CMake's project version (ServerMetadata's) is the chart's appVersion %s" % app_version)


if __name__ == "__main__":
    sys.exit(main())

// Validates Kubernetes objects (a JSON array on stdin) against the schemas
// of npm's kubernetes-models (apiVersion, kind, required fields, types and
// formats), @kubernetes-models/prometheus-operator (ServiceMonitor) and
// @kubernetes-models/cert-manager (Certificate).
// Prints one line per object; exits 1 if any is invalid or of an unknown kind.
import * as apps from "kubernetes-models/apps/v1";
import * as core from "kubernetes-models/v1";
import * as policy from "kubernetes-models/policy/v1";
import * as autoscaling from "kubernetes-models/autoscaling/v2";
import * as networking from "kubernetes-models/networking.k8s.io/v1";
import * as monitoring from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import * as certmanager from "@kubernetes-models/cert-manager/cert-manager.io/v1";

const models = {
  "apps/v1": apps, "v1": core, "policy/v1": policy, "autoscaling/v2": autoscaling,
  "networking.k8s.io/v1": networking, "monitoring.coreos.com/v1": monitoring,
  "cert-manager.io/v1": certmanager,
};
let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = 0;
for (const obj of JSON.parse(input)) {
  const name = `${obj.apiVersion} ${obj.kind} ${obj.metadata && obj.metadata.name}`;
  const group = models[obj.apiVersion];
  const Model = group && group[obj.kind];
  if (!Model) {
    console.log(`UNKNOWN ${name}`);
    failed++;
    continue;
  }
  try {
    new Model(obj).validate();
    console.log(`valid ${name}`);
  } catch (e) {
    console.log(`INVALID ${name}: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);

// Validates Kubernetes objects (a JSON array on stdin) against the schemas
// of npm's kubernetes-models (apiVersion, kind, required fields, types and
// formats), @kubernetes-models/prometheus-operator (ServiceMonitor) and
// @kubernetes-models/cert-manager (Certificate); KServe's ServingRuntime and
// InferenceService against kserve-schemas.json (beside this file; no package
// has KServe's models) with their containers against Kubernetes' Container.
// Prints one line per object; exits 1 if any is invalid or of an unknown kind.
import * as apps from "kubernetes-models/apps/v1";
import * as core from "kubernetes-models/v1";
import * as policy from "kubernetes-models/policy/v1";
import * as autoscaling from "kubernetes-models/autoscaling/v2";
import * as networking from "kubernetes-models/networking.k8s.io/v1";
import * as monitoring from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import * as certmanager from "@kubernetes-models/cert-manager/cert-manager.io/v1";
import Ajv from "ajv";
import { readFileSync } from "node:fs";

// KServe's kinds: the schema, then every container as a Pod's would be.
const kserveSchemas = JSON.parse(
  readFileSync(new URL("./kserve-schemas.json", import.meta.url), "utf8"));
const ajv = new Ajv({ allErrors: true, strict: false });
function kserveModel(kind) {
  const check = ajv.compile({ definitions: kserveSchemas.definitions, ...kserveSchemas[kind] });
  return class {
    constructor(obj) { this.obj = obj; }
    validate() {
      if (!check(this.obj)) throw new Error(ajv.errorsText(check.errors, { dataVar: kind }));
      const containers = (this.obj.spec || {}).containers;
      if (containers) {
        new core.Pod({ metadata: { name: "runtime" }, spec: { containers } }).validate();
      }
    }
  };
}

const models = {
  "apps/v1": apps, "v1": core, "policy/v1": policy, "autoscaling/v2": autoscaling,
  "networking.k8s.io/v1": networking, "monitoring.coreos.com/v1": monitoring,
  "cert-manager.io/v1": certmanager,
  "serving.kserve.io/v1alpha1": { ServingRuntime: kserveModel("ServingRuntime") },
  "serving.kserve.io/v1beta1": { InferenceService: kserveModel("InferenceService") },
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

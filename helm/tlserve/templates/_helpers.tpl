{{/* The release's resource name, at most 63 characters. */}}
{{- define "tlserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tlserve.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tlserve.labels" -}}
{{ include "tlserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tlserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tlserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tlserve.image" -}}
{{- $repo := .Values.image.repository -}}
{{- if and .Values.gpu.enabled .Values.gpu.repository -}}{{- $repo = .Values.gpu.repository -}}{{- end -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
"true" in PostgreSQL mode (database.url.secretName): the state is in a
database that replicas share, not on the data volume.
*/}}
{{- define "tlserve.sharedDatabase" -}}
{{- if .Values.database.url.secretName -}}true{{- end -}}
{{- end -}}

{{/*
Whether the data volume is a claim: persistence in SQLite mode.
*/}}
{{- define "tlserve.persistentData" -}}
{{- if and .Values.persistence.enabled (not (include "tlserve.sharedDatabase" .)) -}}true{{- end -}}
{{- end -}}

{{/*
In SQLite mode the state lives in one file on one volume: more than one
replica, or an autoscaler that makes more, would split it, and a
PodDisruptionBudget would keep its one pod's node from ever being drained.
Refuse instead of doing so.
*/}}
{{- define "tlserve.checkReplicas" -}}
{{- if and (include "tlserve.persistentData" .) (gt (int .Values.replicaCount) 1) -}}
{{- fail "replicaCount > 1 with persistence.enabled: tlserve keeps its datasets, models and jobs in one SQLite file that replicas cannot share; put the state in PostgreSQL (database.url.secretName), run one replica, or set persistence.enabled=false for stateless Embed-only replicas (README: Replicas and state)" -}}
{{- end -}}
{{- if and (include "tlserve.persistentData" .) .Values.autoscaling.enabled -}}
{{- fail "autoscaling.enabled with persistence.enabled: autoscaled replicas would each need the one SQLite state file; put the state in PostgreSQL (database.url.secretName) or autoscale only stateless Embed-only replicas (persistence.enabled=false), see README: Replicas and state" -}}
{{- end -}}
{{- if and (include "tlserve.persistentData" .) .Values.podDisruptionBudget.enabled -}}
{{- fail "podDisruptionBudget.enabled with persistence.enabled: the one replica of SQLite mode could never be evicted, so its node could never be drained; use it with several replicas (PostgreSQL mode: database.url.secretName), see README: Replicas and state" -}}
{{- end -}}
{{- if and (include "tlserve.sharedDatabase" .) (not .Values.database.url.key) -}}
{{- fail "database.url.secretName needs database.url.key (the Secret's key that holds the URI)" -}}
{{- end -}}
{{- if and .Values.database.password.secretName (not .Values.database.password.key) -}}
{{- fail "database.password.secretName needs database.password.key (the Secret's key that holds the password)" -}}
{{- end -}}
{{- end -}}

{{/*
A flag's value as tlserve parses it. Helm reads every number of a values file
as a float64, which prints in scientific notation from 1e6 on
(67108864 -> 6.7108864e+07, which absl rejects): whole numbers are printed as
integers.
*/}}
{{- define "tlserve.flagValue" -}}
{{- if and (kindIs "float64" .) (eq . (float64 (int64 .))) -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* The kubernetes.io/tls Secret with the server's certificate. */}}
{{- define "tlserve.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "tlserve.fullname" .)) .Values.tls.secretName -}}
{{- end -}}

{{/* The quotas a tenant has: the names of tlserve's --tenant_* flags. */}}
{{- define "tlserve.quotaNames" -}}
storage_mb datasets images models private_params jobs inflight_images
{{- end -}}

{{/*
Settings that would leave the server exposed, unprobeable or unable to start:
refused with the reason instead.
*/}}
{{- define "tlserve.checkSecurity" -}}
{{- $tls := .Values.tls -}}
{{- if and (or $tls.enabled .Values.auth.apiKeysSecret) (not (int .Values.healthPort)) -}}
{{- fail "healthPort: 0 with tls.enabled or auth.apiKeysSecret: the kubelet's gRPC probes speak neither TLS nor API keys, so they need tlserve's plaintext health port (--health_port); keep healthPort set (default 8081)" -}}
{{- end -}}
{{- if and $tls.enabled (not $tls.secretName) (not $tls.certManager.enabled) -}}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret with tls.crt and tls.key) or tls.certManager.enabled to have cert-manager make one" -}}
{{- end -}}
{{- if and $tls.clientAuth (not $tls.enabled) -}}
{{- fail "tls.clientAuth (mTLS) needs tls.enabled" -}}
{{- end -}}
{{- if and $tls.certManager.enabled (not $tls.enabled) -}}
{{- fail "tls.certManager.enabled needs tls.enabled: the Certificate would make a Secret that nothing mounts" -}}
{{- end -}}
{{- if and $tls.certManager.enabled (not $tls.certManager.issuerRef.name) -}}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name (an Issuer, or a ClusterIssuer with issuerRef.kind=ClusterIssuer)" -}}
{{- end -}}
{{- if and .Values.metrics.tls (not $tls.enabled) -}}
{{- fail "metrics.tls serves /metrics with the gRPC certificate: it needs tls.enabled" -}}
{{- end -}}
{{- if and .Values.audit.enabled (not (has (toString .Values.audit.output) (list "file" "stdout"))) -}}
{{- fail (printf "audit.output must be file or stdout, not %v" .Values.audit.output) -}}
{{- end -}}
{{- $names := splitList " " (include "tlserve.quotaNames" .) -}}
{{- range $name, $_ := .Values.quotas.defaults -}}
{{- if not (has $name $names) -}}
{{- fail (printf "quotas.defaults.%s: no such quota (one of %s)" $name (join ", " $names)) -}}
{{- end -}}
{{- end -}}
{{- range $tenant, $quotas := .Values.quotas.tenants -}}
{{- if not (regexMatch "^[^\\s#]+$" $tenant) -}}
{{- fail (printf "quotas.tenants: tenant %q cannot be written to the quotas file (no spaces or #)" $tenant) -}}
{{- end -}}
{{- range $name, $_ := $quotas -}}
{{- if not (has $name $names) -}}
{{- fail (printf "quotas.tenants.%s.%s: no such quota (one of %s)" $tenant $name (join ", " $names)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

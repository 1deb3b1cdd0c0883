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
State lives in one SQLite file on one volume: more than one replica, or an
autoscaler that makes more, would split it. Refuse instead of doing so.
*/}}
{{- define "tlserve.checkReplicas" -}}
{{- if and .Values.persistence.enabled (gt (int .Values.replicaCount) 1) -}}
{{- fail "replicaCount > 1 with persistence.enabled: tlserve keeps its datasets, models and jobs in one SQLite file that replicas cannot share; run one replica, or set persistence.enabled=false for stateless Embed-only replicas (README: Replicas and state)" -}}
{{- end -}}
{{- if and .Values.persistence.enabled .Values.autoscaling.enabled -}}
{{- fail "autoscaling.enabled with persistence.enabled: autoscaled replicas would each need the one SQLite state file; autoscale only stateless Embed-only replicas (persistence.enabled=false), see README: Replicas and state" -}}
{{- end -}}
{{- end -}}

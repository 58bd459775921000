{{/* The chart name, or nameOverride. */}}
{{- define "m2m.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Object names: the release name when it contains the chart name, else release-chart. */}}
{{- define "m2m.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "m2m.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "m2m.serviceAccountName" -}}
{{- default (include "m2m.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "m2m.peeringName" -}}
{{- default (include "m2m.fullname" .) .Values.peering.name -}}
{{- end -}}

{{/*
Labels on every object: Helm's own three (which the parity test with
manifests/ ignores), and those kustomize adds to every object of manifests/.
*/}}
{{- define "m2m.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: m2m-token-operator
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* The operator's pods: what the Deployment, PDB, NetworkPolicy and Service select. */}}
{{- define "m2m.selectorLabels" -}}
app.kubernetes.io/name: {{ include "m2m.name" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "m2m.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "m2m.sharded" -}}
{{- if .Values.sharding.namespaces }}true{{ end -}}
{{- end -}}

{{/* Namespaced mode: Roles in rbac.servedNamespaces instead of cluster-wide rights. */}}
{{- define "m2m.namespaced" -}}
{{- if .Values.rbac.namespaced }}true{{ end -}}
{{- end -}}

{{/* Serving a set of namespaces (sharding or namespaced mode): no Kopf peering. */}}
{{- define "m2m.standalone" -}}
{{- if or (include "m2m.sharded" .) (include "m2m.namespaced" .) }}true{{ end -}}
{{- end -}}

{{/*
One replica only: the namespaced mode, which has no Lease (a shard's replicas elect
their active one through the shard's Lease, as manifests/components/shard).
*/}}
{{- define "m2m.singleReplica" -}}
{{- if and (include "m2m.namespaced" .) (not (include "m2m.sharded" .)) }}true{{ end -}}
{{- end -}}

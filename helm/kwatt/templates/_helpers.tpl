{{/* Chart name, overridable. */}}
{{- define "kwatt.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object name prefix: the release name, plus the chart name unless it already contains it. */}}
{{- define "kwatt.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kwatt.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride }}
{{- end }}

{{- define "kwatt.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kwatt.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kwatt.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kwatt.labels" -}}
helm.sh/chart: {{ include "kwatt.chart" . }}
{{ include "kwatt.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: exporter
app.kubernetes.io/part-of: kwatt
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "kwatt.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kwatt.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kwatt.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Whether the exporter gets a web config (TLS and/or basic auth). */}}
{{- define "kwatt.webConfigEnabled" -}}
{{- if or .Values.web.tls.enabled .Values.web.basicAuth.users }}true{{ end }}
{{- end }}

{{- define "kwatt.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "kwatt.fullname" .)) .Values.web.tls.existingSecret }}
{{- end }}

{{/* HTTP or HTTPS, for probes and monitors. */}}
{{- define "kwatt.scheme" -}}
{{- if .Values.web.tls.enabled }}https{{ else }}http{{ end }}
{{- end }}

{{/*
The exporter config with null values dropped (recursively), so that a null in values.yaml
means "the exporter's default" rather than a value the exporter would reject.
*/}}
{{- define "kwatt.pruneNulls" -}}
{{- $out := dict }}
{{- range $key, $value := . }}
{{- if kindIs "map" $value }}
{{- $inner := include "kwatt.pruneNulls" $value | fromYaml }}
{{- if $inner }}
{{- $_ := set $out $key $inner }}
{{- end }}
{{- else if not (kindIs "invalid" $value) }}
{{- $_ := set $out $key $value }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* Checks that combinations of values make sense; fails the render with the reason. */}}
{{- define "kwatt.validate" -}}
{{- if and .Values.config.embodied.by_node_labels (not .Values.rbac.readNode) (not .Values.config.kubernetes.read_node) }}
{{- fail "config.embodied.by_node_labels needs rbac.readNode: true: the exporter reads its node's labels (get on nodes) to pick the entry" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled .Values.podMonitor.enabled }}
{{- fail "serviceMonitor.enabled and podMonitor.enabled are both true: Prometheus would scrape every exporter twice; pick one" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.service.enabled) }}
{{- fail "serviceMonitor.enabled needs service.enabled (or use podMonitor.enabled)" }}
{{- end }}
{{- if and .Values.web.tls.enabled (not .Values.web.tls.existingSecret) (or (not .Values.web.tls.cert) (not .Values.web.tls.key)) }}
{{- fail "web.tls.enabled: set web.tls.existingSecret, or both web.tls.cert and web.tls.key" }}
{{- end }}
{{- if and .Values.web.tls.requireClientCert (not .Values.web.tls.enabled) }}
{{- fail "web.tls.requireClientCert needs web.tls.enabled" }}
{{- end }}
{{- if and .Values.web.tls.requireClientCert (not .Values.web.tls.existingSecret) (not .Values.web.tls.ca) }}
{{- fail "web.tls.requireClientCert: set web.tls.ca (or an existingSecret with ca.crt)" }}
{{- end }}
{{- range $monitor := list "serviceMonitor" "podMonitor" }}
{{- $m := index $.Values $monitor }}
{{- if and $m.enabled $.Values.web.basicAuth.users (not $m.basicAuth) }}
{{- fail (printf "web.basicAuth.users is set but %s.basicAuth is empty: Prometheus would get 401 on every scrape" $monitor) }}
{{- end }}
{{- end }}
{{- end }}

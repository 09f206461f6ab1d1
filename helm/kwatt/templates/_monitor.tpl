{{/*
The scrape endpoint shared by the ServiceMonitor and the PodMonitor. Called with
(dict "root" $ "monitor" .Values.serviceMonitor|podMonitor).
*/}}
{{- define "kwatt.monitorEndpoint" -}}
{{- $root := .root }}
{{- $m := .monitor }}
port: metrics
path: /metrics
scheme: {{ include "kwatt.scheme" $root }}
# kwatt's namespace/pod/container labels name the measured workload, not the exporter pod;
# without honorLabels Prometheus would rename them exported_*.
honorLabels: true
interval: {{ $m.interval }}
scrapeTimeout: {{ $m.scrapeTimeout }}
{{- with $m.tlsConfig }}
tlsConfig:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $m.basicAuth }}
basicAuth:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $m.relabelings }}
relabelings:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $m.metricRelabelings }}
metricRelabelings:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

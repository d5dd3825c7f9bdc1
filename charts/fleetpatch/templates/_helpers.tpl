{{/* Names and labels shared by every template. */}}

{{- define "fleetpatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object name: at most 40 characters, so "-node-agent-windows" still fits in 63. */}}
{{- define "fleetpatch.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "fleetpatch.labels" -}}
app.kubernetes.io/name: {{ include "fleetpatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "fleetpatch.commonLabels" . }}
{{- end }}

{{/* The labels besides name and instance; pod templates add them to their selector labels. */}}
{{- define "fleetpatch.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fleetpatch
{{- end }}

{{/* Selector labels of one component: pass (list $ "controller"). */}}
{{- define "fleetpatch.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "fleetpatch.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "fleetpatch.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "fleetpatch.controllerServiceAccount" -}}
{{- printf "%s-controller" (include "fleetpatch.fullname" .) }}
{{- end }}

{{- define "fleetpatch.nodeAgentServiceAccount" -}}
{{- printf "%s-node-agent" (include "fleetpatch.fullname" .) }}
{{- end }}

{{- define "fleetpatch.gatewayService" -}}
{{- printf "%s-gateway" (include "fleetpatch.fullname" .) }}
{{- end }}

{{/* The URL node agents use: the Service's cluster name, which the certificate carries. */}}
{{- define "fleetpatch.gatewayUrl" -}}
{{- printf "https://%s.%s.svc:%v" (include "fleetpatch.gatewayService" .) .Release.Namespace .Values.gateway.service.port }}
{{- end }}

{{/* The Secret with tls.crt and tls.key that the controller serves. */}}
{{- define "fleetpatch.tlsSecret" -}}
{{- default (printf "%s-gateway-tls" (include "fleetpatch.fullname" .)) .Values.gateway.tls.existingSecret }}
{{- end }}

{{/* Where the node agents read ca.crt: a ConfigMap, or the ca.crt item of existingSecret. */}}
{{- define "fleetpatch.caVolumeSource" -}}
{{- if .Values.gateway.tls.caConfigMap }}
configMap:
  name: {{ .Values.gateway.tls.caConfigMap }}
  items:
    - key: ca.crt
      path: ca.crt
{{- else if .Values.gateway.tls.existingSecret }}
secret:
  secretName: {{ .Values.gateway.tls.existingSecret }}
  items:
    - key: ca.crt
      path: ca.crt
{{- else }}
configMap:
  name: {{ printf "%s-gateway-ca" (include "fleetpatch.fullname" .) }}
  items:
    - key: ca.crt
      path: ca.crt
{{- end }}
{{- end }}

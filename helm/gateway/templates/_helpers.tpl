{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified name: the release name, plus the chart name unless it already contains it. */}}
{{- define "gateway.fullname" -}}
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

{{- define "gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gateway.labels" -}}
helm.sh/chart: {{ include "gateway.chart" . }}
{{ include "gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gateway.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/* Port names: unique within the pod, so prefixed in sidecar mode (the app may use "http"). */}}
{{- define "gateway.proxyPortName" -}}
{{- if eq .Values.mode "sidecar" }}gw-http{{ else }}http{{ end }}
{{- end }}
{{- define "gateway.adminPortName" -}}
{{- if eq .Values.mode "sidecar" }}gw-admin{{ else }}admin{{ end }}
{{- end }}

{{/* The Secret holding the Authlete access token, and its key. */}}
{{- define "gateway.secretName" -}}
{{- if .Values.authlete.accessToken -}}
{{ include "gateway.fullname" . }}-authlete
{{- else if .Values.authlete.existingSecret -}}
{{ .Values.authlete.existingSecret }}
{{- else -}}
{{ fail "authlete: set authlete.existingSecret (recommended) or authlete.accessToken" }}
{{- end -}}
{{- end }}
{{- define "gateway.secretKey" -}}
{{- if .Values.authlete.accessToken -}}
access-token
{{- else -}}
{{ .Values.authlete.existingSecretKey }}
{{- end -}}
{{- end }}

{{/*
The gateway's YAML config: the `config` values tree plus the keys the chart owns (listeners
from ports/bindAddress, the access token as an environment reference).
*/}}
{{- define "gateway.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) -}}
{{- $_ := set $cfg "listen" (printf "%s:%d" .Values.bindAddress (int .Values.ports.proxy)) -}}
{{- $_ := set $cfg "admin_listen" (printf "%s:%d" .Values.bindAddress (int .Values.ports.admin)) -}}
{{- $authlete := deepCopy ((get $cfg "authlete") | default dict) -}}
{{- $_ := set $authlete "access_token" "${AUTHLETE_ACCESS_TOKEN}" -}}
{{- $_ := set $cfg "authlete" $authlete -}}
{{- toYaml $cfg -}}
{{- end }}

{{/* Seconds: longer than the gateway's shutdown_timeout plus the preStop sleep. */}}
{{- define "gateway.terminationGracePeriodSeconds" -}}
{{- $shutdown := 10.0 -}}
{{- if hasKey .Values.config "shutdown_timeout" -}}
{{- $shutdown = .Values.config.shutdown_timeout -}}
{{- end -}}
{{- $floor := add (int (ceil $shutdown)) (int .Values.preStopSleepSeconds) -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{ add $floor 5 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) (int $floor) -}}
{{ fail (printf "terminationGracePeriodSeconds (%v) must be larger than config.shutdown_timeout + preStopSleepSeconds (%v)" .Values.terminationGracePeriodSeconds $floor) }}
{{- else -}}
{{ .Values.terminationGracePeriodSeconds }}
{{- end -}}
{{- end }}

{{/* The gateway container: used by the Deployment and printed for sidecar use by NOTES.txt. */}}
{{- define "gateway.container" -}}
name: gateway
image: {{ include "gateway.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
args:
  - run
  - --config
  - /etc/gateway/gateway.yaml
  {{- if gt (int .Values.workers) 1 }}
  - --workers
  - {{ .Values.workers | quote }}
  {{- end }}
ports:
  - name: {{ include "gateway.proxyPortName" . }}
    containerPort: {{ .Values.ports.proxy }}
    protocol: TCP
  - name: {{ include "gateway.adminPortName" . }}
    containerPort: {{ .Values.ports.admin }}
    protocol: TCP
env:
  - name: AUTHLETE_ACCESS_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ include "gateway.secretName" . }}
        key: {{ include "gateway.secretKey" . }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
livenessProbe:
  httpGet:
    path: /healthz
    port: {{ include "gateway.adminPortName" . }}
  {{- toYaml .Values.livenessProbe | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: {{ include "gateway.adminPortName" . }}
  {{- toYaml .Values.readinessProbe | nindent 2 }}
{{- if gt (int .Values.preStopSleepSeconds) 0 }}
lifecycle:
  preStop:
    exec:
      command: ["sleep", {{ .Values.preStopSleepSeconds | quote }}]
{{- end }}
{{- with .Values.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.securityContext | nindent 2 }}
volumeMounts:
  - name: gateway-config
    mountPath: /etc/gateway
    readOnly: true
  - name: gateway-tmp
    mountPath: /tmp
{{- end }}

{{- define "gateway.volume" -}}
name: gateway-config
configMap:
  name: {{ include "gateway.fullname" . }}
{{- end }}

{{- /* Request bodies buffered past limits.request_buffer_memory_bytes spill here: the root
filesystem is read-only. */ -}}
{{- define "gateway.tmpVolume" -}}
name: gateway-tmp
emptyDir:
  sizeLimit: {{ .Values.tmpVolume.sizeLimit }}
{{- end }}

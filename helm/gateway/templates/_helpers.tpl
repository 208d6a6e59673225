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
{{- include "gateway.validateShared" . -}}
{{- if .Values.shared.enabled -}}
{{- $s := .Values.shared -}}
{{- $shared := dict "redis_url" "${GATEWAY_REDIS_URL}" "secret" "${GATEWAY_SHARED_SECRET}" -}}
{{- $_ := set $shared "key_prefix" $s.keyPrefix -}}
{{- $_ := set $shared "local_ttl" $s.localTtl -}}
{{- $_ := set $shared "timeout" $s.timeout -}}
{{- $_ := set $shared "expected_replicas" (int (include "gateway.expectedReplicas" .)) -}}
{{- if not (kindIs "invalid" $s.fallbackRate) -}}
{{- $_ := set $shared "fallback_rate" $s.fallbackRate -}}
{{- end -}}
{{- if $s.tls.caSecret -}}
{{- $_ := set $shared "tls" (dict "ca_file" (include "gateway.redisCaFile" .)) -}}
{{- end -}}
{{- $_ := set $cfg "shared" $shared -}}
{{- end -}}
{{- if include "gateway.adminEnabled" . -}}
{{- $_ := set $cfg "admin" (dict "token" "${GATEWAY_ADMIN_TOKEN}") -}}
{{- end -}}
{{- include "gateway.validateDecision" . -}}
{{- if .Values.decision.enabled -}}
{{- $_ := set $cfg "decision" (dict "path" .Values.decision.path) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end }}

{{/* ------------------------------------------------------------------ shared state (Redis) */}}

{{/* Objects derived from the fullname, kept within a 63-character DNS label. */}}
{{- define "gateway.redisFullname" -}}
{{- printf "%s-redis" (include "gateway.fullname" . | trunc 57 | trimSuffix "-") -}}
{{- end }}
{{- define "gateway.adminServiceName" -}}
{{- printf "%s-admin" (include "gateway.fullname" . | trunc 57 | trimSuffix "-") -}}
{{- end }}
{{/* Secrets the chart makes for shared state (URL, HMAC key, trial Redis password) and for
the admin token. */}}
{{- define "gateway.sharedSecretName" -}}
{{ include "gateway.fullname" . }}-shared
{{- end }}
{{- define "gateway.adminSecretName" -}}
{{ include "gateway.fullname" . }}-admin
{{- end }}

{{/* The trial Redis's labels: never matched by the gateway's selector (name differs). */}}
{{- define "gateway.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-redis" (include "gateway.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}
{{- define "gateway.redisLabels" -}}
helm.sh/chart: {{ include "gateway.chart" . }}
{{ include "gateway.redisSelectorLabels" . }}
app.kubernetes.io/part-of: {{ include "gateway.name" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "gateway.redisImage" -}}
{{- if .Values.redis.image.digest -}}
{{ .Values.redis.image.repository }}@{{ .Values.redis.image.digest }}
{{- else -}}
{{ .Values.redis.image.repository }}:{{ .Values.redis.image.tag }}
{{- end -}}
{{- end }}

{{/* Where the CA of a rediss:// Redis is mounted (shared.tls.caSecret). */}}
{{- define "gateway.redisCaDir" -}}/etc/gateway-redis-ca{{- end }}
{{- define "gateway.redisCaFile" -}}{{ include "gateway.redisCaDir" . }}/ca.crt{{- end }}

{{/* The labels of the pods that run the gateway: the chart's own (standalone) or the
application's (networkPolicy.podSelector; required in sidecar mode). */}}
{{- define "gateway.policyPodLabels" -}}
{{- if .Values.networkPolicy.podSelector -}}
{{ toYaml .Values.networkPolicy.podSelector }}
{{- else -}}
{{ include "gateway.selectorLabels" . }}
{{- end -}}
{{- end }}

{{/* Replicas the fallback budget is divided by (shared.expectedReplicas). */}}
{{- define "gateway.expectedReplicas" -}}
{{- $s := .Values.shared -}}
{{- if not (kindIs "invalid" $s.expectedReplicas) -}}
{{ int $s.expectedReplicas }}
{{- else if eq .Values.mode "sidecar" -}}
{{ fail "shared.expectedReplicas: in sidecar mode, set the number of application pods (their maximum with an autoscaler): each falls back to rate / expectedReplicas while Redis is unusable" }}
{{- else if .Values.autoscaling.enabled -}}
{{ max 1 (int .Values.autoscaling.maxReplicas) }}
{{- else -}}
{{ max 1 (int .Values.replicaCount) }}
{{- end -}}
{{- end }}

{{/* "true" when POST /cache/purge gets a token (admin.*), else empty. */}}
{{- define "gateway.adminEnabled" -}}
{{- if or .Values.admin.existingSecret .Values.admin.token .Values.admin.generateToken -}}true{{- end -}}
{{- end }}

{{/* The trial Redis asks for a password. */}}
{{- define "gateway.redisAuth" -}}
{{- if and .Values.redis.enabled .Values.redis.auth.enabled -}}true{{- end -}}
{{- end }}

{{/* Combinations the values schema cannot express. */}}
{{- define "gateway.validateShared" -}}
{{- $s := .Values.shared -}}
{{- if and .Values.redis.enabled (not $s.enabled) -}}
{{- fail "redis.enabled: the trial Redis is for the gateway's shared state; also set shared.enabled=true" -}}
{{- end -}}
{{- if $s.enabled -}}
{{- $sources := 0 -}}
{{- if $s.redisUrl }}{{ $sources = add1 $sources }}{{ end -}}
{{- if $s.existingSecret }}{{ $sources = add1 $sources }}{{ end -}}
{{- if .Values.redis.enabled }}{{ $sources = add1 $sources }}{{ end -}}
{{- if eq $sources 0 -}}
{{- fail "shared: say where Redis is: shared.existingSecret (a Secret holding the URL), shared.redisUrl, or redis.enabled (a single-node Redis for trials)" -}}
{{- else if gt $sources 1 -}}
{{- fail "shared: set only one of shared.redisUrl, shared.existingSecret and redis.enabled (the trial Redis brings its own URL)" -}}
{{- end -}}
{{- if and $s.secret.existingSecret $s.secret.value -}}
{{- fail "shared.secret: set existingSecret or value, not both" -}}
{{- end -}}
{{- if $s.tls.caSecret -}}
{{- if .Values.redis.enabled -}}
{{- fail "shared.tls.caSecret: the trial Redis (redis.enabled) does not speak TLS" -}}
{{- else if and $s.redisUrl (not (hasPrefix "rediss://" $s.redisUrl)) -}}
{{- fail "shared.tls.caSecret: only applies to a rediss:// shared.redisUrl" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $a := .Values.admin -}}
{{- $adminSources := 0 -}}
{{- if $a.existingSecret }}{{ $adminSources = add1 $adminSources }}{{ end -}}
{{- if $a.token }}{{ $adminSources = add1 $adminSources }}{{ end -}}
{{- if $a.generateToken }}{{ $adminSources = add1 $adminSources }}{{ end -}}
{{- if gt $adminSources 1 -}}
{{- fail "admin: set only one of admin.existingSecret, admin.token and admin.generateToken" -}}
{{- end -}}
{{- if and .Values.redis.enabled .Values.redis.auth.existingSecret .Values.redis.auth.password -}}
{{- fail "redis.auth: set existingSecret or password, not both" -}}
{{- end -}}
{{- end }}

{{/* Keys of Secret <fullname>-shared (base64): only what no Secret of the user's holds.
Generated values are kept from the Secret already in the cluster (lookup), so an upgrade
does not change them; `helm template` has no cluster and makes new ones. */}}
{{- define "gateway.sharedSecretData" -}}
{{- $old := dict -}}
{{- with (lookup "v1" "Secret" .Release.Namespace (include "gateway.sharedSecretName" .)) -}}
{{- $old = .data | default dict -}}
{{- end -}}
{{- $data := dict -}}
{{- $s := .Values.shared -}}
{{- if $s.enabled -}}
{{- if $s.redisUrl -}}
{{- $_ := set $data "redis-url" ($s.redisUrl | b64enc) -}}
{{- end -}}
{{- if not $s.secret.existingSecret -}}
{{- if $s.secret.value -}}
{{- $_ := set $data "shared-secret" ($s.secret.value | b64enc) -}}
{{- else if hasKey $old "shared-secret" -}}
{{- $_ := set $data "shared-secret" (get $old "shared-secret") -}}
{{- else -}}
{{- $_ := set $data "shared-secret" (randAlphaNum 48 | b64enc) -}}
{{- end -}}
{{- end -}}
{{- if and (include "gateway.redisAuth" .) (not .Values.redis.auth.existingSecret) -}}
{{- if .Values.redis.auth.password -}}
{{- $_ := set $data "redis-password" (.Values.redis.auth.password | b64enc) -}}
{{- else if hasKey $old "redis-password" -}}
{{- $_ := set $data "redis-password" (get $old "redis-password") -}}
{{- else -}}
{{- $_ := set $data "redis-password" (randAlphaNum 32 | b64enc) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml $data -}}
{{- end }}

{{- define "gateway.adminSecretData" -}}
{{- $old := dict -}}
{{- with (lookup "v1" "Secret" .Release.Namespace (include "gateway.adminSecretName" .)) -}}
{{- $old = .data | default dict -}}
{{- end -}}
{{- $data := dict -}}
{{- if .Values.admin.token -}}
{{- $_ := set $data "admin-token" (.Values.admin.token | b64enc) -}}
{{- else if .Values.admin.generateToken -}}
{{- if hasKey $old "admin-token" -}}
{{- $_ := set $data "admin-token" (get $old "admin-token") -}}
{{- else -}}
{{- $_ := set $data "admin-token" (randAlphaNum 40 | b64enc) -}}
{{- end -}}
{{- end -}}
{{- toYaml $data -}}
{{- end }}

{{/* The trial Redis's password: Secret and key. */}}
{{- define "gateway.redisPasswordRef" -}}
name: {{ .Values.redis.auth.existingSecret | default (include "gateway.sharedSecretName" .) }}
key: {{ ternary .Values.redis.auth.existingSecretKey "redis-password" (ne .Values.redis.auth.existingSecret "") }}
{{- end }}

{{/* Values given in plain text that land in the chart's Secrets: their digest rolls the
pods when one changes (generated values never change). */}}
{{- define "gateway.sharedValuesChecksum" -}}
{{- $parts := list -}}
{{- if .Values.shared.enabled -}}
{{- $parts = append $parts .Values.shared.redisUrl -}}
{{- $parts = append $parts .Values.shared.secret.value -}}
{{- if include "gateway.redisAuth" . }}{{ $parts = append $parts .Values.redis.auth.password }}{{ end -}}
{{- end -}}
{{- $parts = append $parts .Values.admin.token -}}
{{- if ne (join "" $parts) "" -}}
{{ join "\n" $parts | sha256sum }}
{{- end -}}
{{- end }}

{{/* The gateway container's environment for shared state and the admin token. */}}
{{- define "gateway.sharedEnv" -}}
{{- if .Values.shared.enabled }}
{{- $s := .Values.shared }}
{{- if .Values.redis.enabled }}
{{- $host := printf "%s.%s.svc" (include "gateway.redisFullname" .) .Release.Namespace }}
{{- if include "gateway.redisAuth" . }}
- name: GATEWAY_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      {{- include "gateway.redisPasswordRef" . | nindent 6 }}
# Kubernetes expands $(GATEWAY_REDIS_PASSWORD) from the variable above.
- name: GATEWAY_REDIS_URL
  value: {{ printf "redis://:$(GATEWAY_REDIS_PASSWORD)@%s:6379/0" $host | quote }}
{{- else }}
- name: GATEWAY_REDIS_URL
  value: {{ printf "redis://%s:6379/0" $host | quote }}
{{- end }}
{{- else }}
- name: GATEWAY_REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- if $s.redisUrl }}
      name: {{ include "gateway.sharedSecretName" . }}
      key: redis-url
      {{- else }}
      name: {{ $s.existingSecret }}
      key: {{ $s.redisUrlKey }}
      {{- end }}
{{- end }}
- name: GATEWAY_SHARED_SECRET
  valueFrom:
    secretKeyRef:
      {{- if $s.secret.existingSecret }}
      name: {{ $s.secret.existingSecret }}
      key: {{ $s.secret.key }}
      {{- else }}
      name: {{ include "gateway.sharedSecretName" . }}
      key: shared-secret
      {{- end }}
{{- end }}
{{- if include "gateway.adminEnabled" . }}
- name: GATEWAY_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      {{- if .Values.admin.existingSecret }}
      name: {{ .Values.admin.existingSecret }}
      key: {{ .Values.admin.existingSecretKey }}
      {{- else }}
      name: {{ include "gateway.adminSecretName" . }}
      key: admin-token
      {{- end }}
{{- end }}
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
  {{- with include "gateway.sharedEnv" . | trim }}
  {{- . | nindent 2 }}
  {{- end }}
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
  {{- if and .Values.shared.enabled .Values.shared.tls.caSecret }}
  - name: gateway-redis-ca
    mountPath: {{ include "gateway.redisCaDir" . }}
    readOnly: true
  {{- end }}
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

{{- /* The CA of a rediss:// Redis (shared.tls.caSecret), as ca.crt. */ -}}
{{- define "gateway.redisCaVolume" -}}
name: gateway-redis-ca
secret:
  secretName: {{ .Values.shared.tls.caSecret }}
  items:
    - key: {{ .Values.shared.tls.caKey }}
      path: ca.crt
{{- end }}

{{/* ------------------------------------------------------------------ decision mode */}}

{{/* Decision mode's requirements, and routes without an upstream (decision mode only). */}}
{{- define "gateway.validateDecision" -}}
{{- $d := .Values.decision -}}
{{- if $d.enabled -}}
{{- if eq .Values.mode "sidecar" -}}
{{- fail "decision.enabled: not in sidecar mode: the ingress asks one Service for its decisions, and a sidecar has none (install a standalone release for the decisions)" -}}
{{- end -}}
{{- if not (get (.Values.config | default dict) "trusted_proxies") -}}
{{- fail "decision.enabled: set config.trusted_proxies to the addresses your ingress controller's pods connect from (the pod CIDR, e.g. [\"10.244.0.0/16\"]): the gateway answers decisions to them only (403 to anyone else), and believes the original path, method and host only from them" -}}
{{- end -}}
{{- else -}}
{{- range $i, $route := (get (.Values.config | default dict) "routes") -}}
{{- if not (get $route "upstream") -}}
{{- fail (printf "config.routes[%d]%s: upstream is required (a route without one only answers an ingress's decisions: set decision.enabled)" $i (ternary (printf " (%v)" (get $route "name")) "" (hasKey $route "name"))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* The URL an ingress asks for decisions: the Service, port service.port, at decision.path. */}}
{{- define "gateway.decisionURL" -}}
{{- printf "http://%s.%s.svc.cluster.local:%d%s" (include "gateway.fullname" .) .Release.Namespace (int .Values.service.port) .Values.decision.path -}}
{{- end }}

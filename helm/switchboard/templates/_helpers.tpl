{{/* The chart's name, and the prefix of every object's name. */}}
{{- define "switchboard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* At most 40 characters: a StatefulSet's name (this and "-router") must leave room in its pods' labels. */}}
{{- define "switchboard.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "switchboard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "switchboard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The selector of one role's pods: (dict "root" $ "role" "gateway"). */}}
{{- define "switchboard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "switchboard.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{- define "switchboard.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "switchboard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "switchboard.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the configuration file, the database's URL and Redis's URL (unless the operator's own). */}}
{{- define "switchboard.secretName" -}}
{{- include "switchboard.fullname" . -}}
{{- end -}}

{{/* The store's address, as the routers and gateways are told it. */}}
{{- /* HOST:PORT of a listen address (`.Values.listenAddress`; an IPv6 address in brackets) and a port. */ -}}
{{- define "switchboard.listen" -}}
{{- $address := .root.Values.listenAddress -}}
{{- if contains ":" $address -}}[{{ $address }}]{{- else -}}{{ $address }}{{- end -}}:{{ .port }}
{{- end }}

{{- define "switchboard.storeUrl" -}}
{{- printf "http://%s-store:%d" (include "switchboard.fullname" .) (int .Values.store.port) -}}
{{- end -}}

{{/* The configuration file: the operator's `config` with the version the binary reads. */}}
{{- define "switchboard.configFile" -}}
{{- $config := deepCopy .Values.config -}}
{{- if not $config.tenants -}}
{{- fail "config.tenants: at least one tenant is needed (or existingConfigSecret: a Secret of yours with the whole configuration file)" -}}
{{- end -}}
{{- $_ := set $config "version" 1 -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Refusals of values that would render a cluster that cannot start, each naming the value. */}}
{{- define "switchboard.validate" -}}
{{- if and (not .Values.database.url) (not .Values.database.existingSecret) -}}
{{- fail "database.url (postgres://USER:PASSWORD@HOST:5432/DATABASE) or database.existingSecret is required: the stores keep everything in PostgreSQL" -}}
{{- end -}}
{{- if and (not .Values.redis.url) (not .Values.redis.existingSecret) -}}
{{- fail "redis.url (redis://HOST:6379/) or redis.existingSecret is required: gateways and routers keep agents' presence in Redis" -}}
{{- end -}}
{{- if .Values.config.version -}}
{{- fail "config.version: leave it out, the chart sets it" -}}
{{- end -}}
{{- if .Values.config.license -}}
{{- fail "config.license: set license.maxSessions instead" -}}
{{- end -}}
{{- if hasKey (dig "limits" dict (.Values.config | default dict)) "drain_delay_ms" -}}
{{- fail "config.limits.drain_delay_ms: set gateway.drainDelaySeconds instead" -}}
{{- end -}}
{{- if and .Values.config.presence (hasKey .Values.config.presence "redis_url") -}}
{{- fail "config.presence.redis_url: set redis.url (or redis.existingSecret) instead" -}}
{{- end -}}
{{- $lease := .Values.router.lease -}}
{{- if not (and (lt (int64 $lease.renewEveryMs) (int64 $lease.renewDeadlineMs)) (lt (int64 $lease.renewDeadlineMs) (int64 $lease.leaseMs))) -}}
{{- fail "router.lease: renewEveryMs < renewDeadlineMs < leaseMs is required (a router must give up its shards before its lease ends)" -}}
{{- end -}}
{{- end -}}

{{/* A URL's Secret and key: the operator's own, or the chart's under `key`.
     (dict "root" $ "values" .Values.redis "key" "redis-url") */}}
{{- define "switchboard.urlSecretKeyRef" -}}
name: {{ default (include "switchboard.secretName" .root) .values.existingSecret }}
key: {{ ternary .values.existingSecretKey .key (ne .values.existingSecret "") }}
{{- end -}}

{{/* Redis's URL, for the roles that keep presence in it (gateways and routers). */}}
{{- define "switchboard.redisEnv" -}}
- name: SWITCHBOARD_REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- include "switchboard.urlSecretKeyRef" (dict "root" . "values" .Values.redis "key" "redis-url") | nindent 6 }}
{{- end -}}

{{/* The environment every role shares. */}}
{{- define "switchboard.commonEnv" -}}
- name: SWITCHBOARD_CONFIG
  value: /etc/switchboard/config.yaml
- name: SWITCHBOARD_LICENSE_MAX_SESSIONS
  value: {{ int64 .Values.license.maxSessions | quote }}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
- name: NO_COLOR
  value: "1"
{{- with .Values.otlpEndpoint }}
- name: SWITCHBOARD_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* The volumes every role mounts: the configuration file, and /tmp (the root file system is read-only). */}}
{{- define "switchboard.volumes" -}}
- name: config
  secret:
    secretName: {{ default (include "switchboard.secretName" .) .Values.existingConfigSecret }}
    items:
      - key: config.yaml
        path: config.yaml
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "switchboard.volumeMounts" -}}
- name: config
  mountPath: /etc/switchboard
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Pod annotations: a new configuration rolls the pods; prometheus.io/* for discovery by annotations. */}}
{{- define "switchboard.podAnnotations" -}}
{{- $root := .root -}}
checksum/config: {{ include (print $root.Template.BasePath "/secret.yaml") $root | sha256sum }}
{{- if $root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .metricsPort | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The labels of one role's objects and pods: (dict "root" $ "role" "gateway"). */}}
{{- define "switchboard.roleLabels" -}}
{{ include "switchboard.labels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{/* The scheduling settings of one role's pods (its values). */}}
{{- define "switchboard.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* One role's PodDisruptionBudget: (dict "root" $ "role" "gateway" "budget" .Values.gateway.podDisruptionBudget). */}}
{{- define "switchboard.pdb" -}}
{{- with .budget }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "switchboard.fullname" $.root }}-{{ $.role }}
  labels:
    {{- include "switchboard.roleLabels" $ | nindent 4 }}
spec:
  {{- toYaml . | nindent 2 }}
  selector:
    matchLabels:
      {{- include "switchboard.selectorLabels" $ | nindent 6 }}
{{- end }}
{{- end -}}

{{/* The pod spec's parts every role shares, up to its containers. */}}
{{- define "switchboard.podCommon" -}}
serviceAccountName: {{ include "switchboard.serviceAccountName" . }}
# Switchboard calls no Kubernetes API, and reads no variable Kubernetes would add for each Service.
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
volumes:
  {{- include "switchboard.volumes" . | nindent 2 }}
{{- end -}}

{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full resource name: fullnameOverride, else the release name when it already contains the chart
name, else "<release>-<chart>".
*/}}
{{- define "relay.fullname" -}}
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

{{- define "relay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the relay pods. Never change them in an upgrade: Deployment selectors are
immutable.
*/}}
{{- define "relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "relay.labels" -}}
helm.sh/chart: {{ include "relay.chart" . }}
{{ include "relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: decnet
{{- end }}

{{- define "relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "relay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "relay.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Replica count the release runs with at least: autoscaling.minReplicas when the HPA is on, else
replicaCount. Decides whether a PodDisruptionBudget makes sense.
*/}}
{{- define "relay.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}
{{- .Values.autoscaling.minReplicas | int }}
{{- else }}
{{- .Values.replicaCount | int }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding RELAY_JWT_SECRET and RELAY_DATABASE_URL. Fails rendering when unset:
the chart never carries secret values itself.
*/}}
{{- define "relay.secretName" -}}
{{- required "existingSecret.name is required: create a Secret holding the JWT secret and the database URL (see deploy/helm/README.md) and pass --set existingSecret.name=<secret>" .Values.existingSecret.name }}
{{- end }}

{{/*
terminationGracePeriodSeconds: derived as preStop sleep + drain + margin, or the explicit value,
which must be greater than preStop sleep + drain.
*/}}
{{- define "relay.terminationGracePeriodSeconds" -}}
{{- $s := .Values.shutdown }}
{{- $floor := add ($s.preStopSleepSeconds | int) ($s.drainTimeoutSeconds | int) }}
{{- $explicit := $s.terminationGracePeriodSeconds | int }}
{{- if eq $explicit 0 }}
{{- add $floor ($s.graceMarginSeconds | int) }}
{{- else if le $explicit $floor }}
{{- fail (printf "shutdown.terminationGracePeriodSeconds (%d) must be greater than shutdown.preStopSleepSeconds + shutdown.drainTimeoutSeconds (%d), or the kubelet kills pods that are still draining their streams; set it to 0 to derive it" $explicit $floor) }}
{{- else }}
{{- $explicit }}
{{- end }}
{{- end }}

{{/*
The ConfigMap's data: every non-secret RELAY_* setting. Also hashed into the pod template's
checksum/config annotation, so exactly a change here rolls the pods.
*/}}
{{- define "relay.configData" -}}
RELAY_LISTEN_ADDR: {{ printf ":%d" (.Values.containerPort | int) | quote }}
RELAY_KAFKA_BROKERS: {{ required "config.kafkaBrokers is required" .Values.config.kafkaBrokers | quote }}
RELAY_KAFKA_TOPICS_REGEX: {{ .Values.config.kafkaTopicsRegex | quote }}
{{- with .Values.config.jwtIssuer }}
RELAY_JWT_ISSUER: {{ . | quote }}
{{- end }}
{{- with .Values.config.jwtAudience }}
RELAY_JWT_AUDIENCE: {{ . | quote }}
{{- end }}
RELAY_JWT_LEEWAY: {{ .Values.config.jwtLeeway | quote }}
RELAY_SSE_MAX_PER_USER: {{ .Values.config.sseMaxPerUser | int | quote }}
RELAY_SSE_MAX_CONNECTIONS: {{ .Values.config.sseMaxConnections | int | quote }}
RELAY_SSE_KEEPALIVE: {{ .Values.config.sseKeepalive | quote }}
RELAY_SSE_WRITE_TIMEOUT: {{ .Values.config.sseWriteTimeout | quote }}
RELAY_SUBSCRIBER_BUFFER: {{ .Values.config.subscriberBuffer | int | quote }}
RELAY_SSE_FLUSH_INTERVAL: {{ .Values.config.sseFlushInterval | quote }}
RELAY_SSE_SEND_BUFFER: {{ .Values.config.sseSendBuffer | int | quote }}
RELAY_SSE_USER_TIMEOUT: {{ .Values.config.sseUserTimeout | quote }}
RELAY_SSE_MAX_LIFETIME: {{ .Values.config.sseMaxLifetime | quote }}
RELAY_SSE_LIFETIME_JITTER: {{ .Values.config.sseLifetimeJitter | toString | quote }}
{{- with .Values.config.trustedProxies }}
RELAY_TRUSTED_PROXIES: {{ join "," . | quote }}
{{- end }}
RELAY_SNAPSHOT_LIMIT: {{ .Values.config.snapshotLimit | int | quote }}
RELAY_DATABASE_TIMEOUT: {{ .Values.config.databaseTimeout | quote }}
RELAY_MAX_RECORD_BYTES: {{ .Values.config.maxRecordBytes | int | quote }}
RELAY_SHUTDOWN_TIMEOUT: {{ printf "%ds" (.Values.shutdown.drainTimeoutSeconds | int) | quote }}
RELAY_SHUTDOWN_SPREAD: {{ printf "%ds" (include "relay.spreadSeconds" . | int) | quote }}
{{- if include "relay.rebalance" . }}
RELAY_PEERS: {{ printf "%s-peers.%s.svc:%d" (include "relay.fullname" .) .Release.Namespace (.Values.containerPort | int) | quote }}
RELAY_REBALANCE_INTERVAL: {{ printf "%ds" (.Values.rebalance.intervalSeconds | int) | quote }}
RELAY_REBALANCE_TOLERANCE: {{ .Values.rebalance.tolerance | toString | quote }}
{{- end }}
RELAY_LOG_LEVEL: {{ .Values.config.logLevel | quote }}
RELAY_LOG_FORMAT: {{ .Values.config.logFormat | quote }}
{{- end }}

{{/*
"true" when replicas rebalance with their peers: rebalance.enabled and more than one replica can run.
Fails when the interval does not outlast a rollout's overlap of old and new pods.
*/}}
{{- define "relay.rebalance" -}}
{{- if and .Values.rebalance.enabled (or .Values.autoscaling.enabled (gt (.Values.replicaCount | int) 1)) }}
{{- $overlap := add (.Values.minReadySeconds | int) (.Values.shutdown.preStopSleepSeconds | int) }}
{{- if le (.Values.rebalance.intervalSeconds | int) $overlap }}
{{- fail (printf "rebalance.intervalSeconds (%d) must be above minReadySeconds + shutdown.preStopSleepSeconds (%d): a new pod counts as a peer one interval after it is first seen, so that in a rollout the old pods get SIGTERM before they would rebalance towards the new ones (deploy/helm/README.md)" (.Values.rebalance.intervalSeconds | int) $overlap) }}
{{- end }}true
{{- end }}
{{- end }}

{{/*
shutdown.spreadSeconds, which must be below the drain timeout: the relay refuses to start
otherwise (RELAY_SHUTDOWN_SPREAD must be below RELAY_SHUTDOWN_TIMEOUT).
*/}}
{{- define "relay.spreadSeconds" -}}
{{- $s := .Values.shutdown }}
{{- if ge ($s.spreadSeconds | int) ($s.drainTimeoutSeconds | int) }}
{{- fail (printf "shutdown.spreadSeconds (%d) must be below shutdown.drainTimeoutSeconds (%d): the streams still open at the drain timeout are cut, not ended cleanly" ($s.spreadSeconds | int) ($s.drainTimeoutSeconds | int)) }}
{{- end }}
{{- $s.spreadSeconds | int }}
{{- end }}

{{/*
progressDeadlineSeconds: the explicit value, or the longest a healthy step of a rollout may take:
schedule and pull, the startup probe's bound, the readiness probe's, then minReadySeconds.
*/}}
{{- define "relay.progressDeadlineSeconds" -}}
{{- $r := .Values.rollout }}
{{- if $r.progressDeadlineSeconds }}
{{- $r.progressDeadlineSeconds | int }}
{{- else }}
{{- $st := .Values.probes.startup }}
{{- $rd := .Values.probes.readiness }}
{{- add ($r.pullMarginSeconds | int) (mul ($st.periodSeconds | int) ($st.failureThreshold | int)) (mul ($rd.periodSeconds | int) ($rd.failureThreshold | int)) (.Values.minReadySeconds | int) }}
{{- end }}
{{- end }}

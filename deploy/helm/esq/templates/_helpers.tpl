{{/*
Chart name, truncated to the 63 characters of a DNS label.
*/}}
{{- define "esq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects. Components append "-write-svc" etc., so it is kept to
52 characters.
*/}}
{{- define "esq.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of one component's objects: (dict "root" $ "component" "write-svc").
*/}}
{{- define "esq.componentName" -}}
{{- printf "%s-%s" (include "esq.fullname" .root) .component }}
{{- end }}

{{- define "esq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "esq.labels" -}}
helm.sh/chart: {{ include "esq.chart" . }}
app.kubernetes.io/name: {{ include "esq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: esq
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels of one component: (dict "root" $ "component" "write-svc").
*/}}
{{- define "esq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "esq.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
All labels of one component's objects: (dict "root" $ "component" "write-svc").
*/}}
{{- define "esq.componentLabels" -}}
{{ include "esq.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "esq.configName" -}}
{{- printf "%s-config" (include "esq.fullname" .) }}
{{- end }}

{{- define "esq.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "esq.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "esq.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion (toString .Values.image.tag)) }}
{{- end }}

{{/*
The listen address of a component: (dict "root" $ "port" 50051).
*/}}
{{- define "esq.listen" -}}
{{- $host := .root.Values.bindAddress | toString }}
{{- if contains ":" $host }}
{{- printf "[%s]:%d" $host (int .port) }}
{{- else }}
{{- printf "%s:%d" $host (int .port) }}
{{- end }}
{{- end }}

{{/*
The Redis URL write-svc publishes nudges to.
*/}}
{{- define "esq.nudgeUrl" -}}
{{- default (first .Values.redis.urls) .Values.nudge.url }}
{{- end }}

{{/*
Security: whether server TLS and token authentication are configured ("true" or ""), and the
Secrets that hold them (the user's, or the chart's own made from PEM/lines in values).
*/}}
{{- define "esq.tls.enabled" -}}
{{- if or .Values.tls.existingSecret .Values.tls.certificate }}true{{ end }}
{{- end }}

{{- define "esq.tls.secretName" -}}
{{- default (printf "%s-tls" (include "esq.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{- define "esq.auth.enabled" -}}
{{- if or .Values.auth.existingSecret .Values.auth.tokens }}true{{ end }}
{{- end }}

{{- define "esq.auth.secretName" -}}
{{- default (printf "%s-auth" (include "esq.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/*
Where the secret volumes are mounted (read-only) in every container.
*/}}
{{- define "esq.mount.tls" -}}/etc/esq/tls{{- end }}
{{- define "esq.mount.auth" -}}/etc/esq/auth{{- end }}
{{- define "esq.mount.cqlTls" -}}/etc/esq/cql-tls{{- end }}
{{- define "esq.mount.redisTls" -}}/etc/esq/redis-tls{{- end }}

{{/*
Checks of the security values; renders nothing. Insecure mode must be asked for: without it,
missing TLS or tokens stop the render with what to set.
*/}}
{{- define "esq.validate.security" -}}
{{- if and .Values.tls.existingSecret (or .Values.tls.certificate .Values.tls.key) }}
{{- fail "tls: set either tls.existingSecret or tls.certificate/tls.key, not both" }}
{{- end }}
{{- if and (not .Values.tls.existingSecret) (or .Values.tls.certificate .Values.tls.key) (not (and .Values.tls.certificate .Values.tls.key)) }}
{{- fail "tls: tls.certificate and tls.key go together (PEM certificate chain and private key), e.g. --set-file tls.certificate=certs/server.pem --set-file tls.key=certs/server-key.pem" }}
{{- end }}
{{- if and .Values.tls.certificate (not (contains "-----BEGIN" .Values.tls.certificate)) }}
{{- fail "tls.certificate: not PEM (no -----BEGIN line); pass the file with --set-file tls.certificate=server.pem" }}
{{- end }}
{{- if and .Values.tls.key (not (contains "-----BEGIN" .Values.tls.key)) }}
{{- fail "tls.key: not PEM (no -----BEGIN line); pass the file with --set-file tls.key=server-key.pem" }}
{{- end }}
{{- if and .Values.tls.clientCa (not (include "esq.tls.enabled" .)) }}
{{- fail "tls.clientCa (mutual TLS) needs server TLS: set tls.existingSecret or tls.certificate/tls.key" }}
{{- end }}
{{- if and .Values.tls.clientCa .Values.tls.certificate (not .Values.tls.clientCaCertificate) }}
{{- fail "tls.clientCa: with tls.certificate/tls.key, put the client CA's PEM in tls.clientCaCertificate (with tls.existingSecret, its ca.crt key is used)" }}
{{- end }}
{{- if and .Values.tls.clientCaCertificate (not (contains "-----BEGIN" .Values.tls.clientCaCertificate)) }}
{{- fail "tls.clientCaCertificate: not PEM (no -----BEGIN line); pass the file with --set-file tls.clientCaCertificate=ca.pem" }}
{{- end }}
{{- if and .Values.auth.existingSecret .Values.auth.tokens }}
{{- fail "auth: set either auth.existingSecret or auth.tokens, not both" }}
{{- end }}
{{- range $i, $line := .Values.auth.tokens }}
{{- if not (regexMatch "^(reader|writer|admin) [0-9a-f]{64} [^[:space:]]+$" (toString $line)) }}
{{- fail (printf "auth.tokens[%d]: not a token-file line \"<role> <sha256-hex> <name>\" (role reader, writer or admin; 64 lowercase hex digits). Put only the hash here, never the token: `esq token new` prints the line, `esq token hash` hashes a token from stdin" $i) }}
{{- end }}
{{- end }}
{{- if not .Values.insecure }}
{{- if not (include "esq.tls.enabled" .) }}
{{- fail "TLS is not configured: set tls.existingSecret (a kubernetes.io/tls Secret with tls.crt and tls.key) or tls.certificate and tls.key (PEM; `esq tls generate` makes a test set), or set insecure=true to serve plaintext without authentication (development only)" }}
{{- end }}
{{- if not (include "esq.auth.enabled" .) }}
{{- fail "authentication is not configured: set auth.existingSecret (a Secret whose key `tokens` holds the token file) or auth.tokens (lines \"<role> <sha256-hex> <name>\" from `esq token new --role writer --name NAME`), or set insecure=true to serve without authentication (development only)" }}
{{- end }}
{{- end }}
{{- if and .Values.cql.existingSecret (not .Values.cql.username) }}
{{- fail "cql.existingSecret holds the password: set cql.username too" }}
{{- end }}
{{- if and .Values.cql.username (not .Values.cql.existingSecret) }}
{{- fail "cql.username: set cql.existingSecret, the Secret holding its password (key cql.passwordKey)" }}
{{- end }}
{{- if and .Values.cql.tls.enabled (not .Values.cql.tls.existingSecret) }}
{{- fail "cql.tls.enabled: set cql.tls.existingSecret, a Secret with the CA of the nodes' certificates under ca.crt" }}
{{- end }}
{{- if and .Values.redis.tls.enabled (not .Values.redis.tls.existingSecret) }}
{{- fail "redis.tls.enabled: set redis.tls.existingSecret, a Secret with the CA of Redis' certificate under ca.crt" }}
{{- end }}
{{- if .Values.redis.tls.enabled }}
{{- range $url := .Values.redis.urls }}
{{- if not (hasPrefix "rediss://" $url) }}
{{- fail (printf "redis.tls.enabled: %q is not a rediss:// URL (TLS needs rediss://)" $url) }}
{{- end }}
{{- end }}
{{- if and .Values.nudge.url (not (hasPrefix "rediss://" .Values.nudge.url)) }}
{{- fail (printf "redis.tls.enabled: nudge.url %q is not a rediss:// URL (TLS needs rediss://)" .Values.nudge.url) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Checks of values the schema cannot express; renders nothing.
*/}}
{{- define "esq.validate" -}}
{{- include "esq.validate.security" . }}
{{- if not .Values.cql.nodes }}
{{- fail "cql.nodes: set at least one ScyllaDB/Cassandra contact point (host:port)" }}
{{- end }}
{{- if not .Values.redis.urls }}
{{- fail "redis.urls: set at least one Redis URL (redis://host:port)" }}
{{- end }}
{{- if not (has .Values.cql.changeFeed (list "table" "scylla-cdc")) }}
{{- fail (printf "cql.changeFeed: %q is not one of table, scylla-cdc" .Values.cql.changeFeed) }}
{{- end }}
{{- if has (int .Values.probes.healthPort) (list (int .Values.writeSvc.port) (int .Values.readSvc.port) (int .Values.projector.port)) }}
{{- fail (printf "probes.healthPort: %d is also a gRPC port; give health a port of its own" (int .Values.probes.healthPort)) }}
{{- end }}
{{- if and .Values.metrics.enabled (eq (int .Values.metrics.port) (int .Values.probes.healthPort)) }}
{{- fail (printf "probes.healthPort: %d is also metrics.port; give health a port of its own" (int .Values.probes.healthPort)) }}
{{- end }}
{{- if and .Values.metrics.enabled (has (int .Values.metrics.port) (list (int .Values.writeSvc.port) (int .Values.readSvc.port) (int .Values.projector.port))) }}
{{- fail (printf "metrics.port: %d is also a gRPC port; give metrics a port of their own" (int .Values.metrics.port)) }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" }}
{{- end }}
{{- if not (has .Values.logFormat (list "json" "plain")) }}
{{- fail (printf "logFormat: %q is not one of json, plain" .Values.logFormat) }}
{{- end }}
{{- end }}

{{/*
One component's Deployment. Called as
  include "esq.deployment" (dict "root" $ "component" "write-svc" "binary" "write-svc"
                                 "values" $.Values.writeSvc "env" (list ...))
where env holds the component's own environment (ESQ_LISTEN etc.); the shared settings come
from the ConfigMap through envFrom.
*/}}
{{- define "esq.deployment" -}}
{{- include "esq.validate" .root }}
{{- $root := .root }}
{{- $v := .values }}
{{- $sel := dict "root" $root "component" .component }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "esq.componentName" $sel }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "esq.componentLabels" $sel | nindent 4 }}
spec:
  {{- if not (and $v.autoscaling $v.autoscaling.enabled) }}
  replicas: {{ int $v.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "esq.selectorLabels" $sel | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "esq.componentLabels" $sel | nindent 8 }}
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        # Roll the pods when the shared configuration changes.
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        {{- $annotations := dict }}
        {{- if and $root.Values.metrics.enabled $root.Values.metrics.podAnnotations }}
        {{- $_ := set $annotations "prometheus.io/scrape" "true" }}
        {{- $_ := set $annotations "prometheus.io/port" ($root.Values.metrics.port | int | toString) }}
        {{- $_ := set $annotations "prometheus.io/path" "/metrics" }}
        {{- end }}
        {{- $annotations = mergeOverwrite $annotations (default (dict) $v.podAnnotations) }}
        {{- with $annotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "esq.serviceAccountName" $root }}
      # esq never calls the Kubernetes API.
      automountServiceAccountToken: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ int $root.Values.terminationGracePeriodSeconds }}
      containers:
        - name: {{ .component }}
          image: {{ include "esq.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: [{{ .binary | quote }}]
          ports:
            - name: grpc
              containerPort: {{ int $v.port }}
              protocol: TCP
            {{- if $root.Values.metrics.enabled }}
            - name: metrics
              containerPort: {{ int $root.Values.metrics.port }}
              protocol: TCP
            {{- end }}
            {{- if include "esq.tls.enabled" $root }}
            - name: health
              containerPort: {{ int $root.Values.probes.healthPort }}
              protocol: TCP
            {{- end }}
          envFrom:
            - configMapRef:
                name: {{ include "esq.configName" $root }}
            {{- with $root.Values.envFrom }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- with $v.envFrom }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          env:
            - name: ESQ_LISTEN
              value: {{ include "esq.listen" (dict "root" $root "port" $v.port) | quote }}
            {{- if $root.Values.metrics.enabled }}
            - name: ESQ_METRICS_ADDR
              value: {{ include "esq.listen" (dict "root" $root "port" $root.Values.metrics.port) | quote }}
            {{- end }}
            {{- with .env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- include "esq.securityEnv" $root | nindent 12 }}
            {{- with $root.Values.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- /* The kubelet's gRPC probes speak plaintext only: with TLS they use the health-only port. */}}
          {{- $probePort := ternary $root.Values.probes.healthPort $v.port (eq (include "esq.tls.enabled" $root) "true") | int }}
          startupProbe:
            grpc:
              port: {{ $probePort }}
            {{- toYaml $root.Values.probes.startup | nindent 12 }}
          readinessProbe:
            grpc:
              port: {{ $probePort }}
            {{- toYaml $root.Values.probes.readiness | nindent 12 }}
          livenessProbe:
            grpc:
              port: {{ $probePort }}
            {{- toYaml $root.Values.probes.liveness | nindent 12 }}
          {{- if gt (int $root.Values.preStopSleepSeconds) 0 }}
          lifecycle:
            preStop:
              exec:
                command: ["sleep", {{ int $root.Values.preStopSleepSeconds | toString | quote }}]
          {{- end }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- include "esq.secretMounts" $root | nindent 12 }}
      volumes:
        # The root filesystem is read-only; /tmp is the only writable place.
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
        {{- include "esq.secretVolumes" $root | nindent 8 }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/*
The environment of the security settings, the same in every component: insecure mode, server
TLS and tokens (paths into the read-only secret mounts), the health-only listener with TLS, and
the stores' credentials (secretKeyRef) and TLS files. Renders a YAML list (maybe empty).
*/}}
{{- define "esq.securityEnv" -}}
{{- $env := list }}
{{- if .Values.insecure }}
{{- $env = append $env (dict "name" "ESQ_INSECURE" "value" "true") }}
{{- end }}
{{- if include "esq.tls.enabled" . }}
{{- $dir := include "esq.mount.tls" . }}
{{- $env = append $env (dict "name" "ESQ_TLS_CERT" "value" (printf "%s/tls.crt" $dir)) }}
{{- $env = append $env (dict "name" "ESQ_TLS_KEY" "value" (printf "%s/tls.key" $dir)) }}
{{- if .Values.tls.clientCa }}
{{- $env = append $env (dict "name" "ESQ_TLS_CLIENT_CA" "value" (printf "%s/ca.crt" $dir)) }}
{{- end }}
{{- $env = append $env (dict "name" "ESQ_HEALTH_LISTEN" "value" (include "esq.listen" (dict "root" . "port" .Values.probes.healthPort))) }}
{{- end }}
{{- if include "esq.auth.enabled" . }}
{{- $env = append $env (dict "name" "ESQ_AUTH_TOKENS" "value" (printf "%s/tokens" (include "esq.mount.auth" .))) }}
{{- if .Values.auth.protectReflection }}
{{- $env = append $env (dict "name" "ESQ_AUTH_REFLECTION" "value" "true") }}
{{- end }}
{{- end }}
{{- if .Values.cql.existingSecret }}
{{- $env = append $env (dict "name" "ESQ_CQL_USERNAME" "value" .Values.cql.username) }}
{{- $env = append $env (dict "name" "ESQ_CQL_PASSWORD" "valueFrom" (dict "secretKeyRef" (dict "name" .Values.cql.existingSecret "key" .Values.cql.passwordKey))) }}
{{- end }}
{{- if .Values.cql.tls.enabled }}
{{- $dir := include "esq.mount.cqlTls" . }}
{{- $env = append $env (dict "name" "ESQ_CQL_TLS_CA" "value" (printf "%s/ca.crt" $dir)) }}
{{- if .Values.cql.tls.clientCertificate }}
{{- $env = append $env (dict "name" "ESQ_CQL_TLS_CERT" "value" (printf "%s/tls.crt" $dir)) }}
{{- $env = append $env (dict "name" "ESQ_CQL_TLS_KEY" "value" (printf "%s/tls.key" $dir)) }}
{{- end }}
{{- end }}
{{- if .Values.redis.existingSecret }}
{{- $env = append $env (dict "name" "ESQ_REDIS_USERNAME" "valueFrom" (dict "secretKeyRef" (dict "name" .Values.redis.existingSecret "key" .Values.redis.usernameKey "optional" true))) }}
{{- $env = append $env (dict "name" "ESQ_REDIS_PASSWORD" "valueFrom" (dict "secretKeyRef" (dict "name" .Values.redis.existingSecret "key" .Values.redis.passwordKey))) }}
{{- end }}
{{- if .Values.redis.tls.enabled }}
{{- $dir := include "esq.mount.redisTls" . }}
{{- $env = append $env (dict "name" "ESQ_REDIS_TLS_CA" "value" (printf "%s/ca.crt" $dir)) }}
{{- if .Values.redis.tls.clientCertificate }}
{{- $env = append $env (dict "name" "ESQ_REDIS_TLS_CERT" "value" (printf "%s/tls.crt" $dir)) }}
{{- $env = append $env (dict "name" "ESQ_REDIS_TLS_KEY" "value" (printf "%s/tls.key" $dir)) }}
{{- end }}
{{- end }}
{{- with $env }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/*
The secret volumes behind the security settings (renders a YAML list, maybe empty). Every one
is read-only to the pod's group (0440; fsGroup owns the files) and mounted whole, never by
subPath, so that renewed certificates and edited token files reach the running servers, which
re-read them.
*/}}
{{- define "esq.secretVolumes" -}}
{{- $volumes := list }}
{{- if include "esq.tls.enabled" . }}
{{- $volumes = append $volumes (dict "name" "tls" "secret" (dict "secretName" (include "esq.tls.secretName" .) "defaultMode" 288)) }}
{{- end }}
{{- if include "esq.auth.enabled" . }}
{{- $volumes = append $volumes (dict "name" "auth" "secret" (dict "secretName" (include "esq.auth.secretName" .) "defaultMode" 288)) }}
{{- end }}
{{- if .Values.cql.tls.enabled }}
{{- $volumes = append $volumes (dict "name" "cql-tls" "secret" (dict "secretName" .Values.cql.tls.existingSecret "defaultMode" 288)) }}
{{- end }}
{{- if .Values.redis.tls.enabled }}
{{- $volumes = append $volumes (dict "name" "redis-tls" "secret" (dict "secretName" .Values.redis.tls.existingSecret "defaultMode" 288)) }}
{{- end }}
{{- with $volumes }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{- define "esq.secretMounts" -}}
{{- $mounts := list }}
{{- if include "esq.tls.enabled" . }}
{{- $mounts = append $mounts (dict "name" "tls" "mountPath" (include "esq.mount.tls" .) "readOnly" true) }}
{{- end }}
{{- if include "esq.auth.enabled" . }}
{{- $mounts = append $mounts (dict "name" "auth" "mountPath" (include "esq.mount.auth" .) "readOnly" true) }}
{{- end }}
{{- if .Values.cql.tls.enabled }}
{{- $mounts = append $mounts (dict "name" "cql-tls" "mountPath" (include "esq.mount.cqlTls" .) "readOnly" true) }}
{{- end }}
{{- if .Values.redis.tls.enabled }}
{{- $mounts = append $mounts (dict "name" "redis-tls" "mountPath" (include "esq.mount.redisTls" .) "readOnly" true) }}
{{- end }}
{{- with $mounts }}
{{- toYaml . }}
{{- end }}
{{- end }}

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
Checks of values the schema cannot express; renders nothing.
*/}}
{{- define "esq.validate" -}}
{{- if not .Values.cql.nodes }}
{{- fail "cql.nodes: set at least one ScyllaDB/Cassandra contact point (host:port)" }}
{{- end }}
{{- if not .Values.redis.urls }}
{{- fail "redis.urls: set at least one Redis URL (redis://host:port)" }}
{{- end }}
{{- if not (has .Values.cql.changeFeed (list "table" "scylla-cdc")) }}
{{- fail (printf "cql.changeFeed: %q is not one of table, scylla-cdc" .Values.cql.changeFeed) }}
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
            {{- with $root.Values.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          startupProbe:
            grpc:
              port: {{ int $v.port }}
            {{- toYaml $root.Values.probes.startup | nindent 12 }}
          readinessProbe:
            grpc:
              port: {{ int $v.port }}
            {{- toYaml $root.Values.probes.readiness | nindent 12 }}
          livenessProbe:
            grpc:
              port: {{ int $v.port }}
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
      volumes:
        # The root filesystem is read-only; /tmp is the only writable place.
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
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

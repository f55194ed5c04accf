{{/*
The Service of a gRPC component: (dict "root" $ "component" "write-svc" "values" $.Values.writeSvc).
*/}}
{{- define "esq.service" -}}
{{- $root := .root }}
{{- $v := .values }}
{{- $sel := dict "root" $root "component" .component }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "esq.componentName" $sel }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "esq.componentLabels" $sel | nindent 4 }}
  {{- with $v.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ $v.service.type }}
  selector:
    {{- include "esq.selectorLabels" $sel | nindent 4 }}
  ports:
    - name: grpc
      port: {{ int $v.service.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    {{- if $root.Values.metrics.enabled }}
    - name: metrics
      port: {{ int $root.Values.metrics.port }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
    {{- end }}
{{- end }}

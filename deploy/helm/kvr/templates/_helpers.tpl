{{/* Name prefix of every object: the release name, with "-kvr" unless it already says kvr. */}}
{{- define "kvr.fullname" -}}
{{- if contains "kvr" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-kvr" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of objects that carry a component's selector labels too (kvr.selector). */}}
{{- define "kvr.baseLabels" -}}
app.kubernetes.io/part-of: kvr
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Labels of the other objects. */}}
{{- define "kvr.labels" -}}
{{ include "kvr.baseLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "scheduler") */}}
{{- define "kvr.selector" -}}
app.kubernetes.io/name: {{ include "kvr.fullname" .root }}-{{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "kvr.grpcPool" -}}
{{- .Values.extProc.pool | default (first .Values.pools) -}}
{{- end -}}

{{/* Pod-level settings shared by every kvr Deployment. */}}
{{- define "kvr.podSecurity" -}}
automountServiceAccountToken: false
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "kvr.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- end -}}

{{- define "kvr.probes" -}}
readinessProbe:
  httpGet:
    path: /readyz
    port: http
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 2
livenessProbe:
  httpGet:
    path: /healthz
    port: http
  initialDelaySeconds: 10
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
{{- end -}}

{{/* envFrom (common + the component's ConfigMap) and the NATS credentials variable. */}}
{{- define "kvr.envFrom" -}}
envFrom:
  - configMapRef:
      name: {{ include "kvr.fullname" .root }}-common
  - configMapRef:
      name: {{ include "kvr.fullname" .root }}-{{ .component }}
{{- end -}}

{{- define "kvr.natsMounts" -}}
{{- if .Values.nats.credentialsSecret }}
- name: nats-credentials
  mountPath: /etc/kvr/nats
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "kvr.natsVolumes" -}}
{{- if .Values.nats.credentialsSecret }}
- name: nats-credentials
  secret:
    secretName: {{ .Values.nats.credentialsSecret }}
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end -}}

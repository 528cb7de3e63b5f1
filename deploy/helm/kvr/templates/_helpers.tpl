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

{{/* NATS credentials as files: the shared creds Secret, or (nats.identities) the component's own
password Secret and client-certificate Secret (docs/security.md). Called with (dict "root" $ "component" NAME). */}}
{{- define "kvr.natsMounts" -}}
{{- $nats := .root.Values.nats }}
{{- if or $nats.credentialsSecret $nats.identities.enabled }}
- name: nats-credentials
  mountPath: /etc/kvr/nats
  readOnly: true
{{- end }}
{{- if and $nats.identities.enabled $nats.identities.tls }}
- name: nats-tls
  mountPath: /etc/kvr/nats-tls
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "kvr.natsVolumes" -}}
{{- $nats := .root.Values.nats }}
{{- if and $nats.credentialsSecret $nats.identities.enabled }}
{{- fail "nats.credentialsSecret and nats.identities.enabled: choose one way to authenticate" }}
{{- end }}
{{- if $nats.credentialsSecret }}
- name: nats-credentials
  secret:
    secretName: {{ $nats.credentialsSecret }}
{{- else if $nats.identities.enabled }}
- name: nats-credentials
  secret:
    secretName: {{ printf "%s%s" $nats.identities.passwordSecretPrefix .component }}
    defaultMode: 0400
{{- if $nats.identities.tls }}
- name: nats-tls
  secret:
    secretName: {{ printf "%s%s" $nats.identities.tlsSecretPrefix .component }}
    defaultMode: 0400
{{- end }}
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end -}}

{{/* Names, labels and the pieces every workload of the chart shares. */}}

{{- define "customer-instance.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* One release per customer namespace, so the release name alone names the objects. */}}
{{- define "customer-instance.fullname" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Name of one component's objects: (dict "root" $ "component" "api"). */}}
{{- define "customer-instance.componentName" -}}
{{- printf "%s-%s" (include "customer-instance.fullname" .root) .component -}}
{{- end -}}

{{- define "customer-instance.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: never change after install (a Deployment's selector is immutable). */}}
{{- define "customer-instance.selectorLabels" -}}
app.kubernetes.io/name: {{ include "customer-instance.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "customer-instance.labels" -}}
{{ include "customer-instance.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: iotistic
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ include "customer-instance.chart" .root }}
{{- with .root.Values.customerId }}
iotistic.io/customer-id: {{ . }}
{{- end }}
iotistic.io/plan: {{ .root.Values.plan }}
{{- end -}}

{{/* Replicas of a workload: its own count, or 0 when the instance is disabled. */}}
{{- define "customer-instance.replicas" -}}
{{- if .root.Values.enabled -}}{{ .replicas }}{{- else -}}0{{- end -}}
{{- end -}}

{{- define "customer-instance.preset" -}}
{{- $byPlan := dict "unlicensed" "small" "trial" "small" "starter" "small" "professional" "medium" "enterprise" "large" -}}
{{- .Values.resourcesPreset | default (get $byPlan .Values.plan) -}}
{{- end -}}

{{/* A component's resources: its own when set, else its entry in the preset. */}}
{{- define "customer-instance.resources" -}}
{{- $own := get (get .root.Values .component) "resources" -}}
{{- if $own -}}
{{- toYaml $own -}}
{{- else -}}
{{- $preset := get .root.Values.resourcePresets (include "customer-instance.preset" .root) -}}
{{- toYaml (required (printf "resourcePresets has no entry for %s" .component) (get $preset .component)) -}}
{{- end -}}
{{- end -}}

{{- define "customer-instance.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion | toString) -}}
{{- end -}}

{{/* Pod-level security: non-root with the image's own uid, RuntimeDefault seccomp. */}}
{{- define "customer-instance.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .runAsUser }}
runAsGroup: {{ .runAsUser }}
fsGroup: {{ .runAsUser }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "customer-instance.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .readOnlyRootFilesystem }}
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The pod spec fields every workload shares. */}}
{{- define "customer-instance.podCommon" -}}
serviceAccountName: {{ include "customer-instance.fullname" . }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* emptyDir volumes (and their mounts) for the paths a read-only root filesystem must write. */}}
{{- define "customer-instance.writableVolumes" -}}
{{- range $index, $path := .writablePaths }}
- name: writable-{{ $index }}
  emptyDir: {}
{{- end }}
{{- end -}}

{{- define "customer-instance.writableMounts" -}}
{{- range $index, $path := .writablePaths }}
- name: writable-{{ $index }}
  mountPath: {{ $path }}
{{- end }}
{{- end -}}

{{/* The generated credentials Secret keeps its values across upgrades: read back with lookup. */}}
{{- define "customer-instance.credentialsSecretName" -}}
{{- printf "%s-credentials" (include "customer-instance.fullname" .) -}}
{{- end -}}

{{- define "customer-instance.credential" -}}
{{- $secret := lookup "v1" "Secret" .root.Release.Namespace (include "customer-instance.credentialsSecretName" .root) -}}
{{- if and $secret $secret.data (hasKey $secret.data .key) -}}
{{- index $secret.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end -}}

{{/* Environment shared by the API and the exporter: identity, licence, database. */}}
{{- define "customer-instance.licenseEnv" -}}
- name: CUSTOMER_ID
  value: {{ .Values.customerId | quote }}
- name: IOTISTIC_PLAN
  value: {{ .Values.plan | quote }}
- name: IOTISTIC_LICENSE_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.license.secretName }}
      key: license.jwt
- name: IOTISTIC_LICENSE_PUBLIC_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.license.secretName }}
      key: public-key.pem
# The mounted copy follows a renewed licence without a restart.
- name: IOTISTIC_LICENSE_FILE
  value: /etc/iotistic/license/license.jwt
{{- end -}}

{{- define "customer-instance.databaseEnv" -}}
- name: DB_HOST
  value: {{ include "customer-instance.componentName" (dict "root" . "component" "postgresql") }}
- name: DB_PORT
  value: "5432"
- name: DB_NAME
  value: {{ .Values.postgresql.database | quote }}
- name: DB_USER
  value: {{ .Values.postgresql.username | quote }}
- name: DB_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "customer-instance.credentialsSecretName" . }}
      key: postgres-password
{{- end -}}

{{- define "customer-instance.licenseVolume" -}}
- name: license
  secret:
    secretName: {{ .Values.license.secretName }}
    items:
      - key: license.jwt
        path: license.jwt
      - key: public-key.pem
        path: public-key.pem
{{- end -}}

{{/*
Names, labels and the pieces every workload of the chart shares.

A value of .Values is written quoted (strings), through int (numbers), toJson (booleans) or
customer-instance.json (maps, lists), never bare: a Customer sets most of them (spec.instance.values),
and a string written bare could end the object it is in and start another, in any namespace, which the
operator would apply. Not toYaml either: its block scalars keep U+2028 and U+0085 as they are, which YAML
reads as line breaks, so a string of several lines could still write keys of its own. Names made of the
release name are DNS labels helm checked.
*/}}

{{/* A map or list as JSON, a YAML flow of one line. toJson leaves U+0085 as it is, which YAML reads as a
line break (in a string, a "---" after it ends the document): escaped like JSON's \u2028. */}}
{{- define "customer-instance.json" -}}
{{- toJson . | replace "\u0085" "\\u0085" -}}
{{- end -}}

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
iotistic.io/customer-id: {{ . | quote }}
{{- end }}
iotistic.io/plan: {{ .root.Values.plan | quote }}
{{- end -}}

{{/* Replicas of a workload: its own count (none when a Customer's values set it null: the API server's
default), or 0 when the instance is disabled. */}}
{{- define "customer-instance.replicas" -}}
{{- if not .root.Values.enabled -}}0{{- else if not (kindIs "invalid" .replicas) -}}{{ .replicas | int }}{{- end -}}
{{- end -}}

{{- define "customer-instance.preset" -}}
{{- $byPlan := dict "unlicensed" "small" "trial" "small" "starter" "small" "professional" "medium" "enterprise" "large" -}}
{{- .Values.resourcesPreset | default (get $byPlan .Values.plan) -}}
{{- end -}}

{{/* A component's resources: its own when set, else its entry in the preset. */}}
{{- define "customer-instance.resources" -}}
{{- $own := get (get .root.Values .component) "resources" -}}
{{- if $own -}}
{{- include "customer-instance.json" $own -}}
{{- else -}}
{{- $preset := get .root.Values.resourcePresets (include "customer-instance.preset" .root) -}}
{{- include "customer-instance.json" (required (printf "resourcePresets has no entry for %s" .component) (get $preset .component)) -}}
{{- end -}}
{{- end -}}

{{- define "customer-instance.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion | toString) -}}
{{- end -}}

{{/* Pod-level security: non-root with the image's own uid, RuntimeDefault seccomp. */}}
{{- define "customer-instance.podSecurityContext" -}}
runAsNonRoot: true
{{- if not (kindIs "invalid" .runAsUser) }}
runAsUser: {{ .runAsUser | int }}
runAsGroup: {{ .runAsUser | int }}
fsGroup: {{ .runAsUser | int }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "customer-instance.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .readOnlyRootFilesystem | toJson }}
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The pod spec fields every workload shares. */}}
{{- define "customer-instance.podCommon" -}}
serviceAccountName: {{ include "customer-instance.fullname" . }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets: {{ include "customer-instance.json" . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector: {{ include "customer-instance.json" . }}
{{- end }}
{{- with .Values.tolerations }}
tolerations: {{ include "customer-instance.json" . }}
{{- end }}
{{- with .Values.affinity }}
affinity: {{ include "customer-instance.json" . }}
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
  mountPath: {{ $path | quote }}
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

{{/* Environment shared by the API and the exporter: identity and licence, all of it from the operator's
values. Written after a component's extraEnv, so that the operator's entry is the one Kubernetes keeps
(the last of a name): the CRD refuses these names in extraEnv, and the operator leaves them out of a
Customer stored before that (operator/values.py). */}}
{{- define "customer-instance.licenseEnv" -}}
- name: CUSTOMER_ID
  value: {{ .Values.customerId | quote }}
- name: IOTISTIC_PLAN
  value: {{ .Values.plan | quote }}
- name: IOTISTIC_LICENSE_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.license.secretName | quote }}
      key: license.jwt
- name: IOTISTIC_LICENSE_PUBLIC_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.license.secretName | quote }}
      key: public-key.pem
# The mounted copy follows a renewed licence without a restart.
- name: IOTISTIC_LICENSE_FILE
  value: /etc/iotistic/license/license.jwt
# The licence's iss and aud to verify: the operator's LICENSE_ISSUER and LICENSE_AUDIENCE.
- name: IOTISTIC_LICENSE_ISSUER
  value: {{ .Values.license.issuer | quote }}
- name: IOTISTIC_LICENSE_AUDIENCE
  value: {{ .Values.license.audience | quote }}
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
    secretName: {{ .Values.license.secretName | quote }}
    items:
      - key: license.jwt
        path: license.jwt
      - key: public-key.pem
        path: public-key.pem
{{- end -}}

{{/* Mosquitto's configuration file, extraConfig's lines last: (the mosquitto values). */}}
{{- define "customer-instance.mosquittoConf" -}}
listener {{ .port | int }}
protocol mqtt
persistence true
persistence_location /mosquitto/data/
log_dest stdout
log_type error
log_type warning
log_type notice
allow_anonymous {{ .allowAnonymous | toJson }}
{{- if not .allowAnonymous }}
password_file /mosquitto/auth/passwd
{{- end }}
{{- with .extraConfig }}
{{ trimSuffix "\n" . }}
{{- end }}
{{- end -}}

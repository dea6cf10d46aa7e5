{{/* Names, labels and the pod pieces both components share. */}}

{{- define "iotistic-billing.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release name alone when it already says iotistic-billing; room is left for "-webhook-server". */}}
{{- define "iotistic-billing.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "iotistic-billing.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of one component's objects: (dict "root" $ "component" "operator"). */}}
{{- define "iotistic-billing.componentName" -}}
{{- printf "%s-%s" (include "iotistic-billing.fullname" .root) .component -}}
{{- end -}}

{{- define "iotistic-billing.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: never change after install (a Deployment's selector is immutable). */}}
{{- define "iotistic-billing.selectorLabels" -}}
app.kubernetes.io/name: {{ include "iotistic-billing.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Every operator pod, of any shard: what the operator's Service and NetworkPolicy select (each shard's
Deployment selects its own pods by component, operator or operator-shard-k, so selectors never overlap). */}}
{{- define "iotistic-billing.operatorPods" -}}
app.kubernetes.io/name: {{ include "iotistic-billing.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
iotistic.io/role: operator
{{- end -}}

{{- define "iotistic-billing.labels" -}}
{{ include "iotistic-billing.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: iotistic
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ include "iotistic-billing.chart" .root }}
{{- end -}}

{{- define "iotistic-billing.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}

{{- define "iotistic-billing.webhookServerUrl" -}}
{{- printf "http://%s.%s.svc:%v" (include "iotistic-billing.componentName" (dict "root" . "component" "webhook-server")) .Release.Namespace .Values.webhookServer.port -}}
{{- end -}}

{{/* Where the licence key Secret is mounted. */}}
{{- define "iotistic-billing.licenseKeysDir" -}}/etc/iotistic/license-keys{{- end -}}

{{/* Non-root with the image's uid, RuntimeDefault seccomp. */}}
{{- define "iotistic-billing.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The root filesystem is read-only: /tmp (helm's cache and the values files it is given) is an emptyDir. */}}
{{- define "iotistic-billing.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The pod spec fields both components share; .component picks its scheduling values. */}}
{{- define "iotistic-billing.podCommon" -}}
{{- $c := get .root.Values .values -}}
serviceAccountName: {{ include "iotistic-billing.componentName" . }}
# Both talk to the API server; the ServiceAccount itself does not automount, the pod asks for it.
automountServiceAccountToken: true
enableServiceLinks: false
{{- with $c.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "iotistic-billing.podSecurityContext" . | nindent 2 }}
{{- end -}}

{{/* DATABASE_URL from its Secret: both components, and the operator pods' migrate init container. */}}
{{- define "iotistic-billing.databaseEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "secrets.database.name is required" .Values.secrets.database.name }}
      key: {{ .Values.secrets.database.key }}
{{- end -}}

{{/* Where secrets.database.caCert is mounted: DATABASE_URL's sslrootcert=<this>/<key>. */}}
{{- define "iotistic-billing.databaseCaDir" -}}/etc/iotistic/postgresql{{- end -}}

{{/* The volumeMount of PostgreSQL's CA (secrets.database.caCert) in every container that connects (the
operator, its migrate init container, the webhook server); nothing when no CA is named. */}}
{{- define "iotistic-billing.databaseCaMount" -}}
{{- if .Values.secrets.database.caCert.name -}}
- name: database-ca
  mountPath: {{ include "iotistic-billing.databaseCaDir" . }}
  readOnly: true
{{- end -}}
{{- end -}}

{{/* Its volume: the one key, under its own name, so that sslrootcert names it. */}}
{{- define "iotistic-billing.databaseCaVolume" -}}
{{- with .Values.secrets.database.caCert -}}
{{- if .name -}}
- name: database-ca
  secret:
    secretName: {{ .name }}
    defaultMode: 0440
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Environment both components read: settings, the database, the image's writable paths. */}}
{{- define "iotistic-billing.commonEnv" -}}
{{- $config := .Values.config -}}
{{- if and $config.notices.platformWebhookUrl (not .Values.secrets.notices.name) -}}
{{- fail "config.notices.platformWebhookUrl needs secrets.notices.name: the Secret whose key secrets.notices.platformWebhookSecretKey holds its signing secret (NOTIFY_WEBHOOK_SECRET)" -}}
{{- end -}}
{{ include "iotistic-billing.databaseEnv" . }}
- name: BASE_DOMAIN
  value: {{ $config.baseDomain | quote }}
- name: BILLING_URL
  value: {{ $config.billingUrl | default (include "iotistic-billing.webhookServerUrl" .) | quote }}
- name: DEFAULT_TRIAL_DAYS
  value: {{ $config.defaultTrialDays | quote }}
- name: DUNNING_RESTRICT_DAYS
  value: {{ $config.dunningRestrictDays | quote }}
- name: LICENSE_ISSUER
  value: {{ $config.license.issuer | quote }}
- name: LICENSE_AUDIENCE
  value: {{ $config.license.audience | quote }}
- name: LICENSE_LIFETIME_DAYS
  value: {{ $config.license.lifetimeDays | quote }}
- name: LOG_FORMAT
  value: {{ $config.logFormat | quote }}
{{- with .Values.secrets.licenseKeys.extraPublicKeys }}
- name: LICENSE_EXTRA_PUBLIC_KEY_PATHS
  value: {{ include "iotistic-billing.extraPublicKeyPaths" $ | quote }}
{{- end }}
{{- /* Notices: the operator writes some (trial ending, licence suspended), the webhook server sends. */}}
- name: NOTIFY_FROM
  value: {{ $config.notices.from | quote }}
- name: TRIAL_NOTICE_DAYS
  value: {{ $config.notices.trialNoticeDays | quote }}
{{- with $config.notices.customerPortalUrl }}
- name: CUSTOMER_PORTAL_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.secrets.notices.name }}
{{- if $.Values.secrets.notices.smtpUrlKey }}
{{- /* Required: an optional key makes the whole Secret optional to Kubernetes, so a misspelt name or a
Secret made after the install (External Secrets, sealed secrets) started the pods without SMTP_URL, read
once at start, and mail was dead without a word (found in review). Without a mail server smtpUrlKey is
"": no SMTP_URL. */}}
- name: SMTP_URL
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.secrets.notices.smtpUrlKey }}
{{- end }}
{{- if $config.notices.platformWebhookUrl }}
- name: NOTIFY_WEBHOOK_URL
  value: {{ $config.notices.platformWebhookUrl | quote }}
- name: NOTIFY_WEBHOOK_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.secrets.notices.platformWebhookSecretKey }}
{{- end }}
{{- end }}
{{- /* The operator keeps a deleted Customer's webhook signing secret here, the webhook server reads it. */}}
- name: BILLING_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: HOME
  value: /tmp
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- end -}}

{{/* A component's extraEnv (dict "root" "extraEnv" "component"), refused when it names a setting
commonEnv gives both components a value of (from config, or from the Pod: BILLING_NAMESPACE): the later
entry wins, so that component alone would read another value than the other (found in review:
DUNNING_RESTRICT_DAYS told customers a date the operator did not keep; BILLING_NAMESPACE had the webhook
server look for deleted Customers' signing secrets where the operator kept none). A credential from
another Secret (valueFrom.secretKeyRef) stays possible. Names compare in upper case, as the settings read
them (case_sensitive=False): dunning_restrict_days is DUNNING_RESTRICT_DAYS to them (found in review: it
rendered, and won over the chart's value). */}}
{{- define "iotistic-billing.extraEnv" -}}
{{- $common := dict -}}
{{- range (include "iotistic-billing.commonEnv" .root | fromYamlArray) -}}
{{- if hasKey . "value" -}}
{{- $_ := set $common (upper .name) "set it through the chart's value for it (values.yaml, config and secrets)" -}}
{{- else if dig "valueFrom" "fieldRef" "fieldPath" "" . -}}
{{- $_ := set $common (upper .name) (printf "the chart sets it from the Pod's %s" .valueFrom.fieldRef.fieldPath) -}}
{{- end -}}
{{- end -}}
{{- range $entry := .extraEnv -}}
{{- with get $common (upper $entry.name) -}}
{{- fail (printf "%s.extraEnv: %s is set by the chart for both components; %s" $.component $entry.name .) -}}
{{- end -}}
{{- end -}}
{{- with .extraEnv }}{{ toYaml . }}{{ end -}}
{{- end -}}

{{/* "true" when one of the extraEnv lists sets the variable, else "": (dict "extraEnvs" (list ...) "name"
"SMTP_URL"). What NOTES and the NetworkPolicy read of a setting given there instead of by its value; in
any case, as the settings read it (smtp_url is SMTP_URL). */}}
{{- define "iotistic-billing.extraEnvNames" -}}
{{- $found := false -}}
{{- range $extraEnv := .extraEnvs -}}
{{- range $extraEnv -}}
{{- if eq (upper .name) (upper $.name) -}}{{- $found = true -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- if $found -}}true{{- end -}}
{{- end -}}

{{/* Fails naming .value on a network of .cidrs that the settings refuse (ipaddress.ip_network, strict:
the pods would crash-loop), and on none they take (found in review: a bare address, which the chart took
before, failed helm upgrade, and Sprig's int read the prefix 08 as 0, 010 as 8). IPv4 as ip_network reads
it: an address (octets without a leading zero), then nothing (/32), /digits up to 32 (leading zeros
allowed), or /a netmask (255.0.0.0) or a hostmask (0.255.255.255), netmask first; no host bits set. IPv6:
a prefix of digits up to 128; its address and host bits are left to the settings (Sprig has no IP
arithmetic, and IPv6's is too long to write here). The schema holds both to the shape. */}}
{{- define "iotistic-billing.checkCidrs" -}}
{{- $powers := list 1 -}}
{{- range until 32 -}}{{- $powers = append $powers (mul (last $powers) 2) -}}{{- end -}}
{{- range $cidr := .cidrs -}}
{{- $parts := splitList "/" $cidr -}}
{{- $address := first $parts -}}
{{- $mask := ternary (last $parts) "" (eq (len $parts) 2) -}}
{{- if contains ":" $address -}}
{{- if or (gt (len $parts) 2) (and (eq (len $parts) 2) (or (not (regexMatch "^[0-9]+$" $mask)) (gt (atoi $mask) 128))) -}}
{{- fail (printf "%s: %s is no IPv6 network: its prefix must be a number up to 128 (the settings refuse it)" $.value $cidr) -}}
{{- end -}}
{{- else -}}
{{- $number := include "iotistic-billing.ipv4" $address | atoi -}}
{{- $prefix := -1 -}}
{{- if gt (len $parts) 2 -}}
{{- /* two slashes: no network, the prefix stays -1 */ -}}
{{- else if eq (len $parts) 1 -}}
{{- $prefix = 32 -}}
{{- else if regexMatch "^[0-9]+$" $mask -}}
{{- /* atoi: base 10, as ip_network reads it; Sprig's int reads 08 as 0 and 010 as 8. */ -}}
{{- if le (atoi $mask) 32 -}}{{- $prefix = atoi $mask -}}{{- end -}}
{{- else -}}
{{- $maskNumber := include "iotistic-billing.ipv4" $mask | atoi -}}
{{- range $bits := until 33 -}}
{{- if and (lt $prefix 0) (eq $maskNumber (sub (last $powers) (index $powers (sub 32 $bits)))) -}}{{- $prefix = $bits -}}{{- end -}}
{{- end -}}
{{- range $bits := until 33 -}}
{{- if and (lt $prefix 0) (eq $maskNumber (sub (index $powers (sub 32 $bits)) 1)) -}}{{- $prefix = $bits -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- if or (lt $number 0) (lt $prefix 0) -}}
{{- fail (printf "%s: %s is no IPv4 network: an address, address/prefix (0 to 32) or address/netmask (the settings refuse it)" $.value $cidr) -}}
{{- end -}}
{{- $size := index $powers (sub 32 $prefix) -}}
{{- $hostBits := mod $number $size -}}
{{- if ne (int $hostBits) 0 -}}
{{- $network := sub $number $hostBits -}}
{{- $dotted := list -}}
{{- range $shift := list 16777216 65536 256 1 -}}
{{- $dotted = append $dotted (mod (div $network $shift) 256) -}}
{{- end -}}
{{- fail (printf "%s: %s has host bits set; the network is %s/%d (the settings refuse it)" $.value $cidr (join "." $dotted) $prefix) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The number of a dotted IPv4 address as ip_network reads one (four octets up to 255, none with a
leading zero), or -1. */}}
{{- define "iotistic-billing.ipv4" -}}
{{- $octets := splitList "." . -}}
{{- $number := 0 -}}
{{- range $octets -}}
{{- if or (lt $number 0) (not (regexMatch "^(0|[1-9][0-9]{0,2})$" .)) (gt (atoi .) 255) -}}
{{- $number = -1 -}}
{{- else -}}
{{- $number = add (mul $number 256) (atoi .) -}}
{{- end -}}
{{- end -}}
{{- if ne (len $octets) 4 -}}{{- $number = -1 -}}{{- end -}}
{{- $number -}}
{{- end -}}

{{/* LICENSE_EXTRA_PUBLIC_KEY_PATHS as the JSON list pydantic-settings reads. */}}
{{- define "iotistic-billing.extraPublicKeyPaths" -}}
{{- $paths := list -}}
{{- range $index, $key := .Values.secrets.licenseKeys.extraPublicKeys -}}
{{- $paths = append $paths (printf "%s/extra-public-key-%d.pem" (include "iotistic-billing.licenseKeysDir" $) $index) -}}
{{- end -}}
{{- toJson $paths -}}
{{- end -}}

{{/* Volume items of the retired public keys. */}}
{{- define "iotistic-billing.extraPublicKeyItems" -}}
{{- range $index, $key := .Values.secrets.licenseKeys.extraPublicKeys }}
- key: {{ $key }}
  path: extra-public-key-{{ $index }}.pem
{{- end }}
{{- end -}}

{{/* A NetworkPolicy egress rule to ipBlocks on TCP ports: (dict "cidrs" [...] "ports" [...]). */}}
{{- define "iotistic-billing.egressTo" -}}
- to:
    {{- range $cidr := .cidrs }}
    - ipBlock:
        cidr: {{ $cidr }}
        {{- /* .except, when given: the entries of its family, left out of 0.0.0.0/0 or ::/0 only (an
        except outside its cidr is refused by the API server). */}}
        {{- $except := list }}
        {{- range $.except }}
        {{- if or (and (eq $cidr "0.0.0.0/0") (not (contains ":" .))) (and (eq $cidr "::/0") (contains ":" .)) }}
        {{- $except = append $except . }}
        {{- end }}
        {{- end }}
        {{- with $except }}
        except:
          {{- toYaml . | nindent 10 }}
        {{- end }}
    {{- end }}
  ports:
    {{- range .ports }}
    - protocol: TCP
      port: {{ . }}
    {{- end }}
{{- end -}}

{{/* The port a URL names, else .default (the scheme's): (dict "url" "oci://host:5000/x" "default" 443). */}}
{{- define "iotistic-billing.urlPort" -}}
{{- regexFind ":[0-9]+$" (urlParse .url).host | trimPrefix ":" | default .default -}}
{{- end -}}

{{/* The Services' IP families (values.yaml, service): nothing when empty, the cluster's default. */}}
{{- define "iotistic-billing.ipFamilies" -}}
{{- with .Values.service.ipFamilyPolicy }}
ipFamilyPolicy: {{ . }}
{{- end }}
{{- with .Values.service.ipFamilies }}
ipFamilies: {{ toJson . }}
{{- end }}
{{- end -}}

{{/* A whole number of minutes as a duration Prometheus and usageRunWindow read: 180 is 3h, 90 is 90m. */}}
{{- define "iotistic-billing.minutes" -}}
{{- if eq (mod . 60) 0 -}}{{ div . 60 }}h{{- else -}}{{ . }}m{{- end -}}
{{- end -}}

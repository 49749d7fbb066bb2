{{/* Names, labels and the image reference shared by every template. */}}

{{/* The chart name ("txmail"), or nameOverride. */}}
{{- define "txmail.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every object name: fullnameOverride, else the release name when it already
contains the chart name, else "<release>-<chart>". Truncated so "<prefix>-operator-metrics"
stays within 63 characters.
*/}}
{{- define "txmail.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 46 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 46 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 46 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of the operator's Deployment, ClusterRole, Role and their bindings. */}}
{{- define "txmail.operatorName" -}}
{{- printf "%s-operator" (include "txmail.fullname" .) -}}
{{- end -}}

{{/* The operator's ServiceAccount. */}}
{{- define "txmail.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "txmail.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "txmail.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object the chart installs. */}}
{{- define "txmail.labels" -}}
helm.sh/chart: {{ include "txmail.chart" . }}
app.kubernetes.io/name: {{ include "txmail.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: txmail
{{- end -}}

{{/* Labels of the CRDs: the chart's, without the instance (a CRD is shared by the cluster). */}}
{{- define "txmail.crdLabels" -}}
helm.sh/chart: {{ include "txmail.chart" . }}
app.kubernetes.io/name: {{ include "txmail.name" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: txmail
{{- end -}}

{{/* The operator pod's selector (immutable in a Deployment: never add to it). */}}
{{- define "txmail.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "txmail.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "txmail.operatorLabels" -}}
{{ include "txmail.labels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{/*
The relay pods, Services and other objects the operator creates carry these labels
(txmail_relay.contract LABEL_NAME / LABEL_MANAGED_BY; builders.relay_labels).
*/}}
{{- define "txmail.relaySelectorLabels" -}}
app.kubernetes.io/name: txmail-relay
app.kubernetes.io/managed-by: txmail
{{- end -}}

{{/*
The image of the operator and of the relays: "repository@digest" when a digest is set, else
"repository:tag" with the tag defaulting to the chart's appVersion.
*/}}
{{- define "txmail.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
A label selector after "key:": " {}" when empty, else the selector as a block indented by
.indent. Call as  namespaceSelector:{{ include "txmail.selector" (dict "sel" $sel "indent" 12) }}
*/}}
{{- define "txmail.selector" -}}
{{- if .sel }}{{ toYaml .sel | nindent .indent }}{{ else }} {}{{ end -}}
{{- end -}}

{{/* Namespaces that get Roles for SmtpTokens, TransactionalEmails, app Secrets and Events. */}}
{{- define "txmail.watchNamespaces" -}}
{{- join "," (uniq .Values.operator.watchNamespaces) -}}
{{- end -}}

{{/* NetworkPolicy egress rules (argument: .Values.networkPolicy): the cluster DNS. */}}
{{- define "txmail.dnsEgress" -}}
- to:
    - namespaceSelector:{{ include "txmail.selector" (dict "sel" .dns.namespaceSelector "indent" 8) }}
      podSelector:{{ include "txmail.selector" (dict "sel" .dns.podSelector "indent" 8) }}
  ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
{{- end -}}

{{/* ... and the API server: its CIDRs when given, else its ports anywhere. */}}
{{- define "txmail.apiServerEgress" -}}
{{ if .apiServer.cidrs -}}
- to:
    {{- range .apiServer.cidrs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  ports:
{{- else -}}
- ports:
{{- end }}
    {{- range .apiServer.ports }}
    - {protocol: TCP, port: {{ . }}}
    {{- end }}
{{- end -}}

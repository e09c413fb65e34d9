{{/*
The application's name: "petrel-operator", not the chart's name "petrel". A Broker's
objects select their pods by app.kubernetes.io/name=petrel and
app.kubernetes.io/instance=<Broker>, so the operator's pod must never carry
app.kubernetes.io/name=petrel (a release and a Broker of the same name in one namespace
would otherwise put the operator behind the Broker's Services).
*/}}
{{- define "petrel.name" -}}
{{- default "petrel-operator" .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The objects' name: fullnameOverride; else "<release>-<nameOverride>"; else
"<release>-operator" (release "petrel": petrel-operator), or the release name alone if
it already says "operator".
*/}}
{{- define "petrel.fullname" -}}
{{- $release := .Release.Name }}
{{- $suffix := default "operator" .Values.nameOverride }}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains $suffix $release }}
{{- $release | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" $release $suffix | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "petrel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The labels that never change: the Deployment's selector. */}}
{{- define "petrel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "petrel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The labels of every object. */}}
{{- define "petrel.labels" -}}
helm.sh/chart: {{ include "petrel.chart" . }}
{{ include "petrel.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: petrel
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "petrel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "petrel.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image: the tag defaults to the chart's appVersion. */}}
{{- define "petrel.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

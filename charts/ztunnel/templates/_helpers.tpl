{{- define "zt.labels" -}}
app: {{ .Values.name }}
app.kubernetes.io/name: {{ .Values.name }}
app.kubernetes.io/component: ztunnel
app.kubernetes.io/part-of: ambient-mesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "zt.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- /* Whole seconds of a duration as ztunnel parses it (ms, s, m, h; bare = s), rounded up. */ -}}
{{- define "zt.seconds" -}}
{{- $d := toString . | trim -}}
{{- $num := regexFind "^[0-9]+" $d -}}
{{- $unit := trimPrefix $num $d -}}
{{- if not $num -}}
{{- fail (printf "drainTimeout %q is not a duration like 30s, 5m or 1h" $d) -}}
{{- end -}}
{{- $n := int64 $num -}}
{{- if or (eq $unit "s") (eq $unit "") -}}{{ $n }}
{{- else if eq $unit "ms" -}}{{ div (add $n 999) 1000 }}
{{- else if eq $unit "m" -}}{{ mul $n 60 }}
{{- else if eq $unit "h" -}}{{ mul $n 3600 }}
{{- else -}}{{ fail (printf "drainTimeout %q: unknown unit %q (use ms, s, m or h)" $d $unit) }}
{{- end -}}
{{- end }}

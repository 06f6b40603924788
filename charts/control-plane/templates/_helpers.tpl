{{- define "cp.labels" -}}
app: {{ .Values.name }}
istio: pilot
app.kubernetes.io/name: {{ .Values.name }}
app.kubernetes.io/component: control-plane
app.kubernetes.io/part-of: ambient-mesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "cp.selector" -}}
app: {{ .Values.name }}
istio: pilot
{{- end }}

{{- define "cp.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- /* The DNS names ztunnels and waypoints dial. */ -}}
{{- define "cp.serverNames" -}}
{{- $svc := printf "%s.%s.svc" .Values.name .Release.Namespace -}}
{{- $names := list $svc (printf "%s.%s" $svc .Values.clusterDomain) -}}
{{- join "," (concat $names .Values.extraServerNames) -}}
{{- end }}

{{- /*
The mesh root as a dict {cert, key, create}: the values' own root, the
Secret already in the cluster (kept across upgrades), or a new one.
Rendered once per template that needs it; the lookup makes every render
after the first install agree.
*/ -}}
{{- define "cp.ca" -}}
{{- $ca := .Values.ca -}}
{{- $found := lookup "v1" "Secret" .Release.Namespace $ca.secretName -}}
{{- $foundCert := "" -}}
{{- if and $found $found.data -}}
{{- $foundCert = index $found.data "ca-cert.pem" | default "" | b64dec -}}
{{- end -}}
{{- if and (or $ca.cert $ca.key) (not (and $ca.cert $ca.key)) (not $ca.existingSecret) -}}
{{- fail "ca: give both ca.cert and ca.key (PEM), or neither" -}}
{{- end -}}
{{- if $ca.existingSecret -}}
{{- $cert := $ca.cert | default $foundCert -}}
{{- if not $cert -}}
{{- fail (printf "ca.existingSecret: the Secret %s/%s was not found (or has no ca-cert.pem); create it first, or give its certificate as ca.cert" .Release.Namespace $ca.secretName) -}}
{{- end -}}
{{- dict "cert" $cert "create" false | toJson -}}
{{- else if and $ca.cert $ca.key -}}
{{- dict "cert" $ca.cert "key" $ca.key "create" true | toJson -}}
{{- else if $found -}}
{{- dict "cert" $foundCert "key" (index $found.data "ca-key.pem" | b64dec) "create" true | toJson -}}
{{- else -}}
{{- $k := genPrivateKey "ed25519" -}}
{{- $root := genCAWithKey (printf "%s root CA" .Values.trustDomain) 3650 $k -}}
{{- dict "cert" $root.Cert "key" $root.Key "create" true | toJson -}}
{{- end -}}
{{- end }}

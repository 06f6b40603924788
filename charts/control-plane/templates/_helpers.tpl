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
{{- include "cp.caFrom" (dict "ctx" . "found" (lookup "v1" "Secret" .Release.Namespace .Values.ca.secretName)) -}}
{{- end }}

{{- /* cp.ca given the Secret found in the cluster (`found`, empty if none). */ -}}
{{- define "cp.caFrom" -}}
{{- $found := .found -}}
{{- with .ctx -}}
{{- $ca := .Values.ca -}}
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
{{- /* Ours from an earlier install: keep it. Anyone else's: say how to use it. */ -}}
{{- $owner := (($found.metadata).annotations | default dict) | dig "meta.helm.sh/release-name" "" -}}
{{- if ne $owner .Release.Name -}}
{{- fail (printf "the Secret %s/%s exists and is not this release's: set ca.existingSecret=true to use it as the root, or ca.secretName to another name" .Release.Namespace $ca.secretName) -}}
{{- end -}}
{{- $foundKey := index ($found.data | default dict) "ca-key.pem" | default "" | b64dec -}}
{{- if not (and $foundCert $foundKey) -}}
{{- fail (printf "the Secret %s/%s has no ca-cert.pem and ca-key.pem" .Release.Namespace $ca.secretName) -}}
{{- end -}}
{{- dict "cert" $foundCert "key" $foundKey "create" true | toJson -}}
{{- else -}}
{{- $k := genPrivateKey "ed25519" -}}
{{- $root := genCAWithKey (printf "%s root CA" .Values.trustDomain) 3650 $k -}}
{{- dict "cert" $root.Cert "key" $root.Key "create" true | toJson -}}
{{- end -}}
{{- end -}}
{{- end }}

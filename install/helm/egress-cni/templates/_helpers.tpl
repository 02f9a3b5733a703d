{{/* The image the DaemonSets run: hub/egress-cni:tag, @digest when set. */}}
{{- define "egress-cni.image" -}}
{{- $ref := printf "%s/egress-cni:%s" .Values.image.hub .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- $ref = printf "%s@%s" $ref .Values.image.digest -}}
{{- end -}}
{{- $ref -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "egress-cni.labels" -}}
app.kubernetes.io/part-of: egress-cni
{{- end -}}

{{/* The node rules of a role (pkg/node config), as JSON. */}}
{{- define "egress-cni.nodeConfig" -}}
{{- $v := .values -}}
{{- $c := dict "role" .role "podCIDRs" $v.node.podCIDRs "logDrops" $v.node.logDrops -}}
{{- with $v.node.serviceCIDRs }}{{ $_ := set $c "serviceCIDRs" . }}{{ end -}}
{{- with $v.node.nodeCIDRs }}{{ $_ := set $c "nodeCIDRs" . }}{{ end -}}
{{- with $v.node.allow }}{{ $_ := set $c "allow" . }}{{ end -}}
{{- if eq .role "egress" -}}
{{- $_ := set $c "uplink" $v.egressNodes.uplink -}}
{{- with $v.egressNodes.egressIP }}{{ $_ := set $c "egressIP" . }}{{ end -}}
{{- end -}}
{{- toPrettyJson $c -}}
{{- end -}}

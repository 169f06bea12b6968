{{/* Prefix of every object name: "<release>-prime", or fullnameOverride. */}}
{{- define "prime.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "prime.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component; call with (dict "ctx" $ "component" "learner"). */}}
{{- define "prime.selectorLabels" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "prime.image" -}}
{{- $repo := required "image.repository is required" .Values.image.repository -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "prime.secretName" -}}
{{- default (printf "%s-auth" (include "prime.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The shared token, from the Secret: every prime container gets it as PRIME_TOKEN. */}}
{{- define "prime.tokenEnv" -}}
- name: PRIME_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "prime.secretName" . }}
      key: {{ .Values.auth.tokenKey }}
{{- end -}}

{{/* Torch and OpenMP threads; call with the thread count. */}}
{{- define "prime.threadsEnv" -}}
- name: PRIME_THREADS
  value: {{ . | quote }}
- name: OMP_NUM_THREADS
  value: {{ . | quote }}
{{- end -}}

{{/* A name-to-value map as container env entries. */}}
{{- define "prime.envMap" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end -}}
{{- end -}}

{{/*
Resources of a container with `gpus` GPUs: the GPU count goes in the limits (Kubernetes takes
the request from the limit for extended resources). Call with the component's values.
*/}}
{{- define "prime.resources" -}}
{{- $resources := deepCopy (default dict .resources) -}}
{{- if gt (int .gpus) 0 -}}
{{- $limits := default dict (get $resources "limits") -}}
{{- $_ := set $limits .gpuResource (int .gpus) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/* The --device flag of a component with `gpus` GPUs: each pod sees only its own GPU. */}}
{{- define "prime.device" -}}
{{- if gt (int .gpus) 0 -}}cuda{{- else -}}cpu{{- end -}}
{{- end -}}

{{/*
Start-up, readiness and liveness probes of a gRPC server; call with (dict "values" .Values.x
"port" N "service" "prime.v1.X" "tls" BOOL "timeout" SECONDS). Plain servers get Kubernetes'
native gRPC probe on grpc.health.v1. The native probe cannot speak TLS, so a TLS server is
probed by `prime status` in the container, over TLS to its own loopback port with the TLS
environment of "prime.tlsServerEnv": the same certificate, client certificate and token
checks an actor meets, and a Status answer exists exactly when the health service says
SERVING (both start with the server).
*/}}
{{- define "prime.grpcProbes" -}}
{{- $check := dict "grpc" (dict "port" .port "service" .service) -}}
{{- if .tls -}}
{{- $command := list "prime" "status" "--addr" (printf "https://127.0.0.1:%v" .port) "--timeout-secs" (toString .timeout) -}}
{{- $check = dict "exec" (dict "command" $command) "timeoutSeconds" (int .timeout) -}}
{{- end -}}
{{- $probes := dict -}}
{{- range $probe := list "startupProbe" "readinessProbe" "livenessProbe" -}}
{{- $timing := get $.values $probe -}}
{{- $_ := set $probes $probe (merge (dict "periodSeconds" $timing.periodSeconds "failureThreshold" $timing.failureThreshold) (deepCopy $check)) -}}
{{- end -}}
{{- toYaml $probes -}}
{{- end -}}

{{/*
HTTP probes on a metrics port (the actors': they serve no gRPC): start-up and liveness ask
/healthz, readiness /readyz. Call with (dict "values" .Values.x "port" N).
*/}}
{{- define "prime.httpProbes" -}}
{{- $probes := dict -}}
{{- range $probe := list "startupProbe" "readinessProbe" "livenessProbe" -}}
{{- $timing := get $.values $probe -}}
{{- $path := ternary "/readyz" "/healthz" (eq $probe "readinessProbe") -}}
{{- $_ := set $probes $probe (dict "httpGet" (dict "path" $path "port" (int $.port)) "periodSeconds" $timing.periodSeconds "failureThreshold" $timing.failureThreshold) -}}
{{- end -}}
{{- toYaml $probes -}}
{{- end -}}

{{/* Prometheus scrape annotations plus the component's own; call with (dict "ctx" $ "values" .Values.x "port" N). */}}
{{- define "prime.podAnnotations" -}}
{{- $annotations := deepCopy (default dict .values.podAnnotations) -}}
{{- if and .port .ctx.Values.metrics.scrapeAnnotations -}}
{{- $_ := set $annotations "prometheus.io/scrape" "true" -}}
{{- $_ := set $annotations "prometheus.io/port" (toString .port) -}}
{{- $_ := set $annotations "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- if $annotations -}}
annotations:
  {{- toYaml $annotations | nindent 2 }}
{{- end -}}
{{- end -}}

{{/* Pod security: non-root, the image's user, RuntimeDefault seccomp. */}}
{{- define "prime.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container security of the learner, actors and prm-server: nothing beyond running code. */}}
{{- define "prime.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Scheduling fields of a component. */}}
{{- define "prime.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* Common pod fields: pull secrets. */}}
{{- define "prime.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* A memory-backed /dev/shm of the given size. */}}
{{- define "prime.shmVolume" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ . }}
{{- end -}}

{{- define "prime.learnerName" -}}{{ include "prime.fullname" . }}-learner{{- end -}}
{{- define "prime.learnerRanksName" -}}{{ include "prime.fullname" . }}-learner-ranks{{- end -}}
{{- define "prime.verifierName" -}}{{ include "prime.fullname" . }}-verifier{{- end -}}
{{- define "prime.prmName" -}}{{ include "prime.fullname" . }}-prm-server{{- end -}}
{{- define "prime.runClaimName" -}}
{{- default (printf "%s-runs" (include "prime.fullname" .)) .Values.learner.runVolume.existingClaim -}}
{{- end -}}

{{/* Address of rank 0 through the headless Service: resolvable before rank 0 is Ready. */}}
{{- define "prime.masterAddr" -}}
{{- printf "%s-0.%s.%s.svc.%s" (include "prime.learnerName" .) (include "prime.learnerRanksName" .) .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{/* In-cluster DNS name of one of this release's Services: what TLS certificates must carry. */}}
{{- define "prime.serviceHost" -}}
{{- printf "%s.%s.svc.%s" .name .ctx.Release.Namespace .ctx.Values.clusterDomain -}}
{{- end -}}

{{/* URL of a Service's gRPC port for clients: https:// and the full DNS name with TLS. */}}
{{- define "prime.serviceUrl" -}}
{{- if .ctx.Values.tls.enabled -}}
{{- printf "https://%s:%v" (include "prime.serviceHost" .) .port -}}
{{- else -}}
{{- printf "http://%s:%v" .name .port -}}
{{- end -}}
{{- end -}}

{{/* The DNS names the TLS certificate must carry, one a line: the Services clients dial. */}}
{{- define "prime.tlsDnsNames" -}}
{{ include "prime.serviceHost" (dict "ctx" . "name" (include "prime.learnerName" .)) }}
{{ include "prime.serviceHost" (dict "ctx" . "name" (include "prime.verifierName" .)) }}
{{- if .Values.prmServer.enabled }}
{{ include "prime.serviceHost" (dict "ctx" . "name" (include "prime.prmName" .)) }}
{{- end }}
{{- end -}}

{{/* Where the TLS files are mounted in every pod that gets them. */}}
{{- define "prime.tlsDir" -}}/etc/prime-tls{{- end -}}

{{/*
TLS environment of a server container; call with (dict "ctx" $ "host" SERVICE_DNS_NAME).
PRIME_TLS_CERT/KEY (and PRIME_TLS_CLIENT_CA for mutual TLS) are the server's; PRIME_TLS_CA,
PRIME_TLS_DOMAIN (and the client certificate for mutual TLS) are read by `prime status` in the
container: the exec probes and `kubectl exec ... prime status`. The server ignores them.
*/}}
{{- define "prime.tlsServerEnv" -}}
{{- $dir := include "prime.tlsDir" .ctx -}}
- name: PRIME_TLS_CERT
  value: {{ printf "%s/tls.crt" $dir }}
- name: PRIME_TLS_KEY
  value: {{ printf "%s/tls.key" $dir }}
{{- if .ctx.Values.tls.mutual }}
- name: PRIME_TLS_CLIENT_CA
  value: {{ printf "%s/ca.crt" $dir }}
{{- end }}
- name: PRIME_TLS_CA
  value: {{ printf "%s/ca.crt" $dir }}
- name: PRIME_TLS_DOMAIN
  value: {{ .host }}
{{- if .ctx.Values.tls.mutual }}
- name: PRIME_TLS_CLIENT_CERT
  value: {{ printf "%s/tls.crt" $dir }}
- name: PRIME_TLS_CLIENT_KEY
  value: {{ printf "%s/tls.key" $dir }}
{{- end }}
{{- end -}}

{{/* TLS environment of a client container (actors): the CA, and its certificate for mutual TLS. */}}
{{- define "prime.tlsClientEnv" -}}
{{- $dir := include "prime.tlsDir" . -}}
- name: PRIME_TLS_CA
  value: {{ printf "%s/ca.crt" $dir }}
{{- if .Values.tls.mutual }}
- name: PRIME_TLS_CLIENT_CERT
  value: {{ printf "%s/tls.crt" $dir }}
- name: PRIME_TLS_CLIENT_KEY
  value: {{ printf "%s/tls.key" $dir }}
{{- end }}
{{- end -}}

{{/* Read-only mount of the TLS files. */}}
{{- define "prime.tlsMount" -}}
- name: tls
  mountPath: {{ include "prime.tlsDir" . }}
  readOnly: true
{{- end -}}

{{/*
The TLS files as a volume; call with (dict "ctx" $ "role" "server"|"client" "mode" MODE). A
server gets its certificate, key and the CA. A client gets only the CA, plus for mutual TLS
the certificate it presents: the servers' own, or tls.clientSecretName's under the same
names. Keys missing from a Secret stop the pod from starting, with the key named.
*/}}
{{- define "prime.tlsVolume" -}}
{{- $tls := .ctx.Values.tls -}}
{{- $keys := list "ca.crt" -}}
{{- if or (eq .role "server") (and $tls.mutual (not $tls.clientSecretName)) -}}
{{- $keys = list "tls.crt" "tls.key" "ca.crt" -}}
{{- end -}}
- name: tls
  projected:
    defaultMode: {{ .mode }}
    sources:
      - secret:
          name: {{ required "tls.enabled needs tls.secretName: a Secret with tls.crt, tls.key and ca.crt" $tls.secretName }}
          items:
            {{- range $keys }}
            - key: {{ . }}
              path: {{ . }}
            {{- end }}
      {{- if and (eq .role "client") $tls.mutual $tls.clientSecretName }}
      - secret:
          name: {{ $tls.clientSecretName }}
          items:
            - key: tls.crt
              path: tls.crt
            - key: tls.key
              path: tls.key
      {{- end }}
{{- end -}}

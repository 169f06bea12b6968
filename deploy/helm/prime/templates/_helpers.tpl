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

{{/* grpc.health.v1 probes; call with (dict "values" .Values.x "port" N "service" "prime.v1.X"). */}}
{{- define "prime.grpcProbes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
    service: {{ .service }}
  periodSeconds: {{ .values.startupProbe.periodSeconds }}
  failureThreshold: {{ .values.startupProbe.failureThreshold }}
readinessProbe:
  grpc:
    port: {{ .port }}
    service: {{ .service }}
  periodSeconds: {{ .values.readinessProbe.periodSeconds }}
  failureThreshold: {{ .values.readinessProbe.failureThreshold }}
livenessProbe:
  grpc:
    port: {{ .port }}
    service: {{ .service }}
  periodSeconds: {{ .values.livenessProbe.periodSeconds }}
  failureThreshold: {{ .values.livenessProbe.failureThreshold }}
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

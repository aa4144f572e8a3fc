// Package helm_test renders the relay's Helm chart with `helm template` and checks the rendered
// objects: strict decoding into the Kubernetes API types, and the invariants that long-lived SSE
// streams depend on (graceful drain, rollout shape, probes, secrets, security context).
//
// helm comes from $RELAY_HELM, else PATH, else $(go env GOPATH)/bin; scripts/helm-check.sh
// installs it when missing. Without helm the tests skip, unless RELAY_TEST_REQUIRE_SERVICES=1.
package helm_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"
)

const (
	chartDir    = "relay"
	releaseName = "relay"
	namespace   = "decnet"
	// kubeVersion is passed to helm: a helm built with `go install` defaults to v1.20, below the
	// chart's kubeVersion (>= 1.30, for the preStop sleep action).
	kubeVersion = "1.34.0"
	secretName  = "relay-secrets"
	nonRootUID  = int64(65532)
)

// ciSecretName is what every ci/*.yaml variant sets as existingSecret.name.
const ciSecretName = "relay-secrets"

// variantWants lists, per ci/*.yaml file, the optional kinds that file must switch on. Every ci
// file must appear here, so a new variant is never rendered without being looked at.
var variantWants = map[string][]string{
	"ha-values.yaml":         {"HorizontalPodAutoscaler", "PodDisruptionBudget"},
	"ingress-values.yaml":    {"Ingress"},
	"gateway-values.yaml":    {"HTTPRoute", "PodDisruptionBudget"},
	"monitoring-values.yaml": {"ServiceMonitor", "NetworkPolicy", "PodDisruptionBudget"},
}

// optionalKinds are rendered only when a value switches them on.
var optionalKinds = []string{"HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress", "HTTPRoute", "ServiceMonitor", "NetworkPolicy"}

var helmPath string

func TestMain(m *testing.M) {
	helmPath = findHelm()
	os.Exit(m.Run())
}

// findHelm returns the helm binary from $RELAY_HELM, PATH or $(go env GOPATH)/bin, or "".
func findHelm() string {
	if p := os.Getenv("RELAY_HELM"); p != "" {
		return p
	}
	if p, err := exec.LookPath("helm"); err == nil {
		return p
	}
	out, err := exec.Command("go", "env", "GOPATH").Output()
	if err != nil {
		return ""
	}
	for _, dir := range filepath.SplitList(strings.TrimSpace(string(out))) {
		p := filepath.Join(dir, "bin", "helm")
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() {
			return p
		}
	}
	return ""
}

func requireHelm(t *testing.T) string {
	t.Helper()
	if helmPath != "" {
		return helmPath
	}
	if os.Getenv("RELAY_TEST_REQUIRE_SERVICES") == "1" {
		t.Fatal("helm not found ($RELAY_HELM, PATH, $(go env GOPATH)/bin) and RELAY_TEST_REQUIRE_SERVICES=1: run `bash scripts/helm-check.sh install` before go test (it builds helm into $(go env GOPATH)/bin)")
	}
	t.Skip("helm not found ($RELAY_HELM, PATH, $(go env GOPATH)/bin): run scripts/helm-check.sh, which installs it and runs these tests")
	return ""
}

// helmTemplate runs `helm template` on the chart with extra arguments and returns stdout, or an
// error carrying stderr.
func helmTemplate(t *testing.T, args ...string) (string, error) {
	t.Helper()
	helm := requireHelm(t)
	full := append([]string{"template", releaseName, chartDir, "--namespace", namespace, "--kube-version", kubeVersion}, args...)
	cmd := exec.Command(helm, full...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("helm %s: %w\n%s", strings.Join(full, " "), err, stderr.String())
	}
	return stdout.String(), nil
}

func mustRender(t *testing.T, args ...string) *bundle {
	t.Helper()
	out, err := helmTemplate(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	return decodeManifest(t, out)
}

// bundle holds the rendered objects, decoded strictly into their API types.
type bundle struct {
	kinds           map[string]int
	deployments     []appsv1.Deployment
	services        []corev1.Service
	peerServices    []corev1.Service // headless, for RELAY_PEERS
	configMaps      []corev1.ConfigMap
	serviceAccounts []corev1.ServiceAccount
	pods            []corev1.Pod
	hpas            []autoscalingv2.HorizontalPodAutoscaler
	pdbs            []policyv1.PodDisruptionBudget
	netpols         []networkingv1.NetworkPolicy
	ingresses       []networkingv1.Ingress
	serviceMonitors []map[string]any
	httpRoutes      []map[string]any
}

var docSeparator = regexp.MustCompile(`(?m)^---[ \t]*$`)

// decodeStrict decodes one YAML document into out, failing on unknown or duplicate fields.
func decodeStrict(t *testing.T, doc string, out any) {
	t.Helper()
	if err := yaml.UnmarshalStrict([]byte(doc), out); err != nil {
		t.Fatalf("strict decode into %T: %v\n%s", out, err, doc)
	}
}

func decodeManifest(t *testing.T, manifest string) *bundle {
	t.Helper()
	b := &bundle{kinds: map[string]int{}}
	for _, doc := range docSeparator.Split(manifest, -1) {
		if strings.TrimSpace(stripComments(doc)) == "" {
			continue
		}
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
		}
		if err := yaml.Unmarshal([]byte(doc), &head); err != nil {
			t.Fatalf("not YAML: %v\n%s", err, doc)
		}
		b.kinds[head.Kind]++
		switch gvk := head.APIVersion + " " + head.Kind; gvk {
		case "apps/v1 Deployment":
			var o appsv1.Deployment
			decodeStrict(t, doc, &o)
			b.deployments = append(b.deployments, o)
		case "v1 Service":
			var o corev1.Service
			decodeStrict(t, doc, &o)
			if o.Spec.ClusterIP == corev1.ClusterIPNone { // the peers' headless Service
				b.kinds[head.Kind]--
				b.kinds["Service (headless)"]++
				b.peerServices = append(b.peerServices, o)
				break
			}
			b.services = append(b.services, o)
		case "v1 ConfigMap":
			var o corev1.ConfigMap
			decodeStrict(t, doc, &o)
			b.configMaps = append(b.configMaps, o)
		case "v1 ServiceAccount":
			var o corev1.ServiceAccount
			decodeStrict(t, doc, &o)
			b.serviceAccounts = append(b.serviceAccounts, o)
		case "v1 Pod":
			var o corev1.Pod
			decodeStrict(t, doc, &o)
			b.pods = append(b.pods, o)
		case "autoscaling/v2 HorizontalPodAutoscaler":
			var o autoscalingv2.HorizontalPodAutoscaler
			decodeStrict(t, doc, &o)
			b.hpas = append(b.hpas, o)
		case "policy/v1 PodDisruptionBudget":
			var o policyv1.PodDisruptionBudget
			decodeStrict(t, doc, &o)
			b.pdbs = append(b.pdbs, o)
		case "networking.k8s.io/v1 NetworkPolicy":
			var o networkingv1.NetworkPolicy
			decodeStrict(t, doc, &o)
			b.netpols = append(b.netpols, o)
		case "networking.k8s.io/v1 Ingress":
			var o networkingv1.Ingress
			decodeStrict(t, doc, &o)
			b.ingresses = append(b.ingresses, o)
		case "monitoring.coreos.com/v1 ServiceMonitor":
			var o map[string]any
			decodeStrict(t, doc, &o)
			b.serviceMonitors = append(b.serviceMonitors, o)
		case "gateway.networking.k8s.io/v1 HTTPRoute":
			var o map[string]any
			decodeStrict(t, doc, &o)
			b.httpRoutes = append(b.httpRoutes, o)
		default:
			// A Secret (or anything else) appearing means the chart changed shape: look at it here.
			t.Fatalf("unexpected object %q in the rendered chart:\n%s", gvk, doc)
		}
	}
	return b
}

func stripComments(doc string) string {
	var keep []string
	for _, line := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "#") {
			keep = append(keep, line)
		}
	}
	return strings.Join(keep, "\n")
}

type variant struct {
	name      string
	args      []string
	secret    string
	wantKinds []string
}

// variants returns the default values (plus the required secret) and every ci/*.yaml file.
func variants(t *testing.T) []variant {
	t.Helper()
	vs := []variant{{
		name:      "default",
		args:      []string{"--set", "existingSecret.name=" + secretName},
		secret:    secretName,
		wantKinds: []string{"PodDisruptionBudget"}, // replicaCount defaults to 2
	}}
	files, err := filepath.Glob(filepath.Join(chartDir, "ci", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no ci/*.yaml variant files: %v", err)
	}
	for _, f := range files {
		base := filepath.Base(f)
		want, ok := variantWants[base]
		if !ok {
			t.Errorf("%s has no entry in variantWants: add the kinds it must render", f)
			continue
		}
		vs = append(vs, variant{name: base, args: []string{"-f", f}, secret: ciSecretName, wantKinds: want})
	}
	for name := range variantWants {
		if !slices.ContainsFunc(files, func(f string) bool { return filepath.Base(f) == name }) {
			t.Errorf("variantWants names %s, which is not in %s/ci", name, chartDir)
		}
	}
	return vs
}

// TestVariantsRenderValidObjects guards that default values and every ci variant render objects
// that decode strictly into the Kubernetes API types and keep every invariant below.
func TestVariantsRenderValidObjects(t *testing.T) {
	requireHelm(t)
	for _, v := range variants(t) {
		t.Run(v.name, func(t *testing.T) {
			b := mustRender(t, v.args...)
			for _, kind := range []string{"Deployment", "Service", "ConfigMap", "ServiceAccount", "Pod"} {
				if b.kinds[kind] != 1 {
					t.Errorf("want exactly one %s, got %d", kind, b.kinds[kind])
				}
			}
			for _, kind := range optionalKinds {
				want := slices.Contains(v.wantKinds, kind)
				if got := b.kinds[kind]; (got == 1) != want || got > 1 {
					t.Errorf("%s: rendered %d, want present=%v", kind, got, want)
				}
			}
			if t.Failed() {
				return
			}
			checkInvariants(t, b, v.secret)
		})
	}
}

// checkInvariants runs every per-render check on a bundle with one Deployment.
func checkInvariants(t *testing.T, b *bundle, secret string) {
	t.Helper()
	d := b.deployments[0]
	pod := d.Spec.Template
	c := relayContainer(t, d)

	t.Run("graceful drain fits in the grace period", func(t *testing.T) {
		// terminationGracePeriodSeconds > preStop sleep + RELAY_SHUTDOWN_TIMEOUT, and the preStop
		// hook is the kubelet sleep action (the distroless image has no sleep binary).
		if c.Lifecycle == nil || c.Lifecycle.PreStop == nil {
			t.Fatal("no preStop hook")
		}
		pre := c.Lifecycle.PreStop
		if pre.Exec != nil || pre.HTTPGet != nil || pre.TCPSocket != nil {
			t.Errorf("preStop must use only the sleep action (distroless image): %+v", pre)
		}
		if pre.Sleep == nil || pre.Sleep.Seconds <= 0 {
			t.Fatalf("preStop.sleep.seconds missing or not positive: %+v", pre.Sleep)
		}
		raw, src := envValue(t, b, c, "RELAY_SHUTDOWN_TIMEOUT")
		if src != "configmap" {
			t.Errorf("RELAY_SHUTDOWN_TIMEOUT comes from %s, want the ConfigMap", src)
		}
		drain, err := time.ParseDuration(raw)
		if err != nil {
			t.Fatalf("RELAY_SHUTDOWN_TIMEOUT %q: %v", raw, err)
		}
		if pod.Spec.TerminationGracePeriodSeconds == nil {
			t.Fatal("terminationGracePeriodSeconds not set")
		}
		grace := time.Duration(*pod.Spec.TerminationGracePeriodSeconds) * time.Second
		need := time.Duration(pre.Sleep.Seconds)*time.Second + drain
		if grace <= need {
			t.Errorf("terminationGracePeriodSeconds %v must exceed preStop %ds + drain %v = %v", grace, pre.Sleep.Seconds, drain, need)
		}
		// The spread of the stream ends fits in the drain, or the relay refuses to start.
		raw, _ = envValue(t, b, c, "RELAY_SHUTDOWN_SPREAD")
		if spread, err := time.ParseDuration(raw); err != nil || spread >= drain {
			t.Errorf("RELAY_SHUTDOWN_SPREAD %q (%v) must be below RELAY_SHUTDOWN_TIMEOUT %v", raw, err, drain)
		}
	})

	t.Run("startup probe waits for the start-up read", func(t *testing.T) {
		// /startupz (the start-up read of Kafka done) holds the readiness probe back, and its
		// bound covers the relay's own: 10 s to learn the end offsets plus 60 s to read.
		p := c.StartupProbe
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/startupz" || !containerHasPort(c, p.HTTPGet.Port) {
			t.Fatalf("startup probe %+v, want an httpGet of /startupz on a container port", p)
		}
		if bound := p.PeriodSeconds * p.FailureThreshold; bound < 70 {
			t.Errorf("startup probe gives up after %d s, before the relay's own 70 s bound", bound)
		}
	})

	t.Run("readiness and liveness probes differ", func(t *testing.T) {
		// Readiness (/readyz: Kafka+DB, false while draining) must not be the liveness check
		// (/healthz), or an outage of Kafka or the DB restarts every replica.
		r, l := c.ReadinessProbe, c.LivenessProbe
		if r == nil || l == nil || r.HTTPGet == nil || l.HTTPGet == nil {
			t.Fatalf("readiness and liveness must both be httpGet probes: %+v / %+v", r, l)
		}
		if r.HTTPGet.Path != "/readyz" || l.HTTPGet.Path != "/healthz" {
			t.Errorf("readiness %q, liveness %q; want /readyz and /healthz", r.HTTPGet.Path, l.HTTPGet.Path)
		}
		if r.HTTPGet.Path == l.HTTPGet.Path {
			t.Errorf("readiness and liveness share the path %q", r.HTTPGet.Path)
		}
		for _, p := range []*corev1.Probe{r, l} {
			if !containerHasPort(c, p.HTTPGet.Port) {
				t.Errorf("probe port %v is not a container port", p.HTTPGet.Port.String())
			}
		}
	})

	t.Run("secrets come only from secretKeyRef", func(t *testing.T) {
		// No ConfigMap holds the JWT secret or the database URL; the container takes both from
		// the operator's Secret, never as literal values.
		secretVars := []string{"RELAY_JWT_SECRET", "RELAY_DATABASE_URL"}
		for _, cm := range b.configMaps {
			for _, k := range secretVars {
				if _, ok := cm.Data[k]; ok {
					t.Errorf("ConfigMap %s holds %s", cm.Name, k)
				}
			}
			for k, v := range cm.Data {
				if strings.Contains(strings.ToLower(v), "postgres://") || strings.Contains(strings.ToLower(v), "postgresql://") {
					t.Errorf("ConfigMap %s key %s looks like a database URL", cm.Name, k)
				}
			}
		}
		for _, k := range secretVars {
			n := 0
			for _, e := range c.Env {
				if e.Name != k {
					continue
				}
				n++
				if e.Value != "" || e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil {
					t.Errorf("%s is not taken from a secretKeyRef: %+v", k, e)
					continue
				}
				if got := e.ValueFrom.SecretKeyRef.Name; got != secret {
					t.Errorf("%s reads Secret %q, want %q", k, got, secret)
				}
				if e.ValueFrom.SecretKeyRef.Key == "" {
					t.Errorf("%s has no Secret key", k)
				}
			}
			if n != 1 {
				t.Errorf("%s set %d times in env, want once", k, n)
			}
		}
	})

	t.Run("selectors match the pod template", func(t *testing.T) {
		// The Deployment's and Service's selectors pick the relay pods, and only them (not the
		// helm-test pod).
		labels := pod.Labels
		if d.Spec.Selector == nil || len(d.Spec.Selector.MatchLabels) == 0 || len(d.Spec.Selector.MatchExpressions) != 0 {
			t.Fatalf("Deployment selector must be non-empty matchLabels: %+v", d.Spec.Selector)
		}
		if !subset(d.Spec.Selector.MatchLabels, labels) {
			t.Errorf("Deployment selector %v does not match template labels %v", d.Spec.Selector.MatchLabels, labels)
		}
		svc := b.services[0]
		if len(svc.Spec.Selector) == 0 || !subset(svc.Spec.Selector, labels) {
			t.Errorf("Service selector %v does not match template labels %v", svc.Spec.Selector, labels)
		}
		if !reflect.DeepEqual(svc.Spec.Selector, d.Spec.Selector.MatchLabels) {
			t.Errorf("Service selector %v differs from Deployment selector %v", svc.Spec.Selector, d.Spec.Selector.MatchLabels)
		}
		for _, p := range svc.Spec.Ports {
			if !containerHasPort(c, p.TargetPort) {
				t.Errorf("Service port %s targets %v, not a container port", p.Name, p.TargetPort.String())
			}
		}
		for _, p := range b.pods {
			if subset(svc.Spec.Selector, p.Labels) {
				t.Errorf("Service selector also matches pod %s", p.Name)
			}
		}
		if got := envOrFail(t, b, c, "RELAY_LISTEN_ADDR"); !strings.HasSuffix(got, fmt.Sprintf(":%d", c.Ports[0].ContainerPort)) {
			t.Errorf("RELAY_LISTEN_ADDR %q does not listen on container port %d", got, c.Ports[0].ContainerPort)
		}
	})

	t.Run("PDB iff more than one replica", func(t *testing.T) {
		// A PDB on a single replica blocks node drains; with several it keeps viewers served.
		replicas := effectiveMinReplicas(b)
		if (len(b.pdbs) == 1) != (replicas > 1) {
			t.Fatalf("%d PDB(s) with %d replica(s)", len(b.pdbs), replicas)
		}
		for _, p := range b.pdbs {
			if p.Spec.Selector == nil || !reflect.DeepEqual(p.Spec.Selector.MatchLabels, d.Spec.Selector.MatchLabels) {
				t.Errorf("PDB selector %+v differs from the Deployment's", p.Spec.Selector)
			}
			if p.Spec.MaxUnavailable == nil && p.Spec.MinAvailable == nil {
				t.Error("PDB sets neither maxUnavailable nor minAvailable")
			}
		}
	})

	t.Run("rollout keeps capacity", func(t *testing.T) {
		// A surge, maxUnavailable 0 and a minReadySeconds: a rollout never drops capacity. The
		// progress deadline covers a healthy step: the startup probe's and the readiness probe's
		// bounds plus minReadySeconds.
		s := d.Spec.Strategy
		if s.Type != appsv1.RollingUpdateDeploymentStrategyType || s.RollingUpdate == nil {
			t.Fatalf("strategy %+v, want RollingUpdate", s)
		}
		if s.RollingUpdate.MaxSurge == nil || intOrString(s.RollingUpdate.MaxSurge, 0) || !intOrString(s.RollingUpdate.MaxUnavailable, 0) {
			t.Errorf("maxSurge %v / maxUnavailable %v, want a surge / 0", s.RollingUpdate.MaxSurge, s.RollingUpdate.MaxUnavailable)
		}
		if d.Spec.MinReadySeconds <= 0 {
			t.Errorf("minReadySeconds %d, want > 0", d.Spec.MinReadySeconds)
		}
		if st, r := c.StartupProbe, c.ReadinessProbe; st != nil && r != nil {
			step := st.PeriodSeconds*st.FailureThreshold + r.PeriodSeconds*r.FailureThreshold + d.Spec.MinReadySeconds
			if d.Spec.ProgressDeadlineSeconds == nil || *d.Spec.ProgressDeadlineSeconds < step {
				t.Errorf("progressDeadlineSeconds %v, want at least the %d s a healthy step may take", d.Spec.ProgressDeadlineSeconds, step)
			}
		}
		if _, ok := pod.Annotations["checksum/config"]; !ok {
			t.Error("pod template has no checksum/config annotation")
		}
	})

	t.Run("restricted security context", func(t *testing.T) {
		// Relay and helm-test containers meet the "restricted" Pod Security Standard as the chart
		// promises: non-root 65532, read-only root, no escalation, no capabilities, RuntimeDefault.
		checkRestricted(t, "deployment/"+d.Name, pod.Spec)
		for _, p := range b.pods {
			checkRestricted(t, "pod/"+p.Name, p.Spec)
		}
		if pod.Spec.AutomountServiceAccountToken == nil || *pod.Spec.AutomountServiceAccountToken {
			t.Error("relay pods mount a service account token they never use")
		}
		if pod.Spec.EnableServiceLinks == nil || *pod.Spec.EnableServiceLinks {
			t.Error("enableServiceLinks must be false: a Service named relay injects RELAY_* variables")
		}
		if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
			t.Errorf("resources need cpu+memory requests and a memory limit: %+v", c.Resources)
		}
	})

	t.Run("HPA targets the Deployment", func(t *testing.T) {
		// autoscaling/v2 on CPU, scaling this Deployment, which then leaves spec.replicas to it.
		if len(b.hpas) == 0 {
			if d.Spec.Replicas == nil {
				t.Error("no HPA, yet the Deployment leaves spec.replicas unset")
			}
			return
		}
		h := b.hpas[0]
		if h.Spec.ScaleTargetRef.Kind != "Deployment" || h.Spec.ScaleTargetRef.Name != d.Name || h.Spec.ScaleTargetRef.APIVersion != "apps/v1" {
			t.Errorf("HPA targets %+v, want apps/v1 Deployment %s", h.Spec.ScaleTargetRef, d.Name)
		}
		if d.Spec.Replicas != nil {
			t.Error("with an HPA the Deployment must not set spec.replicas (upgrades would reset the scale)")
		}
		if h.Spec.MinReplicas == nil || *h.Spec.MinReplicas > h.Spec.MaxReplicas {
			t.Errorf("HPA min %v > max %d", h.Spec.MinReplicas, h.Spec.MaxReplicas)
		}
		cpu := slices.ContainsFunc(h.Spec.Metrics, func(m autoscalingv2.MetricSpec) bool {
			return m.Type == autoscalingv2.ResourceMetricSourceType && m.Resource != nil && m.Resource.Name == corev1.ResourceCPU &&
				m.Resource.Target.Type == autoscalingv2.UtilizationMetricType && m.Resource.Target.AverageUtilization != nil
		})
		if !cpu {
			t.Error("HPA has no CPU utilization metric")
		}
		for _, m := range h.Spec.Metrics {
			if m.Type == autoscalingv2.PodsMetricSourceType && (m.Pods == nil || m.Pods.Metric.Name != "relay_viewers_connected") {
				t.Errorf("Pods metric %+v, want relay_viewers_connected", m.Pods)
			}
		}
	})

	t.Run("Ingress streams SSE", func(t *testing.T) {
		// ingress-nginx must not buffer the stream nor cut idle streams at its 60s default, and
		// only the SSE path is exposed (not /metrics).
		svc := b.services[0]
		for _, ing := range b.ingresses {
			a := ing.Annotations
			if a["nginx.ingress.kubernetes.io/proxy-buffering"] != "off" {
				t.Errorf("proxy-buffering = %q, want off", a["nginx.ingress.kubernetes.io/proxy-buffering"])
			}
			for _, k := range []string{"proxy-read-timeout", "proxy-send-timeout"} {
				if secs := atoiOrZero(a["nginx.ingress.kubernetes.io/"+k]); secs < 3600 {
					t.Errorf("%s = %q, want >= 3600", k, a["nginx.ingress.kubernetes.io/"+k])
				}
			}
			// A 503 from a draining or full pod is retried on another pod, not passed to the
			// browser (EventSource gives up on it).
			if next := strings.Fields(a["nginx.ingress.kubernetes.io/proxy-next-upstream"]); !slices.Contains(next, "http_503") || !slices.Contains(next, "error") {
				t.Errorf("proxy-next-upstream = %q, want error and http_503 among its cases", a["nginx.ingress.kubernetes.io/proxy-next-upstream"])
			}
			if tries := atoiOrZero(a["nginx.ingress.kubernetes.io/proxy-next-upstream-tries"]); tries < 2 {
				t.Errorf("proxy-next-upstream-tries = %q, want at least 2", a["nginx.ingress.kubernetes.io/proxy-next-upstream-tries"])
			}
			for _, r := range ing.Spec.Rules {
				for _, p := range r.HTTP.Paths {
					if !strings.HasPrefix(p.Path, "/api/") {
						t.Errorf("Ingress exposes %q beyond the API", p.Path)
					}
					be := p.Backend.Service
					if be == nil || be.Name != svc.Name || (be.Port.Name != "http" && be.Port.Number != svc.Spec.Ports[0].Port) {
						t.Errorf("Ingress backend %+v does not point at Service %s", be, svc.Name)
					}
				}
			}
		}
	})

	t.Run("HTTPRoute streams SSE", func(t *testing.T) {
		// The Gateway API route points at the Service and sets timeouts long enough for streams
		// (at least an hour, or 0s = none), above the relay's own stream lifetime.
		svc := b.services[0]
		for _, r := range b.httpRoutes {
			rules := dig[[]any](t, r, "spec", "rules")
			if len(rules) == 0 || len(dig[[]any](t, r, "spec", "parentRefs")) == 0 {
				t.Fatalf("HTTPRoute needs parentRefs and rules: %v", r)
			}
			for _, rule := range rules {
				rule := rule.(map[string]any)
				for _, ref := range dig[[]any](t, rule, "backendRefs") {
					ref := ref.(map[string]any)
					if ref["name"] != svc.Name || toInt(ref["port"]) != int(svc.Spec.Ports[0].Port) {
						t.Errorf("backendRef %v, want %s:%d", ref, svc.Name, svc.Spec.Ports[0].Port)
					}
				}
				lifetime, _ := time.ParseDuration(envOrFail(t, b, c, "RELAY_SSE_MAX_LIFETIME"))
				for _, k := range []string{"request", "backendRequest"} {
					raw := dig[string](t, rule, "timeouts", k)
					dur, err := time.ParseDuration(raw)
					if err != nil || (dur != 0 && dur < time.Hour) {
						t.Errorf("timeouts.%s = %q, want >= 1h or 0s (%v)", k, raw, err)
					}
					// The relay ends a stream cleanly at its lifetime, before the gateway cuts it.
					if dur != 0 && lifetime >= dur {
						t.Errorf("timeouts.%s = %q does not exceed RELAY_SSE_MAX_LIFETIME %v", k, raw, lifetime)
					}
				}
			}
		}
	})

	t.Run("ServiceMonitor scrapes /metrics", func(t *testing.T) {
		// The ServiceMonitor selects the relay Service and scrapes its named port at /metrics.
		svc := b.services[0]
		for _, sm := range b.serviceMonitors {
			sel := dig[map[string]any](t, sm, "spec", "selector", "matchLabels")
			if len(sel) == 0 || !subset(toStringMap(sel), svc.Labels) {
				t.Errorf("ServiceMonitor selector %v does not match Service labels %v", sel, svc.Labels)
			}
			eps := dig[[]any](t, sm, "spec", "endpoints")
			if len(eps) == 0 {
				t.Fatal("ServiceMonitor has no endpoints")
			}
			ep := eps[0].(map[string]any)
			if ep["port"] != svc.Spec.Ports[0].Name || ep["path"] != "/metrics" {
				t.Errorf("endpoint %v, want port %s path /metrics", ep, svc.Spec.Ports[0].Name)
			}
		}
	})

	t.Run("NetworkPolicy selects the relay", func(t *testing.T) {
		// The policy applies to the relay pods and still admits traffic on the HTTP port.
		for _, np := range b.netpols {
			if !reflect.DeepEqual(np.Spec.PodSelector.MatchLabels, d.Spec.Selector.MatchLabels) {
				t.Errorf("NetworkPolicy podSelector %v, want %v", np.Spec.PodSelector.MatchLabels, d.Spec.Selector.MatchLabels)
			}
			if len(np.Spec.Ingress) == 0 {
				t.Fatal("NetworkPolicy admits nothing")
			}
			for _, rule := range np.Spec.Ingress {
				for _, p := range rule.Ports {
					if p.Port == nil || !containerHasPort(c, *p.Port) {
						t.Errorf("NetworkPolicy port %v is not a container port", p.Port)
					}
				}
			}
		}
	})

	t.Run("peers are the ready relay pods", func(t *testing.T) {
		// With RELAY_PEERS, it names the headless Service of the relay's ready pods on the
		// container port, and a NetworkPolicy lets the pods reach each other there.
		peers, src := envValue(t, b, c, "RELAY_PEERS")
		if peers == "" {
			if len(b.peerServices) != 0 {
				t.Errorf("a headless Service without RELAY_PEERS")
			}
			return
		}
		if len(b.peerServices) != 1 || src != "configmap" {
			t.Fatalf("RELAY_PEERS %q from %s with %d headless Services, want one", peers, src, len(b.peerServices))
		}
		ps := b.peerServices[0]
		if ps.Spec.PublishNotReadyAddresses || !reflect.DeepEqual(ps.Spec.Selector, d.Spec.Selector.MatchLabels) {
			t.Errorf("peers Service selects %v (publishNotReadyAddresses %v), want the Deployment's pods, ready only", ps.Spec.Selector, ps.Spec.PublishNotReadyAddresses)
		}
		if want := fmt.Sprintf("%s.%s.svc:%d", ps.Name, namespace, c.Ports[0].ContainerPort); peers != want {
			t.Errorf("RELAY_PEERS %q, want %q", peers, want)
		}
		if len(ps.Spec.Ports) != 1 || !containerHasPort(c, ps.Spec.Ports[0].TargetPort) || ps.Spec.Ports[0].Port != c.Ports[0].ContainerPort {
			t.Errorf("peers Service ports %v, want the container's HTTP port", ps.Spec.Ports)
		}
		self := d.Spec.Selector.MatchLabels
		for _, np := range b.netpols {
			admits := false
			for _, rule := range np.Spec.Ingress {
				fromPeers := len(rule.From) == 0
				for _, f := range rule.From {
					fromPeers = fromPeers || (f.PodSelector != nil && f.NamespaceSelector == nil && reflect.DeepEqual(f.PodSelector.MatchLabels, self))
				}
				admits = admits || fromPeers
			}
			if !admits {
				t.Errorf("NetworkPolicy %s does not admit the relay's own pods", np.Name)
			}
			if !slices.Contains(np.Spec.PolicyTypes, networkingv1.PolicyTypeEgress) {
				continue
			}
			reaches := false
			for _, rule := range np.Spec.Egress {
				for _, to := range rule.To {
					if to.PodSelector != nil && reflect.DeepEqual(to.PodSelector.MatchLabels, self) && len(rule.Ports) == 1 &&
						intOrString(rule.Ports[0].Port, int(c.Ports[0].ContainerPort)) {
						reaches = true
					}
				}
			}
			if !reaches {
				t.Errorf("NetworkPolicy %s's egress does not reach the other relay pods on %d", np.Name, c.Ports[0].ContainerPort)
			}
		}
	})

	t.Run("helm test goes through the Service", func(t *testing.T) {
		// The hook pod, of the relay's image, runs `relay check-stream` against the Service:
		// the stream as tests.streamUser (TestHelmTestReadsTheStream), or without one /readyz,
		// needing no secret.
		if len(b.pods) != 1 {
			t.Fatalf("%d test pods", len(b.pods))
		}
		p := b.pods[0]
		if p.Annotations["helm.sh/hook"] != "test" {
			t.Errorf("pod %s is not a helm test hook", p.Name)
		}
		// A pod deleted on success leaves `helm test --logs` nothing to print (and it fails).
		if dp := p.Annotations["helm.sh/hook-delete-policy"]; dp != "before-hook-creation" {
			t.Errorf("test pod's hook-delete-policy %q, want before-hook-creation only", dp)
		}
		c := p.Spec.Containers[0]
		if want := relayContainer(t, b.deployments[0]).Image; c.Image != want {
			t.Errorf("test image %q, want the relay's %q", c.Image, want)
		}
		got := strings.Join(append(c.Command, c.Args...), " ")
		base := fmt.Sprintf("check-stream --timeout 20s --url http://%s:%d/", b.services[0].Name, b.services[0].Spec.Ports[0].Port)
		if !strings.Contains(got, " --user ") {
			if got != base+"readyz" || len(c.Env) != 0 || len(c.EnvFrom) != 0 {
				t.Errorf("test pod without a stream user runs %q with env %v / %v, want %q and no env", got, c.Env, c.EnvFrom, base+"readyz")
			}
		} else if !strings.HasPrefix(got, base+"api/v1/identities/events ") {
			t.Errorf("test command %q, want the stream through the Service", got)
		}
	})
}

// With tests.streamUser the helm test opens the stream through the Service as that user, with
// the relay's JWT secret from the release's Secret and its issuer/audience from the ConfigMap.
func TestHelmTestReadsTheStream(t *testing.T) {
	b := mustRender(t, "--set", "existingSecret.name="+secretName, "--set", "existingSecret.jwtSecretKey=jwt",
		"--set", "tests.streamUser=2f0c6e1a-user", "--set", "config.jwtIssuer=decnet", "--set", "config.jwtAudience=relay")
	if len(b.pods) != 1 {
		t.Fatalf("%d test pods", len(b.pods))
	}
	c := b.pods[0].Spec.Containers[0]
	want := fmt.Sprintf("check-stream --timeout 20s --url http://%s:%d/api/v1/identities/events --user 2f0c6e1a-user",
		b.services[0].Name, b.services[0].Spec.Ports[0].Port)
	if got := strings.Join(append(c.Command, c.Args...), " "); got != want {
		t.Errorf("test command %q, want %q", got, want)
	}
	if len(c.Env) != 1 || c.Env[0].Name != "RELAY_JWT_SECRET" || c.Env[0].ValueFrom == nil || c.Env[0].ValueFrom.SecretKeyRef == nil ||
		c.Env[0].ValueFrom.SecretKeyRef.Name != secretName || c.Env[0].ValueFrom.SecretKeyRef.Key != "jwt" {
		t.Errorf("test pod env %+v, want RELAY_JWT_SECRET from %s/jwt", c.Env, secretName)
	}
	for name, want := range map[string]string{"RELAY_JWT_ISSUER": "decnet", "RELAY_JWT_AUDIENCE": "relay"} {
		if got, src := envValue(t, b, c, name); got != want || src != "configmap" {
			t.Errorf("test pod %s = %q from %q, want %q from the ConfigMap", name, got, src, want)
		}
	}
	checkInvariants(t, b, secretName)
}

func relayContainer(t *testing.T, d appsv1.Deployment) corev1.Container {
	t.Helper()
	cs := d.Spec.Template.Spec.Containers
	if len(cs) != 1 {
		t.Fatalf("want one container in %s, got %d", d.Name, len(cs))
	}
	return cs[0]
}

// envValue resolves a container variable from env (literal, secret) or envFrom ConfigMaps of the
// bundle, and says where it came from.
func envValue(t *testing.T, b *bundle, c corev1.Container, name string) (value, source string) {
	t.Helper()
	for _, e := range c.Env {
		if e.Name == name {
			switch {
			case e.ValueFrom == nil:
				return e.Value, "literal"
			case e.ValueFrom.SecretKeyRef != nil:
				return "", "secret"
			case e.ValueFrom.ConfigMapKeyRef != nil:
				return configMapData(t, b, e.ValueFrom.ConfigMapKeyRef.Name)[e.ValueFrom.ConfigMapKeyRef.Key], "configmap"
			default:
				return "", "other"
			}
		}
	}
	for _, ef := range c.EnvFrom {
		if ef.ConfigMapRef != nil {
			if v, ok := configMapData(t, b, ef.ConfigMapRef.Name)[name]; ok {
				return v, "configmap"
			}
		}
	}
	return "", ""
}

func envOrFail(t *testing.T, b *bundle, c corev1.Container, name string) string {
	t.Helper()
	v, src := envValue(t, b, c, name)
	if src == "" {
		t.Fatalf("%s is not set in the container", name)
	}
	return v
}

func configMapData(t *testing.T, b *bundle, name string) map[string]string {
	t.Helper()
	for _, cm := range b.configMaps {
		if cm.Name == name {
			return cm.Data
		}
	}
	t.Fatalf("container refers to ConfigMap %q, which the chart does not render", name)
	return nil
}

func containerHasPort(c corev1.Container, p intstr.IntOrString) bool {
	for _, cp := range c.Ports {
		if (p.Type == intstr.String && p.StrVal == cp.Name) || (p.Type == intstr.Int && p.IntVal == cp.ContainerPort) {
			return true
		}
	}
	return false
}

func effectiveMinReplicas(b *bundle) int32 {
	if len(b.hpas) > 0 && b.hpas[0].Spec.MinReplicas != nil {
		return *b.hpas[0].Spec.MinReplicas
	}
	if r := b.deployments[0].Spec.Replicas; r != nil {
		return *r
	}
	return 1 // the API server's default
}

func intOrString(v *intstr.IntOrString, want int) bool {
	return v != nil && v.Type == intstr.Int && int(v.IntVal) == want
}

func checkRestricted(t *testing.T, what string, spec corev1.PodSpec) {
	t.Helper()
	psc := spec.SecurityContext
	if psc == nil {
		psc = &corev1.PodSecurityContext{}
	}
	for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
		sc := c.SecurityContext
		if sc == nil {
			t.Errorf("%s/%s: no container securityContext", what, c.Name)
			continue
		}
		nonRoot := firstBool(sc.RunAsNonRoot, psc.RunAsNonRoot)
		uid := sc.RunAsUser
		if uid == nil {
			uid = psc.RunAsUser
		}
		seccomp := sc.SeccompProfile
		if seccomp == nil {
			seccomp = psc.SeccompProfile
		}
		switch {
		case nonRoot == nil || !*nonRoot:
			t.Errorf("%s/%s: runAsNonRoot not true", what, c.Name)
		case uid == nil:
			t.Errorf("%s/%s: runAsUser unset, want %d", what, c.Name, nonRootUID)
		case *uid != nonRootUID:
			t.Errorf("%s/%s: runAsUser %d, want %d", what, c.Name, *uid, nonRootUID)
		case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
			t.Errorf("%s/%s: readOnlyRootFilesystem not true", what, c.Name)
		case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
			t.Errorf("%s/%s: allowPrivilegeEscalation not false", what, c.Name)
		case sc.Privileged != nil && *sc.Privileged:
			t.Errorf("%s/%s: privileged", what, c.Name)
		case sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") || len(sc.Capabilities.Add) > 0:
			t.Errorf("%s/%s: capabilities %+v, want drop [ALL] and no add", what, c.Name, sc.Capabilities)
		case seccomp == nil || seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault:
			t.Errorf("%s/%s: seccompProfile %+v, want RuntimeDefault", what, c.Name, seccomp)
		}
	}
}

func firstBool(vs ...*bool) *bool {
	for _, v := range vs {
		if v != nil {
			return v
		}
	}
	return nil
}

func subset(sub, super map[string]string) bool {
	for k, v := range sub {
		if super[k] != v {
			return false
		}
	}
	return true
}

func toStringMap(m map[string]any) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = fmt.Sprint(v)
	}
	return out
}

func toInt(v any) int {
	switch n := v.(type) {
	case float64:
		return int(n)
	case int64:
		return int(n)
	case int:
		return n
	}
	return -1
}

func atoiOrZero(s string) int {
	n := 0
	for _, r := range s {
		if r < '0' || r > '9' {
			return 0
		}
		n = n*10 + int(r-'0')
	}
	return n
}

// dig walks nested maps of an unstructured object and returns the value at path as T.
func dig[T any](t *testing.T, m map[string]any, path ...string) T {
	t.Helper()
	var cur any = m
	for _, k := range path {
		mm, ok := cur.(map[string]any)
		if !ok {
			t.Fatalf("%s: not an object at %q", strings.Join(path, "."), k)
		}
		cur = mm[k]
	}
	v, ok := cur.(T)
	if !ok {
		var zero T
		t.Fatalf("%s: got %T, want %T", strings.Join(path, "."), cur, zero)
	}
	return v
}

// TestPDBFollowsReplicaCount guards that a PodDisruptionBudget exists exactly when the release
// runs more than one replica, counting autoscaling.minReplicas when the HPA is on.
func TestPDBFollowsReplicaCount(t *testing.T) {
	requireHelm(t)
	cases := []struct {
		name    string
		set     []string
		wantPDB bool
	}{
		{"one replica", []string{"replicaCount=1"}, false},
		{"two replicas", []string{"replicaCount=2"}, true},
		{"HPA from one", []string{"replicaCount=3", "autoscaling.enabled=true", "autoscaling.minReplicas=1"}, false},
		{"HPA from two", []string{"replicaCount=1", "autoscaling.enabled=true", "autoscaling.minReplicas=2"}, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args := []string{"--set", "existingSecret.name=" + secretName}
			for _, s := range tc.set {
				args = append(args, "--set", s)
			}
			b := mustRender(t, args...)
			if got := len(b.pdbs) == 1; got != tc.wantPDB {
				t.Errorf("PDB rendered = %v, want %v", got, tc.wantPDB)
			}
			checkInvariants(t, b, secretName)
		})
	}
}

// TestChecksumFollowsConfig guards that the pod template's checksum/config annotation changes
// when (and only when) a ConfigMap setting changes, so config edits roll the pods.
func TestChecksumFollowsConfig(t *testing.T) {
	requireHelm(t)
	base := []string{"--set", "existingSecret.name=" + secretName}
	checksum := func(t *testing.T, extra ...string) string {
		t.Helper()
		b := mustRender(t, append(slices.Clone(base), extra...)...)
		sum := b.deployments[0].Spec.Template.Annotations["checksum/config"]
		if !regexp.MustCompile(`^[0-9a-f]{64}$`).MatchString(sum) {
			t.Fatalf("checksum/config %q is not a sha256", sum)
		}
		return sum
	}
	ref := checksum(t)
	cases := []struct {
		name    string
		set     string
		changes bool
	}{
		{"same values", "", false},
		{"non-config value", "image.tag=9.9.9", false},
		{"log level", "config.logLevel=debug", true},
		{"brokers", "config.kafkaBrokers=other:9092", true},
		{"drain timeout", "shutdown.drainTimeoutSeconds=40", true},
		{"shutdown spread", "shutdown.spreadSeconds=5", true},
		{"stream lifetime", "config.sseMaxLifetime=10m", true},
		{"rollout surge", "rollout.maxSurge=1", false},
		{"audience added", "config.jwtAudience=web", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var extra []string
			if tc.set != "" {
				extra = []string{"--set", tc.set}
			}
			if got := checksum(t, extra...) != ref; got != tc.changes {
				t.Errorf("checksum changed = %v, want %v", got, tc.changes)
			}
		})
	}
}

// TestBadValuesAreRejected guards that values.schema.json rejects unknown keys and wrong types
// (typos fail instead of being ignored) and that the templates refuse unsafe or incomplete values
// with a message naming the fix.
func TestBadValuesAreRejected(t *testing.T) {
	requireHelm(t)
	dir := t.TempDir()
	typoFile := filepath.Join(dir, "typo.yaml")
	if err := os.WriteFile(typoFile, []byte("existingSecret:\n  name: s\nreplicas: 3\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	nestedTypoFile := filepath.Join(dir, "nested.yaml")
	if err := os.WriteFile(nestedTypoFile, []byte("existingSecret:\n  name: s\ningress:\n  enabled: true\n  hosts:\n    - host: a\n      paths:\n        - path: /api\n          pathType: Prefix\n          servicePort: 80\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	withSecret := []string{"--set", "existingSecret.name=" + secretName}
	cases := []struct {
		name string
		args []string
		want string // substring of helm's error output
	}{
		{"missing existingSecret", nil, "existingSecret.name is required"},
		{"empty existingSecret", []string{"--set", "existingSecret.name="}, "existingSecret.name is required"},
		{"empty secret key", append(slices.Clone(withSecret), "--set", "existingSecret.jwtSecretKey="), "existingSecret.jwtSecretKey is required"},
		{"unknown top-level key in a values file", []string{"-f", typoFile}, "additional properties 'replicas' not allowed"},
		{"unknown key deep in a list", []string{"-f", nestedTypoFile}, "additional properties 'servicePort' not allowed"},
		{"unknown key via --set", append(slices.Clone(withSecret), "--set", "config.logLevell=debug"), "additional properties 'logLevell' not allowed"},
		{"plain secret value", append(slices.Clone(withSecret), "--set", "config.jwtSecret=abc"), "additional properties 'jwtSecret' not allowed"},
		{"wrong type", append(slices.Clone(withSecret), "--set-string", "replicaCount=three"), "replicaCount"},
		{"bad enum", append(slices.Clone(withSecret), "--set", "config.logFormat=xml"), "logFormat"},
		{"bad user timeout", append(slices.Clone(withSecret), "--set", "config.sseUserTimeout=soon"), "sseUserTimeout"},
		{"trusted proxies as a string", append(slices.Clone(withSecret), "--set", "config.trustedProxies=10.0.0.0/8"), "trustedProxies"},
		{"grace period too short", append(slices.Clone(withSecret), "--set", "shutdown.terminationGracePeriodSeconds=35"), "must be greater than shutdown.preStopSleepSeconds + shutdown.drainTimeoutSeconds"},
		{"HPA max below min", append(slices.Clone(withSecret), "--set", "autoscaling.enabled=true", "--set", "autoscaling.minReplicas=5", "--set", "autoscaling.maxReplicas=2"), "autoscaling.maxReplicas (2) must be >= autoscaling.minReplicas (5)"},
		{"HTTPRoute without gateway", append(slices.Clone(withSecret), "--set", "httpRoute.enabled=true"), "httpRoute.parentRefs needs at least one Gateway"},
		{"spread not below the drain", append(slices.Clone(withSecret), "--set", "shutdown.spreadSeconds=25"), "shutdown.spreadSeconds (25) must be below shutdown.drainTimeoutSeconds (25)"},
		{"jitter above 1", append(slices.Clone(withSecret), "--set", "config.sseLifetimeJitter=1.5"), "sseLifetimeJitter"},
		{"bad lifetime", append(slices.Clone(withSecret), "--set", "config.sseMaxLifetime=soon"), "sseMaxLifetime"},
		{"rebalance interval within a rollout's overlap", append(slices.Clone(withSecret), "--set", "rebalance.intervalSeconds=20"), "rebalance.intervalSeconds (20) must be above minReadySeconds + shutdown.preStopSleepSeconds (20)"},
		{"rebalance tolerance above 1", append(slices.Clone(withSecret), "--set", "rebalance.tolerance=2"), "tolerance"},
		{"rebalance interval of 0", append(slices.Clone(withSecret), "--set", "rebalance.intervalSeconds=0"), "intervalSeconds"},
		{"surge of 0", append(slices.Clone(withSecret), "--set", "rollout.maxSurge=0"), "maxSurge"},
		{"surge not a percentage", append(slices.Clone(withSecret), "--set", "rollout.maxSurge=all"), "maxSurge"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := helmTemplate(t, tc.args...)
			if err == nil {
				t.Fatalf("helm template accepted the values; want an error mentioning %q", tc.want)
			}
			var exitErr *exec.ExitError
			if !errors.As(err, &exitErr) {
				t.Fatalf("helm did not run: %v", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error does not mention %q:\n%v", tc.want, err)
			}
		})
	}
}

// TestExplicitGracePeriod guards that an explicit terminationGracePeriodSeconds above the drain is
// used as given, and that the derived one grows with the drain timeout.
func TestExplicitGracePeriod(t *testing.T) {
	requireHelm(t)
	cases := []struct {
		name string
		set  []string
		want int64
	}{
		{"derived default", nil, 10 + 25 + 5},
		{"derived longer drain", []string{"shutdown.drainTimeoutSeconds=50"}, 10 + 50 + 5},
		{"explicit", []string{"shutdown.terminationGracePeriodSeconds=36"}, 36},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args := []string{"--set", "existingSecret.name=" + secretName}
			for _, s := range tc.set {
				args = append(args, "--set", s)
			}
			b := mustRender(t, args...)
			got := b.deployments[0].Spec.Template.Spec.TerminationGracePeriodSeconds
			if got == nil || *got != tc.want {
				t.Errorf("terminationGracePeriodSeconds = %v, want %d", got, tc.want)
			}
			checkInvariants(t, b, secretName)
		})
	}
}

// TestGoMaxProcs guards that goMaxProcs reaches the container as GOMAXPROCS, and that by default
// the variable is not set (Go's own default applies).
func TestGoMaxProcs(t *testing.T) {
	requireHelm(t)
	for _, tc := range []struct{ set, want string }{{"", ""}, {"goMaxProcs=1", "1"}} {
		args := []string{"--set", "existingSecret.name=" + secretName}
		if tc.set != "" {
			args = append(args, "--set", tc.set)
		}
		b := mustRender(t, args...)
		c := relayContainer(t, b.deployments[0])
		if got, _ := envValue(t, b, c, "GOMAXPROCS"); got != tc.want {
			t.Errorf("--set %q: GOMAXPROCS %q, want %q", tc.set, got, tc.want)
		}
		checkInvariants(t, b, secretName)
	}
}

// TestConnectionSettings guards that the user timeout and the trusted proxies reach the
// ConfigMap, and that by default no proxy is trusted (the variable is not set).
func TestConnectionSettings(t *testing.T) {
	requireHelm(t)
	for _, tc := range []struct {
		set              []string
		timeout, proxies string
	}{
		{nil, "30s", ""},
		{[]string{"--set-string", "config.sseUserTimeout=0", "--set", "config.trustedProxies={10.244.0.0/16,192.168.1.1}"}, "0", "10.244.0.0/16,192.168.1.1"},
	} {
		b := mustRender(t, append([]string{"--set", "existingSecret.name=" + secretName}, tc.set...)...)
		c := relayContainer(t, b.deployments[0])
		if got, _ := envValue(t, b, c, "RELAY_SSE_USER_TIMEOUT"); got != tc.timeout {
			t.Errorf("%q: RELAY_SSE_USER_TIMEOUT %q, want %q", tc.set, got, tc.timeout)
		}
		if got, _ := envValue(t, b, c, "RELAY_TRUSTED_PROXIES"); got != tc.proxies {
			t.Errorf("%q: RELAY_TRUSTED_PROXIES %q, want %q", tc.set, got, tc.proxies)
		}
		checkInvariants(t, b, secretName)
	}
}

// TestRolloutAndStreamLifetime guards the chart's defaults for a rollout that moves each viewer
// once (surge 100%, preStop 10 s, streams ended over 10 s, the derived progress deadline) and for
// the stream lifetime (30m, jitter 0.2), and that each can be changed.
func TestRolloutAndStreamLifetime(t *testing.T) {
	requireHelm(t)
	for _, tc := range []struct {
		name                     string
		set                      []string
		surge                    intstr.IntOrString
		deadline, preStop        int64
		spread, lifetime, jitter string
	}{
		{"defaults", nil, intstr.FromString("100%"), 60 + 90 + 10 + 10, 10, "10s", "30m", "0.2"},
		{"surge of one, explicit deadline", []string{"rollout.maxSurge=1", "rollout.progressDeadlineSeconds=600"}, intstr.FromInt32(1), 600, 10, "10s", "30m", "0.2"},
		{"shorter startup bound", []string{"probes.startup.failureThreshold=75", "minReadySeconds=5"}, intstr.FromString("100%"), 60 + 75 + 10 + 5, 10, "10s", "30m", "0.2"},
		{"no spread, no lifetime", []string{"shutdown.spreadSeconds=0", "shutdown.preStopSleepSeconds=5", "config.sseMaxLifetime=0s", "config.sseLifetimeJitter=0"}, intstr.FromString("100%"), 170, 5, "0s", "0s", "0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := []string{"--set", "existingSecret.name=" + secretName}
			for _, s := range tc.set {
				args = append(args, "--set", s)
			}
			b := mustRender(t, args...)
			d := b.deployments[0]
			c := relayContainer(t, d)
			if got := d.Spec.Strategy.RollingUpdate.MaxSurge; got == nil || *got != tc.surge {
				t.Errorf("maxSurge %v, want %v", got, tc.surge.String())
			}
			if got := d.Spec.ProgressDeadlineSeconds; got == nil || int64(*got) != tc.deadline {
				t.Errorf("progressDeadlineSeconds %v, want %d", got, tc.deadline)
			}
			if got := c.Lifecycle.PreStop.Sleep.Seconds; got != tc.preStop {
				t.Errorf("preStop sleep %d s, want %d", got, tc.preStop)
			}
			for name, want := range map[string]string{
				"RELAY_SHUTDOWN_SPREAD": tc.spread, "RELAY_SSE_MAX_LIFETIME": tc.lifetime, "RELAY_SSE_LIFETIME_JITTER": tc.jitter,
			} {
				if got, src := envValue(t, b, c, name); got != want || src != "configmap" {
					t.Errorf("%s = %q from %s, want %q from the ConfigMap", name, got, src, want)
				}
			}
			checkInvariants(t, b, secretName)
		})
	}
}

// TestRebalanceFollowsReplicas guards when the chart turns rebalancing on: by default whenever
// more than one replica can run (replicaCount > 1 or the HPA), never for one replica or when
// switched off, with the interval and tolerance from values; and that a NetworkPolicy with
// restricted ingress and egress then lets the pods reach each other (checkInvariants).
func TestRebalanceFollowsReplicas(t *testing.T) {
	requireHelm(t)
	netpol := []string{"networkPolicy.enabled=true", "networkPolicy.ingressFrom[0].namespaceSelector.matchLabels.name=ingress", "networkPolicy.egress.enabled=true"}
	for _, tc := range []struct {
		name                string
		set                 []string
		interval, tolerance string // "" when off
	}{
		{"defaults: 2 replicas", nil, "30s", "0.1"},
		{"one replica", []string{"replicaCount=1"}, "", ""},
		{"one replica, autoscaled", []string{"replicaCount=1", "autoscaling.enabled=true"}, "30s", "0.1"},
		{"switched off", []string{"rebalance.enabled=false"}, "", ""},
		{"other interval and tolerance", []string{"replicaCount=5", "rebalance.intervalSeconds=10", "rebalance.tolerance=0", "minReadySeconds=2", "shutdown.preStopSleepSeconds=5"}, "10s", "0"},
		{"with a NetworkPolicy", netpol, "30s", "0.1"},
		{"off, with a NetworkPolicy", append([]string{"rebalance.enabled=false"}, netpol...), "", ""},
		{"interval just above the rollout overlap", []string{"rebalance.intervalSeconds=21"}, "21s", "0.1"},
		{"one replica, interval not checked", []string{"replicaCount=1", "rebalance.intervalSeconds=5"}, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := []string{"--set", "existingSecret.name=" + secretName}
			for _, s := range tc.set {
				args = append(args, "--set", s)
			}
			b := mustRender(t, args...)
			c := relayContainer(t, b.deployments[0])
			for name, want := range map[string]string{"RELAY_REBALANCE_INTERVAL": tc.interval, "RELAY_REBALANCE_TOLERANCE": tc.tolerance} {
				if got, _ := envValue(t, b, c, name); got != want {
					t.Errorf("%s = %q, want %q", name, got, want)
				}
			}
			on := tc.interval != ""
			if peers, _ := envValue(t, b, c, "RELAY_PEERS"); (peers != "") != on || (len(b.peerServices) == 1) != on {
				t.Errorf("RELAY_PEERS %q with %d headless Services, want rebalancing %v", peers, len(b.peerServices), on)
			}
			checkInvariants(t, b, secretName)
		})
	}
}

// TestValuesDocumented guards the rule that every key in values.yaml carries a comment: each key
// line is directly under a comment block, unless it sits inside the default value of a key whose
// comment starts with "# --" (that comment documents the whole value, e.g. resources).
func TestValuesDocumented(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(chartDir, "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	keyLine := regexp.MustCompile(`^(\s*)(- )?([A-Za-z][A-Za-z0-9]*):`)
	lines := strings.Split(string(raw), "\n")
	var undocumented []string
	valueIndent := -1 // indent of the "# --" key whose default value we are inside, or -1
	for i, line := range lines {
		m := keyLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		indent := len(m[1])
		if valueIndent >= 0 && indent > valueIndent {
			continue
		}
		valueIndent = -1
		// The contiguous comment block right above the key, if any.
		first := i
		for first > 0 && strings.HasPrefix(strings.TrimSpace(lines[first-1]), "#") {
			first--
		}
		if first == i {
			undocumented = append(undocumented, fmt.Sprintf("line %d: %s", i+1, strings.TrimSpace(line)))
			continue
		}
		if strings.HasPrefix(strings.TrimSpace(lines[first]), "# --") {
			valueIndent = indent
		}
	}
	if len(undocumented) > 0 {
		t.Errorf("values.yaml keys without a comment above them:\n%s", strings.Join(undocumented, "\n"))
	}
}

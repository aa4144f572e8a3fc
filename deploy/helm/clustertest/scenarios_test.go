//go:build cluster

package clustertest

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"

	"github.com/decnet/identity-relay/internal/relaytest"
	"github.com/decnet/identity-relay/internal/testenv"
)

// The scenarios of issue #16 against a live cluster (KUBECONFIG), run by
// scripts/cluster/test.sh (make cluster-test), which starts a cluster of its
// own when none is given. Settings (environment):
//
//	RELAY_CT_IMAGE, RELAY_CT_IMAGE_NEXT  the relay's image (repository:tag) to install,
//	                                     and the one `helm upgrade` moves to
//	RELAY_CT_PULL_POLICY                 image.pullPolicy (IfNotPresent; Never for
//	                                     images imported into the node)
//	RELAY_TEST_DATABASE_URL, RELAY_TEST_KAFKA_BROKERS
//	                                     PostgreSQL and Kafka, as the test reaches them
//	RELAY_CT_POD_DATABASE_URL, RELAY_CT_POD_KAFKA_BROKERS
//	                                     the same as pods reach them (default: the above)
//	RELAY_TEST_KAFKA_SCRIPT, RELAY_TEST_PG_SCRIPT
//	                                     scripts/kafka.sh and pg.sh (stop/start) for the
//	                                     outage scenarios; without them those are skipped
//	RELAY_CT_URL                         the stream's URL (default: through the Service's
//	                                     ClusterIP, which the test must be able to reach)
//	RELAY_CT_VIEWERS, RELAY_CT_RATE      150 viewers, 200 records/s
//	RELAY_CT_NAMESPACE                   Kubernetes namespace of the release (relay-ct)
//	RELAY_CT_HELM_ARGS                   more arguments for the install (space-separated)
//	RELAY_CT_LIFETIME_VALUE              the chart value of the maximum stream lifetime
//	                                     (config.sseMaxLifetime)
//	RELAY_CT_REPORT                      file the table of figures is written to
//	RELAY_CT_KUBECTL                     kubectl binary (kubectl)

const (
	release  = "relay"
	secret   = "clustertest-jwt-secret-0123456789abcdef"
	selector = "app.kubernetes.io/name=relay,app.kubernetes.io/instance=" + release
)

type cluster struct {
	t         *testing.T
	ns        string
	kubectl   string
	url       string
	viewers   int
	rate      float64
	users     []string
	parts     []Partition
	rows      []row
	helmTest  string
	lifetimes string
}

// row is one line of the table of figures.
type row struct {
	name     string
	res      Result
	viewers  int
	rate     float64
	rollout  time.Duration
	settled  time.Duration // from the disruption's start until only the desired pods were left
	memMiB   float64
	note     string
	failures []string
}

func env(name, def string) string {
	if v := strings.TrimSpace(os.Getenv(name)); v != "" {
		return v
	}
	return def
}

func envInt(t *testing.T, name string, def int) int {
	v, err := strconv.Atoi(env(name, strconv.Itoa(def)))
	if err != nil || v <= 0 {
		t.Fatalf("%s: want a positive number", name)
	}
	return v
}

// run runs a command, fails t with its output when it fails, and returns
// its standard output.
func (c *cluster) run(name string, args ...string) string {
	c.t.Helper()
	out, err := c.try(name, args...)
	if err != nil {
		c.t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func (c *cluster) try(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var out strings.Builder
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	return out.String(), err
}

func (c *cluster) k(args ...string) string {
	c.t.Helper()
	return c.run(c.kubectl, append([]string{"-n", c.ns}, args...)...)
}

func TestCluster(t *testing.T) {
	c := &cluster{
		t:       t,
		ns:      env("RELAY_CT_NAMESPACE", "relay-ct"),
		kubectl: env("RELAY_CT_KUBECTL", "kubectl"),
		viewers: envInt(t, "RELAY_CT_VIEWERS", 150),
		rate:    float64(envInt(t, "RELAY_CT_RATE", 200)),
	}
	if os.Getenv("KUBECONFIG") == "" {
		t.Fatal("KUBECONFIG is not set: scripts/cluster/test.sh (make cluster-test) sets it")
	}
	image, next := env("RELAY_CT_IMAGE", ""), env("RELAY_CT_IMAGE_NEXT", "")
	if image == "" || next == "" {
		t.Fatal("RELAY_CT_IMAGE and RELAY_CT_IMAGE_NEXT must name the relay's image and the one to upgrade to")
	}
	brokers := testenv.KafkaBrokers(t)
	dbURL := testenv.DatabaseURL(t)
	defer c.printTable()

	// Viewers: one user each, as browsers of different people.
	db := relaytest.DB(t)
	for range c.viewers {
		c.users = append(c.users, relaytest.AddUser(t, db, "viewer"))
	}
	// Two topics of three partitions, new to this run (a cluster of the
	// user's may hold an earlier run's), created before the relay starts and
	// deleted at the end.
	cl := relaytest.Producer(t, brokers)
	run := relaytest.RandomID(4)
	for _, name := range []string{"formed", "merged"} {
		topic := "identity.clustertest-" + run + "." + name
		relaytest.CreateTopic(t, cl, topic, 3)
		t.Cleanup(func() { _, _ = kadm.NewClient(cl).DeleteTopic(context.Background(), topic) })
		for p := range int32(3) {
			c.parts = append(c.parts, Partition{Topic: topic, Part: p})
		}
	}

	// Install as deploy/helm/README.md tells an operator to.
	c.run(c.kubectl, "create", "namespace", c.ns)
	t.Cleanup(func() { _, _ = c.try(c.kubectl, "delete", "namespace", c.ns, "--wait=false") })
	c.k("create", "secret", "generic", "relay-secrets",
		"--from-literal=jwt-secret="+secret,
		"--from-literal=database-url="+env("RELAY_CT_POD_DATABASE_URL", dbURL))
	repo, tag, _ := strings.Cut(image, ":")
	_, nextTag, _ := strings.Cut(next, ":")
	chart, _ := filepath.Abs("../relay")
	// helm upgrade --install with --wait, as the README's example.
	args := []string{"upgrade", "--install", release, chart, "-n", c.ns,
		"--set", "existingSecret.name=relay-secrets",
		"--set", "config.kafkaBrokers=" + env("RELAY_CT_POD_KAFKA_BROKERS", strings.Join(brokers, ",")),
		"--set", "image.repository=" + repo, "--set-string", "image.tag=" + tag,
		"--set", "image.pullPolicy=" + env("RELAY_CT_PULL_POLICY", "IfNotPresent"),
		"--set", "replicaCount=3", "--wait", "--timeout", "5m",
		// helm test opens the stream as this viewer's user and reads its snapshot.
		"--set-string", "tests.streamUser=" + c.users[0]}
	args = append(args, strings.Fields(os.Getenv("RELAY_CT_HELM_ARGS"))...)
	t0 := time.Now()
	c.run("helm", args...)
	installTime := time.Since(t0)
	ready := c.k("get", "deploy", release, "-o", "jsonpath={.status.readyReplicas}/{.spec.replicas}")
	t.Logf("helm upgrade --install --wait: %v, %s Ready", installTime.Round(time.Second), ready)
	if ready != "3/3" {
		t.Errorf("after helm upgrade --install --wait: %s Ready, want 3/3", ready)
	}
	c.url = env("RELAY_CT_URL", "")
	if c.url == "" {
		ip := c.k("get", "svc", release, "-o", "jsonpath={.spec.clusterIP}:{.spec.ports[0].port}")
		c.url = "http://" + ip + "/api/v1/identities/events"
	}

	t.Run("install", func(t *testing.T) {
		c.t = t
		out, err := c.try("helm", "test", release, "-n", c.ns, "--logs", "--timeout", "90s")
		c.helmTest = "helm test read the snapshot frame through the Service"
		if err != nil || !strings.Contains(out, "read a frame from") || !strings.Contains(out, "event: snapshot") {
			c.helmTest = "helm test FAILED"
			t.Errorf("helm test: %v, want it to pass having read the snapshot frame:\n%s", err, out)
		} else {
			t.Logf("helm test:\n%s", out)
		}
		c.scenario("install, steady", Expect{}, func() time.Duration { return installTime },
			c.helmTest+", "+ready+" Ready")
	})

	t.Run("rollout restart", func(t *testing.T) {
		c.t = t
		c.scenario("kubectl rollout restart", Expect{MaxPerViewer: 1.1, MaxOneViewer: 2, MaxPeakShare: 0.2}, func() time.Duration {
			t0 := time.Now()
			c.k("rollout", "restart", "deploy/"+release)
			c.k("rollout", "status", "deploy/"+release, "--timeout=5m")
			return time.Since(t0)
		}, "")
	})

	t.Run("pod deleted without grace", func(t *testing.T) {
		c.t = t
		c.scenario("pod deleted, --grace-period=0", Expect{}, func() time.Duration {
			pod := strings.Fields(c.k("get", "pods", "-l", selector, "-o", "jsonpath={.items[*].metadata.name}"))[0]
			c.k("delete", "pod", pod, "--grace-period=0", "--force")
			return 0
		}, "")
		r := &c.rows[len(c.rows)-1]
		r.note = fmt.Sprintf("the replacement Ready and the deleted pod gone %v after the delete", r.settled.Round(100*time.Millisecond))
	})

	t.Run("Kafka stopped 20s", func(t *testing.T) {
		c.t = t
		if os.Getenv(testenv.EnvKafkaScript) == "" {
			t.Skip(testenv.EnvKafkaScript + " not set: cannot stop Kafka")
		}
		var note string
		c.scenario("Kafka stopped 20 s", Expect{}, func() time.Duration {
			testenv.StopKafka(t)
			minReady, maxReady := c.watchReady(20 * time.Second)
			testenv.StartKafka(t)
			t0 := time.Now()
			c.waitReady(3)
			note = fmt.Sprintf("pods Ready during the outage: %d to %d of 3; all Ready %v after Kafka was back", minReady, maxReady, time.Since(t0).Round(time.Second))
			return 0
		}, "")
		c.rows[len(c.rows)-1].note = note
	})

	t.Run("PostgreSQL restarted", func(t *testing.T) {
		c.t = t
		if os.Getenv(testenv.EnvPGScript) == "" {
			t.Skip(testenv.EnvPGScript + " not set: cannot stop PostgreSQL")
		}
		var note string
		c.scenario("PostgreSQL restarted", Expect{NoReconnects: true}, func() time.Duration {
			testenv.StopPostgres(t)
			time.Sleep(2 * time.Second)
			note = "new connections during the outage: " + c.probeStatuses(5)
			testenv.StartPostgres(t)
			return 0
		}, "")
		c.rows[len(c.rows)-1].note = note
	})

	t.Run("scale 3-5-3", func(t *testing.T) {
		c.t = t
		// Long against the rebalancing interval, as in production (30 min
		// against 30 s): with 40 s half the viewers landed at random again
		// every round, faster than rebalancing evens them out, and a pod
		// held 20 of 30 at the end ([20 24 28 30 34]).
		lifetime := 120 * time.Second
		// The shortest interval the chart renders: above minReadySeconds +
		// shutdown.preStopSleepSeconds (10 + 10 by default).
		interval := 21 * time.Second
		// A new pod counts as a peer from its second round (2 intervals),
		// then TestRebalanceModel's worst run of 150 viewers 3 → 5 is within
		// ±25% of even 10 rounds later for good (deploy/helm/README.md).
		rounds := 2 + 10
		value := env("RELAY_CT_LIFETIME_VALUE", "config.sseMaxLifetime")
		out, err := c.try("helm", "upgrade", release, chart, "-n", c.ns, "--reuse-values", "--set", value+"="+lifetime.String(),
			"--set", fmt.Sprintf("rebalance.intervalSeconds=%d", int(interval.Seconds())), "--wait", "--timeout", "5m")
		withLifetime := err == nil
		if withLifetime {
			// The next scenario measures a rollout alone.
			c.lifetimes = value + "=0s"
		} else {
			t.Errorf("helm upgrade --set %s=%v: %v\n%s", value, lifetime, err, out)
		}
		var note, spread string
		c.scenario("scale 3 → 5 → 3", Expect{}, func() time.Duration {
			t0 := time.Now()
			c.k("scale", "deploy/"+release, "--replicas=5")
			c.waitReady(5)
			up := time.Since(t0)
			// One lifetime and a retry delay later every stream has ended once
			// and its viewer has landed through the Service; the rounds after
			// it even the pods out. Sampled every round for the note.
			time.Sleep(lifetime + 10*time.Second)
			var seen []string
			for range rounds {
				seen = append(seen, fmt.Sprint(c.viewersPerPod()))
				time.Sleep(interval)
			}
			per := c.viewersPerPod()
			wait := lifetime + 10*time.Second + time.Duration(rounds)*interval
			note = fmt.Sprintf("lifetime %v, rebalance.intervalSeconds %d; viewers per pod after one lifetime + 10 s, then every round: %s; at the end (%v after the 5 were Ready): %v",
				lifetime, int(interval.Seconds()), strings.Join(seen, " "), wait, per)
			if withLifetime {
				even := float64(c.viewers) / 5
				within := len(per) == 5
				for _, n := range per {
					within = within && float64(n) >= 0.75*even && float64(n) <= 1.25*even
				}
				if !within {
					spread = fmt.Sprintf("viewers per pod %v %v after the scale-up: want 5 pods each within ±25%% of %.0f", per, wait, even)
					t.Error(spread)
				}
				note += fmt.Sprintf("; within ±25%% of %.0f: %v", even, within)
			} else {
				note += " (no lifetime set: the chart has no " + value + ")"
			}
			c.k("scale", "deploy/"+release, "--replicas=3")
			c.waitReady(3)
			return up
		}, "")
		c.rows[len(c.rows)-1].note = note
		if spread != "" {
			c.rows[len(c.rows)-1].failures = append(c.rows[len(c.rows)-1].failures, spread)
		}
	})

	t.Run("helm upgrade to a new image", func(t *testing.T) {
		c.t = t
		args := []string{"upgrade", release, chart, "-n", c.ns, "--reuse-values", "--set-string", "image.tag=" + nextTag, "--wait", "--timeout", "5m"}
		if c.lifetimes != "" {
			args = append(args, "--set", c.lifetimes)
		}
		// A rollout as the restart above, with the shortest rebalancing interval.
		c.scenario("helm upgrade --wait, new image", Expect{MaxPerViewer: 1.1, MaxOneViewer: 2, MaxPeakShare: 0.2}, func() time.Duration {
			t0 := time.Now()
			c.run("helm", args...)
			return time.Since(t0)
		}, "")
	})
}

// scenario streams to the viewers while the producer writes and disrupt
// runs, then checks what each received. disrupt returns the rollout time.
func (c *cluster) scenario(name string, e Expect, disrupt func() time.Duration, note string) {
	t := c.t
	t.Helper()
	run := relaytest.RandomID(6)
	// The viewers rebalancing moves (its counter on the pods, which stay)
	// are not the disruption's reconnects.
	rebalanced := c.rebalanceEnds()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	vs := make([]*Viewer, c.viewers)
	var wg sync.WaitGroup
	for i := range vs {
		user := c.users[i]
		vs[i] = NewViewer(c.url, run, func() string { return relaytest.Token(t, secret, user) })
		wg.Add(1)
		go func() { defer wg.Done(); vs[i].Run(ctx) }()
		// Not all at once: tabs open over a few seconds.
		time.Sleep(10 * time.Millisecond)
	}
	defer func() { cancel(); wg.Wait() }()
	deadline := time.After(60 * time.Second)
	for i, v := range vs {
		select {
		case <-v.Connected:
		case <-deadline:
			t.Fatalf("viewer %d has no snapshot after 60 s: %+v", i, v.Log())
		}
	}
	cl := relaytest.Producer(t, testenv.KafkaBrokers(t))
	p := NewProducer(cl, run, c.parts, t.Logf)
	pctx, pcancel := context.WithCancel(context.Background())
	pdone := make(chan struct{})
	go func() { defer close(pdone); p.Run(pctx, c.rate, 90*time.Second) }()
	time.Sleep(5 * time.Second)
	t0 := time.Now()
	rollout := disrupt()
	// kubectl rollout status and helm --wait return while the old pods
	// still drain (preStop, spread): their viewers move after that.
	c.settle()
	settled := time.Since(t0)
	time.Sleep(10 * time.Second)
	pcancel()
	<-pdone
	// Every viewer gets every acknowledged record, or 30 s pass.
	acked := p.Acked()
	for end := time.Now().Add(30 * time.Second); time.Now().Before(end); time.Sleep(200 * time.Millisecond) {
		done := true
		for _, v := range vs {
			if v.Count() < len(acked) {
				done = false
				break
			}
		}
		if done {
			break
		}
	}
	mem := c.podMemoryMiB()
	t.Logf("%s: streams ended by the pods running now, by reason: %s", name, c.disconnects())
	cancel()
	wg.Wait()
	logs := make([]ViewerLog, len(vs))
	for i, v := range vs {
		logs[i] = v.Log()
		if errs := v.Errors(); len(errs) > 0 {
			t.Errorf("viewer %d read frames a browser reads otherwise: %v", i, errs)
		}
	}
	res := Check(acked, logs)
	e.Rebalanced = int(c.rebalanceEnds() - rebalanced)
	f := res.Failures(e)
	for _, x := range f {
		t.Errorf("%s: %s", name, x)
	}
	t.Logf("%s: %+v", name, res)
	c.rows = append(c.rows, row{name: name, res: res, viewers: c.viewers, rate: c.rate, rollout: rollout, settled: settled, memMiB: mem, note: note, failures: f})
}

// settle waits until the Deployment's pods, terminating ones included, are
// exactly its replicas, all Ready.
func (c *cluster) settle() {
	c.t.Helper()
	for end := time.Now().Add(5 * time.Minute); time.Now().Before(end); time.Sleep(500 * time.Millisecond) {
		want, err1 := c.try(c.kubectl, "-n", c.ns, "get", "deploy", release, "-o", "jsonpath={.spec.replicas}/{.status.readyReplicas}")
		pods, err2 := c.try(c.kubectl, "-n", c.ns, "get", "pods", "-l", selector, "-o", "jsonpath={.items[*].metadata.name}")
		n, _, _ := strings.Cut(want, "/")
		if err1 == nil && err2 == nil && want == n+"/"+n && strconv.Itoa(len(strings.Fields(pods))) == n {
			return
		}
	}
	c.t.Fatalf("the deployment's pods did not settle within 5 minutes")
}

// waitReady waits until the Deployment has n Ready replicas and no others.
func (c *cluster) waitReady(n int) {
	c.t.Helper()
	want := fmt.Sprintf("%d/%d/%d", n, n, n)
	for end := time.Now().Add(5 * time.Minute); time.Now().Before(end); time.Sleep(500 * time.Millisecond) {
		got, _ := c.try(c.kubectl, "-n", c.ns, "get", "deploy", release, "-o", "jsonpath={.status.readyReplicas}/{.status.replicas}/{.status.updatedReplicas}")
		if got == want {
			return
		}
	}
	c.t.Fatalf("deployment not at %d Ready replicas within 5 minutes", n)
}

// watchReady samples the Ready pods every second for d: the least and the most.
func (c *cluster) watchReady(d time.Duration) (lo, hi int) {
	lo = 1 << 30
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(time.Second) {
		out, err := c.try(c.kubectl, "-n", c.ns, "get", "pods", "-l", selector, "-o",
			`jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}`)
		if err != nil {
			continue
		}
		n := strings.Count(out, "True")
		lo, hi = min(lo, n), max(hi, n)
	}
	return lo, hi
}

// probeStatuses opens n new streams (fresh tokens, no Last-Event-ID) and
// returns their answers, e.g. "5×503".
func (c *cluster) probeStatuses(n int) string {
	m := map[int]int{}
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for i := range n {
		resp, err := client.Get(c.url + "?token=" + relaytest.Token(c.t, secret, c.users[i]))
		if err != nil {
			m[0]++
			continue
		}
		m[resp.StatusCode]++
		resp.Body.Close()
	}
	return statuses(m)
}

// pods returns the relay pods' IPs.
func (c *cluster) podIPs() []string {
	out, _ := c.try(c.kubectl, "-n", c.ns, "get", "pods", "-l", selector, "--field-selector=status.phase=Running", "-o", "jsonpath={.items[*].status.podIP}")
	return strings.Fields(out)
}

// metric reads one sample of a pod's /metrics.
func metric(ip, sample string) (float64, error) {
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + ip + ":8080/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), sample+" "); ok {
			return strconv.ParseFloat(v, 64)
		}
	}
	return 0, fmt.Errorf("%s: no %s", ip, sample)
}

// disconnects sums relay_viewer_disconnects_total by reason over the pods
// running now, e.g. "lifetime 40, shutdown 12".
func (c *cluster) disconnects() string {
	sum := map[string]float64{}
	client := &http.Client{Timeout: 5 * time.Second}
	for _, ip := range c.podIPs() {
		resp, err := client.Get("http://" + ip + ":8080/metrics")
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			rest, ok := strings.CutPrefix(sc.Text(), `relay_viewer_disconnects_total{reason="`)
			if !ok {
				continue
			}
			reason, val, _ := strings.Cut(rest, `"} `)
			if v, err := strconv.ParseFloat(val, 64); err == nil && v > 0 {
				sum[reason] += v
			}
		}
		resp.Body.Close()
	}
	var parts []string
	for r, v := range sum {
		parts = append(parts, fmt.Sprintf("%s %.0f", r, v))
	}
	sort.Strings(parts)
	return strings.Join(parts, ", ")
}

// rebalanceEnds sums the streams rebalancing ended over the pods running now.
func (c *cluster) rebalanceEnds() float64 {
	var n float64
	for _, ip := range c.podIPs() {
		// No sample until a pod's first rebalancing end.
		v, _ := metric(ip, `relay_viewer_disconnects_total{reason="rebalance"}`)
		n += v
	}
	return n
}

// podMemoryMiB is the largest resident set of the relay pods (0 when their
// metrics cannot be reached).
func (c *cluster) podMemoryMiB() float64 {
	var most float64
	for _, ip := range c.podIPs() {
		if v, err := metric(ip, "process_resident_memory_bytes"); err == nil {
			most = max(most, v/(1<<20))
		}
	}
	return most
}

func (c *cluster) viewersPerPod() []int {
	var per []int
	for _, ip := range c.podIPs() {
		v, err := metric(ip, "relay_viewers_connected")
		if err != nil {
			c.t.Errorf("viewers of pod %s: %v", ip, err)
			continue
		}
		per = append(per, int(v))
	}
	sort.Ints(per)
	return per
}

// printTable writes the figures of every scenario that ran as a Markdown
// table to RELAY_CT_REPORT (scripts/cluster/test.sh prints it after the
// teardown), or prints it.
func (c *cluster) printTable() {
	var b strings.Builder
	fmt.Fprintln(&b, "| scenario | viewers | rate/s | acked | lost | duplicated | snapshot resets | non-200 | reconnects/viewer (max) | peak reconnects/s | longest silence | rollout (old pods gone) | pod RSS | result |")
	fmt.Fprintln(&b, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
	for _, r := range c.rows {
		result := "pass"
		if len(r.failures) > 0 {
			result = "FAIL: " + strings.Join(r.failures, "; ")
		}
		rollout := "–"
		if r.rollout > 0 {
			rollout = r.rollout.Round(100 * time.Millisecond).String()
		}
		if r.rollout > 0 && r.settled > r.rollout+time.Second {
			rollout += fmt.Sprintf(" (%v)", r.settled.Round(100*time.Millisecond))
		}
		fmt.Fprintf(&b, "| %s | %d | %.0f | %d | %d | %d | %d | %d | %.2f (%d) | %d | %v | %s | %.0f MiB | %s |\n",
			r.name, r.viewers, r.rate, r.res.Acked, r.res.Lost, r.res.Dup, r.res.Resets, r.res.Non200,
			r.res.ReconnectsPerViewer(), r.res.MaxReconnects, r.res.PeakPerSecond, r.res.LongestSilence.Round(100*time.Millisecond),
			rollout, r.memMiB, result)
	}
	for _, r := range c.rows {
		if r.note != "" {
			fmt.Fprintf(&b, "\n- %s: %s", r.name, r.note)
		}
	}
	fmt.Fprintln(&b)
	if f := os.Getenv("RELAY_CT_REPORT"); f != "" {
		if err := os.WriteFile(f, []byte(b.String()), 0o644); err == nil {
			return
		}
	}
	fmt.Print("\nOn a real cluster:\n" + b.String())
}

package browsertest

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/decnet/identity-relay/internal/relaytest"
	"github.com/decnet/identity-relay/internal/testenv"
)

// producer writes seq events round-robin over partitions, about one every
// produceEvery, until finish: events flow while a test breaks things.
type producer struct {
	stop chan struct{}
	done chan struct{}
	once sync.Once
	n    atomic.Int64
	err  error
}

const produceEvery = 20 * time.Millisecond

func startProducer(t *testing.T, cl *kgo.Client, topic string, partitions int32) *producer {
	t.Helper()
	pr := &producer{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(pr.done)
		tick := time.NewTicker(produceEvery)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-pr.stop:
				return
			case <-tick.C:
			}
			p := int32(i) % partitions
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			err := cl.ProduceSync(ctx, &kgo.Record{Topic: topic, Partition: p, Value: []byte(relaytest.SeqValue(p, i))}).FirstErr()
			cancel()
			if err != nil {
				pr.err = fmt.Errorf("produce seq %d: %w", i, err)
				return
			}
			pr.n.Store(int64(i + 1))
		}
	}()
	t.Cleanup(func() { pr.once.Do(func() { close(pr.stop) }); <-pr.done })
	return pr
}

// produced returns how many events were written so far.
func (pr *producer) produced() int { return int(pr.n.Load()) }

// finish stops the producer and returns how many events it wrote (seqs [0, n)).
func (pr *producer) finish(t *testing.T) int {
	t.Helper()
	pr.once.Do(func() { close(pr.stop) })
	<-pr.done
	if pr.err != nil {
		t.Fatal(pr.err)
	}
	return pr.produced()
}

// flowing waits until the page has its snapshot (events from the first on
// are then the page's), starts a producer, and waits for 20 events.
func flowing(t *testing.T, v *viewer, cl *kgo.Client, topic string, partitions int32) *producer {
	t.Helper()
	v.waitFor("the snapshot", waitLong, func() bool { return v.snapshots == 1 })
	pr := startProducer(t, cl, topic, partitions)
	v.waitFor("20 events", waitLong, func() bool { return v.opens == 1 && len(v.c.Seen) >= 20 })
	return pr
}

// openPlainPage opens, in a new browser, a plain page whose EventSource
// follows the stream of topic's events through a new proxy routed to r.
func openPlainPage(t *testing.T, topic string, r *relaytest.Process) (*proxy, *viewer) {
	t.Helper()
	px := newProxy(t)
	px.route(r)
	event := strings.TrimPrefix(topic, "identity.")
	return px, newViewer(openTab(t, newBrowser(t), px.URL+"/?token="+relaytest.ViewerToken(t), "snapshot", event), event)
}

// expectResumed checks the k-th stream request (from 0) the proxy passed on:
// it went to replica, was answered 200 and carried, as Last-Event-ID (or as
// ?last_event_id= when query), the id of the last event the page had
// received before it: v.lastIDs[k].
func expectResumed(t *testing.T, px *proxy, v *viewer, k int, replica *relaytest.Process, query bool) {
	t.Helper()
	reqs := px.requests()
	if len(reqs) <= k || len(v.lastIDs) <= k {
		t.Fatalf("want stream request %d: the proxy passed on %d, the page opened %d times", k, len(reqs), len(v.lastIDs))
	}
	r, want := reqs[k], v.lastIDs[k]
	sent, how := r.LastEventID, "Last-Event-ID"
	if query {
		sent, how = r.QueryID, "?last_event_id="
	}
	switch {
	case r.Replica != replica:
		t.Fatalf("stream request %d went to %s, want %s", k, r.Replica.URL, replica.URL)
	case r.Status != 200:
		t.Fatalf("stream request %d was answered %d", k, r.Status)
	case want == "":
		t.Fatalf("the page had received no event before stream request %d", k)
	case sent == nil || *sent != want:
		t.Fatalf("stream request %d carried %s %v, want the last id the page received, %q", k, how, sent, want)
	}
}

// failedRequests counts the requests of the tab that failed without an answer.
func failedRequests(tb *tab) int {
	n := 0
	for _, p := range tb.Problems() {
		if strings.HasPrefix(p, requestFailed) {
			n++
		}
	}
	return n
}

// Chromium's own EventSource on a plain page behind the proxy follows the
// stream across replicas while events flow: a replica drained with SIGTERM
// (the stream ends cleanly), then one killed with SIGKILL (the connection
// breaks). Each time the browser reconnects by itself after retry:, sends
// its Last-Event-ID, lands on another replica and resumes: the page ends
// with every event exactly once, in order per partition, and one snapshot.
func TestBrowserReconnectResumesAcrossReplicas(t *testing.T) {
	const partitions = 3
	env, topic := relaytest.TopicEnv(t, nil)
	cl := relaytest.Producer(t, testenv.KafkaBrokers(t))
	relaytest.CreateTopic(t, cl, topic, partitions)
	a, b := relaytest.Start(t, env), relaytest.Start(t, env)
	a.WaitReady(t)
	b.WaitReady(t)
	px, v := openPlainPage(t, topic, a)
	pr := flowing(t, v, cl, topic, partitions)

	from, to := a, b
	for k, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		if k > 0 {
			t.Logf("starting a replica at seq %d produced", pr.produced())
			to = relaytest.Start(t, env)
			to.WaitReady(t)
		}
		px.route(to) // as a Service drops a terminating pod's endpoint
		before, start := len(v.c.Seen), time.Now()
		t.Logf("%v at seq %d produced, %d received", sig, pr.produced(), before)
		from.Signal(sig)
		v.waitFor(fmt.Sprintf("the page back after %v, 20 events further", sig), waitLong, func() bool {
			return v.opens == k+2 && len(v.c.Seen) >= before+20
		})
		expectResumed(t, px, v, k+1, to, false)
		// SIGTERM ends the stream cleanly; after SIGKILL the browser sees a broken one.
		if broken := failedRequests(v.tab); broken != k {
			t.Fatalf("after %v the browser reported %d failed stream requests, want %d: %q", sig, broken, k, v.tab.Problems())
		}
		t.Logf("%v: the browser reconnected by itself and resumed on another replica (%v to 20 more events)", sig, time.Since(start).Round(time.Millisecond))
		from = to
	}
	n := pr.finish(t)
	v.waitAll(n, waitLong)
	if v.snapshots != 1 || len(px.requests()) != 3 {
		t.Fatalf("%d snapshots and %d stream requests, want 1 and 3", v.snapshots, len(px.requests()))
	}
	t.Logf("the page holds all %d events exactly once; the browser reported %q", n, v.tab.Problems())
}

// A page whose connection is held back (the proxy stops reading from the
// relay for it, as a frozen tab or a stalled network would) is dropped as
// slow; once it reads again, Chromium reconnects by itself with its
// Last-Event-ID and the page ends with every event exactly once.
func TestBrowserHeldBackResumes(t *testing.T) {
	const partitions = 2
	env, topic := relaytest.TopicEnv(t, map[string]string{"RELAY_SUBSCRIBER_BUFFER": "8", "RELAY_SSE_SEND_BUFFER": "65536"})
	r, cl := relaytest.StartOnTopic(t, env, topic, partitions)
	px, v := openPlainPage(t, topic, r)
	v.waitFor("the snapshot", waitLong, func() bool { return v.snapshots == 1 })
	relaytest.ProduceSeq(t, cl, topic, partitions, 0, 10)
	v.waitFor("10 events", waitLong, func() bool { return len(v.c.Seen) == 10 })

	// Big events fill the socket buffers quickly, then the 8-frame queue.
	px.hold()
	pad := strings.Repeat("x", 16<<10)
	n := 10
	for ; relaytest.Metric(t, r.URL, `relay_viewer_disconnects_total{reason="slow"}`) < 1; n += 20 {
		if n > 2000 {
			t.Fatal("the held-back page was not dropped as slow after 2,000 events of 16 KiB")
		}
		for i := n; i < n+20; i++ {
			p := int32(i) % partitions
			relaytest.Produce(t, cl, topic, p, fmt.Sprintf(`{"p":%d,"seq":%d,"pad":%q}`, p, i, pad))
		}
	}
	held := len(v.c.Seen)
	px.release()
	v.waitAll(n, waitLong)
	if v.opens != 2 || v.snapshots != 1 {
		t.Fatalf("%d opens and %d snapshots, want 2 (the cut, then the resume) and 1", v.opens, v.snapshots)
	}
	expectResumed(t, px, v, 1, r, false)
	t.Logf("dropped as slow with %d of %d events on the page; all %d after the browser's own resume", held, n, n)
}

// A stream that ends before its first event (here at its lifetime: the
// chart's default ends every stream within 30 minutes, whether events came
// or not) leaves the page only its snapshot's id. Chromium reconnects with
// it as Last-Event-ID, and the page gets every event published while it
// was away, once, without a second snapshot.
func TestBrowserResumesFromItsSnapshot(t *testing.T) {
	const partitions, n = 2, 10
	env, topic := relaytest.TopicEnv(t, map[string]string{"RELAY_SSE_MAX_LIFETIME": "2s", "RELAY_SSE_LIFETIME_JITTER": "0"})
	r, cl := relaytest.StartOnTopic(t, env, topic, partitions)
	// A record per partition before the page opens: the snapshot's
	// position covers them (the relay omits the id until it knows a partition).
	relaytest.ProduceSeq(t, cl, topic, partitions, 0, partitions)
	consumed := `relay_records_consumed_total{topic="` + topic + `"}`
	until(t, waitLong, func() bool { return relaytest.Metric(t, r.URL, consumed) >= partitions },
		func() string { return "the relay reading the first records" })
	px, v := openPlainPage(t, topic, r)
	v.waitFor("the snapshot", waitLong, func() bool { return v.snapshots == 1 })
	lifetime := `relay_viewer_disconnects_total{reason="lifetime"}`
	until(t, waitLong, func() bool { return relaytest.Metric(t, r.URL, lifetime) >= 1 },
		func() string { return "the stream's end at its lifetime" })

	relaytest.ProduceSeq(t, cl, topic, partitions, partitions, partitions+n) // while the page is away
	v.waitFor(fmt.Sprintf("%d events", n), waitLong, func() bool { return len(v.c.Seen) >= n })
	reqs := px.requests()
	switch {
	case v.snapshotID == "":
		t.Fatal("the snapshot came without an id")
	case len(reqs) < 2 || reqs[1].LastEventID == nil || *reqs[1].LastEventID != v.snapshotID:
		t.Fatalf("the reconnect after the lifetime carried Last-Event-ID %v, want the snapshot's id %q", reqs[min(1, len(reqs)-1)].LastEventID, v.snapshotID)
	case v.snapshots != 1:
		t.Fatalf("%d snapshots, want 1", v.snapshots)
	}
	for i := range n {
		if !v.c.Seen[partitions+i] {
			t.Fatalf("seq %d, published while the page was away, never reached it (got %v)", partitions+i, v.c.Seen)
		}
	}
	if len(v.c.Seen) != n {
		t.Fatalf("the page got %d events, want the %d published after its snapshot: %v", len(v.c.Seen), n, v.c.Seen)
	}
	t.Logf("resumed from the snapshot's id after the lifetime: %d stream requests, every later event once", len(reqs))
}

// A plain EventSource gives up for good on an answer other than 200: a 429
// (the per-user cap) or a 503 (the replica's connection cap; a draining
// replica or a lost database answer the same) leaves it CLOSED. The demo
// page does what a dashboard should: it notices, and opens a new
// EventSource with ?last_event_id= after a growing delay. Here its replica
// is drained onto one that answers 503 until a connection frees: the page
// recovers by itself and ends with every event exactly once.
func TestBrowserAfterRefusal(t *testing.T) {
	// The demo page listens to the contract's event names only.
	const topic = "identity.formed"
	env := relaytest.Env(t, testenv.KafkaBrokers(t))
	env["RELAY_KAFKA_TOPICS_REGEX"] = `^identity\.formed$`
	cl := relaytest.Producer(t, testenv.KafkaBrokers(t))
	partitions := relaytest.EnsureTopic(t, cl, topic, 2)
	with := func(k, v string) map[string]string {
		e := map[string]string{k: v}
		for k, v := range env {
			e[k] = v
		}
		return e
	}
	a := relaytest.Start(t, with("RELAY_SSE_MAX_PER_USER", "1"))
	b := relaytest.Start(t, with("RELAY_SSE_MAX_CONNECTIONS", "1"))
	a.WaitReady(t)
	b.WaitReady(t)
	px := newProxy(t)
	bctx := newBrowser(t)

	// A's one stream of a user, B's one stream: both taken.
	capped := relaytest.ViewerToken(t)
	relaytest.Dial(t, a.URL, capped).ExpectStart(t)
	fullB := relaytest.Dial(t, b.URL, relaytest.ViewerToken(t))
	fullB.ExpectStart(t)

	type refused struct {
		tab    *tab
		token  string
		status int
	}
	var plain []refused
	for _, c := range []struct {
		replica *relaytest.Process
		token   string
		status  int
	}{{a, capped, 429}, {b, relaytest.ViewerToken(t), 503}} {
		px.route(c.replica)
		tb := openTab(t, bctx, px.URL+"/?token="+c.token)
		tb.waitFor(fmt.Sprintf("a plain EventSource answered %d to be CLOSED", c.status), waitLong, func() bool { return tb.sourceState(0) == stateClosed })
		plain = append(plain, refused{tb, c.token, c.status})
	}

	token := relaytest.ViewerToken(t)
	px.route(a)
	tb := openTab(t, bctx, px.URL+"/demo?token="+token, "snapshot", "formed")
	v := newViewer(tb, "formed")
	pr := flowing(t, v, cl, topic, partitions)

	// A drains; the browser reconnects by itself to B, which answers 503:
	// EventSource closes for good, and the page opens new ones.
	px.route(b)
	a.Signal(syscall.SIGTERM)
	pageRetried := func() bool {
		for _, r := range px.requests() {
			if r.Token == token && r.QueryID != nil && r.Status == 503 {
				return true
			}
		}
		return false
	}
	v.waitFor("the page's own retry, refused with 503", waitLong, pageRetried)
	before := len(v.c.Seen)
	fullB.Close() // B has room again
	v.waitFor("the page back on B, 20 events further", waitLong, func() bool { return v.opens == 2 && len(v.c.Seen) >= before+20 })
	n := pr.finish(t)
	v.waitAll(n, waitLong)
	if v.snapshots != 1 {
		t.Fatalf("%d snapshots, want 1", v.snapshots)
	}
	var mine []streamRequest
	for _, r := range px.requests() {
		if r.Token == token {
			mine = append(mine, r)
		}
	}
	last := mine[len(mine)-1]
	switch {
	case mine[1].LastEventID == nil || mine[1].Status != 503:
		t.Fatalf("the browser's own reconnect: Last-Event-ID %v, status %d; want an id and 503", mine[1].LastEventID, mine[1].Status)
	case last.Replica != b || last.Status != 200 || last.QueryID == nil || *last.QueryID != v.lastIDs[1]:
		t.Fatalf("the page's recovery: status %d, ?last_event_id= %v; want 200 on B with %q, its last id", last.Status, last.QueryID, v.lastIDs[1])
	}
	status := eval[string](tb, `document.getElementById("status").textContent`)
	if status != "open" {
		t.Fatalf("the demo page's status reads %q, want open", status)
	}
	tb.screenshot("demo-page-recovered.png")
	t.Logf("the page recovered after %d refusals and holds all %d events exactly once; the browser reported %q", len(mine)-2, n, tb.Problems())

	// The plain EventSources never tried again, all this while.
	for _, p := range plain {
		var n int
		for _, r := range px.requests() {
			if r.Token == p.token {
				n++
				if r.Status != p.status {
					t.Fatalf("plain EventSource answered %d, want %d", r.Status, p.status)
				}
			}
		}
		if state := p.tab.sourceState(0); n != 1 || state != stateClosed {
			t.Fatalf("plain EventSource refused with %d: %d requests, readyState %d; want 1 and CLOSED", p.status, n, state)
		}
	}
}

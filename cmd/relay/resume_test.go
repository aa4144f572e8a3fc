package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"

	"github.com/decnet/identity-relay/internal/relaytest"
	"github.com/decnet/identity-relay/internal/testenv"
	"github.com/decnet/identity-relay/pkg/api"
)

func lastEventID(id string) http.Header { return http.Header{"Last-Event-Id": {id}} }

// A viewer reads half a sequence from one relay, reconnects to another with
// its last id, and ends with the complete sequence: in per-partition order,
// nothing twice, and no snapshot on the resume.
func TestResumeOnAnotherReplica(t *testing.T) {
	env, topic := relaytest.TopicEnv(t, nil)
	cl := relaytest.Producer(t, testenv.KafkaBrokers(t))
	relaytest.CreateTopic(t, cl, topic, 3)
	a, b := relaytest.Start(t, env), relaytest.Start(t, env)
	a.WaitReady(t)
	b.WaitReady(t)
	db := relaytest.DB(t)
	token := relaytest.Token(t, relaytest.Secret, relaytest.AddUser(t, db, "viewer"))

	const n = 60
	c := relaytest.NewCollector(t)
	s := relaytest.Dial(t, a.URL, token)
	s.ExpectStart(t)
	relaytest.ProduceSeq(t, relaytest.Producer(t, testenv.KafkaBrokers(t)), topic, 3, 0, n/2)
	for range n / 3 {
		c.Take(s, 15*time.Second)
	}
	s.Close()
	relaytest.ProduceSeq(t, relaytest.Producer(t, testenv.KafkaBrokers(t)), topic, 3, n/2, n)

	s = relaytest.DialWith(t, b.URL, token, lastEventID(c.LastID))
	openingFrames(t, s)
	for len(c.Seen) < n {
		c.Take(s, 15*time.Second) // a snapshot frame here would fail SplitID
	}
	c.Complete(n)
	if got := relaytest.Metric(t, b.URL, `relay_resumes_total{via="window"}`); got != 1 {
		t.Fatalf("relay_resumes_total{via=window} = %v, want 1", got)
	}
}

// A viewer that stops reading is dropped as slow, resumes with its last id,
// and ends with every event.
func TestStalledViewerResumesComplete(t *testing.T) {
	env, topic := relaytest.TopicEnv(t, map[string]string{"RELAY_SUBSCRIBER_BUFFER": "8"})
	r, cl := relaytest.StartOnTopic(t, env, topic, 2)
	token := relaytest.ViewerToken(t)

	// Big events fill the socket buffers quickly, then the 8-frame channel.
	pad := strings.Repeat("x", 16<<10)
	const n = 400
	s := relaytest.Dial(t, r.URL, token)
	s.ExpectStart(t)
	s.Pause() // stop reading: the viewer stalls
	for i := range n {
		relaytest.Produce(t, cl, topic, int32(i%2), fmt.Sprintf(`{"p":%d,"seq":%d,"pad":%q}`, i%2, i, pad))
	}
	deadline := time.Now().Add(20 * time.Second)
	for relaytest.Metric(t, r.URL, `relay_viewer_disconnects_total{reason="slow"}`) < 1 {
		if time.Now().After(deadline) {
			t.Fatal("stalled viewer was not dropped")
		}
		time.Sleep(100 * time.Millisecond)
	}
	s.Resume()
	c := relaytest.NewCollector(t)
	for {
		f, err := s.NextOrEnd(10 * time.Second)
		if err != nil {
			break // the cut: EOF, possibly after a partial frame
		}
		if strings.HasPrefix(f, ":") {
			continue
		}
		c.TakeFrame(f)
	}
	got := len(c.Seen)
	if got >= n {
		t.Fatalf("the stalled viewer got all %d events before the cut: the test did not stall it", got)
	}
	s2 := relaytest.DialWith(t, r.URL, token, lastEventID(c.LastID))
	for len(c.Seen) < n {
		c.Take(s2, 15*time.Second)
	}
	c.Complete(n)
	t.Logf("cut after %d events, resumed with the other %d", got, n-got)
}

// openingFrames reads the keepalive and retry frames every stream starts with.
func openingFrames(t *testing.T, s *relaytest.Stream) {
	t.Helper()
	if f := s.Next(t, 10*time.Second); f != ": keepalive\n\n" {
		t.Fatalf("first frame %q", f)
	}
	if f := s.Next(t, 10*time.Second); f != "retry: 3000\n\n" {
		t.Fatalf("second frame %q, want the default retry hint", f)
	}
}

// Resuming from inside the window replays without a snapshot (also through
// ?last_event_id=); from before the window, what the window lacks is read
// back from Kafka, still without a snapshot; from before what Kafka still
// holds, or with an id the relay did not make, the viewer gets a fresh
// snapshot and then the live stream.
func TestResumeEdges(t *testing.T) {
	env, topic := relaytest.TopicEnv(t, map[string]string{"RELAY_REPLAY_WINDOW": "5"})
	r, cl := relaytest.StartOnTopic(t, env, topic, 1)
	token := relaytest.ViewerToken(t)

	s := relaytest.Dial(t, r.URL, token)
	s.ExpectStart(t)
	relaytest.ProduceSeq(t, relaytest.Producer(t, testenv.KafkaBrokers(t)), topic, 1, 0, 20)
	ids := make([]string, 20)
	for i := range ids {
		ids[i], _ = relaytest.SplitID(t, s.NextEvent(t, 15*time.Second))
	}
	s.Close()

	// resumed reads seqs [first, 20) in order from a resumed stream, ids included.
	resumed := func(t *testing.T, s *relaytest.Stream, first int) {
		t.Helper()
		openingFrames(t, s)
		c := relaytest.NewCollector(t)
		for i := first; i < 20; i++ {
			c.Take(s, 15*time.Second) // a snapshot frame here would fail SplitID
			if !c.Seen[i] || len(c.Seen) != i-first+1 {
				t.Fatalf("frame %d: got %v, want seqs %d..%d in order", i-first, c.Seen, first, i)
			}
			if c.LastID != ids[i] {
				t.Fatalf("seq %d has id %q, want %q, the id the live stream gave it", i, c.LastID, ids[i])
			}
		}
	}
	t.Run("inside the window, by query parameter", func(t *testing.T) {
		resumed(t, relaytest.Dial(t, r.URL, token+"&last_event_id="+ids[16]), 17)
	})
	t.Run("before the window: read back from Kafka", func(t *testing.T) {
		resumed(t, relaytest.DialWith(t, r.URL, token, lastEventID(ids[2])), 3)
		if got := relaytest.Metric(t, r.URL, `relay_resumes_total{via="kafka"}`); got != 1 {
			t.Fatalf("relay_resumes_total{via=kafka} = %v, want 1", got)
		}
	})

	// Records 0..9 leave Kafka: a resume from seq 2 can no longer be healed.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	off := kadm.Offsets{}
	off.Add(kadm.Offset{Topic: topic, Partition: 0, At: 10})
	if _, err := kadm.NewClient(cl).DeleteRecords(ctx, off); err != nil {
		t.Fatal(err)
	}
	for name, id := range map[string]string{"before what Kafka holds": ids[2], "garbage": "not-an-id"} {
		t.Run(name, func(t *testing.T) {
			s := relaytest.DialWith(t, r.URL, token, lastEventID(id))
			openingFrames(t, s)
			if f := s.Next(t, 10*time.Second); !isSnapshot(f) {
				t.Fatalf("frame %q, want a snapshot", f)
			}
			relaytest.ProduceSeq(t, relaytest.Producer(t, testenv.KafkaBrokers(t)), topic, 1, 100, 101)
			c := relaytest.NewCollector(t)
			c.Take(s, 15*time.Second)
			if !c.Seen[100] || len(c.Seen) != 1 {
				t.Fatalf("after the snapshot got %v, want the live seq 100 only", c.Seen)
			}
		})
	}
}

// tableScans returns how often PostgreSQL scanned table (sequential plus index scans).
func tableScans(t *testing.T, table string) int64 {
	t.Helper()
	db := relaytest.DB(t)
	var n int64
	if _, err := db.Exec(`SELECT pg_stat_clear_snapshot()`); err != nil {
		t.Fatal(err)
	}
	if err := db.Get(&n, `SELECT seq_scan + COALESCE(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = $1`, table); err != nil {
		t.Fatal(err)
	}
	return n
}

// A storm of 5,000 reconnects within about a second: viewers with ids are
// served from the window, viewers without share a few snapshot reads, and
// the database sees a handful of queries, not thousands.
func TestReconnectStormQueries(t *testing.T) {
	const viewers = 5000
	env, topic := relaytest.TopicEnv(t, map[string]string{
		"RELAY_SSE_MAX_PER_USER": "10000", "RELAY_LOG_LEVEL": "info",
	})
	r, _ := relaytest.StartOnTopic(t, env, topic, 1)
	token := relaytest.ViewerToken(t)
	s := relaytest.Dial(t, r.URL, token)
	s.ExpectStart(t)
	relaytest.ProduceSeq(t, relaytest.Producer(t, testenv.KafkaBrokers(t)), topic, 1, 0, 10)
	var id string
	for range 5 {
		id, _ = relaytest.SplitID(t, s.NextEvent(t, 15*time.Second))
	}
	s.Close()

	before := map[string]int64{}
	for _, table := range []string{"attacker_identities", "users", "revoked_tokens"} {
		before[table] = tableScans(t, table)
	}
	type result struct {
		snapshot bool
		err      error
	}
	results := make(chan result, viewers)
	var retries atomic.Int64
	start := time.Now()
	for i := range viewers {
		go func() {
			req, _ := http.NewRequest(http.MethodGet, r.URL+api.EventsPath+"?token="+token, nil)
			if i%2 == 0 {
				req.Header.Set("Last-Event-ID", id)
			}
			resp, err := http.DefaultTransport.RoundTrip(req)
			if err != nil {
				// As EventSource would: retry once. Under -race on two cores
				// the storm can outlast the relay's 5 s header timeout.
				retries.Add(1)
				time.Sleep(time.Second)
				if resp, err = http.DefaultTransport.RoundTrip(req); err != nil {
					results <- result{err: err}
					return
				}
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				results <- result{err: fmt.Errorf("status %d", resp.StatusCode)}
				return
			}
			// Read up to the third frame: the snapshot, or the first replayed event.
			buf := make([]byte, 0, 4096)
			tmp := make([]byte, 4096)
			for strings.Count(string(buf), "\n\n") < 3 {
				n, err := resp.Body.Read(tmp)
				if err != nil {
					results <- result{err: err}
					return
				}
				buf = append(buf, tmp[:n]...)
			}
			third := strings.SplitN(string(buf), "\n\n", 4)[2] + "\n\n"
			results <- result{snapshot: isSnapshot(third)}
		}()
		if i%250 == 249 {
			time.Sleep(40 * time.Millisecond) // spread the storm over about a second
		}
	}
	snapshots := 0
	for i := range viewers {
		res := <-results
		if res.err != nil {
			t.Fatalf("viewer %d: %v", i, res.err)
		}
		if res.snapshot {
			snapshots++
		}
	}
	took := time.Since(start)
	if snapshots != viewers/2 {
		t.Fatalf("%d viewers got a snapshot, want exactly the %d without an id", snapshots, viewers/2)
	}
	// Backends flush their statistics when they exit: stop the relay first.
	r.Signal(syscall.SIGTERM)
	if code := r.Wait(t, 30*time.Second); code != 0 {
		t.Fatalf("relay exit code %d", code)
	}
	time.Sleep(500 * time.Millisecond)
	// One snapshot query a second at most, plus the first; users and
	// revocations are looked up once and cached.
	limit := int64(took/time.Second) + 2
	for table, b := range before {
		n := tableScans(t, table) - b
		t.Logf("%d viewers in %v (%d connects retried): %s scanned %d times", viewers, took.Round(time.Millisecond), retries.Load(), table, n)
		if n > limit {
			t.Errorf("%s scanned %d times for %d viewers in %v, want at most %d", table, n, viewers, took, limit)
		}
	}
}

// TestLifetimeResumesExactlyOnce guards RELAY_SSE_MAX_LIFETIME against the
// real broker: while events flow, each stream ends cleanly between frames
// at its lifetime (counted as lifetime), the viewer reconnects once with
// its last id, as EventSource does, and over all its streams gets every
// event exactly once and in order, never a snapshot again.
func TestLifetimeResumesExactlyOnce(t *testing.T) {
	const n = 150
	env, topic := relaytest.TopicEnv(t, map[string]string{"RELAY_SSE_MAX_LIFETIME": "1s", "RELAY_SSE_LIFETIME_JITTER": "0.5"})
	r, cl := relaytest.StartOnTopic(t, env, topic, 3)
	token := relaytest.ViewerToken(t)

	// Events flow all along, one every 25 ms: several lifetimes' worth.
	produced := relaytest.ProducePaced(cl, topic, 3, 0, n, 25*time.Millisecond)

	c := relaytest.NewCollector(t)
	ends := 0
	s := relaytest.Dial(t, r.URL, token)
	s.ExpectStart(t)
	for !c.Seen[n-1] {
		f, err := s.NextOrEnd(30 * time.Second)
		switch {
		case errors.Is(err, io.EOF):
			// Ended at its lifetime: resume once, from the last id. A
			// stream that ended before its first event has no id yet, and
			// starts again as a new viewer.
			ends++
			s.Close()
			if c.LastID == "" {
				s = relaytest.Dial(t, r.URL, token)
				s.ExpectStart(t)
				continue
			}
			s = relaytest.DialWith(t, r.URL, token, lastEventID(c.LastID))
			openingFrames(t, s)
			continue
		case err != nil:
			t.Fatalf("stream cut, not ended between frames: %v (partial %q)", err, f)
		case strings.HasPrefix(f, ":"):
			continue
		}
		c.TakeFrame(f) // fails on a duplicate, a step back or a snapshot (no id)
	}
	s.Close()
	if err := <-produced; err != nil {
		t.Fatal(err)
	}
	first := n - 1
	for seq := range c.Seen {
		first = min(first, seq)
	}
	for i := first; i < n; i++ {
		if !c.Seen[i] {
			t.Fatalf("seq %d never delivered (received %d..%d with %d lifetime ends)", i, first, n-1, ends)
		}
	}
	if ends == 0 {
		t.Fatalf("no stream reached its lifetime over %d events", n)
	}
	if got := waitMetricAtLeast(t, r.URL, `relay_viewer_disconnects_total{reason="lifetime"}`, float64(ends), 10*time.Second); got != float64(ends) {
		t.Fatalf(`relay_viewer_disconnects_total{reason="lifetime"} = %v, want %d`, got, ends)
	}
	resumed := relaytest.Metric(t, r.URL, `relay_resumes_total{via="window"}`)
	if snap := relaytest.Metric(t, r.URL, `relay_resumes_total{via="snapshot"}`); snap != 0 || resumed < 1 {
		t.Fatalf("resumes: %v from the window, %v with a snapshot; want some and none", resumed, snap)
	}
	t.Logf("seqs %d..%d over %d streams: %d lifetime ends, %v resumes from the window", first, n-1, ends+1, ends, resumed)
}

func isSnapshot(frame string) bool {
	data, ok := relaytest.SnapshotData(frame)
	return ok && strings.HasPrefix(data, `{"identities":`)
}

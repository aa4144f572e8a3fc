package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/decnet/identity-relay/internal/ssetest"
	"github.com/decnet/identity-relay/pkg/fanout"
	"github.com/decnet/identity-relay/pkg/sse"
)

// TestSpreadSchedule guards the shape of a spread shutdown: n ends, in
// increasing order, one in each n-th of the window, so that no second of the
// window carries more than its share of the reconnects (plus one stream).
func TestSpreadSchedule(t *testing.T) {
	for _, tc := range []struct {
		n      int
		window time.Duration
		u      func() float64
	}{
		{0, 10 * time.Second, func() float64 { return 0.5 }},
		{1, 10 * time.Second, func() float64 { return 0.999 }},
		{150, 10 * time.Second, func() float64 { return 0 }},
		{1000, 10 * time.Second, func() float64 { return 0.999999 }},
		{7, 3 * time.Second, seededUniform(1)},
		{10000, 15 * time.Second, seededUniform(2)},
	} {
		at := spreadSchedule(tc.n, tc.window, tc.u)
		if len(at) != tc.n {
			t.Fatalf("n=%d: %d ends", tc.n, len(at))
		}
		if !slices.IsSorted(at) {
			t.Errorf("n=%d: ends out of order", tc.n)
		}
		perSecond := map[time.Duration]int{}
		for k, d := range at {
			slot := tc.window / time.Duration(tc.n)
			if lo, hi := time.Duration(k)*tc.window/time.Duration(tc.n), time.Duration(k+1)*tc.window/time.Duration(tc.n); d < lo || d > hi {
				t.Fatalf("n=%d: end %d at %v, outside its slot [%v, %v] (slot %v)", tc.n, k, d, lo, hi, slot)
			}
			perSecond[d.Truncate(time.Second)]++
		}
		most := tc.n*int(time.Second)/int(tc.window) + 1
		for sec, c := range perSecond {
			if c > most {
				t.Errorf("n=%d over %v: %d ends in the second from %v, want at most %d", tc.n, tc.window, c, sec, most)
			}
		}
	}
}

// seededUniform is a deterministic stand-in for rand.Float64.
func seededUniform(seed uint64) func() float64 {
	x := seed
	return func() float64 {
		x = x*6364136223846793005 + 1442695040888963407
		return float64(x>>11) / (1 << 53)
	}
}

// TestSpreadEndsEveryStream guards a spread shutdown end to end, in
// process: the plan names every open stream once, at the schedule's times;
// run, it ends each stream cleanly between frames (the chunked body's last
// chunk) after every frame published before its turn, and counts each as
// shutdown, none as a write error.
func TestSpreadEndsEveryStream(t *testing.T) {
	const n = 20
	h := newHarness(t, newFakeStore(), func(c *Config) { c.MaxPerUser = n })
	bodies := make([]io.Reader, n)
	for i := range bodies {
		_, bodies[i] = h.dialStream(t, "u-viewer")
	}
	h.waitOpen(t, "u-viewer", n)
	for i := range 5 {
		publishAt(t, h.broker, i)
	}
	h.srv.Drain()
	const window = 300 * time.Millisecond
	plan := h.srv.spreadPlan(-1, window)
	if len(plan) != n {
		t.Fatalf("plan has %d streams, want %d", len(plan), n)
	}
	seen := map[*viewer]bool{}
	for k, e := range plan {
		if seen[e.v] {
			t.Fatalf("stream planned twice")
		}
		seen[e.v] = true
		if lo, hi := time.Duration(k)*window/n, time.Duration(k+1)*window/n; e.at < lo || e.at > hi {
			t.Errorf("turn %d at %v, outside [%v, %v]", k, e.at, lo, hi)
		}
	}
	h.srv.runSpread(context.Background(), plan, fanout.ReasonShutdown)
	for i, body := range bodies {
		rest, err := readToEnd(t, body)
		if err != nil {
			t.Fatalf("stream %d cut instead of ended: %v (read %q)", i, err, rest)
		}
		frames, err := ssetest.ParseFrames(rest)
		if err != nil {
			t.Fatalf("stream %d did not end between frames: %v (%q)", i, err, rest)
		}
		var events int
		for _, f := range frames {
			if f.Event == "formed" {
				events++
			}
		}
		if events != 5 {
			t.Errorf("stream %d got %d of the 5 events published before its turn", i, events)
		}
	}
	h.waitDisconnects(t, fanout.ReasonShutdown, n)
	if got := h.disconnects(t, reasonWriteError); got != 0 {
		t.Errorf("%v write errors", got)
	}
}

// TestStreamLifetimeDraw guards the lifetime of a stream: within
// (max×(1−jitter), max], max itself when the draw or the jitter is 0, and
// none at all when max is 0.
func TestStreamLifetimeDraw(t *testing.T) {
	for _, tc := range []struct {
		max      time.Duration
		jitter   float64
		u        float64
		lo, want time.Duration // want: exact when not 0
	}{
		{0, 0.2, 0.5, 0, 0},
		{30 * time.Minute, 0.2, 0, 0, 30 * time.Minute},
		{30 * time.Minute, 0, 0.9, 0, 30 * time.Minute},
		{30 * time.Minute, 0.2, 0.5, 0, 27 * time.Minute},
		{30 * time.Minute, 0.2, 0.9999999, 24 * time.Minute, 0},
		{time.Second, 1, 0.9999999, 0, 0},
	} {
		got := streamLifetime(tc.max, tc.jitter, tc.u)
		switch {
		case tc.want != 0 && got != tc.want:
			t.Errorf("max %v jitter %v u %v: %v, want %v", tc.max, tc.jitter, tc.u, got, tc.want)
		case tc.want == 0 && (got <= tc.lo || got > tc.max) && tc.max != 0:
			t.Errorf("max %v jitter %v u %v: %v, want in (%v, %v]", tc.max, tc.jitter, tc.u, got, tc.lo, tc.max)
		case tc.max == 0 && got != 0:
			t.Errorf("max 0: lifetime %v, want none", got)
		}
	}
}

// TestStreamEndsAtItsLifetime guards RELAY_SSE_MAX_LIFETIME in process: a
// stream ends cleanly between frames at its lifetime, counted as lifetime;
// the viewer resumes once with its last id and gets every event exactly
// once, without a snapshot. The first connection resumes too (from seq 0),
// so that what it gets before its end is written at its opening, whenever
// the lifetime comes.
func TestStreamEndsAtItsLifetime(t *testing.T) {
	h := newHarness(t, newFakeStore(), func(c *Config) {
		c.MaxLifetime = 300 * time.Millisecond
		c.LifetimeJitter = 0.5
	})
	const n = 6
	for i := range n / 2 {
		publishAt(t, h.broker, i)
	}
	token := hs256(t, claimsFor("u-viewer", nil))
	afterFirst := sse.Position{sse.KeyOf("identity.formed", [16]byte{}, 0): 1}.Encode()
	frames := resumeFrom(t, h, token, afterFirst, 2)
	got, last := seqsOf(t, frames)
	if !slices.Equal(got, []int{1, 2}) {
		t.Fatalf("the first stream got %v, want [1 2]", got)
	}
	if more := endsAtLifetime(t, h, h.lastBody); len(more) != 0 {
		t.Fatalf("the first stream got %v more", more)
	}

	for i := n / 2; i < n; i++ { // published while the viewer is away
		publishAt(t, h.broker, i)
	}
	if got, _ := seqsOf(t, resumeFrom(t, h, token, last, n/2)); !slices.Equal(got, []int{3, 4, 5}) {
		t.Fatalf("the resume got %v, want [3 4 5]", got)
	}
	if got := counterValue(t, h.srv.m.resumes.WithLabelValues("window")); got != 2 {
		t.Fatalf("relay_resumes_total{via=window} = %v, want 2", got)
	}
}

// TestStreamEndingBeforeAnEventResumes: a stream that ends (here at its
// lifetime) before any event has only its snapshot's id; resuming from it
// gives exactly the events published since the snapshot, and no second
// snapshot. Without the id the browser would start over as a new viewer,
// and the events published while it was away would never reach it as events.
func TestStreamEndingBeforeAnEventResumes(t *testing.T) {
	h := newHarness(t, newFakeStore(), func(c *Config) { c.MaxLifetime = 300 * time.Millisecond })
	for i := range 3 {
		publishAt(t, h.broker, i)
	}
	token := hs256(t, claimsFor("u-viewer", nil))
	resp := h.get(t, "", token)
	defer resp.Body.Close()
	id := checkStream(t, resp)
	if want := h.broker.Position().Encode(); id != want {
		t.Fatalf("snapshot id %q, want the position it was read at, %q", id, want)
	}
	if got := endsAtLifetime(t, h, resp.Body); len(got) != 0 {
		t.Fatalf("the stream got %v after its snapshot, want none (all were before it)", got)
	}

	for i := 3; i < 6; i++ { // published while the viewer is away
		publishAt(t, h.broker, i)
	}
	if got, _ := seqsOf(t, resumeFrom(t, h, token, id, 3)); !slices.Equal(got, []int{3, 4, 5}) {
		t.Fatalf("resuming from the snapshot's id got %v, want [3 4 5]", got)
	}
	if got := counterValue(t, h.srv.m.resumes.WithLabelValues("window")); got != 1 {
		t.Fatalf("relay_resumes_total{via=window} = %v, want 1", got)
	}
}

// endsAtLifetime reads body to its end, which must come cleanly between
// frames and be counted as a lifetime end, and returns the seqs it read.
func endsAtLifetime(t *testing.T, h *harness, body io.Reader) []int {
	t.Helper()
	rest, err := readToEnd(t, body)
	if err != nil {
		t.Fatalf("stream cut instead of ended at its lifetime: %v (read %q)", err, rest)
	}
	tail, err := ssetest.ParseFrames(rest)
	if err != nil {
		t.Fatalf("the stream did not end between frames: %v (%q)", err, rest)
	}
	h.waitDisconnects(t, reasonLifetime, 1)
	seqs, _ := seqsOf(t, tail)
	return seqs
}

// resumeFrom opens a stream with Last-Event-ID id and reads its keepalive,
// retry hint and then events frames, failing on a snapshot; the body is
// left in h.lastBody.
func resumeFrom(t *testing.T, h *harness, token, id string, events int) []ssetest.Frame {
	t.Helper()
	req := h.request(t, "", token)
	req.Header.Set("Last-Event-ID", id)
	resp, err := h.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("resume: status %d", resp.StatusCode)
	}
	br := bufio.NewReader(resp.Body)
	h.lastBody = br
	var frames []ssetest.Frame
	for len(frames) < 2+events {
		f := readFrame(t, br)
		if f.Event == "snapshot" {
			t.Fatal("the resume got a snapshot")
		}
		frames = append(frames, f)
	}
	return frames
}

// publishAt publishes {"seq":n} at offset n of one partition.
func publishAt(t *testing.T, b *fanout.Broadcaster, n int) {
	t.Helper()
	ev := sse.Event{Topic: "identity.formed", Type: "formed", TS: "1", Payload: json.RawMessage(fmt.Sprintf(`{"seq":%d}`, n)), Offset: int64(n)}
	if err := b.Publish(ev); err != nil {
		t.Fatal(err)
	}
}

// seqsOf returns the seqs of the event frames and the id of the last one.
func seqsOf(t *testing.T, frames []ssetest.Frame) (seqs []int, lastID string) {
	t.Helper()
	for _, f := range frames {
		if f.Event != "formed" {
			continue
		}
		var ev struct {
			Payload struct{ Seq int } `json:"payload"`
		}
		if err := json.Unmarshal([]byte(f.Data[0]), &ev); err != nil {
			t.Fatal(err)
		}
		seqs, lastID = append(seqs, ev.Payload.Seq), f.ID
	}
	return seqs, lastID
}

// readFrame reads one whole frame.
func readFrame(t *testing.T, br *bufio.Reader) ssetest.Frame {
	t.Helper()
	done := make(chan []byte, 1)
	go func() {
		var raw []byte
		for !bytes.HasSuffix(raw, []byte("\n\n")) {
			line, err := br.ReadBytes('\n')
			raw = append(raw, line...)
			if err != nil {
				break
			}
		}
		done <- raw
	}()
	select {
	case raw := <-done:
		frames, err := ssetest.ParseFrames(raw)
		if err != nil || len(frames) != 1 {
			t.Fatalf("frame %q: %v", raw, err)
		}
		return frames[0]
	case <-time.After(10 * time.Second): // bounds a hang only
		t.Fatal("no frame")
		return ssetest.Frame{}
	}
}

// TestProbeRequestsLoggedAtDebug guards that the requests the kubelet and
// Prometheus make every few seconds (/healthz, /readyz, /startupz,
// /metrics), and peers every rebalance interval (/peerz), are logged at debug, and every other request at info as before.
func TestProbeRequestsLoggedAtDebug(t *testing.T) {
	h := newHarness(t, newFakeStore(), nil)
	base := strings.TrimSuffix(h.url, EventsPath)
	for _, path := range []string{"/healthz", "/readyz", "/startupz", "/metrics", "/peerz", "/nowhere", EventsPath} {
		resp, err := h.client.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	want := map[string]string{
		"/healthz": "DEBUG", "/readyz": "DEBUG", "/startupz": "DEBUG", "/metrics": "DEBUG", "/peerz": "DEBUG",
		"/nowhere": "INFO", EventsPath: "INFO",
	}
	got := map[string]string{}
	for deadline := time.Now().Add(10 * time.Second); len(got) < len(want); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("request lines logged for %v, want all of %v", got, want)
		}
		for _, line := range strings.Split(h.logs.String(), "\n") {
			var rec struct{ Level, Msg, Path string }
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "request" {
				got[rec.Path] = rec.Level
			}
		}
	}
	for path, level := range want {
		if got[path] != level {
			t.Errorf("request to %s logged at %s, want %s", path, got[path], level)
		}
	}
}

// TestStartupz guards the startup probe's endpoint: 503 until the start-up
// read of Kafka is done, then 200, whatever the database does (it is
// /readyz's business, and a database down at start-up must not get the
// container restarted).
func TestStartupz(t *testing.T) {
	var started atomic.Bool
	store := newFakeStore()
	h := newHarness(t, store, func(c *Config) { c.ConsumerReady = started.Load })
	base := strings.TrimSuffix(h.url, EventsPath)
	status := func(path string) int {
		t.Helper()
		resp, err := h.client.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if got := status("/startupz"); got != http.StatusServiceUnavailable {
		t.Errorf("/startupz before the start-up read: %d, want 503", got)
	}
	started.Store(true)
	if got := status("/startupz"); got != http.StatusOK {
		t.Errorf("/startupz after the start-up read: %d, want 200", got)
	}
	store.update(func(s *fakeStore) { s.errs = map[string]error{"Ping": errors.New("database down")} })
	if got, ready := status("/startupz"), status("/readyz"); got != http.StatusOK || ready != http.StatusServiceUnavailable {
		t.Errorf("database down: /startupz %d, /readyz %d; want 200 and 503", got, ready)
	}
}

// TestProbesBoundDatabasePings: /readyz and /peerz answer anyone, without
// a credential, and each looks at the database. However fast clients ask,
// up or down, the relay pings it at most once per pingEvery: in a window
// of d, at most ⌊d/pingEvery⌋+1 pings. Every answer still says what the
// last ping found, and a recovery shows within pingEvery.
func TestProbesBoundDatabasePings(t *testing.T) {
	store := newFakeStore()
	h := newHarness(t, store, nil)
	base := strings.TrimSuffix(h.url, EventsPath)
	hammer := func(phase string, want int) {
		t.Helper()
		before := store.pingCalls.Load()
		start := time.Now()
		var wg sync.WaitGroup
		var wrong atomic.Int64
		for w := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				path := []string{"/readyz", "/peerz"}[w%2]
				for range 100 {
					resp, err := h.client.Get(base + path)
					if err != nil {
						wrong.Add(1)
						continue
					}
					_, _ = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != want {
						wrong.Add(1)
					}
				}
			}()
		}
		wg.Wait()
		elapsed := time.Since(start)
		pings := store.pingCalls.Load() - before
		bound := int64(elapsed/pingEvery) + 1
		t.Logf("%s: 800 probe requests in %v, %d pings (bound %d)", phase, elapsed.Round(time.Millisecond), pings, bound)
		if pings > bound {
			t.Errorf("%s: %d database pings for 800 probe requests in %v, want at most %d", phase, pings, elapsed, bound)
		}
		if n := wrong.Load(); n > 0 {
			t.Errorf("%s: %d of 800 answers were not %d", phase, n, want)
		}
	}
	store.update(func(s *fakeStore) { s.errs = map[string]error{"Ping": errors.New("database down")} })
	hammer("database down", http.StatusServiceUnavailable)

	store.update(func(s *fakeStore) { s.errs = nil })
	recovered := time.Now()
	for {
		resp, err := h.client.Get(base + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			break
		}
		// A kept failure is at most pingEvery old; the margin is for a
		// loaded machine, not a claim about speed.
		if time.Since(recovered) > 10*pingEvery {
			t.Fatalf("/readyz still %d %v after the database came back", resp.StatusCode, time.Since(recovered))
		}
		time.Sleep(10 * time.Millisecond)
	}
	hammer("database up", http.StatusOK)
}

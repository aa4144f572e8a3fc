package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/decnet/identity-relay/internal/ssetest"
	"github.com/decnet/identity-relay/pkg/fanout"
	"github.com/decnet/identity-relay/pkg/sse"
)

// An id the relay cannot use (CONTRACT.md: malformed, empty, too long,
// naming topics it does not have) is treated exactly like no id: the
// snapshot, then live; never a replay from the start of the stream. Each
// counts as a resume via "snapshot".
func TestUnusableIDGetsSnapshot(t *testing.T) {
	h := newHarness(t, newFakeStore(), nil)
	for off := range int64(5) { // the window holds the stream from its first record
		if err := h.broker.Publish(sse.Event{Topic: "identity.formed", Type: "formed", TS: "1", Payload: json.RawMessage(`{}`), Offset: off}); err != nil {
			t.Fatal(err)
		}
	}
	token := hs256(t, claimsFor("u-viewer", nil))
	unknownTopic := sse.Position{sse.KeyOf("identity.gone", [16]byte{}, 0): 3}.Encode()
	cases := []struct {
		name          string
		header, query *string
	}{
		{name: "garbage header", header: ptr("garbage")},
		{name: "empty header", header: ptr("")},
		{name: "empty query parameter", query: ptr("")},
		{name: "garbage query parameter", query: ptr("not-an-id")},
		{name: "too long", header: ptr("A" + strings.Repeat("Q", sse.MaxPositionLen))},
		{name: "version byte only", header: ptr("AQ")},
		{name: "a topic this relay does not have", header: ptr(unknownTopic)},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			req := h.request(t, "Bearer "+token, "")
			if c.header != nil {
				req.Header["Last-Event-ID"] = []string{*c.header}
			}
			if c.query != nil {
				req.URL.RawQuery = "last_event_id=" + url.QueryEscape(*c.query)
			}
			resp, err := h.client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			checkStream(t, resp) // keepalive, retry, snapshot: nothing replayed before it
			if got := counterValue(t, h.srv.m.resumes.WithLabelValues("snapshot")); got != float64(i+1) {
				t.Fatalf("relay_resumes_total{via=snapshot} = %v, want %d", got, i+1)
			}
		})
	}
	if got := counterValue(t, h.srv.m.resumes.WithLabelValues("window")); got != 0 {
		t.Fatalf("relay_resumes_total{via=window} = %v, want 0", got)
	}
}

func ptr(s string) *string { return &s }

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// Read-back slots: a user holds one at most, n are taken at once, and a
// slot is free again once released.
func TestReadBackSlots(t *testing.T) {
	r := newReadBacks(2)
	bg := context.Background()
	waitFails := func(user string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(bg, 20*time.Millisecond)
		defer cancel()
		if _, err := r.acquire(ctx, user); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("acquire for %s: %v, want to wait", user, err)
		}
	}
	releaseA, err := r.acquire(bg, "a")
	if err != nil {
		t.Fatal(err)
	}
	waitFails("a") // one per user, though a slot is free
	releaseB, err := r.acquire(bg, "b")
	if err != nil {
		t.Fatal(err)
	}
	waitFails("c") // both slots taken
	releaseA()
	releaseA() // idempotent: must not free b's slot
	releaseC, err := r.acquire(bg, "c")
	if err != nil {
		t.Fatal(err)
	}
	waitFails("d")
	releaseB()
	releaseC()
	if _, err := r.acquire(bg, "a"); err != nil {
		t.Fatal(err)
	}
}

// seqHistory stands in for Kafka: publishAt's {"seq":n} at offset n.
type seqHistory struct{ reads *atomic.Int64 }

func (h seqHistory) Read(_ context.Context, ranges []fanout.Range) ([]sse.Event, error) {
	h.reads.Add(1)
	var evs []sse.Event
	for _, r := range ranges {
		for off := r.From; off < r.To; off++ {
			evs = append(evs, sse.Event{Topic: r.Topic, TopicID: r.TopicID, Partition: r.Partition, Type: "formed", TS: "1",
				Payload: json.RawMessage(fmt.Sprintf(`{"seq":%d}`, off)), Offset: off})
		}
	}
	return evs, nil
}

// TestSnapshotOvertakenByTheWindow: a burst evicts the position a new
// viewer's snapshot was read at from the window before the viewer is
// subscribed, twice (the shared snapshot, then a fresh one). What the
// window lacks is then read back from Kafka, as for a viewer resuming from
// the snapshot's id: the viewer gets every event after the snapshot's
// position once, in order. (It used to get the live stream only: the
// events in between never reached it.) Without Kafka to read from it still
// gets the snapshot and the live stream, and the gap is logged.
func TestSnapshotOvertakenByTheWindow(t *testing.T) {
	for _, withKafka := range []bool{true, false} {
		t.Run(fmt.Sprintf("kafka=%v", withKafka), func(t *testing.T) { snapshotOvertaken(t, withKafka) })
	}
}

func snapshotOvertaken(t *testing.T, withKafka bool) {
	store := newFakeStore()
	store.blocks, store.gate = map[string]bool{"Snapshot": true}, make(chan struct{})
	var reads atomic.Int64
	h := newHarnessOn(t, store, fanout.New(fanout.Options{Buffer: 64, WindowEvents: 4}), func(c *Config) {
		if withKafka {
			c.History = seqHistory{&reads}
		}
	})
	next := 0
	publish := func(n int) {
		for range n {
			publishAt(t, h.broker, next)
			next++
		}
	}
	publish(3)
	resp := make(chan *http.Response, 1)
	token := hs256(t, claimsFor("u-viewer", nil))
	go func() {
		r, err := h.client.Do(h.request(t, "", token))
		if err != nil {
			t.Error(err)
			r = nil
		}
		resp <- r
	}()
	for call := int64(1); call <= 2; call++ {
		waitCalls(t, "snapshot queries", &store.snapshotCalls, call)
		publish(10) // while the query runs: the window (4 events) moves past its position
		store.gate <- struct{}{}
	}
	r := <-resp
	if r == nil {
		t.FailNow()
	}
	defer r.Body.Close()
	id := checkStream(t, r)
	from, err := sse.ParsePosition(id)
	if err != nil || len(from) != 1 {
		t.Fatalf("snapshot id %q: %v %v", id, from, err)
	}
	var first int
	for _, off := range from {
		first = int(off)
	}
	if first != 13 {
		t.Fatalf("the snapshot's position is offset %d, want 13 (read before the second burst)", first)
	}
	live := next
	publish(2)
	if !withKafka {
		first = live // all it can get
	}
	var want []int
	for i := first; i < next; i++ {
		want = append(want, i)
	}
	br := bufio.NewReader(r.Body)
	var got []int
	for len(got) < len(want) {
		f := readFrame(t, br)
		if f.Event == "snapshot" {
			t.Fatal("a second snapshot")
		}
		seqs, _ := seqsOf(t, []ssetest.Frame{f})
		got = append(got, seqs...)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("after the snapshot got %v, want %v", got, want)
	}
	if withKafka && reads.Load() != 1 {
		t.Fatalf("%d read-backs, want 1", reads.Load())
	}
	if logged := strings.Contains(h.logs.String(), "Kafka could not fill in"); logged == withKafka {
		t.Fatalf("the gap logged: %v, want %v", logged, !withKafka)
	}
}

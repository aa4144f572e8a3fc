package api

import (
	"context"
	"encoding/json"
	"errors"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

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

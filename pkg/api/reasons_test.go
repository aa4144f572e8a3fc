package api

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/decnet/identity-relay/pkg/fanout"
	"github.com/decnet/identity-relay/pkg/sse"
)

// A stream still writing when the shutdown deadline cuts it counts as
// shutdown, the reason it ended for, not as a write error.
func TestShutdownDeadlineCountsAsShutdown(t *testing.T) {
	h := newHarness(t, newFakeStore(), func(c *Config) {
		c.WriteTimeout = time.Minute // the write blocks until the deadline cuts it
		c.SendBuffer = 16 << 10
	})
	conn, _ := h.dialStream(t, "u-viewer") // read up to the snapshot, then never again
	defer conn.Close()
	// Frames of 64 KiB: a few fill the socket buffers; the queue holds the
	// rest, so the viewer is not dropped as slow.
	pad := strings.Repeat("x", 64<<10)
	for off := range int64(12) {
		payload, _ := json.Marshal(map[string]string{"pad": pad})
		if err := h.broker.Publish(sse.Event{Topic: "identity.formed", Type: "formed", TS: "1", Payload: payload, Offset: off}); err != nil {
			t.Fatal(err)
		}
	}
	h.srv.Drain()
	_ = h.broker.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	if err := h.srv.Wait(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait: %v, want the deadline (the stream was blocked writing)", err)
	}
	h.waitDisconnects(t, fanout.ReasonShutdown, 1)
	for _, r := range []fanout.Reason{reasonWriteError, fanout.ReasonSlow, reasonClientGone} {
		if n := h.disconnects(t, r); n != 0 {
			t.Errorf("also counted %v under %s", n, r)
		}
	}
}

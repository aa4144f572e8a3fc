package api

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/decnet/identity-relay/pkg/sse"
)

// snapshotMaxAge is how long one snapshot query serves new viewers. A storm
// of thousands of viewers costs one query a second, and a viewer arriving
// alone waits for nobody but the database.
const snapshotMaxAge = time.Second

// snapshot is a snapshot frame and the stream position read just before
// its query started. A viewer is subscribed from that position, so whatever
// was published after it is replayed from the window: nothing published
// between the query and the subscription is lost (at worst, an event the
// rows already reflect arrives once more).
type snapshot struct {
	frame []byte
	pos   sse.Position
	taken time.Time
}

// snapshotCache shares snapshot queries among viewers; concurrent misses
// share one query.
type snapshotCache struct {
	load     func(ctx context.Context) (json.RawMessage, error)
	position func() sse.Position
	timeout  time.Duration

	mu      sync.Mutex
	cur     *snapshot
	pending *snapCall
}

type snapCall struct {
	started time.Time
	done    chan struct{}
	snap    *snapshot
	err     error
}

// get returns a snapshot at most snapshotMaxAge old, or with fresh, one
// taken after the call began.
func (c *snapshotCache) get(ctx context.Context, fresh bool) (*snapshot, error) {
	start := time.Now()
	c.mu.Lock()
	if cur := c.cur; cur != nil && !fresh && time.Since(cur.taken) < snapshotMaxAge {
		c.mu.Unlock()
		return cur, nil
	}
	call := c.pending
	if call == nil || (fresh && call.started.Before(start)) {
		call = &snapCall{started: time.Now(), done: make(chan struct{})}
		c.pending = call
		go c.run(call)
	}
	c.mu.Unlock()
	select {
	case <-call.done:
		return call.snap, call.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// run reads one snapshot. Its context is not one viewer's: it serves them all.
func (c *snapshotCache) run(call *snapCall) {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	snap := &snapshot{pos: c.position(), taken: time.Now()}
	rows, err := c.load(ctx)
	if err == nil {
		snap.frame, err = snapshotFrame(rows)
	}
	c.mu.Lock()
	if c.pending == call {
		c.pending = nil
	}
	if err == nil && (c.cur == nil || snap.taken.After(c.cur.taken)) {
		c.cur = snap
	}
	c.mu.Unlock()
	call.snap, call.err = snap, err
	close(call.done)
}

func snapshotFrame(rows json.RawMessage) ([]byte, error) {
	var b bytes.Buffer
	b.Grow(len(rows) + 48)
	b.WriteString("event: snapshot\ndata: {\"identities\":")
	// Compact guarantees one data line whatever the store returned.
	if err := json.Compact(&b, rows); err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	b.WriteString("}\n\n")
	return b.Bytes(), nil
}

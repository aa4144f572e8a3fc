package api

import (
	"context"
	"encoding/json"
	"sync"
	"time"
)

// snapshotSpacing is the least time between two snapshot queries. Viewers
// arriving meanwhile share the next query, so a reconnect storm of thousands
// costs one query a second, while a lone viewer waits for nobody.
const snapshotSpacing = time.Second

// snapshotGroup coalesces snapshot reads. Each viewer is subscribed before it
// joins, and a flight's query starts only after its last viewer joined, so
// the rows are never older than any joiner's subscription.
type snapshotGroup struct {
	load    func(ctx context.Context) (json.RawMessage, error)
	timeout time.Duration

	mu        sync.Mutex
	next      *flight // not yet started: arrivals join it
	lastStart time.Time
}

type flight struct {
	done chan struct{}
	rows json.RawMessage
	err  error
}

func (g *snapshotGroup) get(ctx context.Context) (json.RawMessage, error) {
	g.mu.Lock()
	f := g.next
	if f == nil {
		f = &flight{done: make(chan struct{})}
		g.next = f
		go g.run(f, time.Until(g.lastStart.Add(snapshotSpacing)))
	}
	g.mu.Unlock()
	select {
	case <-f.done:
		return f.rows, f.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (g *snapshotGroup) run(f *flight, wait time.Duration) {
	if wait > 0 {
		time.Sleep(wait)
	}
	g.mu.Lock()
	g.next = nil // later arrivals need a later query
	g.lastStart = time.Now()
	g.mu.Unlock()
	// Not the context of one viewer: the flight serves them all.
	ctx, cancel := context.WithTimeout(context.Background(), g.timeout)
	defer cancel()
	f.rows, f.err = g.load(ctx)
	close(f.done)
}

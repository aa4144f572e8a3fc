package api

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/decnet/identity-relay/pkg/sse"
)

// snapshotMaxAge is how long one snapshot query serves new viewers (Server's
// snaps, a ttlCache of one key). A storm of thousands of viewers costs one
// query a second, and a viewer arriving alone waits for nobody but the database.
const snapshotMaxAge = time.Second

// snapshot is a snapshot frame and the stream position read just before
// its query started. A viewer is subscribed from that position, so whatever
// was published after it is replayed from the window: nothing published
// between the query and the subscription is lost (at worst, an event the
// rows already reflect arrives once more). The frame carries that position
// as its id, so a stream that ends before its first event (lifetime,
// rebalance, shutdown, a slow drop) resumes from it like from any event,
// instead of starting over with another snapshot.
type snapshot struct {
	frame []byte
	pos   sse.Position
}

// loadSnapshot reads one snapshot: the position first, then the rows.
func (s *Server) loadSnapshot(ctx context.Context) (*snapshot, error) {
	snap := &snapshot{pos: s.broker.Position()}
	rows, err := s.store.Snapshot(ctx, s.cfg.SnapshotLimit)
	if err == nil {
		snap.frame, err = snapshotFrame(snap.pos, rows)
	}
	return snap, err
}

// snapshotFrame is `id: <pos>\nevent: snapshot\ndata: {"identities":rows}\n\n`,
// without the id line when no partition is known yet (Kafka not read):
// an empty id would only clear the browser's.
func snapshotFrame(pos sse.Position, rows json.RawMessage) ([]byte, error) {
	var b bytes.Buffer
	b.Grow(len(rows) + 64)
	if len(pos) > 0 {
		b.WriteString("id: ")
		b.WriteString(pos.Encode())
		b.WriteByte('\n')
	}
	b.WriteString("event: snapshot\ndata: {\"identities\":")
	// Compact guarantees one data line whatever the store returned.
	if err := json.Compact(&b, rows); err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	b.WriteString("}\n\n")
	return b.Bytes(), nil
}

package fanout

import "github.com/decnet/identity-relay/pkg/sse"

// Cursor gives one resuming viewer the frames it lacks, each with an id that
// never moves a partition back from what the viewer was already sent.
//
// A frame's id is its replica's position after it. A viewer that comes from
// another replica may be ahead of that on some partition (the replicas read
// partitions in different interleavings): those frames would carry an id
// behind what the viewer has, and resuming from it would bring back frames
// it already had. Until the replica's own ids cover the viewer's position,
// the cursor skips what the viewer has and sends the others with the
// merged id (the per-partition maximum of the two). Once covered, every
// later frame is new to the viewer and its own id is exact: the cursor is done.
type Cursor struct {
	have  sse.Position // per partition, the next offset the viewer needs
	at    sse.Position // the stream position before the next frame, for have's partitions
	ahead int          // partitions where have is beyond at
	done  bool
}

// newCursor returns a cursor for a viewer at have, whose next frame follows
// the stream position at; nil when the frames' own ids will do.
func newCursor(have, at sse.Position) *Cursor {
	c := &Cursor{have: have, at: at}
	for k, v := range have {
		if v > at[k] {
			c.ahead++
		}
	}
	if c.ahead == 0 {
		return nil
	}
	return c
}

// Done reports whether every frame from now on goes out as it is.
func (c *Cursor) Done() bool { return c == nil || c.done }

// Frame returns what to send the viewer for f, the next frame of the stream
// in publish order: nil when the viewer already has it, else f's bytes, with
// the merged id while the viewer is ahead. A nil Cursor passes every frame.
func (c *Cursor) Frame(f *sse.Frame) []byte {
	if c.Done() {
		return f.Bytes
	}
	k := f.Key
	have, tracked := c.have[k]
	wasAhead := tracked && have > c.at[k]
	c.at[k] = f.Offset + 1
	send := f.Offset >= have
	if send {
		c.have[k] = f.Offset + 1
	}
	if wasAhead && c.have[k] <= c.at[k] {
		c.ahead--
	}
	if c.ahead == 0 {
		c.done = true
	}
	switch {
	case !send:
		return nil
	case c.done:
		return f.Bytes
	}
	pos, err := sse.ParsePosition(f.ID())
	if err != nil {
		return f.Bytes // cannot happen: the broadcaster encoded it
	}
	for k, v := range c.have {
		pos[k] = max(pos[k], v)
	}
	return f.WithID(pos.Encode())
}

package fanout

import "github.com/decnet/identity-relay/pkg/sse"

// window is the replay window: the newest frames in publish order, bounded in
// count and bytes. For each partition it knows from which offset on it holds
// every published record (low), and the stream position just before its
// oldest frame (base), so it can tell whether a resume is exact and which id
// each of its frames carried.
type window struct {
	maxEvents, maxBytes int

	ring  []*sse.Frame
	head  int // index of the oldest frame
	n     int
	bytes int
	low   map[sse.Key]int64
	base  sse.Position
}

func newWindow(maxEvents, maxBytes int) *window {
	return &window{maxEvents: maxEvents, maxBytes: maxBytes, low: map[sse.Key]int64{}, base: sse.Position{}}
}

func (w *window) at(i int) *sse.Frame { return w.ring[(w.head+i)%len(w.ring)] }

func (w *window) add(f *sse.Frame) {
	if _, ok := w.low[f.Key]; !ok {
		w.low[f.Key] = f.Offset
	}
	if w.n == len(w.ring) {
		w.grow()
	}
	w.ring[(w.head+w.n)%len(w.ring)] = f
	w.n++
	w.bytes += len(f.Bytes)
	for w.n > 1 && (w.n > w.maxEvents || w.bytes > w.maxBytes) {
		old := w.ring[w.head]
		w.ring[w.head] = nil
		w.head = (w.head + 1) % len(w.ring)
		w.n--
		w.bytes -= len(old.Bytes)
		w.low[old.Key] = old.Offset + 1
		w.base[old.Key] = old.Offset + 1
	}
}

// grow doubles the ring up to maxEvents+1, so an idle relay holds no big array.
func (w *window) grow() {
	size := min(max(2*len(w.ring), 64), w.maxEvents+1)
	ring := make([]*sse.Frame, size)
	for i := range w.n {
		ring[i] = w.at(i)
	}
	w.ring, w.head = ring, 0
}

// reset forgets every frame (after a topic was re-created, older frames can
// no longer be placed in the stream): from now on the window covers each
// partition from its next offset, so resuming from anything older is a gap.
func (w *window) reset(next sse.Position) {
	*w = *newWindow(w.maxEvents, w.maxBytes)
	for k, v := range next {
		w.low[k] = v
		w.base[k] = v
	}
}

// plan is what resuming from a position takes, worked out under the
// broadcaster's lock: what to read back from Kafka, and which window frames
// follow it.
type plan struct {
	// missing lists, per partition, the records before the window that the
	// viewer has not seen; have is the viewer's position once they are read.
	missing []Range
	have    sse.Position
	// replay holds the window's frames from the first one the viewer lacks,
	// in publish order; at is the stream position just before replay[0],
	// for the partitions of have (what the replayed frames' ids build on).
	replay []*sse.Frame
	at     sse.Position
}

// plan works out a resume from from, a position the client sent; now is the
// position after the newest frame, names the current topics by hash. It
// returns ErrUnusable for a position this stream could not have issued: empty,
// naming a topic it does not have (or had before it was re-created), or
// further ahead of it than a window. from is not modified.
func (w *window) plan(from, now sse.Position, names map[uint32]topicName) (plan, error) {
	if len(from) == 0 {
		return plan{}, ErrUnusable
	}
	merged := now.Clone()
	for k, v := range from {
		if _, ok := names[k.Topic]; !ok || v-now[k] > int64(w.maxEvents) {
			return plan{}, ErrUnusable
		}
		merged[k] = max(merged[k], v)
	}
	if merged.Slots() > sse.MaxPartitions { // the viewer's ids could not be read back
		return plan{}, ErrUnusable
	}
	p := plan{have: from.Clone()}
	for k := range now {
		if v, low := from[k], w.low[k]; v < low {
			n := names[k.Topic]
			p.missing = append(p.missing, Range{Topic: n.name, TopicID: n.id, Partition: k.Partition, From: v, To: low})
			p.have[k] = low
		}
	}
	p.at = sse.Position{}
	for k := range p.have {
		if v, ok := w.base[k]; ok {
			p.at[k] = v
		}
	}
	for i := range w.n {
		f := w.at(i)
		if f.Offset >= p.have[f.Key] {
			p.replay = make([]*sse.Frame, 0, w.n-i)
			for j := i; j < w.n; j++ {
				p.replay = append(p.replay, w.at(j))
			}
			break
		}
		if _, ok := p.have[f.Key]; ok {
			p.at[f.Key] = f.Offset + 1
		}
	}
	return p, nil
}

// since returns the frames published after at, a position this broadcaster
// gave out, or ErrGap when the window no longer holds all of them.
func (w *window) since(at sse.Position) ([]*sse.Frame, error) {
	for k, low := range w.low {
		if at[k] < low && w.base[k] > 0 {
			return nil, ErrGap
		}
	}
	var out []*sse.Frame
	for i := range w.n {
		if f := w.at(i); f.Offset >= at[f.Key] {
			out = append(out, f)
		}
	}
	return out, nil
}

package fanout

// window is the replay window: the newest frames in publish order, bounded in
// count and bytes. For each partition it knows from which offset on it holds
// every published record (low), so it can tell whether a resume is exact.
type window struct {
	maxEvents, maxBytes int

	ring  []*Frame
	head  int // index of the oldest frame
	n     int
	bytes int
	low   map[Key]int64
}

func newWindow(maxEvents, maxBytes int) *window {
	return &window{maxEvents: maxEvents, maxBytes: maxBytes, low: map[Key]int64{}}
}

func (w *window) at(i int) *Frame { return w.ring[(w.head+i)%len(w.ring)] }

func (w *window) add(f *Frame) {
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
	}
}

// grow doubles the ring up to maxEvents+1, so an idle relay holds no big array.
func (w *window) grow() {
	size := min(max(2*len(w.ring), 64), w.maxEvents+1)
	ring := make([]*Frame, size)
	for i := range w.n {
		ring[i] = w.at(i)
	}
	w.ring, w.head = ring, 0
}

// reset forgets every frame (after a topic was re-created, older frames can
// no longer be placed in the stream): from now on the window covers each
// partition from its next offset, so resuming from anything older is a gap.
func (w *window) reset(next Position) {
	*w = *newWindow(w.maxEvents, w.maxBytes)
	for k, v := range next {
		w.low[k] = v
	}
}

// resume computes what a viewer that has seen everything before from needs;
// now is the position after the newest published frame, names the topics'
// names by hash (to name the missing ranges).
func (w *window) resume(from, now Position, names map[uint32]topicName) Resume {
	r := Resume{}
	for k, next := range now {
		v := from[k]
		switch {
		case v > next:
			// Ahead of this replica: skip what it already saw. Far ahead is
			// not a position of this stream.
			if v-next > int64(w.maxEvents) {
				return Resume{Gap: true}
			}
			if r.Skip == nil {
				r.Skip = Position{}
			}
			r.Skip[k] = v
		case v < w.low[k]:
			// Records between v and low are no longer here.
			r.Gap = true
			n := names[k.Topic]
			r.Missing = append(r.Missing, Range{Topic: n.name, TopicID: n.id, Partition: k.Partition, From: v, To: w.low[k]})
		}
	}
	if r.Gap {
		return Resume{Gap: true, Missing: r.Missing}
	}
	for k, v := range from {
		if _, known := now[k]; !known && v > 0 {
			// A partition this replica has read nothing of yet: whatever it
			// reads below v was seen.
			if r.Skip == nil {
				r.Skip = Position{}
			}
			r.Skip[k] = v
		}
	}
	for i := range w.n {
		f := w.at(i)
		if f.Offset >= from[f.Key] {
			r.Replay = append(r.Replay, f)
		}
	}
	return r
}

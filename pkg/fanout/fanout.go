// Package fanout is the in-memory broadcaster: it turns each event into one
// SSE frame, encoded once, and offers the same bytes to every subscribed
// viewer through the viewer's own bounded channel. A viewer whose channel is
// full is dropped; the broadcaster never waits for anyone.
package fanout

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/decnet/identity-relay/pkg/sse"
)

// Sentinel errors.
var (
	// ErrClosed is returned by Subscribe once the broadcaster is closed.
	ErrClosed = errors.New("fanout: broadcaster closed")
	// ErrUnusable is returned by Resume for a position this stream could not
	// have issued; the viewer is treated as new.
	ErrUnusable = errors.New("fanout: not a position of this stream")
	// ErrGap is returned by Resume and Subscribe when neither the window nor
	// Kafka can bring the viewer from its position to now without loss.
	ErrGap = errors.New("fanout: the stream from this position is no longer held")
)

// Reason says why a subscription ended. It is the label of the relay's
// disconnect metric (relay_viewer_disconnects_total{reason}): the
// broadcaster ends subscriptions as ReasonSlow or ReasonShutdown, and their
// owner may end them for reasons of its own (End).
type Reason string

const (
	// ReasonNone: the subscription is still live.
	ReasonNone Reason = ""
	// ReasonSlow: the viewer's channel was full when a frame arrived.
	ReasonSlow Reason = "slow"
	// ReasonShutdown: the broadcaster was closed.
	ReasonShutdown Reason = "shutdown"
	// ReasonClosed: Close, with no reason of the owner's.
	ReasonClosed Reason = "closed"
)

// Broadcaster offers frames to subscribers and keeps the replay window. The
// zero value is not usable; call New.
//
// Published frames are offered at a flush, all of them as one batch in one
// channel send per viewer. A frame that finds the broadcaster idle (no flush
// for FlushInterval) is offered at once: at light load nothing waits. Frames
// that follow a flush closer than that wait until FlushInterval after it,
// or until maxFlush (or a quarter of a queue) are waiting: under load,
// events close together share one send, one wake-up and one write per
// viewer, most of what a viewer costs at moderate rates.
type Broadcaster struct {
	buffer      int // frames a viewer may have queued
	flushEvery  time.Duration
	flushAfter  int // waiting frames that force a flush
	readBackMax int // bytes of frames one resume may read back

	mu     sync.Mutex
	subs   []*Subscription // index held in Subscription.idx, guarded by mu
	closed bool
	pos    sse.Position // after the last published event
	win    *window
	topics map[string]uint32 // current topic hash (name and topic ID) per topic name
	names  map[uint32]topicName
	// pending holds the frames published since the last flush, at
	// lastFlush; timer flushes them FlushInterval after it.
	pending   []*sse.Frame
	timer     *time.Timer
	lastFlush time.Time

	published, delivered, dropped atomic.Uint64
	behind                        atomic.Bool // many viewers were behind at the last flush
}

// Options size the broadcaster.
type Options struct {
	// Buffer is each viewer's channel capacity, in frames (DefaultBuffer).
	Buffer int
	// WindowEvents and WindowBytes bound the replay window; the oldest frames
	// are evicted past either (DefaultWindowEvents, DefaultWindowBytes).
	WindowEvents int
	WindowBytes  int
	// FlushInterval is the longest a published frame waits to be offered
	// with the frames after it; 0 offers every frame at once.
	FlushInterval time.Duration
	// ReadBackBytes bounds the frames one resume reads back from Kafka
	// (DefaultReadBackBytes); a longer gap gets a snapshot.
	ReadBackBytes int
}

// Stats are running totals since New.
type Stats struct {
	Published uint64 // events encoded and offered
	Delivered uint64 // frames placed in a viewer's channel
	Dropped   uint64 // viewers ended because their channel was full
	// Subscribers, WindowEvents and WindowBytes are sizes now.
	Subscribers  int
	WindowEvents int
	WindowBytes  int
}

// Stats returns the running totals.
func (b *Broadcaster) Stats() Stats {
	b.mu.Lock()
	subs, n, size := len(b.subs), b.win.n, b.win.bytes
	b.mu.Unlock()
	return Stats{
		Published:    b.published.Load(),
		Delivered:    b.delivered.Load(),
		Dropped:      b.dropped.Load(),
		Subscribers:  subs,
		WindowEvents: n,
		WindowBytes:  size,
	}
}

// The defaults of Options (and of the relay's settings).
const (
	// DefaultBuffer: 256 frames (2 KiB of pointers) ride out a few hundred
	// milliseconds of a busy stream for a reader that stalls for a moment.
	DefaultBuffer = 256
	// DefaultWindowEvents and DefaultWindowBytes: minutes of DECNET's usual
	// traffic, so a rollout or a laptop's short sleep resumes from memory.
	DefaultWindowEvents = 10000
	DefaultWindowBytes  = 64 << 20
	// DefaultReadBackBytes: a longer gap is cheaper healed by a snapshot,
	// and four read-backs at once stay within tens of MiB (RELIABILITY.md).
	DefaultReadBackBytes = 8 << 20
)

// New returns a broadcaster sized by o; a field below 1 takes its default.
func New(o Options) *Broadcaster {
	if o.Buffer < 1 {
		o.Buffer = DefaultBuffer
	}
	if o.WindowEvents < 1 {
		o.WindowEvents = DefaultWindowEvents
	}
	if o.WindowBytes < 1 {
		o.WindowBytes = DefaultWindowBytes
	}
	if o.ReadBackBytes < 1 {
		o.ReadBackBytes = DefaultReadBackBytes
	}
	return &Broadcaster{
		buffer: o.Buffer, flushEvery: max(o.FlushInterval, 0), flushAfter: min(max(o.Buffer/4, 1), maxFlush),
		readBackMax: o.ReadBackBytes,
		pos:         sse.Position{}, win: newWindow(o.WindowEvents, o.WindowBytes),
		topics: map[string]uint32{}, names: map[uint32]topicName{},
	}
}

// maxFlush bounds a batch: past it, waiting longer saves little and delays
// every frame of the batch.
const maxFlush = 64

// A Batch is frames offered to the viewers together, in publish order.
// Every viewer gets the same one: read it, never change it.
type Batch struct{ Frames []*sse.Frame }

// Subscription is one viewer's bounded queue of frames, which come in
// batches; the bound counts frames. Its channel holds pointers: 8 bytes a
// slot, most of an idle viewer's queue memory.
type Subscription struct {
	b      *Broadcaster
	c      chan *Batch
	queued atomic.Int64 // frames in c
	done   chan struct{}
	once   sync.Once
	onEnd  func(Reason)
	// reason is written once, before done is closed; read it after <-Done().
	reason Reason
	idx    int // in b.subs; -1 once removed; guarded by b.mu
}

// Batches yields the frames offered to this viewer, in publish order, a
// batch at a time. Batches are shared by every viewer: read them, never
// change them. Hand each one received to Taken.
func (s *Subscription) Batches() <-chan *Batch { return s.c }

// Taken frees the batch's room in the queue.
func (s *Subscription) Taken(batch *Batch) { s.queued.Add(-int64(len(batch.Frames))) }

// Queued is how many frames wait in the queue.
func (s *Subscription) Queued() int { return int(s.queued.Load()) }

// Done is closed when the subscription ends, for whatever reason.
func (s *Subscription) Done() <-chan struct{} { return s.done }

// Reason says why the subscription ended; ReasonNone while it is live.
func (s *Subscription) Reason() Reason {
	select {
	case <-s.done:
		return s.reason
	default:
		return ReasonNone
	}
}

// End unsubscribes for reason r, unless the subscription has ended already
// (the first reason stays). It is idempotent and safe to call from any
// goroutine.
func (s *Subscription) End(r Reason) {
	s.end(r)
	s.b.mu.Lock()
	s.b.removeLocked(s)
	s.b.mu.Unlock()
}

// Close is End(ReasonClosed).
func (s *Subscription) Close() { s.End(ReasonClosed) }

// end records the first reason and signals Done. Idempotent.
func (s *Subscription) end(r Reason) bool {
	ended := false
	s.once.Do(func() {
		s.reason = r
		close(s.done)
		ended = true
		if s.onEnd != nil {
			s.onEnd(r)
		}
	})
	return ended
}

func (b *Broadcaster) subscribeLocked(onEnd func(Reason)) (*Subscription, error) {
	if b.closed {
		return nil, ErrClosed
	}
	s := &Subscription{
		b:     b,
		c:     make(chan *Batch, b.buffer), // every batch holds a frame at least
		done:  make(chan struct{}),
		onEnd: onEnd,
		idx:   len(b.subs),
	}
	b.subs = append(b.subs, s)
	return s, nil
}

// Position returns the stream position after the newest published event.
func (b *Broadcaster) Position() sse.Position {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.pos.Clone()
}

// Range is a run of one partition's offsets, From to To (exclusive).
type Range struct {
	Topic     string
	TopicID   [16]byte
	Partition int32
	From, To  int64
}

// History reads back from Kafka what the replay window no longer holds.
type History interface {
	// Read returns the events of the ranges, each range in offset order.
	// Records that cannot be relayed may be left out.
	Read(ctx context.Context, ranges []Range) ([]sse.Event, error)
}

type topicName struct {
	name string
	id   [16]byte
}

// Resumed is what a resuming viewer is sent before its live frames, in this
// order: the frames read back from Kafka, then the window's frames passed
// through the cursor. Live frames go through the cursor too.
type Resumed struct {
	// Kafka holds the frames read back from Kafka, with ids of this viewer's own.
	Kafka [][]byte
	// Replay holds window frames in publish order; send each through Cursor.
	Replay []*sse.Frame
	// Cursor is nil when every frame can go out as it is.
	Cursor *Cursor
}

// Resume subscribes a viewer that has seen everything before from, a
// position a client sent: it is sent, exactly once each and in order per
// partition, every frame after from. What the window no longer holds is read
// back from h (nil: not at all) within the read-back byte bound; ctx bounds
// that read. It returns ErrUnusable for a position this stream could not
// have issued, and ErrGap when the records after it are no longer held: a
// snapshot is the only way on then.
//
// The window's frames and the subscription are taken under one lock before
// Kafka is read, so whatever is published or evicted during the read is in
// one of them: nothing lost, nothing twice. onEnd is as for Subscribe.
func (b *Broadcaster) Resume(ctx context.Context, from sse.Position, h History, onEnd func(Reason)) (*Subscription, Resumed, error) {
	b.mu.Lock()
	b.flushLocked() // the pending frames are before this viewer's position
	p, err := b.win.plan(from, b.pos, b.names)
	if err == nil && len(p.missing) > 0 && h == nil {
		err = ErrGap
	}
	var s *Subscription
	if err == nil {
		s, err = b.subscribeLocked(onEnd)
	}
	b.mu.Unlock()
	if err != nil {
		return nil, Resumed{}, err
	}
	r := Resumed{Replay: p.replay}
	if len(p.missing) > 0 {
		have := from.Clone() // p.have assumes the read succeeded; the ids grow as it goes
		if r.Kafka, err = b.readBack(ctx, h, p.missing, have); err != nil {
			s.Close()
			return nil, Resumed{}, fmt.Errorf("%w: %w", ErrGap, err)
		}
	}
	r.Cursor = newCursor(p.have, p.at)
	return s, r, nil
}

// readBack reads the missing ranges from h and frames them for a viewer at
// have (which it advances), each with the viewer's position after it as id.
func (b *Broadcaster) readBack(ctx context.Context, h History, missing []Range, have sse.Position) ([][]byte, error) {
	events, err := h.Read(ctx, missing)
	if err != nil {
		return nil, err
	}
	frames := make([][]byte, 0, len(events))
	size := 0
	for _, ev := range events {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		have[sse.KeyOf(ev.Topic, ev.TopicID, ev.Partition)] = ev.Offset + 1
		f, err := sse.Encode(ev, have.Encode())
		if err != nil {
			continue // cannot be framed; the live path skips it too
		}
		if size += len(f.Bytes); size > b.readBackMax {
			return nil, fmt.Errorf("read back more than %d bytes of frames", b.readBackMax)
		}
		frames = append(frames, f.Bytes)
	}
	return frames, nil
}

// Subscribe subscribes a viewer from at, a position this broadcaster gave out
// (Position), and returns the window's frames published after it; with a nil
// at, only live frames. It returns ErrGap when the window no longer holds
// them all.
//
// onEnd, if not nil, is called once when the subscription ends, by whichever
// goroutine ends it, possibly the publisher's: it must return at once and must
// not call the broadcaster. The API uses it to cut a write blocked on a
// viewer that was just dropped for being slow.
func (b *Broadcaster) Subscribe(at sse.Position, onEnd func(Reason)) (*Subscription, []*sse.Frame, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.flushLocked()
	var replay []*sse.Frame
	if at != nil {
		var err error
		if replay, err = b.win.since(at); err != nil {
			return nil, nil, err
		}
	}
	s, err := b.subscribeLocked(onEnd)
	if err != nil {
		return nil, nil, err
	}
	return s, replay, nil
}

// Publish encodes ev once, with the stream position after it as its id, keeps
// it in the replay window and offers it to every live subscriber at the next
// flush, never blocking. A subscriber whose queue cannot take the batch is
// ended with ReasonSlow and removed. Call Publish from one goroutine: each
// partition's events must come in offset order. A backfill event (read at
// start-up, older than the process) goes to the window only.
func (b *Broadcaster) Publish(ev sse.Event) error {
	if ev.Offset < 0 || ev.Offset >= sse.MaxOffset {
		return fmt.Errorf("%w: offset %d", sse.ErrBadPosition, ev.Offset)
	}
	key := sse.KeyOf(ev.Topic, ev.TopicID, ev.Partition)
	b.mu.Lock()
	defer b.mu.Unlock()
	if old, ok := b.topics[ev.Topic]; ok && old != key.Topic {
		// A new topic ID: the topic was deleted and re-created. Its old
		// partitions leave the position, and the window, which mixes the two,
		// is emptied; resumes from before this get a snapshot.
		for k := range b.pos {
			if k.Topic == old {
				delete(b.pos, k)
			}
		}
		delete(b.names, old)
		b.win.reset(b.pos)
	} else if next, seen := b.pos[key]; seen && ev.Offset < next {
		// Offsets went back under the same key (a cluster without topic IDs
		// re-created the topic): the window no longer describes the stream.
		delete(b.pos, key)
		b.win.reset(b.pos)
	}
	prev, had := b.pos[key]
	b.pos[key] = ev.Offset + 1
	if !had && b.pos.Slots() > sse.MaxPartitions {
		delete(b.pos, key)
		return sse.ErrTooManyPartitions
	}
	f, err := sse.Encode(ev, b.pos.Encode())
	if err != nil {
		if had {
			b.pos[key] = prev
		} else {
			delete(b.pos, key)
		}
		return err
	}
	b.topics[ev.Topic] = key.Topic
	b.names[key.Topic] = topicName{ev.Topic, ev.TopicID}
	f.Key, f.Offset = key, ev.Offset
	b.win.add(f)
	b.published.Add(1)
	if !ev.Backfill {
		if b.pending == nil {
			b.pending = make([]*sse.Frame, 0, b.flushAfter)
		}
		b.pending = append(b.pending, f)
		switch {
		case b.flushEvery == 0 || len(b.pending) >= b.flushAfter:
			b.flushLocked()
		case len(b.pending) == 1:
			wait := b.flushEvery - time.Since(b.lastFlush)
			switch {
			case wait <= 0: // idle: no reason to wait
				b.flushLocked()
			case b.timer == nil:
				b.timer = time.AfterFunc(wait, b.flush)
			default:
				b.timer.Reset(wait)
			}
		}
	}
	return nil
}

// Empty records that a partition holds no record below next (retention
// deleted them all before this process read any): a viewer whose position
// is behind next on it has lost records, and gets a snapshot. A partition
// already published is left alone.
func (b *Broadcaster) Empty(topic string, topicID [16]byte, partition int32, next int64) {
	key := sse.KeyOf(topic, topicID, partition)
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, seen := b.pos[key]; seen || next <= 0 || next >= sse.MaxOffset {
		return
	}
	if old, ok := b.topics[topic]; ok && old != key.Topic {
		return // a stale report of a topic re-created since
	}
	if b.pos[key] = next; b.pos.Slots() > sse.MaxPartitions {
		delete(b.pos, key)
		return
	}
	b.win.low[key], b.win.base[key] = next, next
	b.topics[topic] = key.Topic
	b.names[key.Topic] = topicName{topic, topicID}
}

// flush is the timer's.
func (b *Broadcaster) flush() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.flushLocked()
}

// flushLocked offers the pending frames to every subscriber as one batch.
func (b *Broadcaster) flushLocked() {
	if len(b.pending) == 0 {
		return
	}
	batch := &Batch{Frames: b.pending}
	b.pending = nil // the frames now belong to the viewers
	b.lastFlush = time.Now()
	if b.timer != nil {
		b.timer.Stop()
	}
	n := int64(len(batch.Frames))
	delivered, dropped, behind := 0, 0, 0
	for i := 0; i < len(b.subs); {
		s := b.subs[i]
		if q := s.queued.Load() + n; q <= int64(b.buffer) {
			s.queued.Add(n)
			select {
			case s.c <- batch: // room: c holds buffer batches of a frame at least
				delivered += len(batch.Frames)
				if b.isBehind(q) {
					behind++
				}
				i++
				continue
			default:
			}
		}
		// Full: drop the viewer. removeLocked swaps the last one into i.
		if s.end(ReasonSlow) {
			dropped++
		}
		b.removeLocked(s)
	}
	b.delivered.Add(uint64(delivered))
	b.dropped.Add(uint64(dropped))
	b.behind.Store(b.many(behind))
}

// Behind reports whether more than a quarter of the viewers have a quarter
// of their queue or more to write: then the relay is reading faster than it
// can write, not one viewer being slow, and reading on would drop many. The
// consumer waits a little for them instead. Cheap while they are not
// behind: each flush records the answer, and only a yes is checked again.
func (b *Broadcaster) Behind() bool {
	if !b.behind.Load() {
		return false
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, s := range b.subs {
		if b.isBehind(s.queued.Load() + int64(len(b.pending))) {
			n++
		}
	}
	b.behind.Store(b.many(n))
	return b.behind.Load()
}

func (b *Broadcaster) isBehind(queued int64) bool { return queued >= int64(max(b.buffer/4, 1)) }
func (b *Broadcaster) many(n int) bool            { return n > 0 && 4*n > len(b.subs) }

// Close ends every subscription with ReasonShutdown and refuses new ones.
// It is idempotent; it returns ErrClosed when already closed.
func (b *Broadcaster) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return ErrClosed
	}
	b.closed = true
	b.flushLocked()
	for _, s := range b.subs {
		s.end(ReasonShutdown)
		s.idx = -1
	}
	b.subs = nil
	return nil
}

// removeLocked swap-removes s from b.subs in O(1).
func (b *Broadcaster) removeLocked(s *Subscription) {
	i := s.idx
	if i < 0 || i >= len(b.subs) || b.subs[i] != s {
		return
	}
	last := len(b.subs) - 1
	b.subs[i] = b.subs[last]
	b.subs[i].idx = i
	b.subs[last] = nil
	b.subs = b.subs[:last]
	s.idx = -1
}

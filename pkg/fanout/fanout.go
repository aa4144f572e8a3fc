// Package fanout is the in-memory broadcaster: it turns each event into one
// SSE frame, encoded once, and offers the same bytes to every subscribed
// viewer through the viewer's own bounded channel. A viewer whose channel is
// full is dropped; the broadcaster never waits for anyone.
package fanout

import (
	"errors"
	"sync"
	"sync/atomic"
)

// Sentinel errors.
var (
	// ErrClosed is returned by Subscribe once the broadcaster is closed.
	ErrClosed = errors.New("fanout: broadcaster closed")
	// ErrBadName is returned by Encode for a topic that cannot name an SSE event.
	ErrBadName = errors.New("fanout: topic cannot be an SSE event name")
)

// Reason says why a subscription ended. Its String form doubles as a metric label.
type Reason int

const (
	// ReasonNone: the subscription is still live.
	ReasonNone Reason = iota
	// ReasonSlow: the viewer's channel was full when a frame arrived.
	ReasonSlow
	// ReasonShutdown: the broadcaster was closed.
	ReasonShutdown
	// ReasonUnsubscribed: the viewer left (Subscription.Close).
	ReasonUnsubscribed
)

func (r Reason) String() string {
	switch r {
	case ReasonSlow:
		return "slow"
	case ReasonShutdown:
		return "shutdown"
	case ReasonUnsubscribed:
		return "unsubscribed"
	default:
		return "none"
	}
}

// Broadcaster offers frames to subscribers. The zero value is not usable; call New.
type Broadcaster struct {
	buffer int

	mu     sync.RWMutex
	subs   []*Subscription // index held in Subscription.idx, guarded by mu
	closed bool

	published, delivered, dropped atomic.Uint64
}

// Stats are running totals since New.
type Stats struct {
	Published uint64 // events encoded and offered
	Delivered uint64 // frames placed in a viewer's channel
	Dropped   uint64 // viewers ended because their channel was full
}

// Stats returns the running totals.
func (b *Broadcaster) Stats() Stats {
	return Stats{
		Published: b.published.Load(),
		Delivered: b.delivered.Load(),
		Dropped:   b.dropped.Load(),
	}
}

// New returns a broadcaster that gives each subscriber a channel of buffer frames.
func New(buffer int) *Broadcaster {
	if buffer < 1 {
		buffer = 1
	}
	return &Broadcaster{buffer: buffer}
}

// Subscription is one viewer's bounded queue of frames.
type Subscription struct {
	b     *Broadcaster
	c     chan *Frame
	done  chan struct{}
	once  sync.Once
	onEnd func(Reason)
	// reason is written once, before done is closed; read it after <-Done().
	reason Reason
	idx    int // in b.subs; -1 once removed; guarded by b.mu
}

// Frames yields the frames offered to this viewer, in publish order.
func (s *Subscription) Frames() <-chan *Frame { return s.c }

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

// Close unsubscribes. It is idempotent and safe to call from any goroutine.
func (s *Subscription) Close() {
	s.end(ReasonUnsubscribed)
	s.b.mu.Lock()
	s.b.removeLocked(s)
	s.b.mu.Unlock()
}

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

// Len reports the number of live subscriptions.
func (b *Broadcaster) Len() int {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return len(b.subs)
}

// Subscribe adds a viewer. Frames published from now on are offered to it.
// onEnd, if not nil, is called once when the subscription ends, by whichever
// goroutine ends it, possibly the publisher's: it must return at once and must
// not call the broadcaster. The API uses it to cut a write blocked on a
// viewer that was just dropped for being slow.
func (b *Broadcaster) Subscribe(onEnd func(Reason)) (*Subscription, error) {
	s := &Subscription{
		b:     b,
		c:     make(chan *Frame, b.buffer),
		done:  make(chan struct{}),
		onEnd: onEnd,
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, ErrClosed
	}
	s.idx = len(b.subs)
	b.subs = append(b.subs, s)
	return s, nil
}

// Publish encodes ev once and offers the frame to every live subscriber
// without ever blocking. A subscriber whose channel is full is ended with
// ReasonSlow and removed. Call Publish from one goroutine at a time: each
// viewer sees frames in the order of the calls.
func (b *Broadcaster) Publish(ev Event) error {
	f, err := Encode(ev)
	if err != nil {
		return err
	}
	b.broadcast(f)
	return nil
}

func (b *Broadcaster) broadcast(f *Frame) {
	delivered := 0
	var slow []*Subscription
	b.mu.RLock()
	for _, s := range b.subs {
		select {
		case <-s.done:
			// Ended but not yet removed: nothing to offer.
		default:
			select {
			case s.c <- f:
				delivered++
			default:
				if s.end(ReasonSlow) {
					slow = append(slow, s)
				}
			}
		}
	}
	b.mu.RUnlock()
	if len(slow) > 0 {
		b.mu.Lock()
		for _, s := range slow {
			b.removeLocked(s)
		}
		b.mu.Unlock()
	}
	b.published.Add(1)
	b.delivered.Add(uint64(delivered))
	b.dropped.Add(uint64(len(slow)))
}

// Close ends every subscription with ReasonShutdown and refuses new ones.
// It is idempotent; it returns ErrClosed when already closed.
func (b *Broadcaster) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return ErrClosed
	}
	b.closed = true
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

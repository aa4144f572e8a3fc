package api

import (
	"context"
	"sync"
)

// limiter holds the per-user and global stream caps. A slot is taken before
// any header is written, so an over-cap viewer gets a real 429 or 503.
type limiter struct {
	maxPerUser, maxTotal int

	mu      sync.Mutex
	perUser map[string]int
	total   int
}

func newLimiter(maxPerUser, maxTotal int) *limiter {
	return &limiter{maxPerUser: maxPerUser, maxTotal: maxTotal, perUser: map[string]int{}}
}

type slotResult int

const (
	slotOK slotResult = iota
	slotUserFull
	slotGlobalFull
)

// acquire takes a slot for user; release must be called exactly once on slotOK.
func (l *limiter) acquire(user string) slotResult {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.maxPerUser > 0 && l.perUser[user] >= l.maxPerUser {
		return slotUserFull
	}
	if l.maxTotal > 0 && l.total >= l.maxTotal {
		return slotGlobalFull
	}
	l.perUser[user]++
	l.total++
	return slotOK
}

func (l *limiter) release(user string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total--
	if n := l.perUser[user] - 1; n > 0 {
		l.perUser[user] = n
	} else {
		delete(l.perUser, user)
	}
}

// readBacks bounds the Kafka read-backs of resuming viewers: n at once, one
// per user. A slot is held until the frames read are written to the viewer
// (or the viewer is cut), so the memory they take is bounded by n read-backs,
// and one user cannot take every slot.
type readBacks struct {
	slots chan struct{}

	mu    sync.Mutex
	users map[string]chan struct{} // closed when the user's read-back ends
}

func newReadBacks(n int) *readBacks {
	return &readBacks{slots: make(chan struct{}, n), users: map[string]chan struct{}{}}
}

// acquire waits, until ctx ends, for the user's earlier read-back to end
// and for a free slot. The returned release is idempotent.
func (r *readBacks) acquire(ctx context.Context, user string) (func(), error) {
	for {
		r.mu.Lock()
		busy, ok := r.users[user]
		if !ok {
			r.users[user] = make(chan struct{})
			r.mu.Unlock()
			break
		}
		r.mu.Unlock()
		select {
		case <-busy:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	endUser := func() {
		r.mu.Lock()
		close(r.users[user])
		delete(r.users, user)
		r.mu.Unlock()
	}
	select {
	case r.slots <- struct{}{}:
	case <-ctx.Done():
		endUser()
		return nil, ctx.Err()
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			<-r.slots
			endUser()
		})
	}, nil
}

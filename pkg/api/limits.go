package api

import "sync"

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

package api

import (
	"context"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"
)

// maxCached bounds a cache; past it, expired entries are swept.
const maxCached = 100_000

// ttlCache shares concurrent loads of one key (singleflight) and keeps a
// loaded value for ttl, counted from when its load began. Errors are not
// kept. A load serves every caller waiting on it, so it runs detached from
// any one of them, bounded by timeout; each caller waits only as long as
// its own context allows.
type ttlCache[T any] struct {
	ttl, timeout time.Duration
	group        singleflight.Group

	mu      sync.Mutex
	entries map[string]cacheEntry[T]
}

type cacheEntry[T any] struct {
	v       T
	expires time.Time
}

func newTTLCache[T any](ttl, timeout time.Duration) *ttlCache[T] {
	return &ttlCache[T]{ttl: ttl, timeout: timeout, entries: map[string]cacheEntry[T]{}}
}

// get returns the value of key and when it leaves the cache (zero when it
// was not kept). With fresh, the value comes from a load begun after the call.
func (c *ttlCache[T]) get(ctx context.Context, key string, fresh bool, load func(context.Context) (T, error)) (T, time.Time, error) {
	if e, ok := c.kept(key); ok && !fresh {
		return e.v, e.expires, nil
	}
	if fresh {
		c.group.Forget(key) // a load under way may have begun before this call
	}
	ch := c.group.DoChan(key, func() (any, error) {
		// A load that ended between the look above and DoChan has kept its
		// value: use it, or two loads of the key would run back to back.
		if e, ok := c.kept(key); ok && !fresh {
			return e, nil
		}
		began := time.Now()
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.timeout)
		defer cancel()
		v, err := load(lctx)
		if err != nil {
			return nil, err
		}
		e := cacheEntry[T]{v: v}
		if c.ttl > 0 {
			e.expires = began.Add(c.ttl)
			c.keep(key, e)
		}
		return e, nil
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			var zero T
			return zero, time.Time{}, r.Err
		}
		e := r.Val.(cacheEntry[T])
		return e.v, e.expires, nil
	case <-ctx.Done():
		var zero T
		return zero, time.Time{}, ctx.Err()
	}
}

// kept returns key's entry if it has not expired.
func (c *ttlCache[T]) kept(key string) (cacheEntry[T], bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[key]
	return e, ok && time.Now().Before(e.expires)
}

func (c *ttlCache[T]) keep(key string, e cacheEntry[T]) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if old, ok := c.entries[key]; ok && old.expires.After(e.expires) {
		return // a load begun later finished first
	}
	if len(c.entries) >= maxCached {
		now := time.Now()
		for k, old := range c.entries {
			if !now.Before(old.expires) {
				delete(c.entries, k)
			}
		}
		if len(c.entries) >= maxCached {
			clear(c.entries)
		}
	}
	c.entries[key] = e
}

package api

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestCacheLoadsOncePerTTL guards the cache's bound: however callers of one
// key interleave with its load (joining it, or looking just before it keeps
// its value and calling DoChan just after), the key is loaded once per TTL.
func TestCacheLoadsOncePerTTL(t *testing.T) {
	for round := range 50 {
		c := newTTLCache[int](time.Hour, time.Second)
		var loads atomic.Int64
		var wg sync.WaitGroup
		for range 32 {
			wg.Go(func() {
				for range 20 {
					v, _, err := c.get(context.Background(), "k", false, func(context.Context) (int, error) {
						loads.Add(1)
						return 7, nil
					})
					if err != nil || v != 7 {
						t.Errorf("get: %v, %v", v, err)
					}
				}
			})
		}
		wg.Wait()
		if n := loads.Load(); n != 1 {
			t.Fatalf("round %d: %d loads of one key within its TTL, want 1", round, n)
		}
	}
}

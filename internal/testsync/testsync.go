// Package testsync holds the goroutine-safe pieces tests share: a buffer
// that logs are written to from other goroutines, and a bounded wait for a
// counter that other goroutines advance.
package testsync

import (
	"bytes"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Buffer is a bytes.Buffer safe for concurrent writes and reads.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

// WriteString appends s.
func (b *Buffer) WriteString(s string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.b.WriteString(s)
}

func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// WaitAtLeast polls n until it reaches want, and fails tb if that takes
// longer than limit: a wait that cannot end must not hang a run.
func WaitAtLeast(tb testing.TB, n *atomic.Int64, want int64, limit time.Duration) {
	tb.Helper()
	deadline := time.Now().Add(limit)
	for n.Load() < want {
		if time.Now().After(deadline) {
			tb.Fatalf("%d of %d after %v", n.Load(), want, limit)
		}
		time.Sleep(20 * time.Microsecond)
	}
}

package fanout

import (
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/decnet/identity-relay/internal/testsync"
	"github.com/decnet/identity-relay/pkg/sse"
)

// BenchmarkBroadcast measures the broadcast path at 1k and 10k viewers, each
// drained by its own goroutine as the HTTP handlers do, with every frame
// offered alone (flush=0) and with the relay's default flush interval. One op is one event
// (encoded once) offered to every viewer; queues are drained before the
// timer stops. Reports delivered frames/s and allocations per frame.
func BenchmarkBroadcast(b *testing.B) {
	for _, c := range []struct {
		viewers int
		flush   time.Duration
	}{{1000, 0}, {1000, time.Millisecond}, {10000, time.Millisecond}} {
		viewers := c.viewers
		b.Run(fmt.Sprintf("viewers=%d/flush=%v", viewers, c.flush), func(b *testing.B) {
			hub := New(Options{FlushInterval: c.flush})
			var received atomic.Int64
			var wg sync.WaitGroup
			subs := make([]*Subscription, viewers)
			for i := range subs {
				s, _, err := hub.Subscribe(nil, nil)
				if err != nil {
					b.Fatal(err)
				}
				subs[i] = s
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						select {
						case batch := <-s.Batches():
							s.Taken(batch)
							received.Add(int64(len(batch.Frames)))
						case <-s.Done():
							return
						}
					}
				}()
			}
			ev := sse.Event{Topic: "identity.formed", Type: "formed", TS: "1750000000.123",
				Payload: json.RawMessage(`{"identity_uuid":"` + strings.Repeat("a", 200) + `"}`)}
			b.ReportAllocs()
			b.ResetTimer()
			start := time.Now()
			for i := range b.N {
				ev.Offset = int64(i)
				if err := hub.Publish(ev); err != nil {
					b.Fatal(err)
				}
				// Let readers catch up every 128 events so no viewer is dropped:
				// this measures delivery, not the drop path.
				if i%128 == 127 {
					testsync.WaitAtLeast(b, &received, int64(i+1)*int64(viewers), time.Minute)
				}
			}
			testsync.WaitAtLeast(b, &received, int64(b.N)*int64(viewers), time.Minute)
			elapsed := time.Since(start)
			b.StopTimer()
			if d := hub.Stats().Dropped; d != 0 {
				b.Fatalf("%d viewers dropped", d)
			}
			b.ReportMetric(float64(b.N)*float64(viewers)/elapsed.Seconds(), "frames/s")
			_ = hub.Close()
			wg.Wait()
		})
	}
}

// BenchmarkEncode measures building one frame.
func BenchmarkEncode(b *testing.B) {
	ev := sse.Event{Topic: "identity.observation.linked", Type: "observation.linked", TS: "1750000000.123",
		Payload: json.RawMessage(`{"identity_uuid":"0b6f6a9e-3f1c-4c55-9a53-2f1f1c7d9a10","observation_uuid":"5e0e3c1a-8d7b-4e8f-9d55-0c1b2a3d4e5f"}`)}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := sse.Encode(ev, ""); err != nil {
			b.Fatal(err)
		}
	}
}

package api

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http/httptest"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/decnet/identity-relay/internal/testsync"
	"github.com/decnet/identity-relay/internal/users"
	"github.com/decnet/identity-relay/pkg/fanout"
	"github.com/decnet/identity-relay/pkg/sse"
)

// BenchmarkHTTPStream measures the whole path a frame takes, over real
// loopback TCP: broadcaster → viewer goroutine → writev → socket → a reading
// client. One op is one event delivered to every viewer; every viewer has
// read every frame before the timer stops. Reports delivered frames/s and the
// relay's goroutines per viewer. The clients share the process (and the two
// cores), so the figure is a floor; memory per viewer is measured on the
// relay process by tools/relay-load (BENCHMARKS.md).
func BenchmarkHTTPStream(b *testing.B) {
	for _, viewers := range []int{100, 1000} {
		b.Run(fmt.Sprintf("viewers=%d", viewers), func(b *testing.B) {
			store := newFakeStore()
			store.users["u-bench"] = &users.User{UUID: "u-bench", Role: "viewer"}
			broker := fanout.New(fanout.Options{Buffer: 256, FlushInterval: time.Millisecond}) // the relay's defaults
			cfg := testConfig()
			cfg.MaxPerUser, cfg.MaxConnections = viewers, viewers
			srv, err := New(cfg, store, broker)
			if err != nil {
				b.Fatal(err)
			}
			ts := httptest.NewServer(srv.Handler())
			defer ts.Close()
			u, _ := url.Parse(ts.URL)
			tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claimsFor("u-bench", nil)).SignedString([]byte(testSecret))
			if err != nil {
				b.Fatal(err)
			}

			goroutinesBefore := runtime.NumGoroutine()

			var received atomic.Int64
			var wg sync.WaitGroup
			conns := make([]net.Conn, viewers)
			for i := range conns {
				c, err := net.Dial("tcp", u.Host)
				if err != nil {
					b.Fatal(err)
				}
				conns[i] = c
				fmt.Fprintf(c, "GET %s?token=%s HTTP/1.1\r\nHost: x\r\n\r\n", EventsPath, tok)
				br := bufio.NewReaderSize(c, 64<<10)
				// Wait for the snapshot so that the viewer is subscribed.
				for {
					line, err := br.ReadString('\n')
					if err != nil {
						b.Fatal(err)
					}
					if strings.HasPrefix(line, "event: snapshot") {
						break
					}
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					countFrames(br, &received)
				}()
			}
			goroutinesPerViewer := float64(runtime.NumGoroutine()-goroutinesBefore-viewers) / float64(viewers)

			ev := sse.Event{Topic: "identity.formed", Type: "formed", TS: "1750000000.123",
				Payload: json.RawMessage(`{"identity_uuid":"` + strings.Repeat("a", 200) + `"}`)}
			b.ResetTimer()
			start := time.Now()
			for i := range b.N {
				ev.Offset = int64(i)
				if err := broker.Publish(ev); err != nil {
					b.Fatal(err)
				}
				if i%128 == 127 { // stay inside the viewers' 256-frame queues
					testsync.WaitAtLeast(b, &received, int64(i+1)*int64(viewers), time.Minute)
				}
			}
			testsync.WaitAtLeast(b, &received, int64(b.N)*int64(viewers), time.Minute)
			elapsed := time.Since(start)
			b.StopTimer()
			if d := broker.Stats().Dropped; d != 0 {
				b.Fatalf("%d viewers dropped", d)
			}
			b.ReportMetric(float64(b.N)*float64(viewers)/elapsed.Seconds(), "frames/s")
			b.ReportMetric(goroutinesPerViewer, "relay-goroutines/viewer")
			for _, c := range conns {
				c.Close()
			}
			wg.Wait()
			_ = broker.Close()
		})
	}
}

// countFrames counts complete event frames (a data line ending in "}\n\n"),
// also when the marker straddles two reads.
func countFrames(r io.Reader, n *atomic.Int64) {
	buf := make([]byte, 64<<10)
	marker := []byte("}\n\n")
	var prev [2]byte // the last two bytes read
	for {
		k, err := r.Read(buf)
		if k > 0 {
			got := int64(bytes.Count(buf[:k], marker))
			if prev == [2]byte{'}', '\n'} && buf[0] == '\n' ||
				prev[1] == '}' && k >= 2 && buf[0] == '\n' && buf[1] == '\n' {
				got++
			}
			n.Add(got)
			if k >= 2 {
				prev = [2]byte{buf[k-2], buf[k-1]}
			} else {
				prev = [2]byte{prev[1], buf[0]}
			}
		}
		if err != nil {
			return
		}
	}
}

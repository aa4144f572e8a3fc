package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/decnet/identity-relay/internal/relaytest"
	"github.com/decnet/identity-relay/internal/testenv"
)

// A burst many times larger than each viewer's queue (a catch-up after an
// outage, a backfill job upstream) reaches every viewer that reads, and none
// is dropped: the relay reads Kafka no faster than three quarters of its
// viewers take frames. Without that wait, the consumer fills every queue
// before any viewer runs and drops them all.
func TestBurstLargerThanQueuesDropsNoReader(t *testing.T) {
	const viewers, burst = 30, 12000
	// Queues of 1,024 frames: the burst is 12 times that, and a reader that
	// the test machine starves for a moment has room to catch up.
	env, topic := resumeEnv(t, map[string]string{"RELAY_SSE_MAX_PER_USER": "100", "RELAY_SUBSCRIBER_BUFFER": "1024"})
	r, _ := startOnTopic(t, env, topic, 1)
	token := viewerToken(t)
	streams := make([]*relaytest.Stream, viewers)
	for i := range streams {
		streams[i] = relaytest.Dial(t, r.URL, token)
		streams[i].ExpectStart(t)
	}

	// Readers read from the start, as browsers do.
	var wg sync.WaitGroup
	errs := make([]error, viewers)
	for i, s := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = readSeqs(s, burst)
		}()
	}
	// One produce call: the broker has the whole burst before the relay's
	// next fetch, which then returns thousands of records at once.
	records := make([]*kgo.Record, burst)
	for i := range records {
		records[i] = &kgo.Record{Topic: topic, Value: fmt.Appendf(nil, `{"p":0,"seq":%d}`, i)}
	}
	cl := relaytest.Producer(t, testenv.KafkaBrokers(t))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := cl.ProduceSync(ctx, records...).FirstErr(); err != nil {
		t.Fatalf("produce the burst: %v", err)
	}

	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("viewer %d: %v", i, err)
		}
	}
	t.Logf("waited for viewers: %.3fs", relaytest.Metric(t, r.URL, "relay_consumer_paced_seconds_total"))
	if n := relaytest.Metric(t, r.URL, `relay_viewer_disconnects_total{reason="slow"}`); n != 0 {
		t.Fatalf("%v viewers dropped as slow", n)
	}
}

// readSeqs reads event frames until it has seqs 0..n-1, in order.
func readSeqs(s *relaytest.Stream, n int) error {
	next := 0
	for next < n {
		f, err := s.NextOrEnd(30 * time.Second)
		if err != nil {
			return fmt.Errorf("after seq %d: %w", next-1, err)
		}
		if !strings.HasPrefix(f, "id: ") {
			continue // keepalive
		}
		_, data, _ := strings.Cut(f, "\ndata: ")
		var ev struct{ Payload seqEvent }
		if err := json.Unmarshal([]byte(strings.TrimSpace(data)), &ev); err != nil {
			return fmt.Errorf("frame %q: %w", f, err)
		}
		if ev.Payload.Seq != next {
			return fmt.Errorf("seq %d, want %d", ev.Payload.Seq, next)
		}
		next++
	}
	return nil
}

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/decnet/identity-relay/internal/relaytest"
	"github.com/decnet/identity-relay/internal/testenv"
)

// A burst many times larger than each viewer's queue (a catch-up after an
// outage, a backfill job upstream) reaches every viewer that reads, every
// record exactly once and in order. The relay reads Kafka no faster than
// three quarters of its viewers take frames, so normally none is dropped;
// but a reader the test machine starves long enough still can be, and then
// it resumes with its last id, as a browser would. How many were dropped
// is a figure for BENCHMARKS.md (logged here), not a pass/fail condition:
// it depends on scheduling.
func TestBurstLargerThanQueuesReachesEveryReader(t *testing.T) {
	const viewers, burst = 30, 12000
	// Queues of 1,024 frames: the burst is 12 times that. The window holds
	// the whole burst, so a dropped reader resumes from it.
	env, topic := relaytest.TopicEnv(t, map[string]string{
		"RELAY_SSE_MAX_PER_USER": "100", "RELAY_SUBSCRIBER_BUFFER": "1024", "RELAY_REPLAY_WINDOW": "20000",
	})
	r, _ := relaytest.StartOnTopic(t, env, topic, 1)
	token := relaytest.ViewerToken(t)
	streams := make([]*relaytest.Stream, viewers)
	for i := range streams {
		streams[i] = relaytest.Dial(t, r.URL, token)
		streams[i].ExpectStart(t)
	}

	// Seq 0 first, read by every viewer before the burst: a viewer dropped
	// later then always has an id to resume from (one dropped before any
	// event has none, and a browser would start again as a new viewer).
	cl := relaytest.Producer(t, testenv.KafkaBrokers(t))
	relaytest.Produce(t, cl, topic, 0, `{"p":0,"seq":0}`)
	readers := make([]seqReader, viewers)
	for i, s := range streams {
		if readers[i].read(s, 1); readers[i].next != 1 {
			t.Fatalf("viewer %d: seq 0 not read: %+v", i, readers[i])
		}
	}

	// Then the readers read on, as browsers do.
	var wg sync.WaitGroup
	for i, s := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			readers[i].read(s, burst)
		}()
	}
	// One produce call: the broker has the whole burst before the relay's
	// next fetch, which then returns thousands of records at once.
	records := make([]*kgo.Record, burst-1)
	for i := range records {
		records[i] = &kgo.Record{Topic: topic, Value: fmt.Appendf(nil, `{"p":0,"seq":%d}`, i+1)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := cl.ProduceSync(ctx, records...).FirstErr(); err != nil {
		t.Fatalf("produce the burst: %v", err)
	}
	wg.Wait()

	resumed := 0
	for i := range readers {
		rd := &readers[i]
		for rd.next < burst && rd.err == nil && rd.ended {
			resumed++
			s := relaytest.DialWith(t, r.URL, token, lastEventID(rd.lastID))
			rd.read(s, burst)
			s.Close()
		}
		if rd.err != nil || rd.next != burst {
			t.Errorf("viewer %d: %d of %d seqs: %v", i, rd.next, burst, rd.err)
		}
	}
	slow := relaytest.Metric(t, r.URL, `relay_viewer_disconnects_total{reason="slow"}`)
	t.Logf("waited for viewers: %.3fs; %v of %d viewers dropped as slow, %d resumes",
		relaytest.Metric(t, r.URL, "relay_consumer_paced_seconds_total"), slow, viewers, resumed)
}

// seqReader reads event frames carrying seqs 0, 1, ... in order, across
// resumes.
type seqReader struct {
	next   int    // the seq expected next
	lastID string // the id of the last event read
	ended  bool   // the stream ended (dropped) before the last seq
	err    error  // a wrong frame: not resumable
}

// read reads s until seq n-1, the stream's end, or a wrong frame.
func (rd *seqReader) read(s *relaytest.Stream, n int) {
	rd.ended = false
	for rd.next < n {
		f, err := s.NextOrEnd(30 * time.Second)
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) {
			rd.ended = true // dropped as slow: the relay resets the connection
			return
		}
		if err != nil {
			rd.err = fmt.Errorf("after seq %d: %w", rd.next-1, err)
			return
		}
		id, rest, ok := strings.Cut(f, "\n")
		if !strings.HasPrefix(id, "id: ") || !ok {
			continue // keepalive, retry
		}
		_, data, _ := strings.Cut(rest, "\ndata: ")
		var ev struct{ Payload relaytest.SeqEvent }
		if err := json.Unmarshal([]byte(strings.TrimSpace(data)), &ev); err != nil {
			rd.err = fmt.Errorf("frame %q: %w", f, err)
			return
		}
		if ev.Payload.Seq != rd.next {
			rd.err = fmt.Errorf("seq %d, want %d", ev.Payload.Seq, rd.next)
			return
		}
		rd.next++
		rd.lastID = strings.TrimPrefix(id, "id: ")
	}
}

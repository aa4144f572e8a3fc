package consumer

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/decnet/identity-relay/pkg/fanout"
)

// rng is a read-back range; the one place these tests name fanout.Range.
func rng(topic string, id [16]byte, partition int32, from, to int64) fanout.Range {
	return fanout.Range{Topic: topic, TopicID: id, Partition: partition, From: from, To: to}
}

// historyCluster is a broker with two topics of two partitions, 20 records
// each (offset 7 of identity.a/1 not JSON), and identity.a/0 truncated below 5.
func historyCluster(t *testing.T) (brokers []string, ids map[string][16]byte, values map[tp][][]byte) {
	t.Helper()
	c, brokers := newKFake(t, 2, "identity.a", "identity.b")
	p := newProducer(t, brokers)
	values = map[tp][][]byte{}
	for _, topic := range []string{"identity.a", "identity.b"} {
		for part := range int32(2) {
			v := seqValues(topic, part, 0, 20)
			if topic == "identity.a" && part == 1 {
				v[7] = []byte("not json")
			}
			values[tp{topic, part}] = v
			p.produce(topic, part, v...)
		}
	}
	if err := c.DeleteRecords("identity.a", 0, 5); err != nil {
		t.Fatal(err)
	}
	return brokers, map[string][16]byte{"identity.a": topicID(t, c, "identity.a"), "identity.b": topicID(t, c, "identity.b")}, values
}

// History.Read on kfake returns exactly each range's records in offset order
// (records that do not decode left out), with the range's topic ID, and
// refuses with ErrHistoryGone what Kafka no longer holds, a re-created topic,
// and reads over the record or byte bound; the same clients serve the next read.
func TestKFakeHistoryRead(t *testing.T) {
	brokers, ids, values := historyCluster(t)
	a, b := ids["identity.a"], ids["identity.b"]
	h := NewHistory(Config{Brokers: brokers, MaxRecordBytes: 1 << 20}, 2, 30, 800)
	defer h.Close()
	for _, tc := range []struct {
		name   string
		ranges []fanout.Range
		gone   bool // ErrHistoryGone
		bad    bool // another error: the request is malformed
	}{
		{name: "one range", ranges: []fanout.Range{rng("identity.b", b, 0, 3, 9)}},
		{name: "one record at the end", ranges: []fanout.Range{rng("identity.b", b, 1, 19, 20)}},
		{name: "from the log start", ranges: []fanout.Range{rng("identity.a", a, 0, 5, 8)}},
		{name: "ranges of several partitions and topics", ranges: []fanout.Range{
			rng("identity.a", a, 0, 10, 14), rng("identity.a", a, 1, 0, 4), rng("identity.b", b, 0, 15, 20), rng("identity.b", b, 1, 2, 3)}},
		{name: "a record that does not decode is left out", ranges: []fanout.Range{rng("identity.a", a, 1, 5, 10)}},
		{name: "no topic ID: not checked", ranges: []fanout.Range{rng("identity.b", [16]byte{}, 0, 0, 2)}},
		{name: "below the log start", ranges: []fanout.Range{rng("identity.a", a, 0, 2, 8)}, gone: true},
		{name: "below the log start, beside a good range", ranges: []fanout.Range{
			rng("identity.b", b, 0, 0, 5), rng("identity.a", a, 0, 4, 6)}, gone: true},
		{name: "another topic ID: re-created since", ranges: []fanout.Range{rng("identity.b", a, 0, 0, 2)}, gone: true},
		{name: "more records than a read may take", ranges: []fanout.Range{
			rng("identity.b", b, 0, 0, 20), rng("identity.b", b, 1, 0, 11)}, gone: true},
		// About 33 bytes a record: 30 records are about 1,000 bytes, over 800.
		{name: "more bytes than a read may take", ranges: []fanout.Range{
			rng("identity.b", b, 0, 0, 15), rng("identity.b", b, 1, 0, 15)}, gone: true},
		{name: "empty range", ranges: []fanout.Range{rng("identity.b", b, 0, 4, 4)}, bad: true},
		{name: "negative start", ranges: []fanout.Range{rng("identity.b", b, 0, -1, 4)}, bad: true},
		{name: "a partition twice", ranges: []fanout.Range{rng("identity.b", b, 0, 0, 2), rng("identity.b", b, 0, 4, 6)}, bad: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), hangBound)
			defer cancel()
			evs, err := h.Read(ctx, tc.ranges)
			switch {
			case tc.gone:
				if !errors.Is(err, ErrHistoryGone) {
					t.Fatalf("got %d events, err %v; want ErrHistoryGone", len(evs), err)
				}
				return
			case tc.bad:
				if err == nil || errors.Is(err, ErrHistoryGone) {
					t.Fatalf("got %d events, err %v; want an error other than ErrHistoryGone", len(evs), err)
				}
				return
			case err != nil:
				t.Fatal(err)
			}
			parts := byPartition(evs)
			for _, r := range tc.ranges {
				k := tp{r.Topic, r.Partition}
				var want []wantEvent
				for o := r.From; o < r.To; o++ {
					if string(values[k][o]) != "not json" {
						want = append(want, wantEvent{o, false})
					}
				}
				checkPartition(t, k, r.TopicID, parts[k], want, values[k])
				delete(parts, k)
			}
			if len(parts) > 0 {
				t.Errorf("events outside the ranges: %s", describe(evs))
			}
		})
	}
	if n := len(h.made); n > 2 {
		t.Errorf("%d Kafka clients made, want at most 2 (one per slot)", n)
	}
}

// Concurrent reads share the slots: each gets its own range exactly, and no
// more clients are made than reads may run at once.
func TestKFakeHistoryConcurrentReadsReuseClients(t *testing.T) {
	brokers, ids, values := historyCluster(t)
	const slots, readers, rounds = 3, 8, 3
	h := NewHistory(Config{Brokers: brokers, MaxRecordBytes: 1 << 20}, slots, 1000, 1<<20)
	defer h.Close()
	ctx, cancel := context.WithTimeout(context.Background(), hangBound)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, readers*rounds)
	for i := range readers {
		wg.Go(func() {
			for j := range rounds {
				k := tp{"identity.b", int32(i % 2)}
				from := int64(i + j)
				evs, err := h.Read(ctx, []fanout.Range{rng(k.topic, ids[k.topic], k.partition, from, from+5)})
				if err != nil {
					errs <- err
					return
				}
				for n, ev := range evs {
					if ev.Partition != k.partition || ev.Offset != from+int64(n) || string(ev.Payload) != string(values[k][ev.Offset]) {
						errs <- fmt.Errorf("reader %d: event %d is %s/%d@%d, want offset %d", i, n, ev.Topic, ev.Partition, ev.Offset, from+int64(n))
						return
					}
				}
				if len(evs) != 5 {
					errs <- fmt.Errorf("reader %d: %d events, want 5", i, len(evs))
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	h.mu.Lock()
	made := len(h.made)
	h.mu.Unlock()
	if made < 1 || made > slots {
		t.Errorf("%d Kafka clients made for %d reads, want 1 to %d (one per slot)", made, readers*rounds, slots)
	}
}

// A read honours its context: one waiting for records that do not exist yet
// ends when its context does, one waiting for a slot too, and the slot and
// its client serve the next read; after Close, reads fail.
func TestKFakeHistoryContext(t *testing.T) {
	brokers, ids, _ := historyCluster(t)
	b := ids["identity.b"]
	h := NewHistory(Config{Brokers: brokers, MaxRecordBytes: 1 << 20}, 1, 1000, 1<<20)

	// Past the end (20 records): the read waits for Kafka until cancelled.
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := h.Read(ctx, []fanout.Range{rng("identity.b", b, 0, 18, 25)})
		done <- err
	}()
	// The only slot is taken: a second read waits for it until its deadline.
	waitFor(t, "the first read to take the slot", func() bool { return len(h.clients) == 0 })
	short, cancelShort := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancelShort()
	if _, err := h.Read(short, []fanout.Range{rng("identity.b", b, 1, 0, 2)}); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("read waiting for a slot: %v, want context.DeadlineExceeded", err)
	}
	select {
	case err := <-done:
		t.Fatalf("read past the end returned before its context ended: %v", err)
	default:
	}
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("cancelled read: %v, want context.Canceled", err)
		}
	case <-time.After(hangBound):
		t.Fatal("cancelled read did not return")
	}

	// The slot is back, and its client reads the partition of the cancelled read afresh.
	ctx2, cancel2 := context.WithTimeout(context.Background(), hangBound)
	defer cancel2()
	evs, err := h.Read(ctx2, []fanout.Range{rng("identity.b", b, 0, 18, 20)})
	if err != nil || len(evs) != 2 || evs[0].Offset != 18 || evs[1].Offset != 19 {
		t.Fatalf("read after a cancelled one: %s, %v", describe(evs), err)
	}
	if len(h.made) != 1 {
		t.Errorf("%d clients made, want 1", len(h.made))
	}

	h.Close()
	if _, err := h.Read(ctx2, []fanout.Range{rng("identity.b", b, 0, 0, 2)}); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("read after Close: %v, want an error saying it is closed", err)
	}
}

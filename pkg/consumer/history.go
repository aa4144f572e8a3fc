package consumer

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/decnet/identity-relay/pkg/fanout"
	"github.com/decnet/identity-relay/pkg/sse"
)

// ErrHistoryGone is returned by History.Read when Kafka no longer holds the
// whole range (retention, or the topic is gone), or the range is longer than
// a read may be: only a snapshot helps then.
var ErrHistoryGone = errors.New("consumer: records no longer in Kafka")

const (
	// historyFetchBytes bounds one fetch of a read-back.
	historyFetchBytes = 1 << 20
	// historyFetchWait is how long the broker holds a read-back's fetch
	// open: the records it waits for exist, so a short wait only spares
	// a round trip when a partition has none left below the range's end.
	historyFetchWait = 100 * time.Millisecond
)

// History reads runs of partitions back from Kafka for viewers that resume
// from a position older than the replay window. At most a few reads run at
// once, each on a Kafka client of its own that is kept for the next read,
// so a reconnect storm cannot turn into a storm on the brokers.
type History struct {
	brokers        []string
	maxRecordBytes int
	maxRecords     int
	maxBytes       int
	clients        chan *kgo.Client // a free client per slot; nil until first used

	mu     sync.Mutex
	closed bool
	made   []*kgo.Client
}

// NewHistory returns a reader allowing concurrency reads at once, each of at
// most maxRecords records and maxBytes bytes of record values (a longer gap
// is cheaper to heal with a snapshot).
func NewHistory(cfg Config, concurrency, maxRecords, maxBytes int) *History {
	h := &History{
		brokers: cfg.Brokers, maxRecordBytes: cfg.MaxRecordBytes, maxRecords: maxRecords, maxBytes: maxBytes,
		clients: make(chan *kgo.Client, concurrency),
	}
	for range concurrency {
		h.clients <- nil
	}
	return h
}

// Close closes the clients made so far; reads after it fail.
func (h *History) Close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	for _, cl := range h.made {
		cl.Close()
	}
	h.made = nil
}

// client returns a client for a read: the slot's own, made on first use.
func (h *History) client(cl *kgo.Client) (*kgo.Client, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return nil, errors.New("history: closed")
	}
	if cl != nil {
		return cl, nil
	}
	cl, err := kgo.NewClient(
		kgo.SeedBrokers(h.brokers...),
		// A range that starts below the log start is gone: fail, do not skip.
		kgo.ConsumeResetOffset(kgo.NoResetOffset()),
		kgo.FetchMaxWait(historyFetchWait),
		// A read holds what it decoded until it ends; small fetches keep the
		// raw responses it is decoded from to a little beside that (Kafka
		// still returns a larger record whole).
		kgo.FetchMaxBytes(historyFetchBytes),
		kgo.FetchMaxPartitionBytes(historyFetchBytes),
		kgo.ClientID("identity-relay-history"),
	)
	if err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	h.made = append(h.made, cl)
	return cl, nil
}

// Read returns the events of the ranges, each range in offset order, records
// that fail to decode left out (their offsets still count as read). It waits
// for a free slot and for Kafka until ctx ends.
func (h *History) Read(ctx context.Context, ranges []fanout.Range) ([]sse.Event, error) {
	want, next, err := h.plan(ranges)
	if err != nil {
		return nil, err
	}
	var cl *kgo.Client
	select {
	case cl = <-h.clients:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	cl, err = h.client(cl)
	defer func() { h.clients <- cl }()
	if err != nil {
		return nil, err
	}
	cl.AddConsumePartitions(want)
	defer func() {
		rm := map[string][]int32{}
		for t, ps := range want {
			for p := range ps {
				rm[t] = append(rm[t], p)
			}
		}
		// Removing also drops what was fetched for them and not polled.
		cl.RemoveConsumePartitions(rm)
	}()
	return h.poll(ctx, cl, next)
}

// plan checks the ranges and returns the offsets to consume from and, per
// range, the next offset wanted.
func (h *History) plan(ranges []fanout.Range) (map[string]map[int32]kgo.Offset, map[fanout.Range]int64, error) {
	want := map[string]map[int32]kgo.Offset{}
	next := map[fanout.Range]int64{}
	total := int64(0)
	for _, r := range ranges {
		if r.Topic == "" || r.From < 0 || r.From >= r.To {
			return nil, nil, fmt.Errorf("history: bad range %+v", r)
		}
		if want[r.Topic] == nil {
			want[r.Topic] = map[int32]kgo.Offset{}
		}
		if _, dup := want[r.Topic][r.Partition]; dup {
			return nil, nil, fmt.Errorf("history: partition %s/%d twice", r.Topic, r.Partition)
		}
		want[r.Topic][r.Partition] = kgo.NewOffset().At(r.From)
		next[r] = r.From
		total += r.To - r.From
	}
	if total > int64(h.maxRecords) {
		return nil, nil, fmt.Errorf("%w: %d records missing, more than the %d read back at most", ErrHistoryGone, total, h.maxRecords)
	}
	return want, next, nil
}

// poll fetches with cl until every range in next is read.
func (h *History) poll(ctx context.Context, cl *kgo.Client, next map[fanout.Range]int64) ([]sse.Event, error) {
	var out []sse.Event
	size := 0
	for len(next) > 0 {
		fetches := cl.PollFetches(ctx)
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		var fetchErr error
		fetches.EachError(func(_ string, _ int32, err error) { fetchErr = err })
		if fetchErr != nil {
			return nil, fmt.Errorf("%w: %v", ErrHistoryGone, fetchErr)
		}
		fetches.EachTopic(func(t kgo.FetchTopic) {
			for _, p := range t.Partitions {
				for _, rec := range p.Records {
					if fetchErr != nil {
						return
					}
					fetchErr = h.take(t, rec, next, &out, &size)
				}
			}
		})
		if fetchErr != nil {
			return nil, fetchErr
		}
	}
	return out, nil
}

// take adds rec to out if it is the next record of a range still being read.
func (h *History) take(t kgo.FetchTopic, rec *kgo.Record, next map[fanout.Range]int64, out *[]sse.Event, size *int) error {
	for r, n := range next {
		if r.Topic != rec.Topic || r.Partition != rec.Partition || rec.Offset < n {
			continue
		}
		if r.TopicID != ([16]byte{}) && t.TopicID != ([16]byte{}) && r.TopicID != t.TopicID {
			return ErrHistoryGone // re-created since: not the same log
		}
		if rec.Offset < r.To {
			if *size += len(rec.Value); *size > h.maxBytes {
				return fmt.Errorf("%w: more than %d bytes to read back", ErrHistoryGone, h.maxBytes)
			}
			if ev, err := Decode(rec.Topic, rec.Timestamp, rec.Value, h.maxRecordBytes); err == nil {
				// The range's topic ID names the stream the viewer's id came from.
				ev.TopicID, ev.Partition, ev.Offset = r.TopicID, rec.Partition, rec.Offset
				*out = append(*out, ev)
			}
		}
		next[r] = rec.Offset + 1
		if rec.Offset >= r.To-1 {
			delete(next, r)
		}
	}
	return nil
}

package consumer

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/decnet/identity-relay/pkg/fanout"
)

// ErrHistoryGone is returned by History.Read when Kafka no longer holds the
// whole range (retention, or the topic is gone): only a snapshot helps then.
var ErrHistoryGone = errors.New("consumer: records no longer in Kafka")

// History reads runs of partitions back from Kafka for viewers that resume
// from a position older than the replay window. At most a few reads run at
// once, so a reconnect storm cannot turn into a storm on the brokers.
type History struct {
	brokers        []string
	maxRecordBytes int
	maxRecords     int
	sem            chan struct{}
}

// NewHistory returns a reader allowing concurrency reads at once, each of at
// most maxRecords records (a longer gap is cheaper to heal with a snapshot).
func NewHistory(cfg Config, concurrency, maxRecords int) *History {
	return &History{
		brokers: cfg.Brokers, maxRecordBytes: cfg.MaxRecordBytes, maxRecords: maxRecords,
		sem: make(chan struct{}, concurrency),
	}
}

// Read returns the events of the ranges, each range in offset order, records
// that fail to decode left out (their offsets still count as read). It waits
// for a free slot and for Kafka until ctx ends.
func (h *History) Read(ctx context.Context, ranges []fanout.Range) ([]fanout.Event, error) {
	want := map[string]map[int32]kgo.Offset{}
	left := map[fanout.Range]bool{}
	total := int64(0)
	for _, r := range ranges {
		if r.Topic == "" || r.From >= r.To {
			return nil, fmt.Errorf("history: bad range %+v", r)
		}
		if want[r.Topic] == nil {
			want[r.Topic] = map[int32]kgo.Offset{}
		}
		want[r.Topic][r.Partition] = kgo.NewOffset().At(r.From)
		left[r] = true
		total += r.To - r.From
	}
	if total > int64(h.maxRecords) {
		return nil, fmt.Errorf("%w: %d records missing, more than the %d read back at most", ErrHistoryGone, total, h.maxRecords)
	}
	select {
	case h.sem <- struct{}{}:
		defer func() { <-h.sem }()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	cl, err := kgo.NewClient(
		kgo.SeedBrokers(h.brokers...),
		kgo.ConsumePartitions(want),
		// A range that starts below the log start is gone: fail, do not skip.
		kgo.ConsumeResetOffset(kgo.NoResetOffset()),
		kgo.FetchMaxWait(100*time.Millisecond),
		kgo.ClientID("identity-relay-history"),
	)
	if err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	defer cl.Close()

	var out []fanout.Event
	for len(left) > 0 {
		fetches := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		var fetchErr error
		fetches.EachError(func(_ string, _ int32, err error) { fetchErr = err })
		if fetchErr != nil {
			return nil, fmt.Errorf("%w: %v", ErrHistoryGone, fetchErr)
		}
		fetches.EachTopic(func(t kgo.FetchTopic) {
			for _, p := range t.Partitions {
				for _, rec := range p.Records {
					for r := range left {
						if r.Topic != rec.Topic || r.Partition != rec.Partition {
							continue
						}
						if rec.Offset < r.To {
							if r.TopicID != ([16]byte{}) && t.TopicID != ([16]byte{}) && r.TopicID != t.TopicID {
								fetchErr = ErrHistoryGone // re-created since: not the same log
							}
							if ev, err := Decode(rec.Topic, rec.Timestamp, rec.Value, h.maxRecordBytes); err == nil {
								// The range's topic ID names the stream the viewer's id came from.
								ev.TopicID, ev.Partition, ev.Offset = r.TopicID, rec.Partition, rec.Offset
								out = append(out, ev)
							}
						}
						if rec.Offset >= r.To-1 {
							delete(left, r)
						}
					}
				}
			}
		})
		if fetchErr != nil {
			return nil, fetchErr
		}
	}
	return out, nil
}

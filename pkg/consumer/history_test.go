package consumer

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/decnet/identity-relay/internal/testenv"
	"github.com/decnet/identity-relay/pkg/fanout"
)

// historyTopic creates a topic of one partition on the real broker holding
// n records of about size bytes each.
func historyTopic(t *testing.T, n, size int) string {
	t.Helper()
	brokers := testenv.KafkaBrokers(t)
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.DefaultProduceTopic(""))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	topic := fmt.Sprintf("identity.history%d", time.Now().UnixNano())
	if _, err := kadm.NewClient(cl).CreateTopic(ctx, 1, 1, nil, topic); err != nil {
		t.Fatal(err)
	}
	pad := strings.Repeat("x", size)
	recs := make([]*kgo.Record, n)
	for i := range recs {
		recs[i] = &kgo.Record{Topic: topic, Value: fmt.Appendf(nil, `{"seq":%d,"pad":%q}`, i, pad)}
	}
	if err := cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
		t.Fatal(err)
	}
	return topic
}

// Read-backs reuse one Kafka client per slot (two here), return exactly the ranges in
// offset order, and give up a read larger than the byte bound.
func TestHistoryReusesClientsAndBoundsBytes(t *testing.T) {
	topic := historyTopic(t, 50, 100)
	h := NewHistory(Config{Brokers: testenv.KafkaBrokers(t), MaxRecordBytes: 1 << 20}, 2, 1000, 2000)
	defer h.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, r := range []fanout.Range{{Topic: topic, From: 3, To: 10}, {Topic: topic, From: 5, To: 8}, {Topic: topic, From: 40, To: 50}} {
		events, err := h.Read(ctx, []fanout.Range{r})
		if err != nil {
			t.Fatalf("read %d..%d: %v", r.From, r.To, err)
		}
		if len(events) != int(r.To-r.From) {
			t.Fatalf("read %d..%d: %d events", r.From, r.To, len(events))
		}
		for i, ev := range events {
			if ev.Offset != r.From+int64(i) {
				t.Fatalf("read %d..%d: event %d at offset %d", r.From, r.To, i, ev.Offset)
			}
		}
	}
	if n := len(h.made); n != 2 {
		t.Fatalf("%d Kafka clients made for three reads, want 2: one per slot", n)
	}
	// 30 records of about 130 bytes: more than 2,000 bytes.
	if _, err := h.Read(ctx, []fanout.Range{{Topic: topic, From: 0, To: 30}}); !errors.Is(err, ErrHistoryGone) {
		t.Fatalf("read past the byte bound: %v, want ErrHistoryGone", err)
	}
	// The client is still good for the next read.
	if events, err := h.Read(ctx, []fanout.Range{{Topic: topic, From: 0, To: 2}}); err != nil || len(events) != 2 {
		t.Fatalf("read after a refused one: %d events, %v", len(events), err)
	}
}

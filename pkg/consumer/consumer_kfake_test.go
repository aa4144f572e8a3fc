package consumer

import (
	"bytes"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/decnet/identity-relay/pkg/fanout"
)

// wantEvent is one event a test expects on a partition.
type wantEvent struct {
	offset   int64
	backfill bool
}

// checkPartition fails unless got (one partition's events, in the order
// published) is exactly want, each with the topic's ID and the value produced
// at its offset (values: the partition's records by offset, nil when deleted).
func checkPartition(t *testing.T, k tp, id [16]byte, got []fanout.Event, want []wantEvent, values [][]byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("%s/%d: got %s, want %d events %v", k.topic, k.partition, describe(got), len(want), want)
		return
	}
	for i, w := range want {
		ev := got[i]
		if ev.Offset != w.offset || ev.Backfill != w.backfill {
			t.Errorf("%s/%d: event %d at offset %d backfill %v, want offset %d backfill %v (all: %s)",
				k.topic, k.partition, i, ev.Offset, ev.Backfill, w.offset, w.backfill, describe(got))
			return
		}
		if ev.TopicID != id {
			t.Errorf("%s/%d@%d: topic ID %x, want %x", k.topic, k.partition, ev.Offset, ev.TopicID, id)
		}
		if w.offset < int64(len(values)) && !bytes.Equal(ev.Payload, values[w.offset]) {
			t.Errorf("%s/%d@%d: payload %s, want %s", k.topic, k.partition, ev.Offset, ev.Payload, values[w.offset])
		}
	}
}

// span returns the events of offsets from..to-1, all with backfill b.
func span(from, to int64, b bool) []wantEvent {
	var out []wantEvent
	for o := from; o < to; o++ {
		out = append(out, wantEvent{o, b})
	}
	return out
}

// Start-up backfill: the last Backfill records of every partition arrive
// marked Backfill (fewer where records were deleted), then what is produced
// after start-up unmarked, in offset order; Ready waits for the backfill;
// partitions holding no record are reported through Empty with their end.
func TestKFakeStartupBackfill(t *testing.T) {
	for _, tc := range []struct {
		name     string
		backfill int
		// p0 holds 6 records, p1 holds 5 of which 0..2 are deleted.
		wantP0, wantP1 []wantEvent
	}{
		{"backfill below what is there", 3, span(3, 6, true), span(3, 5, true)},
		{"backfill beyond what is there", 100, span(0, 6, true), span(3, 5, true)},
		{"backfill of one", 1, span(5, 6, true), span(4, 5, true)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const formed, gone, other = "identity.formed", "identity.gone", "other.topic"
			c, brokers := newKFake(t, 3, formed, gone, other)
			p := newProducer(t, brokers)
			values := map[tp][][]byte{
				{formed, 0}: seqValues(formed, 0, 0, 7),
				{formed, 1}: seqValues(formed, 1, 0, 6),
				{formed, 2}: seqValues(formed, 2, 0, 1),
				{gone, 0}:   seqValues(gone, 0, 0, 5),
			}
			p.produce(formed, 0, values[tp{formed, 0}][:6]...)
			p.produce(formed, 1, values[tp{formed, 1}][:5]...)
			p.produce(gone, 0, values[tp{gone, 0}][:4]...)
			p.produce(other, 0, seqValues(other, 0, 0, 3)...)
			if err := c.DeleteRecords(formed, 1, 3); err != nil {
				t.Fatal(err)
			}
			if err := c.DeleteRecords(gone, 0, -1); err != nil { // every record
				t.Fatal(err)
			}
			held, release := holdFetches(t, c)
			sink := &recSink{}
			cons, reg := runConsumer(t, Config{Brokers: brokers, Backfill: tc.backfill}, sink)

			// While no fetch is answered, nothing is read: not ready.
			<-held
			if cons.Ready() {
				t.Fatal("ready before any record was read")
			}
			release()
			sink.waitCount(t, len(tc.wantP0)+len(tc.wantP1))
			waitReady(t, cons)

			// What is produced now is new: not backfill. (Every partition's start
			// offset is resolved: p0 and p1 were read, the others start at their
			// log start, which a few new records do not move.)
			p.produce(formed, 0, values[tp{formed, 0}][6])
			p.produce(formed, 1, values[tp{formed, 1}][5])
			p.produce(formed, 2, values[tp{formed, 2}][0])
			p.produce(gone, 0, values[tp{gone, 0}][4])
			want := map[tp][]wantEvent{
				{formed, 0}: append(slices.Clone(tc.wantP0), wantEvent{6, false}),
				{formed, 1}: append(slices.Clone(tc.wantP1), wantEvent{5, false}),
				{formed, 2}: {{0, false}},
				{gone, 0}:   {{4, false}},
			}
			n := 0
			for _, w := range want {
				n += len(w)
			}
			evs := sink.waitCount(t, n)
			parts := byPartition(evs)
			for k, w := range want {
				checkPartition(t, k, topicID(t, c, k.topic), parts[k], w, values[k])
			}
			for k := range parts {
				if _, ok := want[k]; !ok {
					t.Errorf("events of %s/%d, which is not to be read: %s", k.topic, k.partition, describe(parts[k]))
				}
			}

			_, empties := sink.got()
			slices.SortFunc(empties, func(a, b emptyCall) int {
				return strings.Compare(fmt.Sprint(a.topic, a.partition), fmt.Sprint(b.topic, b.partition))
			})
			wantEmpty := []emptyCall{
				{formed, topicID(t, c, formed), 2, 0}, // never written
				{gone, topicID(t, c, gone), 0, 4},     // every record deleted
				{gone, topicID(t, c, gone), 1, 0},
				{gone, topicID(t, c, gone), 2, 0},
			}
			if !slices.Equal(empties, wantEmpty) {
				t.Errorf("Empty calls %+v, want %+v", empties, wantEmpty)
			}
			if got := metricValue(t, reg, "relay_records_consumed_total", "topic", formed); got != float64(len(want[tp{formed, 0}])+len(want[tp{formed, 1}])+1) {
				t.Errorf("relay_records_consumed_total{topic=%q} = %v", formed, got)
			}
		})
	}
}

// waitReady waits for the consumer to report ready.
func waitReady(t *testing.T, c *Consumer) {
	t.Helper()
	waitFor(t, "the consumer to be ready", c.Ready)
}

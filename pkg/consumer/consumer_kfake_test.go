package consumer

import (
	"bytes"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/decnet/identity-relay/pkg/sse"
)

// wantEvent is one event a test expects on a partition.
type wantEvent struct {
	offset   int64
	backfill bool
}

// checkPartition fails unless got (one partition's events, in the order
// published) is exactly want, each with the topic's ID and the value produced
// at its offset (values: the partition's records by offset, nil when deleted).
func checkPartition(t *testing.T, k tp, id [16]byte, got []sse.Event, want []wantEvent, values [][]byte) {
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

// A matching topic created at run time is read from its first record, none
// of it backfill, however many records it holds when the consumer finds it
// (more than Backfill, too); a topic the regex does not match is not read.
func TestKFakeNewTopicReadFromStart(t *testing.T) {
	for _, backfill := range []int{10, 1} {
		t.Run(fmt.Sprintf("backfill %d", backfill), func(t *testing.T) {
			const formed, created, other = "identity.formed", "identity.created", "other.created"
			c, brokers := newKFake(t, 1, formed)
			p := newProducer(t, brokers)
			p.produce(formed, 0, seqValues(formed, 0, 0, 2)...)
			sink := &recSink{}
			cons, _ := runConsumer(t, Config{Brokers: brokers, Backfill: backfill}, sink)
			startup := min(backfill, 2)
			sink.waitCount(t, startup)
			waitReady(t, cons)

			for _, topic := range []string{created, other} {
				if err := c.CreateTopic(topic, 2, nil); err != nil {
					t.Fatal(err)
				}
			}
			// Produced at once: the consumer finds the topic at its next
			// metadata refresh (up to metadataMaxAge later), with all of them there.
			values := map[tp][][]byte{{created, 0}: seqValues(created, 0, 0, 3), {created, 1}: seqValues(created, 1, 0, 2)}
			p.produce(created, 0, values[tp{created, 0}]...)
			p.produce(created, 1, values[tp{created, 1}]...)
			p.produce(other, 0, seqValues(other, 0, 0, 2)...)
			evs := sink.waitEvents(t, "the new topic's last records", func(evs []sse.Event) bool {
				parts := byPartition(evs)
				last := func(k tp, o int64) bool { n := len(parts[k]); return n > 0 && parts[k][n-1].Offset >= o }
				return last(tp{created, 0}, 2) && last(tp{created, 1}, 1)
			})
			parts := byPartition(evs)
			id := topicID(t, c, created)
			checkPartition(t, tp{created, 0}, id, parts[tp{created, 0}], span(0, 3, false), values[tp{created, 0}])
			checkPartition(t, tp{created, 1}, id, parts[tp{created, 1}], span(0, 2, false), values[tp{created, 1}])
			if len(parts) != 3 || len(evs) != startup+5 {
				t.Errorf("events %s, want %d of %s and 5 of %s", describe(evs), startup, formed, created)
			}
		})
	}
}

// Pacing: while the sink reports viewers behind, the consumer waits for them
// at most maxPace in all until they have caught up once, counts the wait in
// relay_consumer_paced_seconds_total, and every record still arrives.
func TestKFakePacing(t *testing.T) {
	const records = 40
	for _, tc := range []struct {
		name string
		// behind answers Behind from the number of events published so far.
		behind func(published int) bool
		// The guaranteed bounds of the paced seconds. pace stops waiting
		// once maxPace is used up, so each spell of Behind costs at least
		// maxPace and at most maxPace plus one sleep (which a loaded machine
		// may stretch: the upper bound leaves it a second per spell); a
		// budget renewed per record would cost records × maxPace.
		minPaced, maxPaced float64
	}{
		{"never behind", func(int) bool { return false }, 0, 0},
		{"always behind: one budget for all", func(int) bool { return true }, maxPace.Seconds(), maxPace.Seconds() + 1},
		// Behind after each odd-numbered record, caught up after each even one:
		// the budget is renewed once the viewers caught up, so each of the
		// records/2 spells waits it out.
		{"behind in spells: budget renewed after a catch-up", func(n int) bool { return n%2 == 1 },
			records / 2 * maxPace.Seconds(), records / 2 * (maxPace.Seconds() + 1)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const topic = "identity.paced"
			_, brokers := newKFake(t, 1, topic)
			sink := &recSink{behind: tc.behind}
			// Produce once ready: the start-up read has taken its end offsets,
			// so every record is live (before, under load, the consumer could
			// take them after the produce and call the records backfill).
			cons, reg := runConsumer(t, Config{Brokers: brokers, Backfill: records}, sink)
			waitReady(t, cons)
			p := newProducer(t, brokers)
			values := seqValues(topic, 0, 0, records)
			p.produce(topic, 0, values...)
			evs := sink.waitCount(t, records)
			checkPartition(t, tp{topic, 0}, evs[0].TopicID, evs, span(0, records, false), values)
			paced := metricValue(t, reg, "relay_consumer_paced_seconds_total")
			// A float sum of the waits: allow for rounding at the lower bound.
			if paced < tc.minPaced-1e-6 || paced > tc.maxPaced {
				t.Errorf("relay_consumer_paced_seconds_total = %.3f, want within [%.3f, %.3f]", paced, tc.minPaced, tc.maxPaced)
			}
		})
	}
}

// Bad records are skipped and counted by reason; the good records around
// them still arrive, in order, and every record counts as consumed.
func TestKFakeBadRecordsSkipped(t *testing.T) {
	const topic = "identity.bad"
	bad := []struct {
		value  []byte
		reason string
	}{
		{[]byte(`not json`), SkipNotJSON},
		{nil, SkipNotJSON}, // tombstone
		{[]byte(`[1,2]`), SkipNotObject},
		{[]byte("{\"a\":\"\xff\xfe\"}"), SkipInvalidUTF8},
		{[]byte(`{"pad":"` + strings.Repeat("x", 200) + `"}`), SkipTooLarge},
		{[]byte(`{"payload":[1]}`), SkipBadPayload},
		{[]byte(`{"payload":{},"type":5}`), SkipBadType},
		{[]byte(`{"payload":{},"ts":1e400}`), SkipBadTS},
	}
	_, brokers := newKFake(t, 1, topic)
	sink := &recSink{}
	// Produced once ready, so live: see TestKFakePacing.
	cons, reg := runConsumer(t, Config{Brokers: brokers, Backfill: 100, MaxRecordBytes: 100}, sink)
	waitReady(t, cons)
	p := newProducer(t, brokers)
	// good, bad, good, bad, …, good: the good ones at even offsets.
	var values [][]byte
	var want []wantEvent
	wantSkipped := map[string]float64{}
	for i, b := range bad {
		want = append(want, wantEvent{int64(len(values)), false})
		values = append(values, fmt.Appendf(nil, `{"good":%d}`, i), b.value)
		wantSkipped[b.reason]++
	}
	want = append(want, wantEvent{int64(len(values)), false})
	values = append(values, []byte(`{"good":"last"}`))
	p.produce(topic, 0, values...)

	evs := sink.waitEvents(t, "the last good record", func(evs []sse.Event) bool {
		return len(evs) > 0 && evs[len(evs)-1].Offset == int64(len(values)-1)
	})
	checkPartition(t, tp{topic, 0}, evs[0].TopicID, evs, want, values)
	for reason, n := range wantSkipped {
		if got := metricValue(t, reg, "relay_records_skipped_total", "reason", reason); got != n {
			t.Errorf("relay_records_skipped_total{reason=%q} = %v, want %v", reason, got, n)
		}
	}
	if got := metricValue(t, reg, "relay_records_skipped_total"); got != float64(len(bad)) {
		t.Errorf("relay_records_skipped_total = %v in all, want %d", got, len(bad))
	}
	if got := metricValue(t, reg, "relay_records_consumed_total", "topic", topic); got != float64(len(values)) {
		t.Errorf("relay_records_consumed_total = %v, want %d", got, len(values))
	}
}

// A matching topic deleted and re-created under the same name (a new topic
// ID) is followed: its records are read from its start (more than Backfill
// of them, too), none of them backfill, under the new ID.
func TestKFakeTopicRecreatedFollowed(t *testing.T) {
	const topic = "identity.recreated"
	c, brokers := newKFake(t, 1, topic)
	p := newProducer(t, brokers)
	old := seqValues(topic, 0, 0, 3)
	p.produce(topic, 0, old...)
	oldID := topicID(t, c, topic)
	sink := &recSink{}
	cons, reg := runConsumer(t, Config{Brokers: brokers, Backfill: 1}, sink)
	sink.waitCount(t, 1)
	waitReady(t, cons)

	if err := c.DeleteTopic(topic); err != nil {
		t.Fatal(err)
	}
	if err := c.CreateTopic(topic, 1, nil); err != nil {
		t.Fatal(err)
	}
	newID := topicID(t, c, topic)
	if newID == oldID {
		t.Fatal("kfake re-created the topic under its old ID")
	}
	values := seqValues(topic, 0, 100, 2)
	// A new producer: franz-go's clients keep a topic's old ID (the old one
	// fails with UNKNOWN_TOPIC_ID), which is what the consumer must work around.
	newProducer(t, brokers).produce(topic, 0, values...)
	evs := sink.waitCount(t, 1+2)
	checkPartition(t, tp{topic, 0}, oldID, evs[:1], span(2, 3, true), old)
	// Both, though Backfill is 1: the new topic is read from its start.
	checkPartition(t, tp{topic, 0}, newID, evs[1:], span(0, 2, false), values)
	if !cons.Ready() {
		t.Error("not ready after following a re-created topic")
	}
	if got := metricValue(t, reg, "relay_records_skipped_total"); got != 0 {
		t.Errorf("%v records skipped", got)
	}
}

package fanout

import (
	"encoding/json"
	"errors"
	"maps"
	"slices"
	"testing"

	"github.com/decnet/identity-relay/pkg/sse"
)

func publishN(t *testing.T, b *Broadcaster, topic string, partition int32, from, to int64) {
	t.Helper()
	for off := from; off < to; off++ {
		mustPublish(t, b, ev(topic, partition, off))
	}
}

// resumeSent resumes from from without Kafka and returns the offsets of the
// frames sent, in order.
func resumeSent(t *testing.T, b *Broadcaster, from sse.Position) ([]int64, error) {
	t.Helper()
	got, err := resumeAll(t, b, from, nil)
	var offsets []int64
	for _, s := range got {
		offsets = append(offsets, s.offset)
	}
	return offsets, err
}

// Resuming replays exactly the frames after the position, in order; a
// position the window no longer covers is a gap, and one far ahead of it, or
// naming a topic the stream does not have, is not a position of this stream.
func TestResumeFromWindow(t *testing.T) {
	b := New(Options{Buffer: 16, WindowEvents: 10})
	publishN(t, b, "identity.formed", 0, 0, 6) // offsets 0..5 on p0
	publishN(t, b, "identity.formed", 1, 0, 6) // offsets 0..5 on p1; window keeps p0 4,5 and p1 0..5
	p0, p1 := sse.KeyOf("identity.formed", [16]byte{}, 0), sse.KeyOf("identity.formed", [16]byte{}, 1)
	other := sse.KeyOf("identity.other", [16]byte{}, 0)

	cases := []struct {
		name   string
		from   sse.Position
		err    error
		replay []int64 // offsets, in publish order
	}{
		{name: "inside the window", from: sse.Position{p0: 5, p1: 3}, replay: []int64{5, 3, 4, 5}},
		{name: "at the end", from: sse.Position{p0: 6, p1: 6}},
		{name: "before the window, no Kafka", from: sse.Position{p0: 1, p1: 6}, err: ErrGap},
		{name: "p0 missing means nothing of it seen: before the window", from: sse.Position{p1: 4}, err: ErrGap},
		{name: "p1 missing means nothing of it seen, and the window has it all", from: sse.Position{p0: 4}, replay: []int64{4, 5, 0, 1, 2, 3, 4, 5}},
		{name: "ahead of this replica", from: sse.Position{p0: 8, p1: 6}},
		{name: "far ahead", from: sse.Position{p0: 1 << 40, p1: 6}, err: ErrUnusable},
		{name: "a partition this replica has not read yet", from: sse.Position{p0: 6, p1: 6, sse.KeyOf("identity.formed", [16]byte{}, 7): 3}},
		{name: "a topic this replica does not have", from: sse.Position{p0: 6, p1: 6, other: 3}, err: ErrUnusable},
		{name: "empty", from: sse.Position{}, err: ErrUnusable},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sent, err := resumeSent(t, b, c.from)
			if !errors.Is(err, c.err) {
				t.Fatalf("err %v, want %v", err, c.err)
			}
			if !slices.Equal(sent, c.replay) {
				t.Fatalf("replayed offsets %v, want %v", sent, c.replay)
			}
		})
	}
	// A new viewer (nil position) gets nothing to replay.
	s, replay, err := b.Subscribe(nil, nil)
	if err != nil || len(replay) != 0 {
		t.Fatalf("fresh viewer: %d frames, %v", len(replay), err)
	}
	s.Close()
}

// Each frame's id is the position after it; backfill frames are kept for
// resumes but not broadcast.
func TestIDsAndBackfill(t *testing.T) {
	b := New(Options{Buffer: 16})
	s := mustSubscribe(t, b, nil)
	defer s.Close()
	mustPublish(t, b, sse.Event{Topic: "identity.formed", Type: "formed", TS: "1", Payload: json.RawMessage(`{}`), Offset: 7, Backfill: true})
	if s.Queued() != 0 {
		t.Fatal("backfill frame was broadcast")
	}
	mustPublish(t, b, sse.Event{Topic: "identity.merged", Type: "merged", TS: "1", Payload: json.RawMessage(`{}`), Partition: 2, Offset: 3})
	f := one(t, s)
	want := sse.Position{sse.KeyOf("identity.formed", [16]byte{}, 0): 8, sse.KeyOf("identity.merged", [16]byte{}, 2): 4}.Encode()
	if got := string(f.Bytes[:len("id: ")+len(want)+1]); got != "id: "+want+"\n" {
		t.Fatalf("frame starts %q, want id %q", got, want)
	}
	sent, err := resumeSent(t, b, sse.Position{sse.KeyOf("identity.formed", [16]byte{}, 0): 7, sse.KeyOf("identity.merged", [16]byte{}, 2): 3})
	if err != nil || len(sent) != 2 {
		t.Fatalf("resume over backfill: %v %v", sent, err)
	}
}

// The window is bounded by bytes as well as by count.
func TestWindowBoundedByBytes(t *testing.T) {
	b := New(Options{WindowEvents: 1000, WindowBytes: 2000})
	publishN(t, b, "identity.formed", 0, 0, 100)
	st := b.Stats()
	if st.WindowBytes > 2000 || st.WindowEvents >= 100 || st.WindowEvents == 0 {
		t.Fatalf("window holds %d events, %d bytes", st.WindowEvents, st.WindowBytes)
	}
}

// A re-created topic (offsets going back) resets the window instead of mixing two logs.
func TestOffsetsGoingBackResetWindow(t *testing.T) {
	b := New(Options{})
	publishN(t, b, "identity.formed", 0, 0, 50)
	publishN(t, b, "identity.formed", 0, 0, 3)
	if n := b.Stats().WindowEvents; n != 3 {
		t.Fatalf("window holds %d events after the reset, want 3", n)
	}
}

// A topic re-created under the same name (a new topic ID) is a new stream: a
// viewer resuming from before gets the new topic's records from its first
// one, and the other partitions' history from before the re-creation is no
// longer claimed by the window (a snapshot instead of a silent gap).
func TestTopicRecreatedIsANewStream(t *testing.T) {
	b := New(Options{})
	oldID, newID := [16]byte{1}, [16]byte{2}
	of := func(topic string, id [16]byte, off int64) sse.Event {
		e := ev(topic, 0, off)
		e.TopicID = id
		return e
	}
	for off := range int64(50) {
		mustPublish(t, b, of("identity.formed", oldID, off))
		mustPublish(t, b, of("identity.merged", [16]byte{9}, off))
	}
	before := b.Position()
	mustPublish(t, b, of("identity.merged", [16]byte{9}, 50))
	for off := range int64(3) {
		mustPublish(t, b, of("identity.formed", newID, off))
	}
	if _, ok := b.Position()[sse.KeyOf("identity.formed", oldID, 0)]; ok {
		t.Fatal("the old topic's partition is still in the position")
	}
	// Resuming from the first frame after the re-creation: exact, the rest
	// of the new topic.
	after := sse.Position{sse.KeyOf("identity.merged", [16]byte{9}, 0): 51, sse.KeyOf("identity.formed", newID, 0): 1}
	if sent, err := resumeSent(t, b, after); err != nil || !slices.Equal(sent, []int64{1, 2}) {
		t.Fatalf("resume after the re-creation: %v, %v; want offsets 1, 2", sent, err)
	}
	// An id naming the deleted topic is not a position of this stream any more.
	if _, err := resumeSent(t, b, before); !errors.Is(err, ErrUnusable) {
		t.Fatalf("resume from before the re-creation: %v, want ErrUnusable", err)
	}
	// Nor is one of the other topic alone from before it: the window was emptied.
	if _, err := resumeSent(t, b, sse.Position{sse.KeyOf("identity.merged", [16]byte{9}, 0): 50}); !errors.Is(err, ErrGap) {
		t.Fatalf("resume from before the re-creation: %v, want ErrGap", err)
	}
}

// Publish refuses the partition that would take the stream past
// sse.MaxPartitions, and the ids it issues up to there all parse.
func TestPublishWithinMaxPartitions(t *testing.T) {
	b := New(Options{})
	for p := range int32(sse.MaxPartitions) {
		mustPublish(t, b, sse.Event{Topic: "identity.many", Type: "t", TS: "1", Payload: []byte(`{}`), Partition: p, Offset: 1 << 40})
	}
	err := b.Publish(sse.Event{Topic: "identity.more", Type: "t", TS: "1", Payload: []byte(`{}`)})
	if !errors.Is(err, sse.ErrTooManyPartitions) {
		t.Fatalf("publish past %d partitions: %v, want sse.ErrTooManyPartitions", sse.MaxPartitions, err)
	}
	s, _, err := b.Subscribe(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	mustPublish(t, b, sse.Event{Topic: "identity.many", Type: "t", TS: "1", Payload: []byte(`{}`), Partition: 5, Offset: 1<<40 + 1})
	f := one(t, s)
	if _, err := sse.ParsePosition(f.ID()); err != nil {
		t.Fatalf("id of %d bytes issued with %d partitions does not parse: %v", len(f.ID()), sse.MaxPartitions, err)
	}
}

// An offset no position can hold is refused before it touches the stream.
func TestPublishRefusesBadOffsets(t *testing.T) {
	b := New(Options{})
	mustPublish(t, b, ev("identity.a", 0, 5))
	before := b.Position()
	for _, off := range []int64{-1, sse.MaxOffset} {
		if err := b.Publish(ev("identity.a", 0, off)); !errors.Is(err, sse.ErrBadPosition) {
			t.Fatalf("offset %d: %v, want ErrBadPosition", off, err)
		}
	}
	if got := b.Position(); !maps.Equal(got, before) || b.Stats().WindowEvents != 1 {
		t.Fatalf("after refused offsets: position %v (was %v), window %d", got, before, b.Stats().WindowEvents)
	}
}

package fanout

import (
	"encoding/json"
	"testing"
)

func publishN(t *testing.T, b *Broadcaster, topic string, partition int32, from, to int64) {
	t.Helper()
	for off := from; off < to; off++ {
		mustPublish(t, b, Event{Topic: topic, Type: "formed", TS: "1", Payload: json.RawMessage(`{}`),
			Partition: partition, Offset: off})
	}
}

// Resuming replays exactly the frames after the position, in order; a
// position the window no longer covers, or far ahead of it, asks for a snapshot.
func TestResumeFromWindow(t *testing.T) {
	b := New(Options{Buffer: 16, WindowEvents: 10})
	publishN(t, b, "identity.formed", 0, 0, 6) // offsets 0..5 on p0
	publishN(t, b, "identity.formed", 1, 0, 6) // offsets 0..5 on p1; window keeps p0 4,5 and p1 0..5
	p0, p1 := KeyOf("identity.formed", [16]byte{}, 0), KeyOf("identity.formed", [16]byte{}, 1)

	cases := []struct {
		name    string
		from    Position
		gap     bool
		replay  []int64 // offsets, in publish order
		skipKey *Key
	}{
		{name: "inside the window", from: Position{p0: 5, p1: 3}, replay: []int64{5, 3, 4, 5}},
		{name: "at the end", from: Position{p0: 6, p1: 6}},
		{name: "before the window", from: Position{p0: 1, p1: 6}, gap: true},
		{name: "partition missing means nothing seen, and p1 from 0 is covered", from: Position{p0: 4}, replay: []int64{4, 5, 0, 1, 2, 3, 4, 5}},
		{name: "ahead of this replica", from: Position{p0: 8, p1: 6}, skipKey: &p0},
		{name: "far ahead", from: Position{p0: 1 << 40, p1: 6}, gap: true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s, r, err := b.SubscribeFrom(c.from, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if r.Gap != c.gap {
				t.Fatalf("gap %v, want %v", r.Gap, c.gap)
			}
			if c.gap {
				return
			}
			if len(r.Replay) != len(c.replay) {
				t.Fatalf("replayed %d frames, want %d", len(r.Replay), len(c.replay))
			}
			for i, f := range r.Replay {
				if f.Offset != c.replay[i] {
					t.Fatalf("replay[%d] offset %d, want %d", i, f.Offset, c.replay[i])
				}
			}
			if c.skipKey != nil && r.Skip[*c.skipKey] != c.from[*c.skipKey] {
				t.Fatalf("skip %v", r.Skip)
			}
		})
	}
	// A new viewer (nil position) gets nothing to replay.
	s, r, err := b.SubscribeFrom(nil, nil)
	if err != nil || r.Gap || len(r.Replay) != 0 {
		t.Fatalf("fresh viewer: %+v %v", r, err)
	}
	s.Close()
}

// Each frame's id is the position after it; backfill frames are kept for
// resumes but not broadcast.
func TestIDsAndBackfill(t *testing.T) {
	b := New(Options{Buffer: 16})
	s := mustSubscribe(t, b, nil)
	defer s.Close()
	mustPublish(t, b, Event{Topic: "identity.formed", Type: "formed", TS: "1", Payload: json.RawMessage(`{}`), Offset: 7, Backfill: true})
	if s.Queued() != 0 {
		t.Fatal("backfill frame was broadcast")
	}
	mustPublish(t, b, Event{Topic: "identity.merged", Type: "merged", TS: "1", Payload: json.RawMessage(`{}`), Partition: 2, Offset: 3})
	f := one(t, s)
	want := Position{KeyOf("identity.formed", [16]byte{}, 0): 8, KeyOf("identity.merged", [16]byte{}, 2): 4}.Encode()
	if got := string(f.Bytes[:len("id: ")+len(want)+1]); got != "id: "+want+"\n" {
		t.Fatalf("frame starts %q, want id %q", got, want)
	}
	_, r, err := b.SubscribeFrom(Position{KeyOf("identity.formed", [16]byte{}, 0): 7, KeyOf("identity.merged", [16]byte{}, 2): 3}, nil)
	if err != nil || r.Gap || len(r.Replay) != 2 {
		t.Fatalf("resume over backfill: %+v %v", r, err)
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
	ev := func(topic string, id [16]byte, off int64) Event {
		return Event{Topic: topic, TopicID: id, Type: "x", TS: "1", Payload: json.RawMessage(`{}`), Offset: off}
	}
	for off := range int64(50) {
		mustPublish(t, b, ev("identity.formed", oldID, off))
		mustPublish(t, b, ev("identity.merged", [16]byte{9}, off))
	}
	before := b.Position()
	mustPublish(t, b, ev("identity.merged", [16]byte{9}, 50))
	for off := range int64(3) {
		mustPublish(t, b, ev("identity.formed", newID, off))
	}
	if _, ok := b.Position()[KeyOf("identity.formed", oldID, 0)]; ok {
		t.Fatal("the old topic's partition is still in the position")
	}
	// Resuming from just after the re-creation: exact, the new topic from offset 0.
	after := Position{KeyOf("identity.merged", [16]byte{9}, 0): 51, KeyOf("identity.formed", oldID, 0): 50}
	_, r, err := b.SubscribeFrom(after, nil)
	if err != nil || r.Gap || len(r.Replay) != 3 || r.Replay[0].Offset != 0 || r.Replay[0].Key != KeyOf("identity.formed", newID, 0) {
		t.Fatalf("resume after the re-creation: gap %v, %d frames, err %v", r.Gap, len(r.Replay), err)
	}
	// From before it: identity.merged 50 was published before the window was
	// emptied, so the window cannot bring this viewer up to date.
	if _, r, _ := b.SubscribeFrom(before, nil); !r.Gap {
		t.Fatalf("resume from before the re-creation replayed %d frames, want a gap", len(r.Replay))
	}
}

package fanout

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/decnet/identity-relay/pkg/sse"
)

func ev(topic string, partition int32, offset int64) sse.Event {
	return sse.Event{Topic: topic, Type: "t", TS: "1", Partition: partition, Offset: offset,
		Payload: json.RawMessage(fmt.Sprintf(`{"p":%d,"o":%d}`, partition, offset))}
}

// sent is one frame as a viewer got it: its record and the position its id names.
type sent struct {
	key    sse.Key
	offset int64
	id     sse.Position
}

func parseSent(t *testing.T, frame []byte) sent {
	t.Helper()
	idLine, rest, _ := strings.Cut(string(frame), "\n")
	pos, err := sse.ParsePosition(strings.TrimPrefix(idLine, "id: "))
	if err != nil {
		t.Fatalf("frame %q: %v", frame, err)
	}
	_, data, _ := strings.Cut(rest, "\ndata: ")
	var env struct {
		Topic   string
		Payload struct {
			P int32
			O int64
		}
	}
	if err := json.Unmarshal([]byte(data), &env); err != nil {
		t.Fatalf("frame %q: %v", frame, err)
	}
	return sent{sse.KeyOf(env.Topic, [16]byte{}, env.Payload.P), env.Payload.O, pos}
}

// resumeAll resumes from from on b with history h and returns every frame
// sent: read back, replayed, then the live ones queued by now.
func resumeAll(t *testing.T, b *Broadcaster, from sse.Position, h History) ([]sent, error) {
	t.Helper()
	s, r, err := b.Resume(context.Background(), from, h, nil)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	var out []sent
	for _, f := range r.Kafka {
		out = append(out, parseSent(t, f))
	}
	send := func(f *sse.Frame) {
		if bytes := r.Cursor.Frame(f); bytes != nil {
			out = append(out, parseSent(t, bytes))
		}
	}
	for _, f := range r.Replay {
		send(f)
	}
	for len(s.Batches()) > 0 {
		batch := <-s.Batches()
		s.Taken(batch)
		for _, f := range batch.Frames {
			send(f)
		}
	}
	return out, nil
}

// Two replicas read two partitions in different orders. A viewer that got
// a-0 from X and moves to Y, where b-0 came first, must get b-0 with an id
// that still holds a-0: resuming on Y again brings nothing twice.
func TestResumeAcrossReplicasNeverGoesBack(t *testing.T) {
	x, y := New(Options{}), New(Options{})
	mustPublish(t, x, ev("identity.a", 0, 0))
	mustPublish(t, x, ev("identity.b", 0, 0))
	mustPublish(t, y, ev("identity.b", 0, 0))
	mustPublish(t, y, ev("identity.a", 0, 0))
	a, b := sse.KeyOf("identity.a", [16]byte{}, 0), sse.KeyOf("identity.b", [16]byte{}, 0)

	fromX := sse.Position{a: 1} // the id of a-0 on X
	got, err := resumeAll(t, y, fromX, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].key != b {
		t.Fatalf("resumed on Y: %+v, want b-0 only", got)
	}
	if want := (sse.Position{a: 1, b: 1}); !maps.Equal(got[0].id, want) {
		t.Fatalf("b-0 sent with id %v, want %v (Y's own id for it, %v, takes a-0 back)", got[0].id, want, sse.Position{b: 1})
	}
	again, err := resumeAll(t, y, got[0].id, nil)
	if err != nil || len(again) != 0 {
		t.Fatalf("resumed on Y again: %+v, %v; want nothing", again, err)
	}
	mustPublish(t, y, ev("identity.a", 0, 1))
	mustPublish(t, x, ev("identity.a", 0, 1))
	// Once Y's ids cover the viewer, its frames go out as they are: shared bytes.
	s, r, err := y.Resume(context.Background(), sse.Position{a: 1, b: 1}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if r.Cursor != nil || len(r.Replay) != 1 {
		t.Fatalf("covered viewer: cursor %v, %d frames, want none and 1", r.Cursor, len(r.Replay))
	}
}

// history serves read-backs from a list of events, running during (if set)
// while it reads, as Kafka reads race with the consumer.
type history struct {
	events []sse.Event
	during func()
	reads  int
}

func (h *history) Read(ctx context.Context, ranges []Range) ([]sse.Event, error) {
	h.reads++
	if h.during != nil {
		h.during()
	}
	var out []sse.Event
	for _, r := range ranges {
		for _, e := range h.events {
			if e.Topic == r.Topic && e.Partition == r.Partition && e.Offset >= r.From && e.Offset < r.To {
				out = append(out, e)
			}
		}
	}
	return out, ctx.Err()
}

// A read-back during which the window moves on (steady traffic evicting the
// low mark it was planned against) still serves the viewer: Kafka's frames,
// then the window's from that mark, then live, each once.
func TestReadBackRacingEviction(t *testing.T) {
	b := New(Options{WindowEvents: 4, Buffer: 64})
	h := &history{}
	for off := range int64(10) {
		e := ev("identity.a", 0, off)
		h.events = append(h.events, e)
		mustPublish(t, b, e)
	}
	// The window holds 6..9. While 0..5 are read, 10..19 arrive: the window
	// then holds 16..19 only.
	h.during = func() {
		for off := int64(10); off < 20; off++ {
			mustPublish(t, b, ev("identity.a", 0, off))
		}
	}
	got, err := resumeAll(t, b, sse.Position{sse.KeyOf("identity.a", [16]byte{}, 0): 2}, h)
	if err != nil {
		t.Fatalf("resume: %v", err)
	}
	var offsets []int64
	for _, s := range got {
		offsets = append(offsets, s.offset)
	}
	want := []int64{2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19}
	if !slices.Equal(offsets, want) || h.reads != 1 {
		t.Fatalf("sent offsets %v after %d reads, want %v after 1", offsets, h.reads, want)
	}
	for _, s := range got {
		if s.id[s.key] != s.offset+1 {
			t.Fatalf("offset %d sent with id %v", s.offset, s.id)
		}
	}
}

// What one resume can make the relay hold is bounded: a read-back larger
// than ReadBackBytes, or one whose context ends, is given up (a snapshot).
func TestReadBackBounds(t *testing.T) {
	b := New(Options{WindowEvents: 2, ReadBackBytes: 4 << 10})
	h := &history{}
	for off := range int64(100) {
		e := ev("identity.a", 0, off)
		e.Payload = json.RawMessage(fmt.Sprintf(`{"p":0,"o":%d,"pad":"%s"}`, off, strings.Repeat("x", 100)))
		h.events = append(h.events, e)
		mustPublish(t, b, e)
	}
	a := sse.KeyOf("identity.a", [16]byte{}, 0)
	if _, err := resumeAll(t, b, sse.Position{a: 1}, h); !errors.Is(err, ErrGap) {
		t.Fatalf("resume needing 98 frames of 200 bytes within 4 KiB: %v, want ErrGap", err)
	}
	if _, err := resumeAll(t, b, sse.Position{a: 90}, h); err != nil {
		t.Fatalf("resume needing 8 frames: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, _, err := b.Resume(ctx, sse.Position{a: 90}, h, nil); !errors.Is(err, ErrGap) || !errors.Is(err, context.Canceled) {
		t.Fatalf("resume with its context ended: %v, want ErrGap from context.Canceled", err)
	}
	if n := b.Stats().Subscribers; n != 0 {
		t.Fatalf("%d subscriptions left by failed resumes", n)
	}
}

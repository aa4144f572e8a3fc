package fanout

import (
	"encoding/json"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/decnet/identity-relay/pkg/sse"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func event(i int) sse.Event {
	return sse.Event{Topic: "identity.formed", Type: "formed", TS: "1750000000.123",
		Payload: json.RawMessage(`{"seq":` + strconv.Itoa(i) + `}`), Offset: int64(i)}
}

func mustSubscribe(t *testing.T, b *Broadcaster, onEnd func(Reason)) *Subscription {
	t.Helper()
	s, _, err := b.Subscribe(nil, onEnd)
	if err != nil {
		t.Fatalf("subscribe: %v", err)
	}
	return s
}

// one receives the next batch, which must hold one frame.
func one(t *testing.T, s *Subscription) *sse.Frame {
	t.Helper()
	batch := <-s.Batches()
	s.Taken(batch)
	if len(batch.Frames) != 1 {
		t.Fatalf("batch of %d frames, want 1", len(batch.Frames))
	}
	return batch.Frames[0]
}

func mustPublish(t testing.TB, b *Broadcaster, ev sse.Event) {
	t.Helper()
	if err := b.Publish(ev); err != nil {
		t.Fatalf("publish: %v", err)
	}
}

// A viewer that never reads is dropped as slow; the viewers that read get every frame, in order.
func TestSlowViewerDroppedOthersGetEveryFrame(t *testing.T) {
	const buffer, events = 8, 100
	b := New(Options{Buffer: buffer})
	var ended []Reason
	stalled := mustSubscribe(t, b, func(r Reason) { ended = append(ended, r) })
	readers := []*Subscription{mustSubscribe(t, b, nil), mustSubscribe(t, b, nil)}
	want := make([][]byte, 0, events)
	got := make([][][]byte, len(readers))
	for i := range events {
		ev := event(i)
		f, err := sse.Encode(ev, sse.Position{sse.KeyOf(ev.Topic, [16]byte{}, 0): int64(i) + 1}.Encode())
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, f.Bytes)
		mustPublish(t, b, ev)
		for r, s := range readers {
			got[r] = append(got[r], one(t, s).Bytes)
		}
	}
	for r := range readers {
		if len(got[r]) != events {
			t.Fatalf("reader %d got %d frames, want %d", r, len(got[r]), events)
		}
		for i := range want {
			if string(got[r][i]) != string(want[i]) {
				t.Fatalf("reader %d frame %d = %q, want %q", r, i, got[r][i], want[i])
			}
		}
		if readers[r].Reason() != ReasonNone {
			t.Fatalf("reader %d ended: %v", r, readers[r].Reason())
		}
	}
	select {
	case <-stalled.Done():
	default:
		t.Fatal("stalled viewer was not dropped")
	}
	if stalled.Reason() != ReasonSlow || len(ended) != 1 || ended[0] != ReasonSlow {
		t.Fatalf("stalled reason %v, onEnd calls %v; want one slow", stalled.Reason(), ended)
	}
	if stalled.Queued() != buffer {
		t.Fatalf("stalled viewer holds %d frames, want its full buffer %d", stalled.Queued(), buffer)
	}
	if n := b.Stats().Subscribers; n != len(readers) {
		t.Fatalf("%d subscribers left, want %d", n, len(readers))
	}
	st := b.Stats()
	if st.Published != events || st.Dropped != 1 || st.Delivered != events*2+buffer {
		t.Fatalf("stats %+v", st)
	}
	for _, s := range readers {
		s.Close()
	}
	stalled.Close()
}

// Publish returns even when every viewer has stopped reading: no send ever blocks.
func TestPublishNeverBlocks(t *testing.T) {
	b := New(Options{Buffer: 1})
	subs := make([]*Subscription, 50)
	for i := range subs {
		subs[i] = mustSubscribe(t, b, nil)
	}
	for i := range 1000 {
		mustPublish(t, b, event(i))
	}
	for i, s := range subs {
		if s.Reason() != ReasonSlow {
			t.Fatalf("sub %d reason %v, want slow", i, s.Reason())
		}
	}
	if b.Stats().Subscribers != 0 {
		t.Fatalf("%d subscribers left", b.Stats().Subscribers)
	}
}

// Close ends every subscription as shutdown, refuses new ones, and is idempotent.
func TestCloseEndsEverySubscription(t *testing.T) {
	b := New(Options{Buffer: 4})
	var calls atomic.Int32
	s1 := mustSubscribe(t, b, func(r Reason) {
		if r == ReasonShutdown {
			calls.Add(1)
		}
	})
	s2 := mustSubscribe(t, b, nil)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	for _, s := range []*Subscription{s1, s2} {
		<-s.Done()
		if s.Reason() != ReasonShutdown {
			t.Fatalf("reason %v, want shutdown", s.Reason())
		}
		s.Close() // after shutdown: a no-op, and the first reason stays
		if s.Reason() != ReasonShutdown {
			t.Fatalf("reason changed to %v", s.Reason())
		}
	}
	if calls.Load() != 1 {
		t.Fatalf("onEnd called %d times", calls.Load())
	}
	if _, _, err := b.Subscribe(nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("subscribe after close: %v, want ErrClosed", err)
	}
	if err := b.Close(); !errors.Is(err, ErrClosed) {
		t.Fatalf("second close: %v, want ErrClosed", err)
	}
}

// Unsubscribe is idempotent and removes exactly that viewer.
func TestUnsubscribe(t *testing.T) {
	b := New(Options{Buffer: 4})
	s1, s2, s3 := mustSubscribe(t, b, nil), mustSubscribe(t, b, nil), mustSubscribe(t, b, nil)
	s1.Close()
	s1.Close()
	if s1.Reason() != ReasonClosed || b.Stats().Subscribers != 2 {
		t.Fatalf("reason %v len %d", s1.Reason(), b.Stats().Subscribers)
	}
	mustPublish(t, b, event(1))
	if s1.Queued() != 0 || s2.Queued() != 1 || s3.Queued() != 1 {
		t.Fatalf("queued: %d %d %d", s1.Queued(), s2.Queued(), s3.Queued())
	}
	s3.Close()
	s2.Close()
	if b.Stats().Subscribers != 0 {
		t.Fatalf("len %d", b.Stats().Subscribers)
	}
}

// Subscribing and unsubscribing while frames are broadcast is race-free, and
// each viewer sees an increasing sequence with no gap while it reads.
func TestSubscribeUnsubscribeRacingBroadcast(t *testing.T) {
	b := New(Options{Buffer: 1024})
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				s, _, err := b.Subscribe(nil, nil)
				if err != nil {
					t.Error(err)
					return
				}
				last := -1
				for range 20 + w {
					var batch *Batch
					select {
					case batch = <-s.Batches():
						s.Taken(batch)
					case <-stop:
						s.Close()
						return
					}
					for _, f := range batch.Frames {
						seq := seqOf(t, f)
						if last >= 0 && seq != last+1 {
							t.Errorf("gap: %d after %d", seq, last)
						}
						last = seq
					}
				}
				s.Close()
			}
		}()
	}
	for i := range 20000 {
		mustPublish(t, b, event(i))
	}
	close(stop)
	wg.Wait()
	if b.Stats().Subscribers != 0 {
		t.Fatalf("%d subscribers left", b.Stats().Subscribers)
	}
}

func seqOf(t *testing.T, f *sse.Frame) int {
	t.Helper()
	const marker = `"payload":{"seq":`
	s := string(f.Bytes)
	i := len(s) - len("}}\n\n")
	j := i
	for j > 0 && s[j-1] >= '0' && s[j-1] <= '9' {
		j--
	}
	if j < len(marker) || s[j-len(marker):j] != marker {
		t.Fatalf("no seq in %q", s)
	}
	n, _ := strconv.Atoi(s[j:i])
	return n
}

// Published frames are offered at a flush, as one batch: when a quarter of
// a queue (at most 64) is waiting, FlushInterval after the first, before a
// new subscription (its position is after them) and at Close.
func TestFlushBatches(t *testing.T) {
	const buffer = 16
	b := New(Options{Buffer: buffer, FlushInterval: time.Hour})
	s := mustSubscribe(t, b, nil)
	// The first event finds the broadcaster idle: offered at once.
	mustPublish(t, b, event(0))
	if s.Queued() != 1 {
		t.Fatal("the first event, on an idle broadcaster, was not offered at once")
	}
	s.Taken(<-s.Batches())
	// The next ones follow a flush within the interval: they wait.
	for i := range buffer/4 - 1 {
		mustPublish(t, b, event(1+i))
		if s.Queued() != 0 {
			t.Fatalf("offered after %d events, want %d", i+1, buffer/4)
		}
	}
	mustPublish(t, b, event(buffer/4))
	if batch := <-s.Batches(); len(batch.Frames) != buffer/4 || s.Queued() != buffer/4 {
		t.Fatalf("after %d events: a batch of %d, %d queued", buffer/4, len(batch.Frames), s.Queued())
	} else {
		s.Taken(batch)
	}
	mustPublish(t, b, event(100))
	late := mustSubscribe(t, b, nil)
	if s.Queued() != 1 || late.Queued() != 0 {
		t.Fatalf("subscribing with a frame pending: %d and %d queued, want 1 and 0", s.Queued(), late.Queued())
	}
	mustPublish(t, b, event(101))
	if err := b.Close(); err != nil || s.Queued() != 2 || late.Queued() != 1 {
		t.Fatalf("Close with a frame pending: %v, %d and %d queued, want 2 and 1", err, s.Queued(), late.Queued())
	}

	// The bound counts frames, not batches: 1 (idle) and 4 batches of 4
	// make 17 frames, one past a queue of 16.
	b = New(Options{Buffer: buffer, FlushInterval: time.Hour})
	s = mustSubscribe(t, b, nil)
	for i := range buffer - 3 {
		mustPublish(t, b, event(i)) // 1 alone, then 3 batches of 4
	}
	if s.Queued() != buffer-3 || s.Reason() != ReasonNone {
		t.Fatalf("%d queued, reason %v; want %d, none", s.Queued(), s.Reason(), buffer-3)
	}
	for i := range buffer / 4 {
		mustPublish(t, b, event(buffer-3+i))
	}
	if s.Reason() != ReasonSlow {
		t.Fatalf("a batch past the bound: reason %v, want slow", s.Reason())
	}

	b = New(Options{Buffer: buffer, FlushInterval: 20 * time.Millisecond})
	s = mustSubscribe(t, b, nil)
	mustPublish(t, b, event(0)) // idle: at once
	start := time.Now()
	mustPublish(t, b, event(1))
	if s.Queued() != 1 {
		t.Fatal("an event right after a flush was offered before the interval")
	}
	<-s.Batches()
	if batch := <-s.Batches(); len(batch.Frames) != 1 {
		t.Fatalf("a batch of %d after the interval, want 1", len(batch.Frames))
	}
	if waited := time.Since(start); waited >= 20*time.Millisecond+time.Minute {
		t.Fatalf("offered after %v", waited) // bounds a hang only: timers fire late on a loaded machine
	}
	_ = b.Close()
}

// A reader gets every frame once, in order, whatever the flush timing: the
// last frames of a run come with the timer's flush.
func TestFlushLosesNothing(t *testing.T) {
	const events = 5000
	for _, every := range []time.Duration{0, 50 * time.Microsecond, time.Millisecond} {
		b := New(Options{Buffer: events, FlushInterval: every})
		s := mustSubscribe(t, b, nil)
		// The reader only collects; the checks run on the test's goroutine.
		got := make(chan []*sse.Frame, 1)
		go func() {
			var frames []*sse.Frame
			for len(frames) < events {
				batch := <-s.Batches()
				s.Taken(batch)
				frames = append(frames, batch.Frames...)
			}
			got <- frames
		}()
		for i := range events {
			mustPublish(t, b, event(i))
			if i%100 == 0 {
				time.Sleep(time.Duration(i%7) * 10 * time.Microsecond)
			}
		}
		select {
		case frames := <-got:
			for i, f := range frames {
				if seq := seqOf(t, f); seq != i {
					t.Fatalf("interval %v: frame %d after %d", every, seq, i-1)
				}
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("interval %v: the last frames never came", every)
		}
		_ = b.Close()
	}
}

// Behind says yes while more than a quarter of the viewers have a quarter
// of their queue or more waiting, and follows them as they drain.
func TestBehind(t *testing.T) {
	const buffer = 16
	b := New(Options{Buffer: buffer})
	if b.Behind() {
		t.Fatal("behind with no viewers")
	}
	subs := []*Subscription{mustSubscribe(t, b, nil), mustSubscribe(t, b, nil), mustSubscribe(t, b, nil), mustSubscribe(t, b, nil)}
	for i := range buffer/4 - 1 {
		mustPublish(t, b, event(i))
	}
	if b.Behind() {
		t.Fatalf("behind with %d of %d queued", subs[0].Queued(), buffer)
	}
	mustPublish(t, b, event(buffer/4))
	if !b.Behind() {
		t.Fatalf("not behind with every viewer at %d of %d", subs[0].Queued(), buffer)
	}
	drain := func(s *Subscription) {
		for s.Queued() > 0 {
			s.Taken(<-s.Batches())
		}
	}
	drain(subs[0])
	drain(subs[1])
	if !b.Behind() {
		t.Fatal("not behind with half the viewers behind")
	}
	drain(subs[2])
	if b.Behind() {
		t.Fatal("behind with one viewer of four behind")
	}
	_ = b.Close()
}

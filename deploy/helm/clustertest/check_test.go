package clustertest

import (
	"strings"
	"testing"
	"time"
)

// clean is a viewer that received records 0..n-1 of two partitions in order.
func clean(n int64) ViewerLog {
	var l ViewerLog
	for s := int64(0); s < n; s++ {
		l.Recs = append(l.Recs, Rec{Seq: s, Part: []string{"identity.formed/0", "identity.formed/1"}[s%2]})
	}
	return l
}

func seqs(n int64) []int64 {
	var s []int64
	for i := int64(0); i < n; i++ {
		s = append(s, i)
	}
	return s
}

// TestCheckPasses guards the checker's accounting of viewers that received
// everything once, with reconnects within the bounds.
func TestCheckPasses(t *testing.T) {
	at := time.Unix(1000, 0)
	a, b := clean(10), clean(10)
	a.Reconnects = []time.Time{at}
	b.Reconnects = []time.Time{at.Add(time.Second)}
	r := Check(seqs(10), []ViewerLog{a, b, clean(10)})
	if f := r.Failures(Expect{MaxPerViewer: 1, MaxOneViewer: 1, MaxPeakShare: 0.34}); len(f) != 0 {
		t.Fatalf("failures %v for clean viewers (%+v)", f, r)
	}
	if r.Viewers != 3 || r.Acked != 10 || r.Reconnects != 2 || r.MaxReconnects != 1 || r.PeakPerSecond != 1 {
		t.Fatalf("result %+v", r)
	}
}

// TestCheckFails guards that the checker fails on each injected fault, and
// counts it where it belongs.
func TestCheckFails(t *testing.T) {
	at := time.Unix(1000, 0)
	tests := []struct {
		name   string
		mangle func(*ViewerLog)
		expect Expect
		want   string
		count  func(Result) int
	}{
		{"lost", func(l *ViewerLog) { l.Recs = append(l.Recs[:4], l.Recs[5:]...) }, Expect{}, "1 records lost by 1 viewers", func(r Result) int { return r.Lost }},
		{"lost at the end", func(l *ViewerLog) { l.Recs = l.Recs[:7] }, Expect{}, "3 records lost", func(r Result) int { return r.Lost }},
		{"duplicated", func(l *ViewerLog) { l.Recs = append(l.Recs, l.Recs[3]) }, Expect{}, "1 records duplicated", func(r Result) int { return r.Dup }},
		{"duplicated on resume", func(l *ViewerLog) {
			l.Recs = append(append(append([]Rec(nil), l.Recs[:6]...), l.Recs[4:6]...), l.Recs[6:]...)
		}, Expect{}, "2 records duplicated", func(r Result) int { return r.Dup }},
		{"out of order", func(l *ViewerLog) { l.Recs[2], l.Recs[4] = l.Recs[4], l.Recs[2] }, Expect{}, "1 records out of partition order", func(r Result) int { return r.Reorder }},
		{"non-200", func(l *ViewerLog) { l.Non200 = []int{503} }, Expect{}, "1 answers other than 200 (1×503)", func(r Result) int { return r.Non200 }},
		{"snapshot reset", func(l *ViewerLog) { l.SnapshotResets = 1 }, Expect{}, "1 snapshot resets", func(r Result) int { return r.Resets }},
		{"too many reconnects for one", func(l *ViewerLog) { l.Reconnects = []time.Time{at, at.Add(2 * time.Second), at.Add(4 * time.Second)} },
			Expect{MaxOneViewer: 2}, "a viewer reconnected 3 times", func(r Result) int { return r.MaxReconnects }},
		{"reconnect where none may be", func(l *ViewerLog) { l.Reconnects = []time.Time{at} },
			Expect{NoReconnects: true}, "1 reconnects, 0 of them ended by rebalancing (open streams", func(r Result) int { return r.Reconnects }},
		{"reconnects beyond the rebalanced", func(l *ViewerLog) { l.Reconnects = []time.Time{at, at.Add(time.Second)} },
			Expect{NoReconnects: true, Rebalanced: 1}, "2 reconnects, 1 of them ended by rebalancing", func(r Result) int { return r.Reconnects }},
		{"too many reconnects on average", func(l *ViewerLog) { l.Reconnects = []time.Time{at, at.Add(2 * time.Second)} },
			Expect{MaxPerViewer: 0.5}, "0.67 reconnects per viewer", func(r Result) int { return r.Reconnects }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bad := clean(10)
			tt.mangle(&bad)
			r := Check(seqs(10), []ViewerLog{clean(10), bad, clean(10)})
			f := r.Failures(tt.expect)
			if len(f) != 1 || !strings.HasPrefix(f[0], tt.want) {
				t.Fatalf("failures %q, want one starting %q (%+v)", f, tt.want, r)
			}
			if tt.count(r) == 0 {
				t.Fatalf("not counted: %+v", r)
			}
		})
	}
}

// TestCheckPeakPerSecond guards the busiest second's count against its bound.
func TestCheckPeakPerSecond(t *testing.T) {
	at := time.Unix(1000, 0)
	var vs []ViewerLog
	for i := 0; i < 10; i++ {
		v := clean(4)
		v.Reconnects = []time.Time{at.Add(time.Duration(i%4) * time.Second)}
		vs = append(vs, v)
	}
	r := Check(seqs(4), vs)
	if r.PeakPerSecond != 3 {
		t.Fatalf("peak %d, want 3", r.PeakPerSecond)
	}
	if f := r.Failures(Expect{MaxPeakShare: 0.2}); len(f) != 1 || !strings.Contains(f[0], "3 reconnects in one second") {
		t.Fatalf("failures %q", f)
	}
	if f := r.Failures(Expect{MaxPeakShare: 0.3}); len(f) != 0 {
		t.Fatalf("failures %q", f)
	}
	// Reconnects the relays' rebalancing caused are not the disruption's.
	if f := r.Failures(Expect{NoReconnects: true, Rebalanced: 10}); len(f) != 0 {
		t.Fatalf("failures %q", f)
	}
}

// TestCheckUnacked guards that a record Kafka did not acknowledge but a
// viewer received is counted, not failed (the ack can be lost on the way
// back), and that nothing acknowledged fails.
func TestCheckUnacked(t *testing.T) {
	r := Check(seqs(9), []ViewerLog{clean(10)})
	if r.Unknown != 1 || len(r.Failures(Expect{})) != 0 {
		t.Fatalf("%+v %v", r, r.Failures(Expect{}))
	}
	if f := Check(nil, []ViewerLog{{}}).Failures(Expect{}); len(f) != 1 || f[0] != "Kafka acknowledged no record" {
		t.Fatalf("failures %q", f)
	}
}

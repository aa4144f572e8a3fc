// Package clustertest tests the relay's Helm chart on a live Kubernetes
// cluster with viewers that behave like browsers (viewer.go), a producer that
// writes numbered records at a steady rate and keeps what Kafka acknowledged
// (producer.go), and a checker (this file) that says, per viewer, what was
// lost, duplicated or out of order. The scenarios are in scenarios_test.go,
// built only with -tags cluster (make cluster-test, scripts/cluster/test.sh);
// the checker's and the viewer's own tests run in make test.
package clustertest

import (
	"fmt"
	"sort"
	"time"
)

// Rec is one record of the producer's run as a viewer received it.
type Rec struct {
	// Seq numbers the run's records from 0 in the order they were produced.
	Seq int64
	// Part names the record's topic and partition ("identity.formed/2"):
	// records of one partition must arrive in the order of their Seq.
	Part string
}

// ViewerLog is what one viewer saw over a scenario.
type ViewerLog struct {
	// Recs are the run's records received, in order of arrival.
	Recs []Rec
	// SnapshotResets counts snapshot frames on a resume (a reconnection with
	// a Last-Event-ID): the relay could not continue from the viewer's
	// position and started it over.
	SnapshotResets int
	// Non200 holds the status of each answer other than 200; EventSource
	// gives up on the first, and so does the viewer.
	Non200 []int
	// Reconnects holds the time of each reconnection (a new request after a
	// stream ended or a connection failed).
	Reconnects []time.Time
	// LongestSilence is the longest time without a record of the run, from
	// the first record to the end of the scenario's stream.
	LongestSilence time.Duration
	// ConnectErrors counts connections that failed before any answer (a
	// browser retries those after the retry delay).
	ConnectErrors int
}

// Result is the checker's account of a scenario.
type Result struct {
	Viewers  int
	Acked    int // records Kafka acknowledged
	Lost     int // acknowledged records a viewer never received, summed over viewers
	Dup      int // records received more than once, summed over viewers
	Reorder  int // records received after a later one of the same partition
	Unknown  int // records received that Kafka never acknowledged (not an error: an ack can be lost)
	Resets   int // snapshot resets
	Non200   int
	Statuses map[int]int
	// Reconnects over all viewers, their most for one viewer, and the most
	// that fell into one second.
	Reconnects, MaxReconnects, PeakPerSecond int
	// ViewersLosing counts viewers that lost at least one record.
	ViewersLosing  int
	ConnectErrors  int
	LongestSilence time.Duration
}

// ReconnectsPerViewer is the average.
func (r Result) ReconnectsPerViewer() float64 {
	if r.Viewers == 0 {
		return 0
	}
	return float64(r.Reconnects) / float64(r.Viewers)
}

// Check compares what each viewer received with the records Kafka
// acknowledged (every viewer was streaming before the first was produced,
// so each must receive every one of them exactly once).
func Check(acked []int64, viewers []ViewerLog) Result {
	want := make(map[int64]bool, len(acked))
	for _, s := range acked {
		want[s] = true
	}
	r := Result{Viewers: len(viewers), Acked: len(want), Statuses: map[int]int{}}
	perSecond := map[int64]int{}
	for _, v := range viewers {
		seen := make(map[int64]int, len(v.Recs))
		last := map[string]int64{}
		for _, rec := range v.Recs {
			seen[rec.Seq]++
			if seen[rec.Seq] > 1 {
				r.Dup++
				continue
			}
			if !want[rec.Seq] {
				r.Unknown++
			}
			if l, ok := last[rec.Part]; ok && rec.Seq < l {
				r.Reorder++
			} else {
				last[rec.Part] = rec.Seq
			}
		}
		lost := 0
		for s := range want {
			if seen[s] == 0 {
				lost++
			}
		}
		r.Lost += lost
		if lost > 0 {
			r.ViewersLosing++
		}
		r.Resets += v.SnapshotResets
		r.Non200 += len(v.Non200)
		for _, st := range v.Non200 {
			r.Statuses[st]++
		}
		r.Reconnects += len(v.Reconnects)
		r.MaxReconnects = max(r.MaxReconnects, len(v.Reconnects))
		for _, t := range v.Reconnects {
			perSecond[t.Unix()]++
		}
		r.ConnectErrors += v.ConnectErrors
		r.LongestSilence = max(r.LongestSilence, v.LongestSilence)
	}
	for _, n := range perSecond {
		r.PeakPerSecond = max(r.PeakPerSecond, n)
	}
	return r
}

// Expect is what a scenario demands beyond the defaults of Failures.
type Expect struct {
	// MaxPerViewer and MaxOneViewer bound the reconnects (0: unbounded).
	MaxPerViewer float64
	MaxOneViewer int
	// MaxPeakShare bounds the reconnects of the busiest second as a share of
	// the viewers (0: unbounded).
	MaxPeakShare float64
	// AllowResets accepts snapshot resets.
	AllowResets bool
	// NoReconnects fails any reconnect beyond Rebalanced, the streams the
	// relays' rebalancing ended meanwhile (they move for their own reason):
	// open streams must go on untouched.
	NoReconnects bool
	Rebalanced   int
}

// Failures lists what is wrong with r: any record lost, duplicated or out
// of order, any answer but 200, any snapshot reset (unless allowed), a
// reconnect bound passed, or no record acknowledged at all.
func (r Result) Failures(e Expect) []string {
	var f []string
	if r.Acked == 0 {
		f = append(f, "Kafka acknowledged no record")
	}
	if r.Lost > 0 {
		f = append(f, fmt.Sprintf("%d records lost by %d viewers", r.Lost, r.ViewersLosing))
	}
	if r.Dup > 0 {
		f = append(f, fmt.Sprintf("%d records duplicated", r.Dup))
	}
	if r.Reorder > 0 {
		f = append(f, fmt.Sprintf("%d records out of partition order", r.Reorder))
	}
	if r.Non200 > 0 {
		f = append(f, fmt.Sprintf("%d answers other than 200 (%s)", r.Non200, statuses(r.Statuses)))
	}
	if r.Resets > 0 && !e.AllowResets {
		f = append(f, fmt.Sprintf("%d snapshot resets", r.Resets))
	}
	if e.MaxPerViewer > 0 && r.ReconnectsPerViewer() > e.MaxPerViewer {
		f = append(f, fmt.Sprintf("%.2f reconnects per viewer (at most %.2f)", r.ReconnectsPerViewer(), e.MaxPerViewer))
	}
	if e.MaxOneViewer > 0 && r.MaxReconnects > e.MaxOneViewer {
		f = append(f, fmt.Sprintf("a viewer reconnected %d times (at most %d)", r.MaxReconnects, e.MaxOneViewer))
	}
	if e.NoReconnects && r.Reconnects > e.Rebalanced {
		f = append(f, fmt.Sprintf("%d reconnects, %d of them ended by rebalancing (open streams must go on untouched)", r.Reconnects, e.Rebalanced))
	}
	if e.MaxPeakShare > 0 && float64(r.PeakPerSecond) > e.MaxPeakShare*float64(r.Viewers) {
		f = append(f, fmt.Sprintf("%d reconnects in one second (at most %.0f%% of %d viewers)", r.PeakPerSecond, 100*e.MaxPeakShare, r.Viewers))
	}
	return f
}

func statuses(m map[int]int) string {
	keys := make([]int, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Ints(keys)
	s := ""
	for i, k := range keys {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprintf("%d×%d", m[k], k)
	}
	return s
}

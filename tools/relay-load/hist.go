//go:build linux

package main

import (
	"math"
	"math/bits"
	"sort"
	"sync/atomic"
)

// A log-linear histogram of durations in nanoseconds: values below 128 ns
// have a bucket each; above, every power of two is split into 128 equal
// buckets, so a reported quantile is within 0.8% of the true value. It is
// fixed-size, needs no allocation per sample, and merges across viewers,
// shards and worker processes by adding counts.
const (
	histSub     = 128
	histSubBits = 7
	histBuckets = (64 - histSubBits + 1) * histSub
)

func histIndex(v int64) int {
	if v < 0 {
		v = 0
	}
	u := uint64(v)
	if u < histSub {
		return int(u)
	}
	e := bits.Len64(u) - histSubBits - 1 // u>>e is in [128, 256)
	return (e+1)*histSub + int(u>>e) - histSub
}

// histValue is the middle of bucket i.
func histValue(i int) float64 {
	if i < histSub {
		return float64(i)
	}
	e := i/histSub - 1
	m := uint64(i%histSub + histSub)
	lo := float64(m << e)
	return lo + float64(uint64(1)<<e)/2
}

// hist is safe for concurrent add.
type hist struct {
	c [histBuckets]atomic.Uint64
}

func (h *hist) add(v int64) { h.c[histIndex(v)].Add(1) }

// histData is the mergeable, serializable form: bucket index → count.
type histData map[int]uint64

func (h *hist) data(into histData) {
	for i := range h.c {
		if n := h.c[i].Load(); n > 0 {
			into[i] += n
		}
	}
}

func (d histData) merge(o histData) {
	for i, n := range o {
		d[i] += n
	}
}

func (d histData) count() uint64 {
	var n uint64
	for _, c := range d {
		n += c
	}
	return n
}

// quantile returns the value at q (0..1) in nanoseconds; NaN when empty.
func (d histData) quantile(q float64) float64 {
	total := d.count()
	if total == 0 {
		return math.NaN()
	}
	idx := make([]int, 0, len(d))
	for i := range d {
		idx = append(idx, i)
	}
	sort.Ints(idx)
	rank := uint64(math.Ceil(q * float64(total)))
	if rank < 1 {
		rank = 1
	}
	var seen uint64
	for _, i := range idx {
		seen += d[i]
		if seen >= rank {
			return histValue(i)
		}
	}
	return histValue(idx[len(idx)-1])
}

func (d histData) max() float64 {
	best := -1
	for i := range d {
		if i > best {
			best = i
		}
	}
	if best < 0 {
		return math.NaN()
	}
	return histValue(best)
}

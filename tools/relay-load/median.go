//go:build linux

package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
)

// runMedian prints, for reports of the same scenario run several times
// (--json-out files), the median of each figure and its range:
// BENCHMARKS.md gives medians of 3 runs.
func runMedian(files []string, stdout io.Writer) error {
	if len(files) == 0 {
		return fmt.Errorf("%w: --median needs the JSON reports (--json-out) of the runs", errUsage)
	}
	reps := make([]*report, len(files))
	for i, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		reps[i] = &report{}
		if err := json.Unmarshal(b, reps[i]); err != nil {
			return fmt.Errorf("%s: %w", f, err)
		}
	}
	figures := []struct {
		name string
		get  func(r *report) (float64, bool)
		unit string
	}{
		{"frames/s", func(r *report) (float64, bool) { return r.Delivery.FramesPerSec, r.Mode != "idle" }, ""},
		{"latency p50", func(r *report) (float64, bool) { return r.Latency.P50Ms, r.Latency.Count > 0 }, " ms"},
		{"latency p99", func(r *report) (float64, bool) { return r.Latency.P99Ms, r.Latency.Count > 0 }, " ms"},
		{"latency p99.9", func(r *report) (float64, bool) { return r.Latency.P999Ms, r.Latency.Count > 0 }, " ms"},
		{"relay CPU-s per M frames", func(r *report) (float64, bool) {
			return r.Relay.CPUSecsPerMillion, r.Relay.CPUSecsPerMillion > 0
		}, ""},
		{"relay write syscalls per frame", func(r *report) (float64, bool) {
			return r.Relay.WritesPerFrame, r.Relay.WritesPerFrame > 0
		}, ""},
		{"relay cores busy", func(r *report) (float64, bool) {
			return r.Relay.CPUUtilisationPerCPU, r.Relay.CPUMeasuredOverSecs > 0
		}, ""},
		{"tool CPU-s", func(r *report) (float64, bool) { return r.ToolCPUSecs, r.ToolCPUSecs > 0 }, ""},
		{"tool CPU-s per M frames", func(r *report) (float64, bool) { return r.ToolCPUPerMillion, r.ToolCPUPerMillion > 0 }, ""},
		{"relay RSS per viewer", func(r *report) (float64, bool) { return r.Relay.RSSPerViewer / 1024, r.Relay.RSSPerViewer > 0 }, " KiB"},
		{"relay RSS max", func(r *report) (float64, bool) { return float64(r.Relay.RSSMax) / (1 << 20), r.Relay.RSSMax > 0 }, " MiB"},
		{"readers disconnected", func(r *report) (float64, bool) { return float64(r.Delivery.Dropped), true }, ""},
		{"gaps + duplicates", func(r *report) (float64, bool) { return float64(r.Delivery.Gaps + r.Delivery.Dups), true }, ""},
		{"longest keepalive silence", func(r *report) (float64, bool) { return r.Keepalive.MaxGapSecs, r.Keepalive.MaxGapSecs > 0 }, " s"},
		{"stalled cut, queue full to cut (max)", func(r *report) (float64, bool) {
			return stalledMax(r), r.Stalled != nil && r.Stalled.Count > 0
		}, " s"},
	}
	label := reps[0].Label
	if i := strings.LastIndex(label, "-r"); i > 0 { // bench.sh --runs names run k "<scenario>-rk"
		label = label[:i]
	}
	fmt.Fprintf(stdout, "== %s: median of %d runs (min–max) ==\n", label, len(reps))
	for _, f := range figures {
		var v []float64
		for _, r := range reps {
			if x, ok := f.get(r); ok {
				v = append(v, x)
			}
		}
		if len(v) == 0 {
			continue
		}
		s := summarize(v)
		fmt.Fprintf(stdout, "  %-38s %s%s (%s–%s)\n", f.name, num(s.P50), f.unit, num(s.Min), num(s.Max))
	}
	var keeps []string
	for _, r := range reps {
		if r.KeepsUp != nil {
			keeps = append(keeps, fmt.Sprint(*r.KeepsUp))
		}
	}
	if len(keeps) > 0 {
		fmt.Fprintf(stdout, "  %-38s %s\n", "kept up", strings.Join(keeps, ", "))
	}
	return nil
}

func stalledMax(r *report) float64 {
	if r.Stalled == nil {
		return 0
	}
	return r.Stalled.FillToCut.Max
}

// num prints a figure with 3 significant digits, in full below a million.
func num(f float64) string {
	switch {
	case f >= 1e6:
		return fmt.Sprintf("%.3gM", f/1e6)
	case f >= 1000:
		return fmt.Sprintf("%.0f", f)
	default:
		return fmt.Sprintf("%.3g", f)
	}
}

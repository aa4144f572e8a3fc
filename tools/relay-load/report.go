//go:build linux

package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"
)

// report is the result of a run, printed as a table or as JSON.
type report struct {
	Label     string  `json:"label,omitempty"`
	Command   string  `json:"command"`
	RunID     string  `json:"run_id"`
	Mode      string  `json:"mode"`
	StartedAt string  `json:"started_at"`
	Config    *config `json:"config"`

	Viewers struct {
		Requested   int            `json:"requested"`
		Connected   int            `json:"connected"`
		Failures    map[string]int `json:"failures,omitempty"`
		ConnectSecs float64        `json:"connect_secs"`
		Processes   int            `json:"processes"`
		Stalled     int            `json:"stalled"`
		SourceIPs   int            `json:"source_ips"`
	} `json:"viewers"`

	Produce struct {
		Partitions int        `json:"partitions"`
		Target     float64    `json:"target_rate,omitempty"`
		Pace       paceResult `json:"pace"`
	} `json:"produce"`

	Delivery struct {
		FramesTotal     int64          `json:"frames_total"`
		FramesInWindow  int64          `json:"frames_in_window"`
		WindowSecs      float64        `json:"window_secs"`
		FramesPerSec    float64        `json:"frames_per_sec"`
		ExpectedPerSec  float64        `json:"expected_frames_per_sec,omitempty"`
		Live            int            `json:"live_viewers"`
		Complete        int            `json:"complete_viewers"`
		Dropped         int            `json:"dropped_viewers"`
		DropReasons     map[string]int `json:"drop_reasons,omitempty"`
		DroppedAfter    summary        `json:"dropped_after_secs"` // from the first produced event
		Gaps            int64          `json:"gaps"`
		Dups            int64          `json:"dups"`
		ViewersWithGaps int            `json:"viewers_with_gaps"`
		ViewersWithDups int            `json:"viewers_with_dups"`
		Foreign         int64          `json:"foreign_frames"`
		ErrorEvents     int64          `json:"error_events"`
	} `json:"delivery"`

	Latency struct {
		Count  uint64  `json:"count"`
		P50Ms  float64 `json:"p50_ms"`
		P99Ms  float64 `json:"p99_ms"`
		P999Ms float64 `json:"p999_ms"`
		MaxMs  float64 `json:"max_ms"`
	} `json:"latency"`

	Relay struct {
		PID                  int      `json:"pid,omitempty"`
		CPUSecs              float64  `json:"cpu_secs"`
		CPUSecsPerMillion    float64  `json:"cpu_secs_per_million_frames"`
		Writes               int64    `json:"write_syscalls"` // over the same interval as the CPU
		WritesPerFrame       float64  `json:"write_syscalls_per_frame"`
		RSSBefore            int64    `json:"rss_before_bytes"`
		RSSAfterConnect      int64    `json:"rss_after_connect_bytes"`
		RSSPerViewer         float64  `json:"rss_per_viewer_bytes"`
		RSSMax               int64    `json:"rss_max_bytes"`
		Samples              []sample `json:"samples,omitempty"`
		CPUMeasuredOverSecs  float64  `json:"cpu_measured_over_secs"`
		CPUUtilisationPerCPU float64  `json:"cpu_cores_busy"`
	} `json:"relay"`

	// The tool's own CPU over the same interval (every process of it): on a
	// shared machine it is what the relay did not get.
	ToolCPUSecs float64 `json:"tool_cpu_secs"`
	// ... per million frames of the window: what a frame costs the tool
	// (reading, parsing, producing), to set against the relay's figure.
	ToolCPUPerMillion float64 `json:"tool_cpu_secs_per_million_frames"`

	Keepalive struct {
		ConfiguredSecs float64 `json:"configured_secs"`
		ToleranceSecs  float64 `json:"tolerance_secs"`
		MaxGapSecs     float64 `json:"max_gap_secs"`
		P99GapSecs     float64 `json:"p99_viewer_max_gap_secs"`
		P50GapSecs     float64 `json:"p50_viewer_max_gap_secs"`
		LateViewers    int     `json:"late_viewers"`
		Keepalives     int64   `json:"keepalives"`
	} `json:"keepalive"`

	Stalled *stalledReport `json:"stalled,omitempty"`

	KeepsUp *bool    `json:"keeps_up,omitempty"`
	Verdict []string `json:"verdict,omitempty"`
	Notes   []string `json:"notes,omitempty"`
}

type stalledReport struct {
	Count int `json:"count"`
	// Cut: the relay's socket left ESTABLISHED during the run.
	Cut int `json:"cut"`
	// ConfirmedClosed: reading to the end afterwards met EOF or a reset.
	ConfirmedClosed int    `json:"confirmed_closed"`
	NotCut          int    `json:"not_cut"`
	Reference       string `json:"reference"` // what the times below count from
	// Seconds from the reference to the cut, to the last growth of the
	// relay's send queue (the channel starts filling), and between the two.
	CutAfter     summary        `json:"cut_after_secs"`
	QueueFullAt  summary        `json:"queue_full_after_secs"`
	FillToCut    summary        `json:"channel_fill_to_cut_secs"`
	MaxQueue     summary        `json:"max_send_queue_bytes"`
	States       map[string]int `json:"cut_states"`
	DrainEnds    map[string]int `json:"drain_ends"`
	Viewers      []stalledOut   `json:"viewers"`
	PollInterval float64        `json:"poll_interval_secs"`
}

type stalledOut struct {
	Index       int     `json:"index"`
	Local       string  `json:"local"`
	CutAfter    float64 `json:"cut_after_secs"` // -1: not cut
	QueueFullAt float64 `json:"queue_full_after_secs"`
	MaxQueue    int64   `json:"max_send_queue_bytes"`
	CutState    string  `json:"cut_state"`
	DrainEnd    string  `json:"drain_end"`
}

type summary struct {
	N   int     `json:"n"`
	Min float64 `json:"min"`
	P50 float64 `json:"p50"`
	Max float64 `json:"max"`
}

func summarize(v []float64) summary {
	if len(v) == 0 {
		return summary{}
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return summary{N: len(s), Min: s[0], P50: s[(len(s)-1)/2], Max: s[len(s)-1]}
}

func newReport(cfg *config, args []string) *report {
	r := &report{Label: cfg.Label, Command: commandLine(args), Mode: cfg.mode(), StartedAt: time.Now().UTC().Format(time.RFC3339), Config: cfg}
	r.Viewers.Requested = cfg.Viewers
	r.Viewers.Stalled = cfg.Stalled
	r.Viewers.SourceIPs = cfg.SourceIPs
	r.Produce.Target = cfg.Rate
	r.Relay.PID = cfg.RelayPID
	r.Keepalive.ConfiguredSecs = cfg.Keepalive.Seconds()
	r.Keepalive.ToleranceSecs = cfg.KeepaliveTolerance.Seconds()
	return r
}

// commandLine is the command as run, with credentials redacted.
func commandLine(args []string) string {
	out := []string{"bin/relay-load"}
	redact := false
	for _, a := range args {
		switch {
		case redact:
			a, redact = "<redacted>", false
		case a == "--token" || a == "-token" || a == "--jwt-secret" || a == "-jwt-secret":
			redact = true
		case strings.HasPrefix(a, "--token=") || strings.HasPrefix(a, "-token="):
			a = a[:strings.Index(a, "=")+1] + "<redacted>"
		case strings.HasPrefix(a, "--jwt-secret=") || strings.HasPrefix(a, "-jwt-secret="):
			a = a[:strings.Index(a, "=")+1] + "<redacted>"
		}
		if strings.ContainsAny(a, " \t'\"$\\") {
			a = strconv.Quote(a)
		}
		out = append(out, a)
	}
	return strings.Join(out, " ")
}

func finite(f float64) float64 {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return 0
	}
	return f
}

// finish computes the figures from the merged results.
func (r *report) finish(cfg *config, all *groupReport, expect []int64, winFrom, winTo, doneAt time.Time,
	used usage, samples []sample, start time.Time) {
	r.Viewers.Connected = all.Connect.Connected
	r.Viewers.Failures = all.Connect.Failures
	r.Viewers.ConnectSecs = all.Connect.Secs

	d := &r.Delivery
	d.FramesTotal, d.FramesInWindow = all.Frames, all.FramesWin
	d.Live, d.Complete, d.Dropped, d.DropReasons = all.Live, all.Complete, all.Dropped, all.DropReasons
	d.Gaps, d.Dups, d.ViewersWithGaps, d.ViewersWithDups = all.Gaps, all.Dups, all.ViewersGaps, all.ViewersDups
	d.Foreign, d.ErrorEvents = all.Foreign, all.ErrorEvents
	if len(all.DropNs) > 0 {
		ref := r.Produce.Pace.FirstNs
		var at []float64
		for _, ns := range all.DropNs {
			if ref > 0 {
				at = append(at, float64(ns-ref)/1e9)
			}
		}
		d.DroppedAfter = summarize(at)
	}
	r.ToolCPUSecs = all.ToolCPUSecs
	frames := all.FramesWin
	switch r.Mode {
	case "rate", "idle":
		d.WindowSecs = winTo.Sub(winFrom).Seconds()
		if r.Mode == "rate" {
			// Every connected reader should get every event: a viewer
			// the relay dropped is delivery lost, not a smaller target.
			d.ExpectedPerSec = r.Produce.Pace.Rate * float64(all.Live)
		}
	case "burst":
		// From the first record sent to the last frame received.
		if all.LastNs > 0 {
			d.WindowSecs = float64(all.LastNs-r.Produce.Pace.FirstNs) / 1e9
		}
		frames = all.Frames
	}
	if d.WindowSecs > 0 {
		d.FramesPerSec = float64(frames) / d.WindowSecs
	}
	if frames > 0 {
		r.ToolCPUPerMillion = r.ToolCPUSecs / (float64(frames) / 1e6)
	}

	l := &r.Latency
	l.Count = all.Latency.count()
	l.P50Ms = finite(all.Latency.quantile(0.5) / 1e6)
	l.P99Ms = finite(all.Latency.quantile(0.99) / 1e6)
	l.P999Ms = finite(all.Latency.quantile(0.999) / 1e6)
	l.MaxMs = finite(all.Latency.max() / 1e6)

	rl := &r.Relay
	rl.Samples = samples
	for _, s := range samples {
		rl.RSSMax = max(rl.RSSMax, s.RSS)
	}
	if cfg.RelayPID > 0 {
		rl.CPUSecs = used.cpu.Seconds()
		rl.Writes = used.writes
		switch r.Mode {
		case "burst":
			rl.CPUMeasuredOverSecs = doneAt.Sub(winFrom).Seconds()
		default:
			rl.CPUMeasuredOverSecs = winTo.Sub(winFrom).Seconds()
		}
		if rl.CPUMeasuredOverSecs > 0 {
			rl.CPUUtilisationPerCPU = rl.CPUSecs / rl.CPUMeasuredOverSecs
		}
		if frames > 0 {
			rl.CPUSecsPerMillion = rl.CPUSecs / (float64(frames) / 1e6)
			rl.WritesPerFrame = float64(rl.Writes) / float64(frames)
		}
	}

	k := &r.Keepalive
	k.Keepalives = all.Keepalives
	if len(all.MaxGapsNs) > 0 {
		g := make([]float64, len(all.MaxGapsNs))
		for i, ns := range all.MaxGapsNs {
			g[i] = float64(ns) / 1e9
			if ns > (cfg.Keepalive + cfg.KeepaliveTolerance).Nanoseconds() {
				k.LateViewers++
			}
		}
		sort.Float64s(g)
		k.MaxGapSecs = g[len(g)-1]
		k.P99GapSecs = g[int(math.Ceil(0.99*float64(len(g))))-1]
		k.P50GapSecs = g[(len(g)-1)/2]
	}

	if len(all.Stalled) > 0 {
		r.Stalled = stalledFigures(all.Stalled, r.Produce.Pace.FirstNs, cfg.TCPPoll)
	}

	if r.Mode != "idle" {
		var why []string
		if d.Dropped > 0 {
			why = append(why, fmt.Sprintf("%d viewers were disconnected %v", d.Dropped, d.DropReasons))
		}
		if d.Gaps > 0 || d.Dups > 0 {
			why = append(why, fmt.Sprintf("%d gaps and %d duplicates", d.Gaps, d.Dups))
		}
		if d.Complete < d.Live-d.Dropped {
			why = append(why, fmt.Sprintf("%d of %d connected viewers did not receive every event within %v", d.Live-d.Dropped-d.Complete, d.Live-d.Dropped, cfg.Drain))
		}
		if !r.Produce.Pace.AckedAll {
			why = append(why, fmt.Sprintf("the producer lost records (%d failed: %s)", r.Produce.Pace.Failed, r.Produce.Pace.FailReason))
		}
		if r.Mode == "rate" {
			if r.Produce.Pace.Rate < 0.97*cfg.Rate {
				why = append(why, fmt.Sprintf("the producer reached %.0f/s of %.0f/s", r.Produce.Pace.Rate, cfg.Rate))
			}
			if d.ExpectedPerSec > 0 && d.FramesPerSec < 0.97*d.ExpectedPerSec {
				why = append(why, fmt.Sprintf("frames/s %.0f is below 97%% of %.0f", d.FramesPerSec, d.ExpectedPerSec))
			}
		}
		ok := len(why) == 0
		r.KeepsUp = &ok
		if ok {
			why = append(why, "every connected viewer that reads received every event once, in order, and none was disconnected")
		}
		r.Verdict = why
	}
	if d.Foreign > 0 {
		r.Notes = append(r.Notes, fmt.Sprintf("%d frames were not this run's (other producers on the topic)", d.Foreign))
	}
	if d.ErrorEvents > 0 {
		r.Notes = append(r.Notes, fmt.Sprintf("%d error events (Stream interrupted)", d.ErrorEvents))
	}
	if all.PollError != "" {
		r.Notes = append(r.Notes, "stalled viewers' sockets could not be read, their cut times are missing: "+all.PollError)
	}
}

func stalledFigures(list []stalledResult, prodStart int64, poll time.Duration) *stalledReport {
	s := &stalledReport{Count: len(list), States: map[string]int{}, DrainEnds: map[string]int{}, PollInterval: poll.Seconds()}
	ref := prodStart
	s.Reference = "the first produced event"
	if ref == 0 {
		s.Reference = "each viewer's snapshot"
	}
	var cut, full, fill, q []float64
	for _, v := range list {
		base := ref
		if base == 0 {
			base = v.SnapshotNs
		}
		o := stalledOut{Index: v.Index, Local: v.Local, CutAfter: -1, QueueFullAt: -1, MaxQueue: v.MaxQueue, CutState: v.CutState, DrainEnd: v.DrainEnd}
		if v.GrowNs > 0 {
			o.QueueFullAt = float64(v.GrowNs-base) / 1e9
			full = append(full, o.QueueFullAt)
		}
		if v.CutNs > 0 {
			s.Cut++
			o.CutAfter = float64(v.CutNs-base) / 1e9
			cut = append(cut, o.CutAfter)
			s.States[v.CutState]++
			if v.GrowNs > 0 {
				fill = append(fill, float64(v.CutNs-v.GrowNs)/1e9)
			}
		} else {
			s.NotCut++
		}
		if v.DrainEnd == "eof" || v.DrainEnd == "reset" {
			s.ConfirmedClosed++
		}
		s.DrainEnds[v.DrainEnd]++
		q = append(q, float64(v.MaxQueue))
		s.Viewers = append(s.Viewers, o)
	}
	s.CutAfter, s.QueueFullAt, s.FillToCut, s.MaxQueue = summarize(cut), summarize(full), summarize(fill), summarize(q)
	return s
}

func writeReport(cfg *config, r *report, stdout io.Writer) error {
	if cfg.JSONOut != "" {
		b, err := json.MarshalIndent(r, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(cfg.JSONOut, append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	if cfg.JSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	}
	printTable(r, stdout)
	return nil
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

func printTable(r *report, w io.Writer) {
	p := func(name, f string, a ...any) { fmt.Fprintf(w, "  %-11s %s\n", name, fmt.Sprintf(f, a...)) }
	title := r.Label
	if title == "" {
		title = r.Mode + " run"
	}
	fmt.Fprintf(w, "== %s ==\n", title)
	p("command", "%s", r.Command)
	v := r.Viewers
	p("viewers", "%d requested, %d connected in %.1fs, %d stalled; %d process(es), %d source addresses",
		v.Requested, v.Connected, v.ConnectSecs, v.Stalled, v.Processes, v.SourceIPs)
	if len(v.Failures) > 0 {
		p("", "connect failures: %v", v.Failures)
	}
	pc := r.Produce.Pace
	switch r.Mode {
	case "rate":
		p("produce", "%.0f events/s target, %.1f/s achieved (pacing late by at most %.1f ms), %d events, %d partitions, %d-byte values, acked all: %v",
			r.Produce.Target, pc.Rate, pc.MaxLateMs, pc.Events, r.Produce.Partitions, r.Config.ValueBytes, pc.AckedAll)
	case "burst":
		p("produce", "burst of %d events in %.2fs (%.0f/s into the client), %d partitions, %d-byte values, acked all: %v",
			pc.Events, pc.Secs, pc.Rate, r.Produce.Partitions, r.Config.ValueBytes, pc.AckedAll)
	default:
		p("produce", "none (idle run)")
	}
	d := r.Delivery
	if r.Mode != "idle" {
		switch r.Mode {
		case "rate":
			p("delivery", "%.0f frames/s over the %.1fs window (expected %.0f); %d frames in all",
				d.FramesPerSec, d.WindowSecs, d.ExpectedPerSec, d.FramesTotal)
		case "burst":
			p("delivery", "%.0f frames/s: %d frames in %.2fs from the first record sent to the last frame received",
				d.FramesPerSec, d.FramesTotal, d.WindowSecs)
		}
		p("", "viewers reading: %d, complete %d, disconnected %d%s; gaps %d (%d viewers), duplicates %d (%d viewers)",
			d.Live, d.Complete, d.Dropped, mapOrNone(d.DropReasons), d.Gaps, d.ViewersWithGaps, d.Dups, d.ViewersWithDups)
		if d.DroppedAfter.N > 0 {
			p("", "the disconnected ones ended %s s after the first produced event", span(d.DroppedAfter))
		}
		l := r.Latency
		p("latency", "produce→viewer p50 %.2f ms, p99 %.2f ms, p99.9 %.2f ms, max %.2f ms (%d samples)",
			l.P50Ms, l.P99Ms, l.P999Ms, l.MaxMs, l.Count)
	} else if d.Dropped > 0 {
		p("delivery", "disconnected %d %v", d.Dropped, d.DropReasons)
	}
	rl := r.Relay
	if rl.PID > 0 {
		if r.Mode != "idle" {
			p("relay cpu", "%.2f CPU-s over %.1fs (%.2f cores) = %.2f CPU-s per million frames",
				rl.CPUSecs, rl.CPUMeasuredOverSecs, rl.CPUUtilisationPerCPU, rl.CPUSecsPerMillion)
		} else {
			p("relay cpu", "%.2f CPU-s over %.1fs (%.3f cores)", rl.CPUSecs, rl.CPUMeasuredOverSecs, rl.CPUUtilisationPerCPU)
		}
		if rl.Writes > 0 && r.Mode != "idle" {
			p("relay writes", "%d write system calls over the same interval = %.3f per frame (%.1f frames a write)",
				rl.Writes, rl.WritesPerFrame, 1/rl.WritesPerFrame)
		}
		if r.ToolCPUSecs > 0 && rl.CPUMeasuredOverSecs > 0 {
			p("tool cpu", "%.2f CPU-s over the same interval (%.2f cores) = %.2f CPU-s per million frames, every process of the tool",
				r.ToolCPUSecs, r.ToolCPUSecs/rl.CPUMeasuredOverSecs, r.ToolCPUPerMillion)
		}
		p("relay rss", "%s before viewers, %s after connecting: %.1f KiB per viewer; max %s",
			mib(rl.RSSBefore), mib(rl.RSSAfterConnect), rl.RSSPerViewer/1024, mib(rl.RSSMax))
		if len(rl.Samples) > 0 {
			step := max(1, len(rl.Samples)/16)
			var b strings.Builder
			for i := 0; i < len(rl.Samples); i += step {
				s := rl.Samples[i]
				fmt.Fprintf(&b, " %.0fs=%.1f", s.T, float64(s.RSS)/(1<<20))
			}
			last := rl.Samples[len(rl.Samples)-1]
			fmt.Fprintf(&b, " %.0fs=%.1f", last.T, float64(last.RSS)/(1<<20))
			p("rss (MiB)", "%s", strings.TrimSpace(b.String()))
		}
	}
	k := r.Keepalive
	p("keepalive", "configured %.0fs: longest silence per viewer p50 %.2fs, p99 %.2fs, max %.2fs; late (> %.0fs + %.0fs) %d viewers; %d keepalives",
		k.ConfiguredSecs, k.P50GapSecs, k.P99GapSecs, k.MaxGapSecs, k.ConfiguredSecs, k.ToleranceSecs, k.LateViewers, k.Keepalives)
	if s := r.Stalled; s != nil {
		p("stalled", "%d: cut by the relay %d (%v), not cut %d; reading to the end afterwards: %v",
			s.Count, s.Cut, s.States, s.NotCut, s.DrainEnds)
		p("", "after %s: send queue stopped growing at %s s, cut at %s s; channel filling to cut %s s (poll every %.1fs)",
			s.Reference, span(s.QueueFullAt), span(s.CutAfter), span(s.FillToCut), s.PollInterval)
		p("", "relay's send queue at its largest: %s KiB per viewer", spanScaled(s.MaxQueue, 1.0/1024))
	}
	if r.KeepsUp != nil {
		ans := "yes"
		if !*r.KeepsUp {
			ans = "NO"
		}
		p("keeps up", "%s: %s", ans, strings.Join(r.Verdict, "; "))
	}
	for _, n := range r.Notes {
		p("note", "%s", n)
	}
}

func span(s summary) string { return spanScaled(s, 1) }

func spanScaled(s summary, k float64) string {
	if s.N == 0 {
		return "-"
	}
	return fmt.Sprintf("min %.2f / p50 %.2f / max %.2f", s.Min*k, s.P50*k, s.Max*k)
}

func mapOrNone(m map[string]int) string {
	if len(m) == 0 {
		return ""
	}
	return " " + fmt.Sprint(m)
}

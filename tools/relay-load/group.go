//go:build linux

package main

import (
	"context"
	"math"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// groupSpec is what one process needs to run its share of the viewers.
type groupSpec struct {
	Cfg        config `json:"cfg"`
	Token      string `json:"token"`
	RunID      string `json:"run_id"`
	Lo         int    `json:"lo"` // global viewer indices [Lo, Hi)
	Hi         int    `json:"hi"`
	Partitions int    `json:"partitions"`
}

// isStalled spreads exactly k stalled viewers evenly over n.
func isStalled(i, n, k int) bool {
	if k <= 0 || n <= 0 {
		return false
	}
	return (i+1)*k/n-i*k/n == 1
}

type connectResult struct {
	Requested int            `json:"requested"`
	Connected int            `json:"connected"`
	Failures  map[string]int `json:"failures,omitempty"`
	Secs      float64        `json:"secs"`
}

type groupStatus struct {
	Live     int `json:"live"`     // connected, not stalled, not ended
	Primed   int `json:"primed"`   // of those, saw the priming record of every partition
	Complete int `json:"complete"` // of those, have every event of expect
	Ended    int `json:"ended"`
}

// stalledResult is what the tool saw of one stalled viewer. Times are unix ns.
type stalledResult struct {
	Index      int    `json:"index"`
	Local      string `json:"local"`
	SnapshotNs int64  `json:"snapshot_ns"`
	// From the relay's side of the connection (sock_diag):
	Seen      bool   `json:"seen"`        // its socket was found
	GrowNs    int64  `json:"grow_ns"`     // last time its send queue grew
	MaxQueue  int64  `json:"max_queue"`   // largest send queue seen, bytes
	CutNs     int64  `json:"cut_ns"`      // first poll that found it no longer ESTABLISHED
	CutState  string `json:"cut_state"`   // the TCP state then, or "gone"
	DrainEnd  string `json:"drain_end"`   // eof/reset: closed by the relay; timeout: still open
	DrainRead int64  `json:"drain_bytes"` // bytes read when draining at the end
}

// groupReport is one process's raw results; reports merge by adding.
type groupReport struct {
	Connect     connectResult   `json:"connect"`
	Frames      int64           `json:"frames"`
	FramesWin   int64           `json:"frames_in_window"`
	Gaps        int64           `json:"gaps"`
	Dups        int64           `json:"dups"`
	Foreign     int64           `json:"foreign"`
	ErrorEvents int64           `json:"error_events"`
	Keepalives  int64           `json:"keepalives"`
	ViewersGaps int             `json:"viewers_with_gaps"`
	ViewersDups int             `json:"viewers_with_dups"`
	Live        int             `json:"live"` // non-stalled viewers that were connected
	Complete    int             `json:"complete"`
	Dropped     int             `json:"dropped"`
	DropReasons map[string]int  `json:"drop_reasons,omitempty"`
	FirstNs     int64           `json:"first_ns"`
	LastNs      int64           `json:"last_ns"`
	Latency     histData        `json:"latency"`
	MaxGapsNs   []int64         `json:"max_gaps_ns"`
	DropNs      []int64         `json:"drop_ns,omitempty"` // when each dropped reader's stream ended
	ToolCPUSecs float64         `json:"tool_cpu_secs"`     // this process's CPU over the window
	Stalled     []stalledResult `json:"stalled,omitempty"`
	PollError   string          `json:"poll_error,omitempty"` // why stalled viewers' sockets could not be read
}

// group is a share of the viewers, in this process or in a worker.
type group interface {
	connect(ctx context.Context) (*connectResult, error)
	status(expect []int64) (*groupStatus, error)
	window(from, to int64) error
	finish(expect []int64, deadline time.Time) (*groupReport, error)
	close()
}

// localGroup runs viewers in this process.
type localGroup struct {
	spec    groupSpec
	relay   *net.TCPAddr
	request []byte

	viewers   []*viewer
	lat       []*hist // shards, by viewer index
	allPrimed uint64

	winFrom, winTo atomic.Int64
	cpu            cpuWindow
	finishing      chan struct{} // closed when the run ends: stalled viewers drain
	closing        atomic.Bool   // set before the tool closes connections
	wg             sync.WaitGroup
	cancel         context.CancelFunc
	poller         *tcpPoller
}

func newLocalGroup(spec groupSpec) (*localGroup, error) {
	cfg := &spec.Cfg
	relay, path, host, err := relayAddr(cfg.URL)
	if err != nil {
		return nil, err
	}
	g := &localGroup{
		spec:      spec,
		relay:     relay,
		request:   streamRequest(cfg.Protocol, path, host, spec.Token),
		finishing: make(chan struct{}),
	}
	g.winFrom.Store(math.MaxInt64)
	g.winTo.Store(math.MaxInt64)
	g.allPrimed = 1<<uint(spec.Partitions) - 1
	for range 16 {
		g.lat = append(g.lat, new(hist))
	}
	runNeedle := []byte(spec.RunID + `"`)
	for i := spec.Lo; i < spec.Hi; i++ {
		v := &viewer{g: g, idx: i, stalled: isStalled(i, cfg.Viewers, cfg.Stalled), next: make([]atomic.Int64, spec.Partitions)}
		v.p.sink = v
		v.p.runID = runNeedle
		v.p.centrifugo = cfg.Protocol == protoCentrifugo
		g.viewers = append(g.viewers, v)
	}
	return g, nil
}

func (g *localGroup) connect(ctx context.Context) (*connectResult, error) {
	start := time.Now()
	// The viewers outlive connect: their context is the group's, bounded by
	// the whole run's time limit.
	vctx, cancel := context.WithTimeout(context.Background(), g.spec.Cfg.maxRuntime())
	g.cancel = cancel
	cctx, ccancel := context.WithTimeout(ctx, g.spec.Cfg.ConnectTimeout)
	defer ccancel()
	sem := make(chan struct{}, g.spec.Cfg.ConnectConcurrency)
	done := make(chan *viewer, len(g.viewers))
	for _, v := range g.viewers {
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			v.run(vctx, cctx, sem, done)
		}()
	}
	res := &connectResult{Requested: len(g.viewers), Failures: map[string]int{}}
	for range g.viewers {
		v := <-done
		if v.connected {
			res.Connected++
		} else {
			res.Failures[v.failure]++
		}
	}
	res.Secs = time.Since(start).Seconds()
	var stalled []*viewer
	for _, v := range g.viewers {
		if v.stalled && v.connected {
			stalled = append(stalled, v)
		}
	}
	if len(stalled) > 0 {
		g.poller = startTCPPoller(g.relay, stalled, g.spec.Cfg.TCPPoll, g.spec.Cfg.maxRuntime())
	}
	return res, nil
}

func (g *localGroup) status(expect []int64) (*groupStatus, error) {
	var st groupStatus
	for _, v := range g.viewers {
		if !v.connected || v.stalled {
			continue
		}
		if v.ended.Load() {
			st.Ended++
			continue
		}
		st.Live++
		if v.primed.Load() {
			st.Primed++
		}
		if len(expect) > 0 && v.complete(expect) {
			st.Complete++
		}
	}
	return &st, nil
}

func (g *localGroup) window(from, to int64) error {
	g.winTo.Store(to)
	g.winFrom.Store(from)
	g.cpu.arm(from, to)
	return nil
}

// finish waits until every live viewer has the events up to expect (per
// partition, the count produced) or the deadline, then ends the run and
// collects the counters.
func (g *localGroup) finish(expect []int64, deadline time.Time) (*groupReport, error) {
	for len(expect) > 0 && time.Now().Before(deadline) && !g.allComplete(expect) {
		time.Sleep(20 * time.Millisecond)
	}
	endNs := time.Now().UnixNano()
	toolCPU := g.cpu.secs()
	if g.poller != nil {
		g.poller.stop()
	}
	g.closing.Store(true)
	close(g.finishing)
	for _, v := range g.viewers {
		if v.connected && !v.stalled {
			_ = v.conn.Close()
		}
	}
	g.wg.Wait() // stalled viewers drain for at most StalledDrain
	for _, v := range g.viewers {
		if v.connected && v.stalled {
			_ = v.conn.Close()
		}
	}
	if g.cancel != nil {
		g.cancel()
	}

	r := &groupReport{Latency: histData{}, DropReasons: map[string]int{}, ToolCPUSecs: toolCPU}
	for _, h := range g.lat {
		h.data(r.Latency)
	}
	winTo := g.winTo.Load()
	if g.poller != nil && g.poller.err != nil {
		r.PollError = g.poller.err.Error()
	}
	for _, v := range g.viewers {
		if !v.connected {
			continue
		}
		r.Keepalives += v.keepalives
		r.ErrorEvents += v.errorEvents
		r.Foreign += v.foreign
		if v.stalled {
			r.Stalled = append(r.Stalled, g.stalledResult(v))
			continue
		}
		r.Live++
		r.Frames += v.frames
		r.FramesWin += v.framesWin
		r.Gaps += v.gaps
		r.Dups += v.dups
		if v.gaps > 0 {
			r.ViewersGaps++
		}
		if v.dups > 0 {
			r.ViewersDups++
		}
		if v.ended.Load() {
			r.Dropped++
			r.DropReasons[v.endReason]++
			r.DropNs = append(r.DropNs, v.endNs)
		} else {
			// The silence at the end counts too: a stream that stopped
			// sending keepalives must not look punctual.
			end := min(endNs, winTo)
			if v.lastActNs != 0 && end-v.lastActNs > v.maxGapNs {
				v.maxGapNs = end - v.lastActNs
			}
		}
		if len(expect) > 0 && v.complete(expect) {
			r.Complete++
		}
		r.MaxGapsNs = append(r.MaxGapsNs, v.maxGapNs)
		if v.firstNs != 0 && (r.FirstNs == 0 || v.firstNs < r.FirstNs) {
			r.FirstNs = v.firstNs
		}
		r.LastNs = max(r.LastNs, v.lastNs)
	}
	return r, nil
}

func (v *viewer) complete(expect []int64) bool {
	for p, n := range expect {
		if v.next[p].Load() < n {
			return false
		}
	}
	return true
}

func (g *localGroup) allComplete(expect []int64) bool {
	for _, v := range g.viewers {
		if v.connected && !v.stalled && !v.ended.Load() && !v.complete(expect) {
			return false
		}
	}
	return true
}

func (g *localGroup) stalledResult(v *viewer) stalledResult {
	s := stalledResult{Index: v.idx, Local: v.local.String(), SnapshotNs: v.snapshotNs, DrainEnd: v.drainEnd, DrainRead: v.drainBytes}
	if g.poller != nil {
		if t := g.poller.track[v]; t != nil {
			s.Seen, s.GrowNs, s.MaxQueue, s.CutNs, s.CutState = t.seen, t.growNs, t.maxQueue, t.cutNs, t.cutState
		}
	}
	return s
}

func (g *localGroup) close() {
	if g.cancel != nil {
		g.cancel()
	}
	for _, v := range g.viewers {
		if v.conn != nil {
			_ = v.conn.Close()
		}
	}
}

// mergeReports adds b into a.
func mergeReports(a, b *groupReport) {
	a.Connect.Requested += b.Connect.Requested
	a.Connect.Connected += b.Connect.Connected
	if a.Connect.Failures == nil {
		a.Connect.Failures = map[string]int{}
	}
	for k, n := range b.Connect.Failures {
		a.Connect.Failures[k] += n
	}
	a.Connect.Secs = max(a.Connect.Secs, b.Connect.Secs)
	a.Frames += b.Frames
	a.FramesWin += b.FramesWin
	a.Gaps += b.Gaps
	a.Dups += b.Dups
	a.Foreign += b.Foreign
	a.ErrorEvents += b.ErrorEvents
	a.Keepalives += b.Keepalives
	a.ViewersGaps += b.ViewersGaps
	a.ViewersDups += b.ViewersDups
	a.Live += b.Live
	a.Complete += b.Complete
	a.Dropped += b.Dropped
	if a.DropReasons == nil {
		a.DropReasons = map[string]int{}
	}
	for k, n := range b.DropReasons {
		a.DropReasons[k] += n
	}
	if b.FirstNs != 0 && (a.FirstNs == 0 || b.FirstNs < a.FirstNs) {
		a.FirstNs = b.FirstNs
	}
	a.LastNs = max(a.LastNs, b.LastNs)
	if a.Latency == nil {
		a.Latency = histData{}
	}
	a.Latency.merge(b.Latency)
	a.MaxGapsNs = append(a.MaxGapsNs, b.MaxGapsNs...)
	a.DropNs = append(a.DropNs, b.DropNs...)
	a.ToolCPUSecs += b.ToolCPUSecs
	a.Stalled = append(a.Stalled, b.Stalled...)
	if a.PollError == "" {
		a.PollError = b.PollError
	}
	sort.Slice(a.Stalled, func(i, j int) bool { return a.Stalled[i].Index < a.Stalled[j].Index })
}

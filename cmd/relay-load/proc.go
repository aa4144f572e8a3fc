package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat;
// 100 on every Linux the tool runs on (getconf CLK_TCK).
const clockTicks = 100

// relayCPU returns the relay's user+system CPU time so far.
func relayCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name may hold spaces and parentheses: fields count from
	// after the last ')'. utime and stime are fields 14 and 15 of the line.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("unexpected /proc/pid/stat")
	}
	f := bytes.Fields(b[i+1:])
	if len(f) < 13 {
		return 0, errors.New("unexpected /proc/pid/stat")
	}
	ut, err1 := strconv.ParseInt(string(f[11]), 10, 64)
	st, err2 := strconv.ParseInt(string(f[12]), 10, 64)
	if err1 != nil || err2 != nil {
		return 0, errors.New("unexpected /proc/pid/stat")
	}
	return time.Duration(ut+st) * time.Second / clockTicks, nil
}

// relayRSS returns the relay's resident set size (VmRSS) in bytes.
func relayRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range bytes.Split(b, []byte("\n")) {
		if v, ok := bytes.CutPrefix(l, []byte("VmRSS:")); ok {
			f := bytes.Fields(v)
			if len(f) >= 1 {
				kb, err := strconv.ParseInt(string(f[0]), 10, 64)
				return kb << 10, err
			}
		}
	}
	return 0, errors.New("no VmRSS in /proc/pid/status")
}

// selfCPU is this process's user+system CPU time so far.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// cpuWindow measures this process's CPU between two instants: the tool
// shares the machine with the relay, so its own use is part of the report.
type cpuWindow struct {
	from, to atomic.Int64 // CPU ns at the window's edges; 0: not yet
	timers   []*time.Timer
}

// arm takes the readings at from and to (unix ns); to = MaxInt64 leaves the
// end to secs.
func (c *cpuWindow) arm(from, to int64) {
	c.timers = append(c.timers, time.AfterFunc(time.Until(time.Unix(0, from)), func() { c.from.Store(int64(selfCPU())) }))
	if to != math.MaxInt64 {
		c.timers = append(c.timers, time.AfterFunc(time.Until(time.Unix(0, to)), func() { c.to.Store(int64(selfCPU())) }))
	}
}

// secs returns the CPU seconds used in the window so far (to now if the
// window's end has not come).
func (c *cpuWindow) secs() float64 {
	for _, t := range c.timers {
		t.Stop()
	}
	from, to := c.from.Load(), c.to.Load()
	if from == 0 {
		return 0
	}
	if to == 0 {
		to = int64(selfCPU())
	}
	return float64(to-from) / 1e9
}

// sample is one reading of the relay's resources.
type sample struct {
	T      float64 `json:"t"` // seconds since the tool started
	RSS    int64   `json:"rss_bytes"`
	CPU    float64 `json:"cpu_secs"` // cumulative
	Phase  string  `json:"phase"`
	Failed bool    `json:"failed,omitempty"`
}

// sampler reads the relay's RSS and CPU every interval until stopped.
type sampler struct {
	pid   int
	start time.Time
	mu    sync.Mutex
	s     []sample
	phase string
	stopc chan struct{}
	done  chan struct{}
}

func startSampler(ctx context.Context, pid int, start time.Time, every time.Duration) *sampler {
	sm := &sampler{pid: pid, start: start, phase: "start", stopc: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(sm.done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			sm.take()
			select {
			case <-t.C:
			case <-sm.stopc:
				return
			case <-ctx.Done():
				return
			}
		}
	}()
	return sm
}

func (sm *sampler) take() sample {
	rss, err1 := relayRSS(sm.pid)
	cpu, err2 := relayCPU(sm.pid)
	sm.mu.Lock()
	defer sm.mu.Unlock()
	s := sample{T: time.Since(sm.start).Seconds(), RSS: rss, CPU: cpu.Seconds(), Phase: sm.phase, Failed: err1 != nil || err2 != nil}
	sm.s = append(sm.s, s)
	return s
}

func (sm *sampler) setPhase(p string) {
	sm.mu.Lock()
	sm.phase = p
	sm.mu.Unlock()
}

func (sm *sampler) stop() []sample {
	close(sm.stopc)
	<-sm.done
	sm.mu.Lock()
	defer sm.mu.Unlock()
	return sm.s
}

// tcpPoller watches the relay's end of each stalled viewer's connection in
// /proc/net/tcp (the relay and the tool share the host's network
// namespace). A stalled viewer never reads, so the relay's close cannot be
// seen from the viewer's socket: its FIN waits behind the unread bytes. The
// relay's socket shows it at once: it leaves ESTABLISHED (FIN_WAIT1, or is
// gone). Its send queue (tx_queue: bytes written by the relay and not
// acknowledged) grows while the kernel buffers take the frames; once it
// stops growing, the relay's writes block and its per-viewer channel
// fills. So grow_ns is when the channel began to fill and cut_ns when the
// relay closed the connection, each within one poll interval.
type tcpPoller struct {
	relayHex []byte
	track    map[*viewer]*tcpTrack
	byKey    map[uint64]*tcpTrack
	every    time.Duration
	stopc    chan struct{}
	done     chan struct{}
	gen      int
}

type tcpTrack struct {
	seen            bool
	gen             int
	lastQ, maxQueue int64
	growNs, cutNs   int64
	cutState        string
}

func startTCPPoller(relay *net.TCPAddr, stalled []*viewer, every, limit time.Duration) *tcpPoller {
	tp := &tcpPoller{
		relayHex: []byte(procAddr(relay)),
		track:    map[*viewer]*tcpTrack{},
		byKey:    map[uint64]*tcpTrack{},
		every:    every,
		stopc:    make(chan struct{}),
		done:     make(chan struct{}),
	}
	for _, v := range stalled {
		t := &tcpTrack{}
		tp.track[v] = t
		tp.byKey[addrKey(v.local)] = t
	}
	go func() {
		defer close(tp.done)
		end := time.After(limit)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			tp.poll()
			select {
			case <-t.C:
			case <-tp.stopc:
				return
			case <-end:
				return
			}
		}
	}()
	return tp
}

func (tp *tcpPoller) stop() {
	close(tp.stopc)
	<-tp.done
}

var tcpStates = map[string]string{
	"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
	"06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}

func (tp *tcpPoller) poll() {
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return
	}
	now := time.Now().UnixNano()
	tp.gen++
	for len(b) > 0 {
		var line []byte
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line, b = b[:i], b[i+1:]
		} else {
			line, b = b, nil
		}
		// "  12: 0100007F:1F90 0500007F:9C40 01 00001000:00000000 ..."
		f := bytes.Fields(line)
		if len(f) < 5 || !bytes.Equal(f[1], tp.relayHex) {
			continue
		}
		key, ok := parseProcAddr(f[2])
		if !ok {
			continue
		}
		t := tp.byKey[key]
		if t == nil {
			continue
		}
		t.seen = true
		t.gen = tp.gen
		if t.cutNs != 0 {
			continue
		}
		if st := string(f[3]); st != "01" {
			t.cutNs, t.cutState = now, tcpStates[st]
			continue
		}
		txq, _, _ := bytes.Cut(f[4], []byte(":"))
		q, err := strconv.ParseInt(string(txq), 16, 64)
		if err != nil {
			continue
		}
		if q > t.lastQ {
			t.growNs = now
		}
		t.lastQ = q
		t.maxQueue = max(t.maxQueue, q)
	}
	for _, t := range tp.byKey {
		if t.seen && t.cutNs == 0 && t.gen != tp.gen {
			t.cutNs, t.cutState = now, "gone"
		}
	}
}

// procAddr renders an IPv4 address as /proc/net/tcp does: the address as a
// native-endian (little-endian here) 32-bit hex number, the port in hex.
func procAddr(a *net.TCPAddr) string {
	ip := a.IP.To4()
	return fmt.Sprintf("%02X%02X%02X%02X:%04X", ip[3], ip[2], ip[1], ip[0], a.Port)
}

func addrKey(a *net.TCPAddr) uint64 {
	ip := a.IP.To4()
	return uint64(ip[3])<<40 | uint64(ip[2])<<32 | uint64(ip[1])<<24 | uint64(ip[0])<<16 | uint64(a.Port)
}

func parseProcAddr(b []byte) (uint64, bool) {
	h, p, ok := bytes.Cut(b, []byte(":"))
	if !ok || len(h) != 8 {
		return 0, false
	}
	ip, err1 := strconv.ParseUint(string(h), 16, 32)
	port, err2 := strconv.ParseUint(string(p), 16, 16)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return ip<<16 | port, true
}

//go:build linux

package main

import (
	"bytes"
	"context"
	"encoding/binary"
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

	"golang.org/x/sys/unix"
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

// usage is what the relay has used so far: CPU, and write system calls
// (syscw of /proc/<pid>/io: write and writev, which is how the servers
// measured write to their sockets), whose count per frame says how many
// frames each write carried.
type usage struct {
	cpu    time.Duration
	writes int64
}

func relayUsage(pid int) (usage, error) {
	cpu, err := relayCPU(pid)
	if err != nil {
		return usage{}, err
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
	if err != nil {
		return usage{}, err
	}
	for _, l := range bytes.Split(b, []byte("\n")) {
		if v, ok := bytes.CutPrefix(l, []byte("syscw: ")); ok {
			n, err := strconv.ParseInt(string(v), 10, 64)
			return usage{cpu: cpu, writes: n}, err
		}
	}
	return usage{}, errors.New("no syscw in /proc/pid/io")
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

// tcpPoller watches the relay's end of each stalled viewer's connection
// through the kernel's socket diagnostics (netlink sock_diag, what ss uses;
// the relay and the tool share the host's network namespace). A stalled
// viewer never reads, so the relay's close cannot be seen from the viewer's
// socket: its FIN waits behind the unread bytes. The relay's socket shows
// it at once: it leaves ESTABLISHED (FIN_WAIT1, or is gone). Its send queue
// (bytes written by the relay and not acknowledged) grows while the kernel
// buffers take the frames; once it stops growing, the relay's writes block
// and its per-viewer queue fills. So grow_ns is when the queue began to
// fill and cut_ns when the relay closed the connection, each within one
// poll interval. (Reading /proc/net/tcp instead cost tens of milliseconds
// of CPU per poll with a few thousand sockets, and that alone doubled the
// readers' p99 in scenario 5.)
type tcpPoller struct {
	relayIP   [4]byte
	relayPort uint16
	track     map[*viewer]*tcpTrack
	byKey     map[uint64]*tcpTrack
	every     time.Duration
	stopc     chan struct{}
	done      chan struct{}
	gen       int
	err       error // the first failure to read the sockets, if any
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
		relayPort: uint16(relay.Port),
		track:     map[*viewer]*tcpTrack{},
		byKey:     map[uint64]*tcpTrack{},
		every:     every,
		stopc:     make(chan struct{}),
		done:      make(chan struct{}),
	}
	copy(tp.relayIP[:], relay.IP.To4())
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

var tcpStates = map[uint8]string{
	1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
	6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
}

func (tp *tcpPoller) poll() {
	socks, err := tcpSockets()
	if err != nil {
		if tp.err == nil {
			tp.err = err
		}
		return
	}
	now := time.Now().UnixNano()
	tp.gen++
	for _, sk := range socks {
		if sk.srcIP != tp.relayIP || sk.srcPort != tp.relayPort {
			continue
		}
		t := tp.byKey[ipPortKey(sk.dstIP, sk.dstPort)]
		if t == nil {
			continue
		}
		t.seen = true
		t.gen = tp.gen
		if t.cutNs != 0 {
			continue
		}
		if sk.state != 1 { // no longer ESTABLISHED
			t.cutNs, t.cutState = now, tcpStates[sk.state]
			continue
		}
		q := int64(sk.sendQueue)
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

// tcpSocket is what the poller needs of one IPv4 TCP socket.
type tcpSocket struct {
	state            uint8
	srcIP, dstIP     [4]byte
	srcPort, dstPort uint16
	sendQueue        uint32
}

// tcpSockets lists the host's IPv4 TCP sockets in every state but LISTEN
// and TIME_WAIT, with one netlink sock_diag dump (inet_diag_req_v2).
func tcpSockets() ([]tcpSocket, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("sock_diag socket: %w", err)
	}
	defer unix.Close(fd)
	const hdrLen, reqLen = 16, 56
	req := make([]byte, hdrLen+reqLen)
	binary.NativeEndian.PutUint32(req[0:], uint32(len(req)))
	binary.NativeEndian.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	binary.NativeEndian.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	binary.NativeEndian.PutUint32(req[8:], 1) // sequence number
	req[hdrLen+0] = unix.AF_INET
	req[hdrLen+1] = unix.IPPROTO_TCP
	states := uint32(0xfff) &^ (1<<6 | 1<<10) // not TIME_WAIT, not LISTEN
	binary.NativeEndian.PutUint32(req[hdrLen+4:], states)
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("sock_diag request: %w", err)
	}
	var out []tcpSocket
	buf := make([]byte, 1<<16)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return nil, fmt.Errorf("sock_diag read: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return nil, fmt.Errorf("sock_diag parse: %w", err)
		}
		for _, m := range msgs {
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				return nil, errors.New("sock_diag: the kernel refused the dump")
			}
			// inet_diag_msg: family, state, timer, retrans, then the socket
			// id (ports big-endian, addresses in network order), then
			// expires, rqueue, wqueue.
			d := m.Data
			if len(d) < 64 {
				continue
			}
			sk := tcpSocket{
				state:     d[1],
				srcPort:   binary.BigEndian.Uint16(d[4:]),
				dstPort:   binary.BigEndian.Uint16(d[6:]),
				sendQueue: binary.NativeEndian.Uint32(d[60:]),
			}
			copy(sk.srcIP[:], d[8:12])
			copy(sk.dstIP[:], d[24:28])
			out = append(out, sk)
		}
	}
}

// addrKey names a viewer's local address; ipPortKey the same from a
// socket's remote end.
func addrKey(a *net.TCPAddr) uint64 {
	var ip [4]byte
	copy(ip[:], a.IP.To4())
	return ipPortKey(ip, uint16(a.Port))
}

func ipPortKey(ip [4]byte, port uint16) uint64 {
	return uint64(ip[0])<<40 | uint64(ip[1])<<32 | uint64(ip[2])<<24 | uint64(ip[3])<<16 | uint64(port)
}

//go:build linux

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// viewer is one SSE connection: a raw TCP connection, one goroutine, one
// small read buffer, the incremental parser, and its own counters. The
// counters are written by the viewer's goroutine only and read by the group
// after that goroutine has ended; what the group needs while it runs
// (progress per partition, primed, ended) is atomic.
type viewer struct {
	g       *localGroup
	idx     int // global index over every process
	stalled bool
	conn    *net.TCPConn
	local   *net.TCPAddr
	p       parser

	connected   bool
	failure     string // why the connection did not reach the snapshot
	snapshotNs  int64
	next        []atomic.Int64 // per partition: the next seq expected
	primeMask   uint64
	primed      atomic.Bool
	ended       atomic.Bool // the stream ended before the tool closed it
	endReason   string
	endNs       int64
	errorEvents int64

	frames, framesWin, gaps, dups, foreign int64
	firstNs, lastNs                        int64 // receive times of this run's events in the window
	keepalives                             int64
	lastActNs, maxGapNs                    int64 // frames and keepalives, for keepalive timeliness

	// Stalled viewers: what reading to the end after the run found.
	drainBytes int64
	drainEnd   string
}

var errFailed = errors.New("viewer failed")

// dial opens the TCP connection from the viewer's source address.
func (v *viewer) dial(ctx context.Context) error {
	cfg := &v.g.spec.Cfg
	src := net.IPv4(127, 0, 0, byte(1+v.idx%cfg.SourceIPs))
	d := net.Dialer{
		LocalAddr: &net.TCPAddr{IP: src},
		Timeout:   cfg.ViewerTimeout,
		Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				// Let connect() pick the port per destination, not bind():
				// each source address then offers its whole port range.
				_ = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
				if v.stalled {
					// A tiny receive buffer, set before connect so that the
					// window is small from the start: the relay's writes
					// block after a few KiB, as for a stuck browser.
					serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, cfg.StalledRcvBuf)
				}
			})
			if err != nil {
				return err
			}
			return serr
		},
	}
	c, err := d.DialContext(ctx, "tcp4", v.g.relay.String())
	if err != nil {
		return err
	}
	v.conn = c.(*net.TCPConn)
	v.local = v.conn.LocalAddr().(*net.TCPAddr)
	return nil
}

// run connects (within cctx, the connect phase), reads to the snapshot,
// reports on connected, then reads until the connection ends; a stalled
// viewer stops reading instead and waits for the end of the run (or ctx).
func (v *viewer) run(ctx, cctx context.Context, sem chan struct{}, connected chan<- *viewer) {
	buf := make([]byte, v.g.spec.Cfg.ReadBuffer)
	ok := v.connect(cctx, sem, buf)
	connected <- v
	if !ok {
		return
	}
	if v.stalled {
		select {
		case <-v.g.finishing:
		case <-ctx.Done():
		}
		v.drain(buf)
		return
	}
	err := v.readAll(buf)
	if !v.g.closing.Load() {
		v.endNs = time.Now().UnixNano()
		v.endReason = endReason(err, &v.p)
		v.ended.Store(true)
	}
}

// endCheck is how long a reader waits for data before reading once more
// anyway (see readAll).
const endCheck = time.Second

// readAll feeds the parser until the stream ends. It reads the socket
// itself: a read shorter than buf emptied the socket, so it waits for the
// next data at once instead of making the read that would only return
// EAGAIN, as net.Conn.Read does. That halves the tool's reads, whose cost
// would otherwise be taken from the relay it shares the machine with.
//
// But the relay's reset (or FIN) may arrive with the last data, before the
// read: then that read is short, the end is only seen by the next read, and
// no further readiness would wake the wait. So the wait has a deadline:
// after endCheck without data, one more read looks. A dropped viewer's end
// is seen at once, or within endCheck.
func (v *viewer) readAll(buf []byte) error {
	rc, err := v.conn.SyscallConn()
	if err != nil {
		return err
	}
	var rerr error
	read := func(fd uintptr) bool {
		for {
			n, err := unix.Read(int(fd), buf)
			switch {
			case n > 0:
				v.p.feed(buf[:n], time.Now().UnixNano())
				if v.p.bodyEnd {
					rerr = io.EOF
					return true
				}
				if n < len(buf) {
					return false // emptied: wait for more
				}
			case n == 0 && err == nil:
				rerr = io.EOF
				return true
			case errors.Is(err, unix.EAGAIN):
				return false
			case errors.Is(err, unix.EINTR):
			default:
				rerr = err
				return true
			}
		}
	}
	for {
		if err := v.conn.SetReadDeadline(time.Now().Add(endCheck)); err != nil {
			return err
		}
		err = rc.Read(read) // read first, then wait
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
	}
	if err != nil { // the connection was closed (the tool ending the run)
		return err
	}
	return rerr
}

func (v *viewer) connect(ctx context.Context, sem chan struct{}, buf []byte) bool {
	select {
	case sem <- struct{}{}:
	case <-ctx.Done():
		v.failure = "connect phase timed out"
		return false
	}
	defer func() { <-sem }()
	if err := v.dial(ctx); err != nil {
		v.failure = "dial: " + errClass(err)
		return false
	}
	_ = v.conn.SetDeadline(time.Now().Add(v.g.spec.Cfg.ViewerTimeout))
	if _, err := v.conn.Write(v.g.request); err != nil {
		v.failure = "write request: " + errClass(err)
		v.conn.Close()
		return false
	}
	// Response head: it fits in the read buffer.
	have := 0
	for {
		if have == len(buf) {
			v.failure = "response head larger than the read buffer"
			v.conn.Close()
			return false
		}
		n, err := v.conn.Read(buf[have:])
		have += n
		if i := bytes.Index(buf[:have], []byte("\r\n\r\n")); i >= 0 {
			status, chunked, perr := parseHead(buf[:i])
			if perr != nil {
				v.failure = perr.Error()
				v.conn.Close()
				return false
			}
			if status != 200 {
				v.failure = "status " + strconv.Itoa(status)
				v.conn.Close()
				return false
			}
			v.p.chunked = chunked
			v.p.feed(buf[i+4:have], time.Now().UnixNano())
			break
		}
		if err != nil {
			v.failure = "read head: " + errClass(err)
			v.conn.Close()
			return false
		}
	}
	for v.snapshotNs == 0 {
		if v.p.bodyEnd || v.p.badChunk {
			v.failure = "stream ended before the snapshot"
			v.conn.Close()
			return false
		}
		n, err := v.conn.Read(buf)
		if n > 0 {
			v.p.feed(buf[:n], time.Now().UnixNano())
		}
		if err != nil && v.snapshotNs == 0 {
			v.failure = "read to snapshot: " + errClass(err)
			v.conn.Close()
			return false
		}
	}
	_ = v.conn.SetDeadline(time.Time{})
	v.connected = true
	return true
}

// drain reads a stalled viewer's connection to its end after the run: a
// connection the relay closed ends in EOF or a reset once the queued bytes
// are read; one it did not close is still open at the deadline.
func (v *viewer) drain(buf []byte) {
	_ = v.conn.SetReadDeadline(time.Now().Add(v.g.spec.Cfg.StalledDrain))
	for {
		n, err := v.conn.Read(buf)
		v.drainBytes += int64(n)
		if err != nil {
			v.drainEnd = errClass(err)
			return
		}
	}
}

// frame is called by the parser for every whole frame.
func (v *viewer) frame(p *parser, now int64) {
	g := v.g
	switch p.kind {
	case kindSnapshot:
		if v.snapshotNs == 0 {
			v.snapshotNs = now
		}
	case kindComment:
		v.keepalives++
	case kindError:
		v.errorEvents++
	case kindEvent:
		if !p.fOK || !p.fRun {
			v.foreign++
			break
		}
		part := p.fPart
		if part < 0 || part >= int64(len(v.next)) {
			v.foreign++
			break
		}
		if p.fSeq < 0 { // a priming record
			v.primeMask |= 1 << uint(part)
			if v.primeMask == g.allPrimed {
				v.primed.Store(true)
			}
			break
		}
		v.frames++
		from, to := g.winFrom.Load(), g.winTo.Load()
		if now >= from && now <= to {
			v.framesWin++
		}
		if p.fSent >= from && p.fSent <= to {
			g.lat[v.idx%len(g.lat)].add(now - p.fSent)
			if v.firstNs == 0 {
				v.firstNs = now
			}
			v.lastNs = now
		}
		exp := v.next[part].Load()
		switch {
		case p.fSeq == exp:
			v.next[part].Store(exp + 1)
		case p.fSeq > exp:
			v.gaps += p.fSeq - exp
			v.next[part].Store(p.fSeq + 1)
		default:
			v.dups++
		}
	}
	if v.snapshotNs != 0 {
		if v.lastActNs != 0 && now >= g.winFrom.Load() && now <= g.winTo.Load() {
			if gap := now - v.lastActNs; gap > v.maxGapNs {
				v.maxGapNs = gap
			}
		}
		v.lastActNs = now
	}
}

// parseHead returns the status and whether the body is chunked.
func parseHead(h []byte) (int, bool, error) {
	line, rest, _ := bytes.Cut(h, []byte("\r\n"))
	f := bytes.Fields(line)
	if len(f) < 2 || !bytes.HasPrefix(f[0], []byte("HTTP/1.")) {
		return 0, false, fmt.Errorf("not an HTTP/1 response: %.40q", line)
	}
	status, err := strconv.Atoi(string(f[1]))
	if err != nil {
		return 0, false, fmt.Errorf("bad status line: %.40q", line)
	}
	chunked := false
	for _, l := range bytes.Split(rest, []byte("\r\n")) {
		k, val, ok := bytes.Cut(l, []byte(":"))
		if ok && bytes.EqualFold(bytes.TrimSpace(k), []byte("Transfer-Encoding")) &&
			bytes.Contains(bytes.ToLower(val), []byte("chunked")) {
			chunked = true
		}
	}
	return status, chunked, nil
}

func endReason(err error, p *parser) string {
	if p.bodyEnd {
		return "stream ended"
	}
	return errClass(err)
}

// errClass names an error without addresses, so that counts group.
func errClass(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, io.EOF):
		return "eof"
	case errors.Is(err, syscall.ECONNRESET):
		return "reset"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return "no source port"
	case errors.Is(err, syscall.EMFILE), errors.Is(err, syscall.ENFILE):
		return "too many open files"
	case errors.Is(err, os.ErrDeadlineExceeded):
		return "timeout"
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return "cancelled"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, net.ErrClosed):
		return "closed"
	}
	return err.Error()
}

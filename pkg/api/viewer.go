package api

import (
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/decnet/identity-relay/pkg/fanout"
	"github.com/decnet/identity-relay/pkg/sse"
)

// Once a viewer is admitted, its connection is taken over from net/http
// (Hijack) and served by a goroutine of its own. That drops net/http's
// per-connection buffers and the handler's grown stack (most of an idle
// viewer's memory), and lets a batch of shared frames go out in one writev
// without copying them: the frame bytes built once by fanout are what the
// kernel reads. The response is HTTP/1.1 with chunked encoding, one chunk per
// batch, as net/http would send it.

var (
	frameKeepalive = []byte(": keepalive\n\n")
	frameError     = []byte("event: error\ndata: {\"message\":\"Stream interrupted\"}\n\n")
	crlf           = []byte("\r\n")
	lastChunk      = []byte("0\r\n\r\n")
)

// errDropped ends the writes to a viewer dropped as slow.
var errDropped = errors.New("viewer dropped as slow")

// maxBatch bounds how many frames one write carries: enough that a burst
// costs few system calls, few enough that one writev (at most IOV_MAX, 1,024
// buffers) never has to be split by the kernel and one write stays short.
const maxBatch = 128

// The API's own reasons for ending a stream, beside fanout.ReasonSlow and
// fanout.ReasonShutdown: together, the values of
// relay_viewer_disconnects_total{reason}. A stream's subscription is ended
// with the first reason that applies, and that one is counted.
const (
	reasonClientGone fanout.Reason = "client_gone"
	reasonClientSent fanout.Reason = "client_sent" // the client sent on its stream, which SSE clients never do
	reasonWriteError fanout.Reason = "write_error"
	reasonInternal   fanout.Reason = "internal"
	reasonCredential fanout.Reason = "credential" // the token expired or a re-check refused it (credential.go)
	reasonLifetime   fanout.Reason = "lifetime"   // the stream reached its lifetime (MaxLifetime)
	reasonRebalance  fanout.Reason = "rebalance"  // its replica held more than its peers' average (rebalance.go)
)

// viewer is one admitted stream. Its goroutine (run) is the only writer of conn.
type viewer struct {
	s       *Server
	user    string
	sub     *fanout.Subscription
	conn    net.Conn
	chunked bool
	// cursor, for a viewer that resumed, re-ids or skips frames until the
	// stream's own ids cover its position; nil once they do.
	cursor *fanout.Cursor
	// releaseReadBack, if set, gives back the read-back slot this viewer
	// holds until the frames read back from Kafka are written.
	releaseReadBack func()
	// cut is conn once run starts; onEnd uses it from the publisher's goroutine.
	cut          atomic.Pointer[net.Conn]
	lastDeadline time.Time
	lastWrite    time.Time // the keepalive timer is not reset per batch, only checked against this
	// The credential the stream was opened with and when to re-check it (credential.go).
	cred          *claims
	recheck       time.Time
	credTimer     *time.Timer
	recheckFailed bool // the last re-check could not reach the database
	lifeTimer     *time.Timer
	// ending is closed by endFor, with endReason set first.
	ending    chan struct{}
	endOnce   sync.Once
	endReason fanout.Reason
}

// endFor asks run to end the stream between frames, counted as r: its
// credential was refused, it reached its lifetime, or its turn came in a
// spread shutdown or a rebalance. The first reason stays. Any goroutine may call it.
func (v *viewer) endFor(r fanout.Reason) {
	v.endOnce.Do(func() {
		v.endReason = r
		close(v.ending)
	})
}

// watchLifetime ends the stream at its lifetime, if it has one.
func (v *viewer) watchLifetime() {
	if d := streamLifetime(v.s.cfg.MaxLifetime, v.s.cfg.LifetimeJitter, rand.Float64()); d > 0 {
		v.lifeTimer = time.AfterFunc(d, func() { v.endFor(reasonLifetime) })
	}
}

// streamLifetime is a stream's lifetime for u drawn uniformly from [0, 1):
// uniform in (longest×(1−jitter), longest], so that streams opened together
// (by a rollout, after a scale-up) do not all end together, and none
// outlives longest (a proxy's own limit can sit just above it). 0 when
// longest is 0: no limit.
func streamLifetime(longest time.Duration, jitter, u float64) time.Duration {
	return longest - time.Duration(jitter*u*float64(longest))
}

// onEnd is called once by whoever ends the subscription: a viewer dropped as
// slow has its blocked write cut now, not at its deadline.
func (v *viewer) onEnd(r fanout.Reason) {
	if r != fanout.ReasonSlow {
		return
	}
	if c := v.cut.Load(); c != nil {
		_ = (*c).SetWriteDeadline(time.Now())
	}
}

// batch is one write: frames behind a chunk header. Pooled, so an idle
// viewer holds none and a busy one allocates none.
type batch struct {
	bufs net.Buffers // bufs[0] is the chunk header
	hdr  [20]byte
	size int
}

var batchPool = sync.Pool{New: func() any { return &batch{bufs: make(net.Buffers, 1, maxBatch+4)} }}

func getBatch() *batch { return batchPool.Get().(*batch) }

func (b *batch) add(frame []byte) {
	b.bufs = append(b.bufs, frame)
	b.size += len(frame)
}

func (b *batch) reset() {
	clear(b.bufs)
	b.bufs, b.size = b.bufs[:1], 0
}

func (b *batch) release() {
	b.reset()
	batchPool.Put(b)
}

// write sends b as one chunk in one writev, under a write deadline.
func (v *viewer) write(b *batch) error {
	if b.size == 0 {
		return nil
	}
	now := time.Now()
	v.lastWrite = now
	// Re-arming the deadline at most once a second keeps it off the per-batch
	// path (lastDeadline is in the future while the opening's holds).
	if now.Sub(v.lastDeadline) > time.Second {
		v.lastDeadline = now
		if err := v.conn.SetWriteDeadline(now.Add(v.s.cfg.WriteTimeout)); err != nil {
			return err
		}
		if v.sub.Reason() == fanout.ReasonSlow {
			return errDropped // dropped while re-arming: onEnd's cut may have been overwritten
		}
	}
	bufs := b.bufs
	if v.chunked {
		bufs[0] = append(strconv.AppendInt(b.hdr[:0], int64(b.size), 16), '\r', '\n')
		bufs = append(bufs, crlf)
		b.bufs = bufs // keep the grown slice for the pool
	} else {
		bufs = bufs[1:]
	}
	_, err := bufs.WriteTo(v.conn)
	return err
}

// add adds frame to b, writing b first when it is full.
func (v *viewer) add(b *batch, frame []byte) error {
	if len(b.bufs) > maxBatch {
		if err := v.write(b); err != nil {
			return err
		}
		b.reset()
	}
	b.add(frame)
	return nil
}

// writeFrames sends frames in writes of up to maxBatch.
func (v *viewer) writeFrames(frames ...[]byte) error {
	b := getBatch()
	defer b.release()
	for _, f := range frames {
		if err := v.add(b, f); err != nil {
			return err
		}
	}
	return v.write(b)
}

// live adds a frame of the stream to b, through the cursor while there is one.
func (v *viewer) live(b *batch, f *sse.Frame) error {
	if v.cursor == nil {
		return v.add(b, f.Bytes)
	}
	out := v.cursor.Frame(f)
	if v.cursor.Done() {
		v.cursor = nil
	}
	if out == nil { // the viewer has it already
		return nil
	}
	return v.add(b, out)
}

// readBackDone gives back the viewer's read-back slot, if it holds one.
func (v *viewer) readBackDone() {
	if v.releaseReadBack != nil {
		v.releaseReadBack()
	}
}

// opening is what a stream sends before live frames: the snapshot of a new
// viewer, or a resuming viewer's frames read back from Kafka and replayed
// from the window.
type opening struct {
	snapshot []byte
	kafka    [][]byte
	replay   []*sse.Frame
}

// writeOpening sends the opening keepalive and retry hint, then o, all
// within one write timeout: the read-back slot it may hold is not left to
// a viewer that reads slowly.
func (v *viewer) writeOpening(o opening) error {
	defer v.readBackDone()
	v.lastDeadline = time.Now().Add(v.s.cfg.WriteTimeout) // write does not re-arm it meanwhile
	if err := v.conn.SetWriteDeadline(v.lastDeadline); err != nil {
		return err
	}
	b := getBatch()
	defer b.release()
	for _, f := range [][]byte{frameKeepalive, v.s.retry, o.snapshot} {
		if f != nil {
			b.add(f)
		}
	}
	for _, f := range o.kafka {
		if err := v.add(b, f); err != nil {
			return err
		}
	}
	for _, f := range o.replay {
		if err := v.live(b, f); err != nil {
			return err
		}
	}
	if err := v.write(b); err != nil {
		return err
	}
	v.lastDeadline = time.Time{} // the next write arms its own
	return nil
}

// queued writes first (if not nil) and the batches already waiting after
// it, in writes of up to maxBatch frames.
func (v *viewer) queued(first *fanout.Batch) error {
	b := getBatch()
	defer b.release()
	take := func(next *fanout.Batch) error {
		v.sub.Taken(next)
		for _, f := range next.Frames {
			if err := v.live(b, f); err != nil {
				return err
			}
		}
		return nil
	}
	if first != nil {
		if err := take(first); err != nil {
			return err
		}
	}
	queue := v.sub.Batches()
	for range len(queue) {
		if err := take(<-queue); err != nil {
			return err
		}
	}
	return v.write(b)
}

// responseHead is what net/http would have written for the stream.
func (v *viewer) responseHead() []byte {
	h := "HTTP/1.1 200 OK\r\nCache-Control: no-cache\r\nConnection: close\r\n" +
		"Content-Type: text/event-stream\r\nDate: " + time.Now().UTC().Format(http.TimeFormat) + "\r\n"
	if v.chunked {
		h += "Transfer-Encoding: chunked\r\n"
	}
	return []byte(h + "X-Accel-Buffering: no\r\n\r\n")
}

// run streams until the viewer goes, is dropped or the relay shuts down: the
// opening keepalive and retry hint, the snapshot or the replayed frames, then
// live frames and keepalives. It only ever ends between frames.
func (v *viewer) run(o opening) {
	s := v.s
	v.cut.Store(&v.conn)
	defer v.finish(time.Now())

	go v.watchClose()
	v.watchCredential()
	v.watchLifetime()

	if _, err := v.conn.Write(v.responseHead()); err != nil {
		v.readBackDone()
		return
	}
	if err := v.writeOpening(o); err != nil {
		return
	}

	keepalive := time.NewTimer(s.cfg.Keepalive)
	defer keepalive.Stop()
	queue := v.sub.Batches()
	for {
		select {
		case <-v.sub.Done():
			if v.sub.Reason() != fanout.ReasonShutdown {
				return // dropped as slow, or the client went (watchClose)
			}
			// Shutdown: hand over what is already queued, then end the
			// response cleanly so the browser reconnects to another replica.
			// Cut by the shutdown deadline meanwhile, it still counts as shutdown.
			if v.queued(nil) == nil {
				_ = v.endResponse()
			}
			return
		case <-v.ending:
			// The browser reconnects, resuming with its Last-Event-ID
			// (through the load balancer, so maybe elsewhere), or gets the
			// 401 or 403 a new connection would: a refused credential gets
			// no more frames, the other ends what is already queued.
			v.sub.End(v.endReason)
			if v.endReason == reasonCredential || v.queued(nil) == nil {
				_ = v.endResponse()
			}
			return
		case next := <-queue:
			if err := v.queued(next); err != nil {
				return
			}
		case <-keepalive.C:
			if quiet := time.Since(v.lastWrite); quiet < s.cfg.Keepalive {
				keepalive.Reset(s.cfg.Keepalive - quiet) // frames went out meanwhile
				continue
			}
			if err := v.writeFrames(frameKeepalive); err != nil {
				return
			}
			keepalive.Reset(s.cfg.Keepalive)
		}
	}
}

// finish ends the stream run began at start: an error frame after a panic,
// the close, and the slot, metrics and log line of the reason it ended for.
func (v *viewer) finish(start time.Time) {
	s := v.s
	if r := recover(); r != nil {
		s.log.Error("stream failed", "panic", r)
		if v.writeFrames(frameError) == nil {
			_ = v.endResponse()
		}
		v.sub.End(reasonInternal)
	}
	v.sub.End(reasonWriteError) // the first reason stays: this one when no other came first
	reason := v.sub.Reason()
	v.credTimer.Stop()
	if v.lifeTimer != nil {
		v.lifeTimer.Stop()
	}
	if reason == fanout.ReasonSlow {
		// Reset instead of a graceful close: the kernel would otherwise keep
		// the unsent frames (up to tcp_wmem's maximum, 4 MiB by default) for
		// a viewer that is not reading, and send them whenever it does. It
		// resumes from its last whole frame either way.
		if l, ok := v.conn.(interface{ SetLinger(int) error }); ok {
			_ = l.SetLinger(0)
		}
	}
	_ = v.conn.Close()
	s.limits.release(v.user)
	s.m.connected.Dec()
	s.m.disconnects.WithLabelValues(string(reason)).Inc()
	s.streams.done(v.conn)
	s.log.Info("stream ended", "reason", string(reason), "duration", time.Since(start).Round(time.Millisecond).String())
}

// endResponse ends a chunked response cleanly with its last chunk, so the
// browser reconnects; without chunks, closing the connection ends it.
func (v *viewer) endResponse() error {
	if !v.chunked {
		return nil
	}
	// On a stream idle for longer than WriteTimeout the last write's
	// deadline has passed: the last chunk would fail at once.
	if err := v.conn.SetWriteDeadline(time.Now().Add(v.s.cfg.WriteTimeout)); err != nil {
		return err
	}
	if v.sub.Reason() == fanout.ReasonSlow {
		return errDropped // dropped while re-arming, as in write
	}
	_, err := v.conn.Write(lastChunk)
	return err
}

// watchClose ends the subscription when the client closes its side (or the
// relay closes the connection, or the kernel drops it), which wakes run
// through sub.Done: one channel fewer in run's select, on the path every
// frame takes. A client that sends anything is cut too: SSE clients never
// send (CONTRACT.md), and reading on would let one keep a core busy.
func (v *viewer) watchClose() {
	var b [1]byte
	if n, _ := v.conn.Read(b[:]); n > 0 {
		v.sub.End(reasonClientSent)
	}
	v.sub.End(reasonClientGone)
}

// streamSet tracks the open streams, which http.Server.Shutdown does not see
// once they are taken over.
type streamSet struct {
	mu     sync.Mutex
	conns  map[net.Conn]*viewer
	closed bool
	idle   chan struct{} // closed when the last stream ends after close
}

// add registers conn, streamed to v; false once the set is closed (shutting down).
func (s *streamSet) add(conn net.Conn, v *viewer) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	if s.conns == nil {
		s.conns = map[net.Conn]*viewer{}
	}
	s.conns[conn] = v
	return true
}

// viewers returns the viewers of the open streams.
func (s *streamSet) viewers() []*viewer {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*viewer, 0, len(s.conns))
	for _, v := range s.conns {
		out = append(out, v)
	}
	return out
}

// count is the number of open streams.
func (s *streamSet) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

func (s *streamSet) done(conn net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, conn)
	if len(s.conns) == 0 && s.idle != nil {
		close(s.idle)
		s.idle = nil
	}
}

// wait refuses new streams and waits until every stream has ended; when ctx
// ends first, it closes the connections still open.
func (s *streamSet) wait(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	if len(s.conns) == 0 {
		s.mu.Unlock()
		return nil
	}
	idle := make(chan struct{})
	s.idle = idle
	s.mu.Unlock()
	select {
	case <-idle:
		return nil
	case <-ctx.Done():
		s.mu.Lock()
		for c := range s.conns {
			_ = c.Close()
		}
		s.mu.Unlock()
		return ctx.Err()
	}
}

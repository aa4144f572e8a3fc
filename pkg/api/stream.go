package api

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/gin-gonic/gin"

	"github.com/decnet/identity-relay/pkg/fanout"
)

var (
	frameKeepalive = []byte(": keepalive\n\n")
	frameError     = []byte("event: error\ndata: {\"message\":\"Stream interrupted\"}\n\n")
)

// maxBatch bounds how many queued frames one flush carries.
const maxBatch = 64

// Disconnect reasons, the values of relay_viewer_disconnects_total{reason}.
const (
	reasonClientGone = "client_gone"
	reasonSlow       = "slow"
	reasonShutdown   = "shutdown"
	reasonWriteError = "write_error"
	reasonInternal   = "internal"
)

// authorize applies CONTRACT.md's checks in order and returns the user, or the
// status and body to answer with.
func (s *Server) authorize(ctx context.Context, token string) (*User, int, []byte) {
	cl, err := s.auth.verify(token)
	if err != nil {
		return nil, http.StatusUnauthorized, bodyUnauthorized
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.DBTimeout)
	defer cancel()
	u, err := s.store.User(ctx, cl.UUID)
	if err != nil {
		s.log.Warn("user lookup failed", "err", err)
		return nil, http.StatusServiceUnavailable, bodyDatabaseDown
	}
	if u == nil || issuedBeforeCutoff(cl, u) {
		return nil, http.StatusUnauthorized, bodyUnauthorized
	}
	revoked, err := s.store.Revoked(ctx, cl.ID)
	if err != nil {
		s.log.Warn("revocation lookup failed", "err", err)
		return nil, http.StatusServiceUnavailable, bodyDatabaseDown
	}
	if revoked {
		return nil, http.StatusUnauthorized, bodyUnauthorized
	}
	if u.MustChangePassword {
		return nil, http.StatusForbidden, bodyMustChange
	}
	if u.Role != "viewer" && u.Role != "admin" {
		return nil, http.StatusForbidden, bodyForbidden
	}
	return u, 0, nil
}

// events serves GET /api/v1/identities/events. Every refusal is decided and
// written before the 200 headers. The viewer is subscribed before the
// snapshot is read, so an event published in between is queued, not lost.
func (s *Server) events(c *gin.Context) {
	if s.draining.Load() {
		s.fail(c, http.StatusServiceUnavailable, bodyShuttingDown)
		return
	}
	ctx := c.Request.Context()
	user, code, body := s.authorize(ctx, tokenFrom(c.GetHeader("Authorization"), c.Query("token")))
	if code != 0 {
		s.fail(c, code, body)
		return
	}
	switch s.limits.acquire(user.UUID) {
	case slotUserFull:
		s.fail(c, http.StatusTooManyRequests, detail(fmt.Sprintf("SSE connection limit (%d) reached", s.cfg.MaxPerUser)))
		return
	case slotGlobalFull:
		s.fail(c, http.StatusServiceUnavailable, bodyGlobalCap)
		return
	}
	defer s.limits.release(user.UUID)

	// Last-Event-ID is what EventSource sends on reconnect; the query
	// parameter lets a page resume on its first connection.
	lastID := c.GetHeader("Last-Event-ID")
	if lastID == "" {
		lastID = c.Query("last_event_id")
	}
	var from fanout.Position
	if lastID != "" {
		var err error
		from, err = fanout.ParsePosition(lastID)
		if err != nil {
			from = fanout.Position{} // not an id of ours: resume from nothing, which asks for a snapshot
		}
	}

	rc := http.NewResponseController(c.Writer)
	onEnd := func(r fanout.Reason) {
		if r == fanout.ReasonSlow {
			// Unblock a write stuck on this viewer now, not at its deadline.
			_ = rc.SetWriteDeadline(time.Now())
		}
	}
	var (
		sub    *fanout.Subscription
		resume fanout.Resume
		snap   []byte
	)
	if from != nil {
		var err error
		if sub, resume, err = s.broker.SubscribeFrom(from, onEnd); err != nil {
			s.fail(c, http.StatusServiceUnavailable, bodyShuttingDown)
			return
		}
		if resume.Gap { // the window cannot bring this viewer up to date: start afresh
			sub.Close()
			sub = nil
		}
	}
	if sub == nil {
		var code int
		var body []byte
		if sub, resume, snap, code, body = s.subscribeWithSnapshot(ctx, onEnd); code != 0 {
			s.fail(c, code, body)
			return
		}
	}
	defer sub.Close()
	if from != nil {
		via := "window"
		if snap != nil {
			via = "snapshot"
		}
		s.m.resumes.WithLabelValues(via).Inc()
	}

	h := c.Writer.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	c.Status(http.StatusOK)
	s.m.connects.WithLabelValues("200").Inc()
	s.m.connected.Inc()
	defer s.m.connected.Dec()

	fw := &frameWriter{w: c.Writer, rc: rc, timeout: s.cfg.WriteTimeout, skip: resume.Skip}
	reason := s.stream(fw, sub, snap, resume.Replay, ctx.Done())
	s.m.disconnects.WithLabelValues(reason).Inc()
}

// subscribeWithSnapshot gives a new viewer a snapshot (shared, at most
// snapshotMaxAge old) and subscribes it from the position the snapshot was
// read at, so the window replays what was published since. It returns a
// status and body instead when the viewer cannot be served.
func (s *Server) subscribeWithSnapshot(ctx context.Context, onEnd func(fanout.Reason)) (*fanout.Subscription, fanout.Resume, []byte, int, []byte) {
	var (
		snap   *snapshot
		sub    *fanout.Subscription
		resume fanout.Resume
		err    error
	)
	// A shared snapshot may predate what the window holds (the start-up
	// backfill, a huge burst): then read a fresh one, once.
	for _, fresh := range []bool{false, true} {
		if sub != nil {
			sub.Close()
		}
		if snap, err = s.snapshot(ctx, fresh); err != nil {
			s.log.Warn("snapshot failed", "err", err)
			return nil, fanout.Resume{}, nil, http.StatusServiceUnavailable, bodyDatabaseDown
		}
		if sub, resume, err = s.broker.SubscribeFrom(snap.pos, onEnd); err != nil {
			return nil, fanout.Resume{}, nil, http.StatusServiceUnavailable, bodyShuttingDown
		}
		if !resume.Gap {
			return sub, resume, snap.frame, 0, nil
		}
	}
	// The window moved past a snapshot read a moment ago: only an extreme
	// burst does that. Serve that snapshot and the live stream.
	s.log.Warn("replay window overtook a fresh snapshot; events in between may be missing")
	return sub, fanout.Resume{}, snap.frame, 0, nil
}

// snapshot returns a shared snapshot; see snapshotCache.
func (s *Server) snapshot(ctx context.Context, fresh bool) (*snapshot, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.DBTimeout)
	defer cancel()
	start := time.Now()
	snap, err := s.snaps.get(ctx, fresh)
	s.m.snapshot.Observe(time.Since(start).Seconds())
	if err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	return snap, nil
}

// stream writes the stream until it ends and returns why: the opening
// keepalive and retry hint, the snapshot (new viewers and resumes the window
// cannot serve) or the replayed frames, then live frames and keepalives. It
// is the only writer of the connection, and it only ends between frames.
func (s *Server) stream(fw *frameWriter, sub *fanout.Subscription, snapshot []byte, replay []*fanout.Frame, gone <-chan struct{}) (reason string) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("stream failed", "panic", r)
			if fw.write(frameError) == nil {
				_ = fw.flush()
			}
			reason = reasonInternal
		}
	}()

	if err := fw.write(frameKeepalive); err != nil {
		return writeFailed(sub)
	}
	if err := fw.write(s.retry); err != nil {
		return writeFailed(sub)
	}
	if snapshot != nil {
		if err := fw.write(snapshot); err != nil {
			return writeFailed(sub)
		}
	}
	for i, f := range replay {
		if err := fw.write(f.Bytes); err != nil {
			return writeFailed(sub)
		}
		if i%maxBatch == maxBatch-1 {
			if err := fw.flush(); err != nil {
				return writeFailed(sub)
			}
		}
	}
	if err := fw.flush(); err != nil {
		return writeFailed(sub)
	}

	keepalive := time.NewTimer(s.cfg.Keepalive)
	defer keepalive.Stop()
	frames := sub.Frames()
	for {
		select {
		case <-gone:
			return reasonClientGone
		case <-sub.Done():
			if sub.Reason() == fanout.ReasonSlow {
				return reasonSlow
			}
			// Shutdown: hand over what is already queued, then end cleanly so
			// the browser reconnects to another replica.
			if err := fw.queued(frames, nil, len(frames)); err != nil {
				return writeFailed(sub)
			}
			return reasonShutdown
		case f := <-frames:
			if err := fw.queued(frames, f, maxBatch); err != nil {
				return writeFailed(sub)
			}
			keepalive.Reset(s.cfg.Keepalive)
		case <-keepalive.C:
			if err := fw.writeFlush(frameKeepalive); err != nil {
				return writeFailed(sub)
			}
			keepalive.Reset(s.cfg.Keepalive)
		}
	}
}

// writeFailed names why a write failed: a viewer dropped as slow has its
// blocked write cut on purpose (see events), which is not a network error.
func writeFailed(sub *fanout.Subscription) string {
	if sub.Reason() == fanout.ReasonSlow {
		return reasonSlow
	}
	return reasonWriteError
}

// frameWriter writes whole frames to one viewer under a write deadline.
type frameWriter struct {
	w            http.ResponseWriter
	rc           *http.ResponseController
	timeout      time.Duration
	lastDeadline time.Time
	// skip holds, for a viewer that resumed ahead of this replica, the offset
	// per partition below which live frames were already seen; nil once passed.
	skip fanout.Position
}

// live writes a live frame unless the viewer saw it on another replica.
func (fw *frameWriter) live(f *fanout.Frame) error {
	if fw.skip != nil {
		if next, ok := fw.skip[f.Key]; ok {
			if f.Offset >= next-1 { // the last seen one or beyond: stop checking
				delete(fw.skip, f.Key)
				if len(fw.skip) == 0 {
					fw.skip = nil
				}
			}
			if f.Offset < next {
				return nil
			}
		}
	}
	return fw.write(f.Bytes)
}

func (fw *frameWriter) write(b []byte) error {
	// Re-arming the deadline at most once a second keeps it off the per-frame path.
	if now := time.Now(); now.Sub(fw.lastDeadline) > time.Second {
		fw.lastDeadline = now
		_ = fw.rc.SetWriteDeadline(now.Add(fw.timeout))
	}
	_, err := fw.w.Write(b)
	return err
}

func (fw *frameWriter) flush() error { return fw.rc.Flush() }

func (fw *frameWriter) writeFlush(frames ...[]byte) error {
	for _, f := range frames {
		if err := fw.write(f); err != nil {
			return err
		}
	}
	return fw.flush()
}

// queued writes first (if not nil) and then up to limit more frames already
// waiting in the channel, with one flush for the lot.
func (fw *frameWriter) queued(frames <-chan *fanout.Frame, first *fanout.Frame, limit int) error {
	if first != nil {
		if err := fw.live(first); err != nil {
			return err
		}
	}
	for range limit {
		select {
		case f := <-frames:
			if err := fw.live(f); err != nil {
				return err
			}
		default:
			return fw.flush()
		}
	}
	return fw.flush()
}

package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/gin-gonic/gin"

	"github.com/decnet/identity-relay/pkg/fanout"
	"github.com/decnet/identity-relay/pkg/sse"
)

// authorize applies CONTRACT.md's checks in order and returns the claims and
// when to re-check them (see check), or the status and body to answer with.
func (s *Server) authorize(ctx context.Context, token string) (*claims, time.Time, int, []byte) {
	cl, err := s.auth.verify(token)
	if err != nil {
		return nil, time.Time{}, http.StatusUnauthorized, bodyUnauthorized
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.DBTimeout)
	defer cancel()
	code, body, until, err := s.check(ctx, cl)
	if err != nil {
		s.log.Warn("credential lookup failed", "err", err)
		return nil, time.Time{}, http.StatusServiceUnavailable, bodyDatabaseDown
	}
	if code != 0 {
		return nil, time.Time{}, code, body
	}
	return cl, until, 0, nil
}

// events serves GET /api/v1/identities/events. Every refusal is decided and
// written before the 200 headers: auth, caps, subscription and snapshot.
// Then the connection is taken over from net/http (see viewer.go), and a
// goroutine of its own streams to it while the handler returns.
func (s *Server) events(c *gin.Context) {
	if c.Request.ProtoMajor != 1 {
		// A stream takes its connection over, which only HTTP/1 allows (an
		// ingress speaks HTTP/1.1 to its pods); Gin's Hijack would panic.
		s.fail(c, http.StatusHTTPVersionNotSupported, bodyHTTP1Only)
		return
	}
	if s.draining.Load() {
		s.fail(c, http.StatusServiceUnavailable, bodyShuttingDown)
		return
	}
	ctx := c.Request.Context()
	cl, recheck, code, body := s.authorize(ctx, tokenFrom(c.GetHeader("Authorization"), c.Query("token")))
	if code != 0 {
		s.fail(c, code, body)
		return
	}
	user := cl.UUID
	switch s.limits.acquire(user) {
	case slotUserFull:
		s.fail(c, http.StatusTooManyRequests, detail(fmt.Sprintf("SSE connection limit (%d) reached", s.cfg.MaxPerUser)))
		return
	case slotGlobalFull:
		s.fail(c, http.StatusServiceUnavailable, bodyGlobalCap)
		return
	}
	v := &viewer{s: s, user: user, cred: cl, recheck: recheck, ending: make(chan struct{})}
	defer func() {
		if v.conn == nil { // not handed over to a stream: give the slot back
			s.limits.release(user)
		}
	}()

	// Last-Event-ID is what EventSource sends on reconnect; the query
	// parameter lets a page resume on its first connection. An id this
	// relay cannot use, empty ones included, makes a new viewer.
	id := c.GetHeader("Last-Event-ID")
	_, resuming := c.Request.Header["Last-Event-Id"]
	if q, ok := c.GetQuery("last_event_id"); ok && id == "" {
		id, resuming = q, true
	}
	var opening opening
	if resuming {
		via := "snapshot"
		if from, err := sse.ParsePosition(id); err == nil {
			via = s.resume(ctx, v, from, &opening)
		}
		s.m.resumes.WithLabelValues(via).Inc()
	}
	if v.sub == nil {
		var code int
		var body []byte
		if code, body = s.subscribeWithSnapshot(ctx, v, &opening); code != 0 {
			s.fail(c, code, body)
			return
		}
	}
	v.chunked = c.Request.ProtoAtLeast(1, 1)

	conn, _, err := c.Writer.Hijack()
	if err != nil {
		v.sub.Close()
		v.readBackDone()
		s.log.Error("cannot take over the connection", "err", err)
		s.fail(c, http.StatusInternalServerError, detail("Streaming unsupported"))
		return
	}
	if !s.streams.add(conn, v) { // shutting down since the checks above (the slot goes back in the defer)
		v.sub.Close()
		v.readBackDone()
		_ = conn.Close()
		return
	}
	s.setupStream(conn)
	v.conn = conn
	s.m.connects.WithLabelValues("200").Inc()
	s.m.connected.Inc()
	go v.run(opening)
}

// historyTimeout bounds reading a gap back from Kafka, waiting included.
const historyTimeout = 5 * time.Second

// resume subscribes v from a position the client sent, reading what the
// window lacks back from Kafka, and says how: "window" or "kafka", or
// "snapshot" when it could not (an id this stream could not have issued,
// records no longer held, Kafka slow): v.sub is then nil.
func (s *Server) resume(ctx context.Context, v *viewer, from sse.Position, o *opening) string {
	var h fanout.History
	if s.cfg.History != nil {
		h = viewerHistory{s: s, v: v}
	}
	ctx, cancel := context.WithTimeout(ctx, historyTimeout)
	defer cancel()
	sub, r, err := s.broker.Resume(ctx, from, h, v.onEnd)
	if err != nil {
		v.readBackDone()
		if errors.Is(err, fanout.ErrGap) {
			s.log.Info("resume gap not read back; sending a snapshot", "err", err)
		}
		return "snapshot"
	}
	v.sub, v.cursor = sub, r.Cursor
	o.kafka, o.replay = r.Kafka, r.Replay
	if v.releaseReadBack != nil {
		return "kafka"
	}
	return "window"
}

// viewerHistory reads back for one viewer, in a read-back slot that the
// viewer holds until it has written what was read.
type viewerHistory struct {
	s *Server
	v *viewer
}

func (h viewerHistory) Read(ctx context.Context, ranges []fanout.Range) ([]sse.Event, error) {
	release, err := h.s.reads.acquire(ctx, h.v.user)
	if err != nil {
		return nil, fmt.Errorf("waiting for a read-back slot: %w", err)
	}
	h.v.releaseReadBack = release
	return h.s.cfg.History.Read(ctx, ranges)
}

// subscribeWithSnapshot gives a new viewer a snapshot (shared, at most
// snapshotMaxAge old) and subscribes it from the position the snapshot was
// read at, so the window replays what was published since. It returns a
// status and body instead when the viewer cannot be served.
func (s *Server) subscribeWithSnapshot(ctx context.Context, v *viewer, o *opening) (int, []byte) {
	// A shared snapshot may predate what the window holds (the start-up
	// backfill, a huge burst): then read a fresh one, once.
	var snap *snapshot
	for _, fresh := range []bool{false, true} {
		var err error
		if snap, err = s.snapshot(ctx, fresh); err != nil {
			s.log.Warn("snapshot failed", "err", err)
			return http.StatusServiceUnavailable, bodyDatabaseDown
		}
		v.sub, o.replay, err = s.broker.Subscribe(snap.pos, v.onEnd)
		switch {
		case err == nil:
			o.snapshot = snap.frame
			return 0, nil
		case !errors.Is(err, fanout.ErrGap):
			return http.StatusServiceUnavailable, bodyShuttingDown
		}
	}
	// The window moved past a snapshot read a moment ago: only an extreme
	// burst does that. Read what it lacks back from Kafka, as for a viewer
	// resuming from the snapshot's position (the frame's id); failing that,
	// serve the snapshot and the live stream.
	if via := s.resume(ctx, v, snap.pos, o); via != "snapshot" {
		s.log.Info("replay window overtook a fresh snapshot; what it lacks was read back", "via", via)
		o.snapshot = snap.frame
		return 0, nil
	}
	s.log.Warn("replay window overtook a fresh snapshot and Kafka could not fill in; events in between are missing for this viewer")
	var err error
	if v.sub, o.replay, err = s.broker.Subscribe(nil, v.onEnd); err != nil {
		return http.StatusServiceUnavailable, bodyShuttingDown
	}
	o.snapshot = snap.frame
	return 0, nil
}

// snapshot returns a shared snapshot at most snapshotMaxAge old, or with
// fresh, one read after the call began.
func (s *Server) snapshot(ctx context.Context, fresh bool) (*snapshot, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.DBTimeout)
	defer cancel()
	start := time.Now()
	snap, _, err := s.snaps.get(ctx, "", fresh, s.loadSnapshot)
	s.m.snapshot.Observe(time.Since(start).Seconds())
	if err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	return snap, nil
}

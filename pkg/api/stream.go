package api

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/gin-gonic/gin"

	"github.com/decnet/identity-relay/pkg/fanout"
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
// written before the 200 headers: auth, caps, subscription and snapshot.
// Then the connection is taken over from net/http (see viewer.go), and a
// goroutine of its own streams to it while the handler returns.
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
	v := &viewer{s: s, user: user.UUID}
	defer func() {
		if v.conn == nil { // not handed over to a stream: give the slot back
			s.limits.release(user.UUID)
		}
	}()

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

	var (
		resume fanout.Resume
		snap   []byte
		via    = "window"
	)
	if from != nil {
		var err error
		if v.sub, resume, err = s.broker.SubscribeFrom(from, v.onEnd); err != nil {
			s.fail(c, http.StatusServiceUnavailable, bodyShuttingDown)
			return
		}
		if resume.Gap { // the window cannot bring this viewer up to date
			v.sub.Close()
			v.sub = nil
			if v.sub, resume = s.resumeFromKafka(ctx, from, resume.Missing, v.onEnd); v.sub != nil {
				via = "kafka"
			}
		}
	}
	if v.sub == nil {
		var code int
		var body []byte
		if v.sub, resume, snap, code, body = s.subscribeWithSnapshot(ctx, v.onEnd); code != 0 {
			s.fail(c, code, body)
			return
		}
	}
	if from != nil {
		if snap != nil {
			via = "snapshot"
		}
		s.m.resumes.WithLabelValues(via).Inc()
	}
	v.skip = resume.Skip
	v.chunked = c.Request.ProtoAtLeast(1, 1)

	conn, _, err := c.Writer.Hijack()
	if err != nil {
		v.sub.Close()
		s.log.Error("cannot take over the connection", "err", err)
		s.fail(c, http.StatusInternalServerError, detail("Streaming unsupported"))
		return
	}
	if !s.streams.add(conn) { // shutting down since the checks above (the slot goes back in the defer)
		v.sub.Close()
		_ = conn.Close()
		return
	}
	s.setupStream(conn)
	v.conn = conn
	s.m.connects.WithLabelValues("200").Inc()
	s.m.connected.Inc()
	go v.run(snap, resume.Replay)
}

// historyTimeout bounds reading a gap back from Kafka, waiting included.
const historyTimeout = 5 * time.Second

// resumeFromKafka reads from Kafka what a resuming viewer missed before the
// window, then subscribes it from where that read ends; the frames read come
// first in its replay. It returns no subscription when that cannot be done
// (no history, records gone, Kafka slow, the window moved on meanwhile): the
// viewer then gets a snapshot.
func (s *Server) resumeFromKafka(ctx context.Context, from fanout.Position, missing []fanout.Range, onEnd func(fanout.Reason)) (*fanout.Subscription, fanout.Resume) {
	if s.cfg.History == nil || len(missing) == 0 {
		return nil, fanout.Resume{}
	}
	ctx, cancel := context.WithTimeout(ctx, historyTimeout)
	defer cancel()
	events, err := s.cfg.History.Read(ctx, missing)
	if err != nil {
		s.log.Info("resume gap not read back from Kafka; sending a snapshot", "err", err)
		return nil, fanout.Resume{}
	}
	pos := make(fanout.Position, len(from))
	for k, o := range from {
		pos[k] = o
	}
	frames := make([]*fanout.Frame, 0, len(events))
	for _, ev := range events {
		key := fanout.KeyOf(ev.Topic, ev.TopicID, ev.Partition)
		pos[key] = ev.Offset + 1
		f, err := fanout.Encode(ev, pos.Encode())
		if err != nil {
			continue // cannot be framed; the live path skips it too
		}
		frames = append(frames, f)
	}
	for _, r := range missing { // records that did not decode still count as read
		pos[fanout.KeyOf(r.Topic, r.TopicID, r.Partition)] = r.To
	}
	sub, resume, err := s.broker.SubscribeFrom(pos, onEnd)
	if err != nil {
		return nil, fanout.Resume{}
	}
	if resume.Gap {
		sub.Close()
		return nil, fanout.Resume{}
	}
	resume.Replay = append(frames, resume.Replay...)
	return sub, resume
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

// Package api serves the SSE stream and the operational endpoints with Gin.
// It decides every status before it writes a header; then it takes the
// stream's connection over from net/http, and one goroutine of its own
// writes to it (viewer.go).
package api

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/gin-gonic/gin"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/decnet/identity-relay/internal/users"
	"github.com/decnet/identity-relay/pkg/fanout"
	"github.com/decnet/identity-relay/pkg/sse"
)

// EventsPath is the route browsers use (CONTRACT.md).
const EventsPath = "/api/v1/identities/events"

// Store is what the API reads from the database.
type Store interface {
	// User returns the user, or nil and no error when there is none.
	User(ctx context.Context, uuid string) (*users.User, error)
	// Revoked reports whether the token id is in revoked_tokens.
	Revoked(ctx context.Context, jti string) (bool, error)
	// Snapshot returns a JSON array of the newest limit live identities.
	Snapshot(ctx context.Context, limit int) (json.RawMessage, error)
	// Ping reports whether the database answers.
	Ping(ctx context.Context) error
}

// Broker hands out viewer subscriptions; *fanout.Broadcaster is one.
type Broker interface {
	// Resume subscribes a viewer from a position it sent, reading what the
	// window lacks back from h; fanout.ErrUnusable or fanout.ErrGap when
	// only a snapshot will do.
	Resume(ctx context.Context, from sse.Position, h fanout.History, onEnd func(fanout.Reason)) (*fanout.Subscription, fanout.Resumed, error)
	// Subscribe subscribes a viewer from a position Position returned, with
	// the frames since; fanout.ErrGap when the window no longer has them.
	Subscribe(at sse.Position, onEnd func(fanout.Reason)) (*fanout.Subscription, []*sse.Frame, error)
	// Position is the stream position after the newest event.
	Position() sse.Position
}

// Config is the API's part of the relay's settings.
type Config struct {
	JWTSecret      []byte
	JWTIssuer      string
	JWTAudience    string
	JWTLeeway      time.Duration // clock skew allowed on iat and nbf (see newVerifier)
	MaxPerUser     int           // per-user stream cap (429 past it)
	MaxConnections int           // global stream cap (503 past it)
	Keepalive      time.Duration // comment frame after this long without a frame
	Retry          time.Duration // the retry: hint sent once per stream
	// MaxLifetime, if not 0, ends each stream between frames after at most
	// this long (less by up to LifetimeJitter of it, at random), so that
	// browsers resume through the load balancer and viewers spread onto
	// replicas added since (viewer.go, streamLifetime).
	MaxLifetime    time.Duration
	LifetimeJitter float64
	SnapshotLimit  int
	// DBTimeout bounds every database call of a connect, so a dead database
	// answers 503 quickly instead of hanging the viewer.
	DBTimeout time.Duration
	// WriteTimeout bounds each write to a viewer; a viewer that takes longer is cut.
	WriteTimeout time.Duration
	// SendBuffer, if not 0, is each stream's SO_SNDBUF in bytes.
	SendBuffer int
	// UserTimeout, if not 0, is each stream's TCP_USER_TIMEOUT: a client
	// that stops acknowledging is cut this long after the first unacknowledged write.
	UserTimeout time.Duration
	// ReadTimeout bounds reading a request, headers included; 0: 30 s.
	ReadTimeout time.Duration
	// TrustedProxies are the proxies (addresses or CIDRs) whose
	// X-Forwarded-For and X-Real-IP give the logged client address. Empty:
	// none, the address is the connection's.
	TrustedProxies []string
	// AuthCacheTTL is how long user rows and revocations are cached
	// (CONTRACT.md allows 10 s), and so how often an open stream re-checks
	// its credential (credential.go).
	AuthCacheTTL time.Duration
	Logger       *slog.Logger
	Registerer   prometheus.Registerer
	Gatherer     prometheus.Gatherer
	// History, if set, serves resumes older than the replay window; without
	// it, or when Kafka no longer has the records, such viewers get a snapshot.
	History fanout.History
	// ReadBacks bounds the read-backs from History at once (default 4); a
	// user has one at most. Each holds its slot until its frames are written.
	ReadBacks int
	// ConsumerReady reports whether the Kafka consumer runs and has filled the
	// replay window at start-up (readiness, and /startupz).
	ConsumerReady func() bool
	// Peers, if set, are the host:port of the relay's replicas (names
	// looked up every round); Rebalance then ends streams this replica
	// holds above their average, every RebalanceInterval (at least a
	// second), past RebalanceTolerance (rebalance.go).
	Peers              []string
	RebalanceInterval  time.Duration
	RebalanceTolerance float64
}

// Server is the HTTP side of the relay.
type Server struct {
	cfg    Config
	store  *cachedStore
	broker Broker
	auth   *verifier
	log    *slog.Logger
	engine *gin.Engine
	limits *limiter
	reads  *readBacks
	snaps  *ttlCache[*snapshot]
	m      *metrics
	retry  []byte // the retry: frame
	id     string // told to peers (/peerz), so that a replica leaves itself out
	peers  *peerSet

	draining atomic.Bool
	streams  streamSet
}

// New builds the server. cfg must be validated by the caller (see internal/config).
func New(cfg Config, store Store, broker Broker) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Registerer == nil {
		reg := prometheus.NewRegistry()
		cfg.Registerer, cfg.Gatherer = reg, reg
	}
	if cfg.Retry <= 0 {
		cfg.Retry = 3 * time.Second
	}
	if cfg.ReadBacks < 1 {
		cfg.ReadBacks = 4
	}
	if cfg.ReadTimeout <= 0 {
		cfg.ReadTimeout = defaultReadTimeout
	}
	if cfg.ConsumerReady == nil {
		cfg.ConsumerReady = func() bool { return true }
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	s := &Server{
		cfg:    cfg,
		store:  newCachedStore(store, cfg.AuthCacheTTL, cfg.DBTimeout),
		broker: broker,
		auth:   newVerifier(cfg.JWTSecret, cfg.JWTIssuer, cfg.JWTAudience, cfg.JWTLeeway),
		log:    cfg.Logger.With("component", "api"),
		limits: newLimiter(cfg.MaxPerUser, cfg.MaxConnections),
		reads:  newReadBacks(cfg.ReadBacks),
		snaps:  newTTLCache[*snapshot](snapshotMaxAge, cfg.DBTimeout),
		m:      m,
		retry:  []byte("retry: " + strconv.FormatInt(cfg.Retry.Milliseconds(), 10) + "\n\n"),
		id:     rand.Text(),
	}
	if len(cfg.Peers) > 0 {
		s.peers = newPeerSet(cfg.Peers, cfg.RebalanceInterval, m.peerPolls, s.log)
	}
	gin.SetMode(gin.ReleaseMode)
	e := gin.New()
	if err := e.SetTrustedProxies(cfg.TrustedProxies); err != nil {
		return nil, fmt.Errorf("trusted proxies: %w", err)
	}
	e.Use(s.recover, s.accessLog, s.refuseBody)
	e.GET(EventsPath, s.events)
	e.GET("/healthz", func(c *gin.Context) { c.Data(http.StatusOK, "text/plain; charset=utf-8", []byte("ok\n")) })
	e.GET("/readyz", s.readyz)
	e.GET("/startupz", s.startupz)
	e.GET("/peerz", s.peerz)
	if cfg.Gatherer != nil {
		e.GET("/metrics", gin.WrapH(promhttp.HandlerFor(cfg.Gatherer, promhttp.HandlerOpts{})))
	}
	s.engine = e
	return s, nil
}

// Handler returns the Gin engine; callers may add routes (the demo page).
func (s *Server) Handler() *gin.Engine { return s.engine }

// Drain turns readiness false and refuses new viewers with 503. Open streams
// end when the broker is closed; Wait waits for them.
func (s *Server) Drain() { s.draining.Store(true) }

// Wait refuses new streams and returns once every open stream has ended, or
// closes those still open when ctx ends. Call it after closing the broker.
func (s *Server) Wait(ctx context.Context) error { return s.streams.wait(ctx) }

// Errors and their bodies, fixed by CONTRACT.md.
var (
	bodyUnauthorized   = detail("Could not validate credentials")
	bodyForbidden      = detail("Insufficient permissions")
	bodyMustChange     = detail("Password change required before accessing this resource")
	bodyDatabaseDown   = detail("Database unavailable")
	bodyShuttingDown   = detail("Shutting down")
	bodyGlobalCap      = detail("Connection limit reached")
	bodyHTTP1Only      = detail("Streams are served over HTTP/1.1")
	errDatabase        = errors.New("database unavailable")
	errShuttingDown    = errors.New("shutting down")
	errConsumerStopped = errors.New("kafka consumer not running or still filling the replay window")
)

func detail(msg string) []byte {
	b, _ := json.Marshal(map[string]string{"detail": msg})
	return b
}

func (s *Server) fail(c *gin.Context, code int, body []byte) {
	if code == http.StatusUnauthorized {
		c.Header("WWW-Authenticate", "Bearer")
	}
	s.m.connects.WithLabelValues(strconv.Itoa(code)).Inc()
	c.Data(code, "application/json", body)
	c.Abort()
}

// startupz answers 200 once the start-up read of Kafka is done (or given
// up: Kafka unreachable, or past its bound), else 503: Kubernetes' startup
// probe, which holds the readiness probe back until then. Unlike /readyz it
// does not look at the database, so a database down at start-up does not
// get the container restarted when the startup probe gives up.
func (s *Server) startupz(c *gin.Context) {
	if !s.cfg.ConsumerReady() {
		c.Data(http.StatusServiceUnavailable, "application/json", detail(errConsumerStopped.Error()))
		return
	}
	c.Data(http.StatusOK, "text/plain; charset=utf-8", []byte("started\n"))
}

func (s *Server) readyz(c *gin.Context) {
	if err := s.readiness(c.Request.Context()); err != nil {
		c.Data(http.StatusServiceUnavailable, "application/json", detail(err.Error()))
		return
	}
	c.Data(http.StatusOK, "text/plain; charset=utf-8", []byte("ready\n"))
}

// readiness says why this replica should get no new viewers, or nil.
func (s *Server) readiness(ctx context.Context) error {
	switch {
	case s.draining.Load():
		return errShuttingDown
	case !s.cfg.ConsumerReady():
		return errConsumerStopped
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.DBTimeout)
	defer cancel()
	if err := s.store.Ping(ctx); err != nil {
		return errDatabase
	}
	return nil
}

// recover turns a panic in a handler into a 500 and logs it without the
// query string. A panic once a stream is taken over is the stream's own: it
// sends an error frame (viewer.run).
func (s *Server) recover(c *gin.Context) {
	defer func() {
		if r := recover(); r != nil {
			if r == http.ErrAbortHandler {
				panic(r)
			}
			s.log.Error("panic in handler", "path", c.Request.URL.Path, "panic", r)
			if !c.Writer.Written() {
				c.Data(http.StatusInternalServerError, "application/json", detail("Internal error"))
			}
			c.Abort()
		}
	}()
	c.Next()
}

// probePaths are asked every few seconds by the kubelet and Prometheus, and
// every rebalance interval by peers: logged at debug, or each pod would log
// a line every few seconds at info.
var probePaths = map[string]bool{"/healthz": true, "/readyz": true, "/startupz": true, "/metrics": true, "/peerz": true}

// accessLog logs the path, never the query: the token may be there.
func (s *Server) accessLog(c *gin.Context) {
	start := time.Now()
	c.Next()
	level := slog.LevelInfo
	if probePaths[c.Request.URL.Path] {
		level = slog.LevelDebug
	}
	s.log.Log(c.Request.Context(), level, "request", "method", c.Request.Method, "path", c.Request.URL.Path,
		"status", c.Writer.Status(), "duration", time.Since(start).String(), "remote", c.ClientIP())
}

type metrics struct {
	connected      prometheus.Gauge
	connects       *prometheus.CounterVec
	disconnects    *prometheus.CounterVec
	snapshot       prometheus.Histogram
	resumes        *prometheus.CounterVec
	rechecksFailed prometheus.Counter
	peerPolls      *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		connected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "relay_viewers_connected", Help: "Open SSE streams.",
		}),
		connects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_connects_total", Help: "Stream requests, by HTTP status code.",
		}, []string{"code"}),
		disconnects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_viewer_disconnects_total", Help: "Ended streams, by reason.",
		}, []string{"reason"}),
		snapshot: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "relay_snapshot_seconds", Help: "Time to read the snapshot from the database.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 13),
		}),
		resumes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_resumes_total", Help: "Streams opened with Last-Event-ID, by how they resumed: window, kafka (the gap read back) or snapshot.",
		}, []string{"via"}),
		rechecksFailed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "relay_credential_rechecks_failed_total", Help: "Re-checks of an open stream's credential that could not reach the database; the stream was kept.",
		}),
		peerPolls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_rebalance_peer_polls_total", Help: "Peers asked for their open-stream count (RELAY_PEERS), by result: ok, unready (draining or not ready, left out) or error (no answer in time, a failed look-up or a bad answer, left out).",
		}, []string{"result"}),
	}
	for _, col := range []prometheus.Collector{m.connected, m.connects, m.disconnects, m.snapshot, m.resumes, m.rechecksFailed, m.peerPolls} {
		if err := reg.Register(col); err != nil {
			return nil, err
		}
	}
	return m, nil
}

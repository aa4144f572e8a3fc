package api

import (
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/gin-gonic/gin"
)

// What one connection may cost: the bounds on reading requests, and the
// socket settings of a stream, so that a client that vanished frees its
// slot in bounded time.

const (
	// readHeaderTimeout cuts clients that send headers too slowly (slowloris).
	readHeaderTimeout = 5 * time.Second
	// defaultReadTimeout bounds reading a whole request. Bodies are refused
	// unread (refuseBody), so it is a backstop. net/http cancels a request's
	// context at it, so it also bounds a viewer's admission (database calls,
	// a Kafka read-back: about 15 s at most with the defaults).
	defaultReadTimeout = 30 * time.Second

	// TCP keepalive probes a stream that carried nothing for keepaliveIdle.
	// Streams send a keepalive comment every RELAY_SSE_KEEPALIVE anyway; the
	// probes cover a longer setting. With a user timeout set, the kernel
	// gives up on the probes after it instead of after keepaliveCount.
	keepaliveIdle     = 15 * time.Second
	keepaliveInterval = 5 * time.Second
	keepaliveCount    = 3

	// idleTimeout closes a keep-alive connection that sends no next
	// request: browsers reuse theirs within seconds, and an idle one holds
	// a file descriptor of the 20,000 a replica may have.
	idleTimeout = 2 * time.Minute
	// maxHeaderBytes bounds a request's headers: a token is at most
	// MaxTokenBytes (8 KiB), a resume id MaxPositionLen (19 KiB), with room
	// for the cookies and proxy headers a browser and an ingress add.
	maxHeaderBytes = 64 << 10
)

var bodyNotAllowed = detail("Request body not allowed")

// HTTPServer returns the http.Server for Handler. It has no WriteTimeout,
// which would cut every long stream: streams set per-write deadlines. Its
// ReadTimeout does not reach a stream either: net/http clears a connection's
// deadlines when it hands it over (TestStreamOutlivesReadTimeout).
func (s *Server) HTTPServer() *http.Server {
	return &http.Server{
		Handler:           s.engine,
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       s.cfg.ReadTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(s.cfg.Logger.With("component", "http").Handler(), slog.LevelWarn),
	}
}

// refuseBody answers 413 to a request that has a body, before reading any
// of it, and closes the connection: no route takes one, and net/http would
// otherwise read up to 256 KiB of it, as slowly as the client likes (or
// wait for bytes that never come), before and after sending the answer.
func (s *Server) refuseBody(c *gin.Context) {
	if c.Request.ContentLength == 0 {
		return
	}
	// Connection: close keeps net/http from reading the body before the
	// answer; the expired deadline cuts its attempt after it, so the
	// connection closes at once.
	c.Header("Connection", "close")
	_ = http.NewResponseController(c.Writer).SetReadDeadline(time.Now())
	if c.Request.URL.Path == EventsPath {
		s.fail(c, http.StatusRequestEntityTooLarge, bodyNotAllowed)
		return
	}
	c.Data(http.StatusRequestEntityTooLarge, "application/json", bodyNotAllowed)
	c.Abort()
}

// setupStream sets the socket options of a stream's connection.
func (s *Server) setupStream(conn net.Conn) {
	tc, ok := conn.(*net.TCPConn)
	if !ok {
		return
	}
	if s.cfg.SendBuffer > 0 {
		// The kernel would grow the buffer of a viewer that stopped reading
		// to tcp_wmem's maximum (4 MiB by default) before its queue even
		// began to fill: memory held, and the drop delayed, for nothing.
		if err := tc.SetWriteBuffer(s.cfg.SendBuffer); err != nil {
			s.log.Warn("cannot set the stream's send buffer", "err", err)
		}
	}
	// Set here rather than trusted to the listener: the bound below holds
	// however the relay was given its listener.
	ka := net.KeepAliveConfig{Enable: true, Idle: keepaliveIdle, Interval: keepaliveInterval, Count: keepaliveCount}
	if err := tc.SetKeepAliveConfig(ka); err != nil {
		s.log.Warn("cannot set the stream's TCP keepalive", "err", err)
	}
	if s.cfg.UserTimeout > 0 {
		// Without it, the kernel retransmits to a client that vanished (a
		// laptop put to sleep) for about 15 minutes before the write fails,
		// and the viewer holds its slot all that time.
		if err := setUserTimeout(tc, s.cfg.UserTimeout); err != nil {
			s.log.Warn("cannot set the stream's TCP user timeout", "err", err)
		}
	}
}

package api

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/decnet/identity-relay/internal/testsync"
	"github.com/decnet/identity-relay/pkg/fanout"
	"github.com/decnet/identity-relay/pkg/sse"
)

// dialRaw opens a connection to the harness's server and sends head (the
// request line and headers, without the blank line ending them).
func (h *harness) dialRaw(t *testing.T, head string) (net.Conn, *bufio.Reader) {
	t.Helper()
	host := strings.TrimPrefix(strings.TrimSuffix(h.url, EventsPath), "http://")
	conn, err := net.Dial("tcp", host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	// Bounds a hang only: every read below expects an answer at once.
	if err := conn.SetReadDeadline(time.Now().Add(30 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(conn, head+"\r\n"); err != nil {
		t.Fatal(err)
	}
	return conn, bufio.NewReader(conn)
}

// dialStream opens a stream for user on a connection of its own, reads the
// stream's start and returns the connection and the body.
func (h *harness) dialStream(t *testing.T, user string) (net.Conn, io.Reader) {
	t.Helper()
	tok := hs256(t, claimsFor(user, nil))
	h.mu.Lock()
	h.tokens = append(h.tokens, tok)
	h.mu.Unlock()
	conn, br := h.dialRaw(t, "GET "+EventsPath+"?token="+tok+" HTTP/1.1\r\nHost: relay\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	checkStream(t, resp)
	return conn, resp.Body
}

// disconnects returns relay_viewer_disconnects_total{reason}.
func (h *harness) disconnects(t *testing.T, reason fanout.Reason) float64 {
	t.Helper()
	return counterValue(t, h.srv.m.disconnects.WithLabelValues(string(reason)))
}

// waitDisconnects waits until relay_viewer_disconnects_total{reason} is want.
func (h *harness) waitDisconnects(t *testing.T, reason fanout.Reason, want float64) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); h.disconnects(t, reason) != want; {
		if time.Now().After(deadline) {
			t.Fatalf("relay_viewer_disconnects_total{reason=%q} = %v, want %v", reason, h.disconnects(t, reason), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestClientSendingIsDisconnected guards CONTRACT.md "clients never send":
// a viewer that sends on its open stream is cut at its first byte, counted
// as client_sent, and frees its slot; the relay does not read on through
// what it sends (it used to, one byte per system call).
func TestClientSendingIsDisconnected(t *testing.T) {
	tests := []struct {
		name string
		send []byte
	}{
		{"one byte", []byte("x")},
		{"a pipelined request", []byte("GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")},
		{"8 MiB", bytes.Repeat([]byte("x"), 8<<20)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, newFakeStore(), nil)
			conn, body := h.dialStream(t, "u-viewer")
			go func() { _, _ = conn.Write(tt.send) }() // fails once the relay closes
			// The stream ends: a clean end of the chunked body, or a reset
			// when the relay closed with what was sent still unread.
			_, err := io.Copy(io.Discard, body)
			if err != nil && !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("stream did not end: %v", err)
			}
			h.waitDisconnects(t, "client_sent", 1)
			h.waitOpen(t, "u-viewer", 0)
			for _, r := range []fanout.Reason{reasonClientGone, reasonWriteError, reasonInternal} {
				if n := h.disconnects(t, r); n != 0 {
					t.Errorf("also counted %v under %s", n, r)
				}
			}
		})
	}
}

// TestRequestBodyRefused guards that a request announcing a body gets 413
// at once, before any of it is read, and its connection is closed: a client
// that announces a body and never sends it cannot hold a connection (nor the
// relay's file descriptors) open.
func TestRequestBodyRefused(t *testing.T) {
	h := newHarness(t, newFakeStore(), nil)
	tok := hs256(t, claimsFor("u-viewer", nil))
	h.mu.Lock()
	h.tokens = append(h.tokens, tok)
	h.mu.Unlock()
	tests := []struct {
		name, target, headers string
	}{
		{"stream, no credential, Content-Length without a body", EventsPath, "Content-Length: 10\r\n"},
		{"stream, valid credential, Content-Length without a body", EventsPath + "?token=" + tok, "Content-Length: 10\r\n"},
		{"stream, chunked body never sent", EventsPath, "Transfer-Encoding: chunked\r\n"},
		{"healthz, Content-Length without a body", "/healthz", "Content-Length: 1000000\r\n"},
		{"metrics, Expect 100-continue", "/metrics", "Content-Length: 10\r\nExpect: 100-continue\r\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, br := h.dialRaw(t, "GET "+tt.target+" HTTP/1.1\r\nHost: relay\r\n"+tt.headers)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("no answer: %v", err)
			}
			checkRefused(t, resp, http.StatusRequestEntityTooLarge, `{"detail":"Request body not allowed"}`)
			if !resp.Close {
				t.Error("the response keeps the connection open")
			}
			if n, err := br.Read(make([]byte, 1)); err == nil || (!errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET)) {
				t.Fatalf("connection still open after the 413: read %d, %v", n, err)
			}
		})
	}
	h.waitOpen(t, "u-viewer", 0)
}

// TestStreamOutlivesReadTimeout guards that the read timeout, which bounds
// reading a request, does not cut a stream once it is taken over: the close
// watcher would see the expired deadline as the client going.
func TestStreamOutlivesReadTimeout(t *testing.T) {
	// Longer than admission takes even on a loaded machine: net/http would cancel it.
	const readTimeout = 3 * time.Second
	h := newHarness(t, newFakeStore(), func(c *Config) { c.ReadTimeout = readTimeout })
	_, body := h.dialStream(t, "u-viewer")
	time.Sleep(2 * readTimeout)
	if err := h.broker.Publish(sse.Event{Topic: "identity.formed", Type: "formed", TS: "1750000000.5", Payload: json.RawMessage(`{}`)}); err != nil {
		t.Fatal(err)
	}
	want := "event: formed\n"
	got := make([]byte, 0, 256)
	buf := make([]byte, 256)
	for !bytes.Contains(got, []byte(want)) {
		n, err := body.Read(buf)
		if err != nil {
			t.Fatalf("stream ended %v after it started (read timeout %v): %v; got %q", 2*readTimeout, readTimeout, err, got)
		}
		got = append(got, buf[:n]...)
	}
	for _, r := range []fanout.Reason{reasonClientGone, "client_sent", reasonWriteError} {
		if n := h.disconnects(t, r); n != 0 {
			t.Errorf("%v streams ended as %s", n, r)
		}
	}
}

// failOnceListener fails its first Accept with a temporary error, which
// net/http logs through http.Server.ErrorLog and retries.
type failOnceListener struct {
	net.Listener
	failed bool
}

type temporaryError struct{}

func (temporaryError) Error() string   { return "test: accept failed" }
func (temporaryError) Timeout() bool   { return false }
func (temporaryError) Temporary() bool { return true }

func (l *failOnceListener) Accept() (net.Conn, error) {
	if !l.failed { // only Serve's goroutine calls Accept
		l.failed = true
		return nil, temporaryError{}
	}
	return l.Listener.Accept()
}

// serve runs the API's own http.Server on ln, with cfg changed by mod, for
// tests that need a listener of their own; it returns the server and its logs.
func serve(t *testing.T, ln net.Listener, mod func(*Config)) (*Server, *testsync.Buffer) {
	t.Helper()
	logs := &testsync.Buffer{}
	cfg := testConfig()
	if mod != nil {
		mod(&cfg)
	}
	cfg.Logger = slog.New(slog.NewJSONHandler(logs, nil))
	broker := fanout.New(fanout.Options{Buffer: 16})
	srv, err := New(cfg, newFakeStore(), broker)
	if err != nil {
		t.Fatal(err)
	}
	hs := srv.HTTPServer()
	go func() { _ = hs.Serve(ln) }()
	t.Cleanup(func() { _ = broker.Close(); _ = hs.Close() })
	return srv, logs
}

// TestServerErrorsLogged guards that net/http's own error messages (accept
// errors, such as running out of file descriptors) go to the relay's
// structured log with a component, not as bare lines to stderr.
func TestServerErrorsLogged(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	_, logs := serve(t, &failOnceListener{Listener: ln}, nil)
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(logs.String(), "test: accept failed"); {
		if time.Now().After(deadline) {
			t.Fatalf("the accept error was not logged; logs:\n%s", logs)
		}
		time.Sleep(10 * time.Millisecond)
	}
	var rec struct{ Level, Msg, Component string }
	if err := json.Unmarshal([]byte(strings.TrimSpace(logs.String())), &rec); err != nil {
		t.Fatalf("log %q: %v", logs, err)
	}
	if rec.Component != "http" || rec.Level != "WARN" || !strings.HasPrefix(rec.Msg, "http: Accept error: test: accept failed") {
		t.Fatalf("logged %+v, want component http, level WARN, net/http's message", rec)
	}
}

// TestTrustedProxies guards that X-Forwarded-For and X-Real-IP decide the
// logged client address only when the connection comes from a proxy the
// configuration names: by default nobody can forge it.
func TestTrustedProxies(t *testing.T) {
	tests := []struct {
		name    string
		proxies []string
		want    string
	}{
		{"none trusted (default)", nil, "127.0.0.1"},
		{"another network trusted", []string{"10.0.0.0/8"}, "127.0.0.1"},
		{"the peer trusted by address", []string{"127.0.0.1"}, "203.0.113.7"},
		{"the peer trusted by network", []string{"10.0.0.0/8", "127.0.0.0/8"}, "203.0.113.7"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, newFakeStore(), func(c *Config) { c.TrustedProxies = tt.proxies })
			_, br := h.dialRaw(t, "GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Forwarded-For: 203.0.113.7\r\nX-Real-IP: 198.51.100.9\r\n")
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			h.waitReturned(t)
			var rec struct{ Msg, Remote string }
			for _, line := range strings.Split(strings.TrimSpace(h.logs.String()), "\n") {
				if err := json.Unmarshal([]byte(line), &rec); err == nil && rec.Msg == "request" {
					break
				}
			}
			if rec.Remote != tt.want {
				t.Fatalf("logged remote %q, want %q", rec.Remote, tt.want)
			}
		})
	}
}

// TestNewRefusesBadProxies guards that a proxy list Gin cannot use is an error, not ignored.
func TestNewRefusesBadProxies(t *testing.T) {
	cfg := testConfig()
	cfg.TrustedProxies = []string{"not-an-address"}
	broker := fanout.New(fanout.Options{Buffer: 16})
	defer broker.Close()
	if _, err := New(cfg, newFakeStore(), broker); err == nil {
		t.Fatal("New accepted a trusted proxy that is no address")
	} else if !strings.Contains(err.Error(), "not-an-address") {
		t.Fatalf("error %q does not name the bad entry", err)
	}
}

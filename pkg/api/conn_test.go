package api

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

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
func serve(t *testing.T, ln net.Listener, mod func(*Config)) (*Server, *lockedBuffer) {
	t.Helper()
	logs := &lockedBuffer{}
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

// TestStreamSocketTimeouts guards that each stream's socket has
// TCP_USER_TIMEOUT (the configured bound; 0 leaves the kernel's) and TCP
// keepalive, so a client that vanished frees its slot in bounded time.
func TestStreamSocketTimeouts(t *testing.T) {
	tests := []struct {
		name        string
		userTimeout time.Duration
		wantMillis  int
	}{
		{"default", 30 * time.Second, 30000},
		{"short", 1500 * time.Millisecond, 1500},
		{"0: the kernel's", 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t, newFakeStore(), func(c *Config) { c.UserTimeout = tt.userTimeout })
			h.dialStream(t, "u-viewer")
			h.mu.Lock()
			conn := h.accepted[0]
			h.mu.Unlock()
			for _, o := range []struct {
				name       string
				level, opt int
				want       int
			}{
				{"TCP_USER_TIMEOUT", unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, tt.wantMillis},
				{"SO_KEEPALIVE", unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
				{"TCP_KEEPIDLE", unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, int(keepaliveIdle / time.Second)},
				{"TCP_KEEPINTVL", unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, int(keepaliveInterval / time.Second)},
				{"TCP_KEEPCNT", unix.IPPROTO_TCP, unix.TCP_KEEPCNT, keepaliveCount},
			} {
				if got := sockoptInt(t, conn, o.level, o.opt); got != o.want {
					t.Errorf("%s = %d, want %d", o.name, got, o.want)
				}
			}
			h.waitReturned(t)
		})
	}
}

// netns is a network namespace of the test's own, with its loopback up:
// sockets made by run live in it, and the test can take its loopback down
// without touching the machine's.
type netns struct{ do chan func() }

func newNetns(t *testing.T) *netns {
	t.Helper()
	ns := &netns{do: make(chan func())}
	ready := make(chan error)
	go func() {
		// Never unlocked: the thread, in the namespace, ends with this goroutine.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			ready <- err
			return
		}
		ready <- setLoopback(true)
		for f := range ns.do {
			f()
		}
	}()
	if err := <-ready; err != nil {
		t.Skipf("no network namespace of the test's own (needs root on Linux): %v", err)
	}
	t.Cleanup(func() { close(ns.do) })
	return ns
}

// run calls f on the namespace's thread.
func (ns *netns) run(f func()) {
	done := make(chan struct{})
	ns.do <- func() { f(); close(done) }
	<-done
}

// setLoopback sets the loopback interface of the calling thread's namespace up or down.
func setLoopback(up bool) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	if up {
		ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	} else {
		ifr.SetUint16(ifr.Uint16() &^ unix.IFF_UP)
	}
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

// TestVanishedClientFreesSlot guards issue 11's dead client: a viewer whose
// packets no longer arrive (a laptop put to sleep) frees its slot within
// keepalive + user timeout, not after the kernel's ~15 minutes of
// retransmissions. The viewer and the relay talk over the loopback of a
// namespace of the test's own, which the test then takes down.
func TestVanishedClientFreesSlot(t *testing.T) {
	ns := newNetns(t)
	var ln net.Listener
	var err error
	ns.run(func() { ln, err = net.Listen("tcp", "127.0.0.1:0") })
	if err != nil {
		t.Fatal(err)
	}
	const keepalive, userTimeout = time.Second, 2 * time.Second
	srv, _ := serve(t, ln, func(c *Config) { c.Keepalive, c.UserTimeout = keepalive, userTimeout })
	var conn net.Conn
	ns.run(func() { conn, err = net.Dial("tcp", ln.Addr().String()) })
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET %s?token=%s HTTP/1.1\r\nHost: relay\r\n\r\n", EventsPath, hs256(t, claimsFor("u-viewer", nil)))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	checkStream(t, resp)
	h := &harness{srv: srv}
	h.waitOpen(t, "u-viewer", 1)

	ns.run(func() { err = setLoopback(false) })
	if err != nil {
		t.Fatal(err)
	}
	gone := time.Now()
	// Bounds a hang only: the relay should be done after about keepalive +
	// user timeout; without the user timeout it waits for many minutes.
	deadline := gone.Add(time.Minute)
	for {
		srv.limits.mu.Lock()
		open := srv.limits.total
		srv.limits.mu.Unlock()
		if open == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the vanished viewer still holds its slot after %v", time.Since(gone).Round(time.Second))
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("slot freed %v after the viewer vanished (keepalive %v, user timeout %v)", time.Since(gone).Round(10*time.Millisecond), keepalive, userTimeout)
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

//go:build linux

package api

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

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

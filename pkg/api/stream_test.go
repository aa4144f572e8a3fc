package api

import (
	"net"
	"strconv"
	"syscall"
	"testing"
)

// Each stream's socket gets the configured send buffer, which bounds what
// the kernel holds for a viewer that stopped reading; 0 leaves the kernel's
// own sizing.
func TestSendBuffer(t *testing.T) {
	for _, size := range []int{0, 64 << 10} {
		t.Run(strconv.Itoa(size), func(t *testing.T) { checkSendBuffer(t, size) })
	}
}

func checkSendBuffer(t *testing.T, size int) {
	h := newHarness(t, newFakeStore(), func(c *Config) { c.SendBuffer = size })
	resp := h.get(t, "", hs256(t, claimsFor("u-viewer", nil)))
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	h.mu.Lock()
	conns := h.accepted
	h.mu.Unlock()
	if len(conns) != 1 {
		t.Fatalf("%d connections accepted, want 1", len(conns))
	}
	got := sockoptInt(t, conns[0], syscall.SOL_SOCKET, syscall.SO_SNDBUF)
	// Linux reports twice what was set: the other half is for its bookkeeping.
	if size > 0 && got != 2*size {
		t.Errorf("SendBuffer %d: SO_SNDBUF is %d, want %d", size, got, 2*size)
	}
	if size == 0 && got == 2*(64<<10) {
		t.Errorf("SendBuffer 0: SO_SNDBUF is %d, as if set", got)
	}
	h.waitReturned(t)
}

// sockoptInt reads an integer socket option of c.
func sockoptInt(t *testing.T, c net.Conn, level, name int) int {
	t.Helper()
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var serr error
	if err := rc.Control(func(fd uintptr) { n, serr = syscall.GetsockoptInt(int(fd), level, name) }); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatal(serr)
	}
	return n
}

//go:build linux

package main

import (
	"net"
	"testing"
	"time"
)

// A reader whose connection is reset right after its last data sees the end,
// even when data and reset arrive before it reads: its short read of the
// data is the only readiness the socket will ever report.
func TestReaderSeesResetAfterData(t *testing.T) {
	client, server := loopbackPair(t)
	if _, err := server.Write([]byte(": keepalive\n\n: keepalive\n\n")); err != nil {
		t.Fatal(err)
	}
	if err := server.SetLinger(0); err != nil {
		t.Fatal(err)
	}
	server.Close()                     // a reset, as the relay drops a slow viewer
	time.Sleep(100 * time.Millisecond) // both are queued before the first read

	sink := &recSink{}
	v := &viewer{conn: client, p: parser{sink: sink}}
	done := make(chan error, 1)
	go func() { done <- v.readAll(make([]byte, 4096)) }()
	select {
	case err := <-done:
		if endReason(err, &v.p) != "reset" {
			t.Errorf("ended with %v, want a reset", err)
		}
		if len(sink.frames) != 2 {
			t.Errorf("%d frames before the reset, want 2", len(sink.frames))
		}
	case <-time.After(10 * endCheck):
		t.Fatal("the reader never saw the reset")
	}
}

// loopbackPair returns both ends of a loopback TCP connection, closed at the
// end of the test.
func loopbackPair(t *testing.T) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

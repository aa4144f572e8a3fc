//go:build linux

package main

import (
	"fmt"
	"math"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

type recSink struct{ frames []string }

func (s *recSink) frame(p *parser, _ int64) {
	s.frames = append(s.frames, fmt.Sprintf("%d %v %v %d %d %d", p.kind, p.fOK, p.fRun, p.fPart, p.fSeq, p.fSent))
}

func chunk(parts ...string) string {
	var b strings.Builder
	for _, p := range parts {
		fmt.Fprintf(&b, "%x\r\n%s\r\n", len(p), p)
	}
	return b.String()
}

// The parser must give the same frames whatever the read boundaries, with
// and without chunked encoding, and read the tool's fields from data lines.
func TestParserSplits(t *testing.T) {
	pad := strings.Repeat("x", 3000) // longer than lineCap: the fields come first
	ev := func(run string, part, seq int) string {
		return fmt.Sprintf("id: abc\nevent: formed\ndata: {\"topic\":\"identity.formed\",\"type\":\"formed\",\"ts\":1.5,\"payload\":{\"run\":\"%s\",\"part\":%d,\"seq\":%d,\"sent_ns\":1750000000123456789,\"identity_uuid\":\"u\",\"pad\":\"%s\"}}\n\n", run, part, seq, pad)
	}
	body := []string{": keepalive\n\n", "retry: 3000\n\n", "id: AQ\nevent: snapshot\ndata: {\"identities\":[]}\n\n",
		ev("r1", 0, -1) + ev("r1", 2, 7), ev("other", 1, 3), "event: error\ndata: {\"message\":\"Stream interrupted\"}\n\n"}
	want := []string{
		"1 false false 0 0 0", "2 false false 0 0 0",
		"4 true true 0 -1 1750000000123456789", "4 true true 2 7 1750000000123456789",
		"4 true false 1 3 1750000000123456789", "3 false false 0 0 0",
	}
	for _, chunked := range []bool{false, true} {
		stream := strings.Join(body, "")
		if chunked {
			stream = chunk(body...) + "0\r\n\r\n"
		}
		for _, step := range []int{1, 2, 3, 7, 64, 511, 4096, len(stream)} {
			s := &recSink{}
			p := &parser{chunked: chunked, sink: s, runID: []byte(`r1"`)}
			for i := 0; i < len(stream); i += step {
				p.feed([]byte(stream[i:min(i+step, len(stream))]), 1)
			}
			if got := strings.Join(s.frames, "|"); got != strings.Join(want, "|") {
				t.Fatalf("chunked=%v step=%d:\n got %s\nwant %s", chunked, step, got, strings.Join(want, "|"))
			}
			if p.bodyEnd != chunked || p.badChunk {
				t.Fatalf("chunked=%v step=%d: bodyEnd %v badChunk %v", chunked, step, p.bodyEnd, p.badChunk)
			}
		}
	}
}

// The histogram's quantiles must be within its stated precision.
func TestHistQuantiles(t *testing.T) {
	h := new(hist)
	for i := int64(1); i <= 100000; i++ {
		h.add(i * 1000) // 1 µs .. 100 ms, uniform
	}
	d := histData{}
	h.data(d)
	for _, q := range []float64{0.5, 0.99, 0.999} {
		want := q * 100000 * 1000
		if got := d.quantile(q); math.Abs(got-want)/want > 0.01 {
			t.Errorf("q%.3f = %.0f, want %.0f ±1%%", q, got, want)
		}
	}
	for _, v := range []int64{0, 1, 127, 128, 129, 255, 256, 1 << 40} {
		if got := histValue(histIndex(v)); math.Abs(got-float64(v)) > float64(v)/128+1 {
			t.Errorf("value %d lands in a bucket of %.0f", v, got)
		}
	}
}

// Centrifugo's uni_sse stream (as v6.9.1 sends it, captured with curl): a
// blank line, the connect reply (the viewer's snapshot), pings ({}: its
// keepalives), publications whose data is the record value, a disconnect
// (an error); every split of it gives the same frames.
func TestParserCentrifugo(t *testing.T) {
	pub := func(run string, part, seq int) string {
		return fmt.Sprintf(`data: {"channel":"identity","pub":{"data":{"v":1,"id":"18ed2708638adf46","topic":"identity.pf-cap-3967","type":"pf-cap-3967","ts":1796134743.373,"payload":{"run":"%s","part":%d,"seq":%d,"sent_ns":1796134743373963078,"identity_uuid":"00000000-0000-4000-8000-000000000000","pad":"%s"}}}}`+"\n\n",
			run, part, seq, strings.Repeat("x", 600))
	}
	body := []string{"\r\n",
		`data: {"connect":{"client":"adcc14be-4f2e-47e6-96c3-700574989a85","version":"0.0.0 OSS","subs":{"identity":{}},"expires":true,"ttl":600,"ping":3,"session":"122b5d6b-c6c4-4d26-9d40-596e660abda6"}}` + "\n\n",
		"data: {}\n\n", pub("r1", 1, -1) + pub("r1", 0, 5), pub("other", 2, 3) + "data: {}\n\n",
		`data: {"disconnect":{"code":3001,"reason":"shutdown"}}` + "\n\n"}
	want := []string{
		"2 false false 0 0 0", "1 false false 0 0 0",
		"4 true true 1 -1 1796134743373963078", "4 true true 0 5 1796134743373963078",
		"4 true false 2 3 1796134743373963078", "1 false false 0 0 0", "3 false false 0 0 0",
	}
	stream := chunk(body...)
	for _, step := range []int{1, 5, 64, 511, 4096, len(stream)} {
		s := &recSink{}
		p := &parser{chunked: true, centrifugo: true, sink: s, runID: []byte(`r1"`)}
		for i := 0; i < len(stream); i += step {
			p.feed([]byte(stream[i:min(i+step, len(stream))]), 1)
		}
		if got := strings.Join(s.frames, "|"); got != strings.Join(want, "|") {
			t.Fatalf("step=%d:\n got %s\nwant %s", step, got, strings.Join(want, "|"))
		}
	}
}

// The viewers' request and token fit the server: the relay's endpoint with
// the uuid claim, or Centrifugo's uni_sse with the connect request and a
// channels claim.
func TestStreamRequestAndToken(t *testing.T) {
	for _, c := range []struct{ protocol, path, claim string }{
		{protoRelay, "GET /base/api/v1/identities/events?token=", "uuid"},
		{protoCentrifugo, "GET /base/connection/uni_sse?cf_connect=%7B%22token%22%3A%22", "channels"},
	} {
		tok, err := mintToken(c.protocol, "secret", "user-1", time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		claims := jwt.MapClaims{}
		if _, err := jwt.ParseWithClaims(tok, claims, func(*jwt.Token) (any, error) { return []byte("secret"), nil }); err != nil {
			t.Fatalf("%s: %v", c.protocol, err)
		}
		if _, ok := claims[c.claim]; !ok {
			t.Errorf("%s: token has no %s claim: %v", c.protocol, c.claim, claims)
		}
		req := string(streamRequest(c.protocol, "/base", "127.0.0.1:1", tok))
		if !strings.HasPrefix(req, c.path) || !strings.Contains(req, "\r\nHost: 127.0.0.1:1\r\n") || !strings.HasSuffix(req, "\r\n\r\n") {
			t.Errorf("%s: request %q", c.protocol, req)
		}
	}
}

// Exactly k of n viewers are stalled, spread out.
func TestIsStalled(t *testing.T) {
	for _, c := range [][2]int{{1000, 100}, {100, 0}, {7, 7}, {10, 3}} {
		n := 0
		for i := range c[0] {
			if isStalled(i, c[0], c[1]) {
				n++
			}
		}
		if n != c[1] {
			t.Errorf("n=%d k=%d: %d stalled", c[0], c[1], n)
		}
	}
}

type countSink struct{ n int }

func (s *countSink) frame(*parser, int64) { s.n++ }

// The tool parses every frame every viewer gets: its cost per frame bounds
// the rates the tool can measure on a shared machine.
func BenchmarkParser(b *testing.B) {
	var one strings.Builder
	fmt.Fprintf(&one, "event: bench-1\ndata: {\"topic\":\"identity.bench-1\",\"type\":\"bench-1\",\"ts\":1750000000.123,\"payload\":{\"run\":\"r1\",\"part\":2,\"seq\":123456,\"sent_ns\":1750000000123456789,\"identity_uuid\":\"00000002-0000-4000-8000-00000001e240\",\"pad\":\"%s\"}}\nid: %s\n\n",
		strings.Repeat("x", 60), strings.Repeat("A", 75))
	body := chunk(strings.Repeat(one.String(), 128)) // one writev's worth
	b.SetBytes(int64(len(body)))
	s := &countSink{}
	p := &parser{chunked: true, sink: s, runID: []byte(`r1"`)}
	buf := []byte(body)
	for b.Loop() {
		for i := 0; i < len(buf); i += 16384 {
			p.feed(buf[i:min(i+16384, len(buf))], 1)
		}
	}
	if s.n == 0 {
		b.Fatal("no frames parsed")
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(s.n), "ns/frame")
}

// tcpSockets sees both ends of a loopback connection, and the send queue
// of the end whose peer does not read.
func TestTCPSockets(t *testing.T) {
	client, server := loopbackPair(t)
	// The client never reads: what the kernel buffers beyond its window stays queued.
	_ = server.SetWriteDeadline(time.Now().Add(time.Second))
	if n, _ := server.Write(make([]byte, 1<<20)); n == 0 {
		t.Fatal("nothing written")
	}
	srv, cli := server.LocalAddr().(*net.TCPAddr), client.LocalAddr().(*net.TCPAddr)
	socks, err := tcpSockets()
	if err != nil {
		t.Fatal(err)
	}
	found := 0
	for _, sk := range socks {
		switch {
		case sk.srcPort == uint16(srv.Port) && ipPortKey(sk.dstIP, sk.dstPort) == addrKey(cli):
			found++
			if sk.state != 1 || sk.sendQueue == 0 {
				t.Errorf("server end: state %d, send queue %d; want ESTABLISHED and bytes queued", sk.state, sk.sendQueue)
			}
		case sk.srcPort == uint16(cli.Port) && sk.dstPort == uint16(srv.Port):
			found++
		}
	}
	if found != 2 {
		t.Fatalf("found %d of the connection's 2 ends among %d sockets", found, len(socks))
	}
}

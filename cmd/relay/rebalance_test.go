package main

import (
	"errors"
	"io"
	"maps"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/decnet/identity-relay/internal/relaytest"
	"github.com/decnet/identity-relay/internal/testenv"
)

// freePort returns a loopback port nothing listens on now.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}

// TestRebalanceMovesViewersOnce guards RELAY_PEERS against the real broker,
// with two replicas: while its one peer is not up, replica A asks it every
// round, counts it as an error and ends nothing; once the peer is up (and
// has answered two rounds in a row), A, holding all 8 viewers, ends the
// streams above the average (4, or a few
// more if a count is taken while viewers are between replicas), cleanly
// between frames, counted as rebalance, while events flow. Each viewer so
// ended resumes once with its last id on the peer (a Service would pick at
// random; the peer does not rebalance here, so every viewer moves at most
// once) and gets every event exactly once and in order, without a snapshot.
func TestRebalanceMovesViewersOnce(t *testing.T) {
	const viewers, partitions, before, flowing, after = 8, 3, 30, 150, 15
	port := freePort(t)
	env, topic := relaytest.TopicEnv(t, map[string]string{"RELAY_SSE_MAX_PER_USER": "16"})
	envA := maps.Clone(env)
	envA["RELAY_PEERS"] = "localhost:" + port // a name, looked up every round
	envA["RELAY_REBALANCE_INTERVAL"] = "2s"
	a, cl := relaytest.StartOnTopic(t, envA, topic, partitions)
	token := relaytest.ViewerToken(t)

	ss := make([]*relaytest.Stream, viewers)
	cs := make([]*relaytest.Collector, viewers)
	ends := make([]int, viewers)
	var b *relaytest.Process
	// pump reads what viewer i has received, up to upto events, and says
	// whether it has them all; a stream that ends resumes on b at once, as
	// EventSource would, from its last id.
	pump := func(i, upto int) bool {
		t.Helper()
		for len(cs[i].Seen) < upto {
			f, err := ss[i].NextOrEnd(5 * time.Millisecond)
			switch {
			case errors.Is(err, io.EOF):
				if b == nil || ends[i] > 0 {
					t.Fatalf("viewer %d: stream ended (%d ends before; peer up: %v)", i, ends[i], b != nil)
				}
				ends[i]++
				ss[i].Close()
				ss[i] = relaytest.DialWith(t, b.URL, token, lastEventID(cs[i].LastID))
				openingFrames(t, ss[i])
			case errors.Is(err, io.ErrUnexpectedEOF):
				t.Fatalf("viewer %d: stream cut, not ended between frames (partial %q)", i, f)
			case err != nil:
				return false // nothing more yet
			case strings.HasPrefix(f, ":"):
			default:
				cs[i].TakeFrame(f) // fails on a duplicate, a step back or a snapshot (no id)
			}
		}
		return true
	}
	// follow reads every viewer, in turn, until each has upto events.
	follow := func(upto int) {
		t.Helper()
		for deadline := time.Now().Add(time.Minute); ; {
			done := true
			for i := range ss {
				done = pump(i, upto) && done
			}
			if done {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("viewers still short of %d events after a minute", upto)
			}
		}
	}
	for i := range ss {
		ss[i] = relaytest.Dial(t, a.URL, token)
		ss[i].ExpectStart(t)
		cs[i] = relaytest.NewCollector(t)
	}
	relaytest.ProduceSeq(t, cl, topic, partitions, 0, before)
	follow(before)

	// The peer is not up: A's rounds leave it out, count it, end nothing.
	waitMetricAtLeast(t, a.URL, `relay_rebalance_peer_polls_total{result="error"}`, 1, 20*time.Second)
	if got := relaytest.Metric(t, a.URL, `relay_viewer_disconnects_total{reason="rebalance"}`); got != 0 {
		t.Fatalf("A ended %v streams without a peer", got)
	}

	envB := maps.Clone(env)
	envB["RELAY_LISTEN_ADDR"] = "127.0.0.1:" + port
	b = relaytest.Start(t, envB)
	b.WaitReady(t)

	// Events flow, one every 20 ms, while A's next round ends its excess.
	produced := relaytest.ProducePaced(cl, topic, partitions, before, before+flowing, 20*time.Millisecond)
	follow(before + flowing)
	if err := <-produced; err != nil {
		t.Fatal(err)
	}
	// Every stream A has ended by now ended before the last events: its
	// viewer sees the end, and resumes, before it can have them all.
	waitMetricAtLeast(t, a.URL, `relay_viewer_disconnects_total{reason="rebalance"}`, viewers/2, 20*time.Second)
	n := before + flowing + after
	relaytest.ProduceSeq(t, relaytest.Producer(t, testenv.KafkaBrokers(t)), topic, partitions, before+flowing, n)
	follow(n)
	moved := 0
	for i := range ss {
		cs[i].Complete(n)
		moved += ends[i]
	}

	if moved < viewers/2 {
		t.Fatalf("%d viewers moved, want at least %d", moved, viewers/2)
	}
	// A may have ended one more since, in a round that counted B while a viewer was between them.
	if got := relaytest.Metric(t, a.URL, `relay_viewer_disconnects_total{reason="rebalance"}`); got < float64(moved) || got > viewers {
		t.Fatalf(`A's relay_viewer_disconnects_total{reason="rebalance"} = %v, %d viewers moved`, got, moved)
	}
	if win, snap := relaytest.Metric(t, b.URL, `relay_resumes_total{via="window"}`), relaytest.Metric(t, b.URL, `relay_resumes_total{via="snapshot"}`); win != float64(moved) || snap != 0 {
		t.Fatalf("B's resumes: %v from the window, %v with a snapshot; want %d and 0", win, snap, moved)
	}
	for _, r := range []*relaytest.Process{a, b} {
		for _, reason := range []string{"write_error", "slow", "internal"} {
			if got := relaytest.Metric(t, r.URL, `relay_viewer_disconnects_total{reason="`+reason+`"}`); got != 0 {
				t.Errorf("%s: %v streams ended as %s", r.URL, got, reason)
			}
		}
	}
	t.Logf("%d of %d viewers moved to the peer, each once, with all %d events; A: %v open, B: %v; %v peer polls failed before the peer was up",
		moved, viewers, n, relaytest.Metric(t, a.URL, "relay_viewers_connected"), relaytest.Metric(t, b.URL, "relay_viewers_connected"),
		relaytest.Metric(t, a.URL, `relay_rebalance_peer_polls_total{result="error"}`))
}

package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/decnet/identity-relay/internal/ssetest"
	"github.com/decnet/identity-relay/pkg/fanout"
)

// TestRebalanceExcess guards the decision: a replica ends streams only when
// it holds more than the average rounded up and is past the tolerance (or
// a peer is below it), and then only those above the average rounded up.
func TestRebalanceExcess(t *testing.T) {
	for _, tc := range []struct {
		name  string
		own   int
		peers []int
		tol   float64
		want  int
	}{
		{"no peers", 50, nil, 0.1, 0},
		{"no streams", 0, []int{0, 0}, 0.1, 0},
		{"even", 30, []int{30, 30, 30, 30}, 0.1, 0},
		{"old replica after 3 to 5", 50, []int{50, 50, 0, 0}, 0.1, 20},
		{"new replica after 3 to 5", 0, []int{50, 50, 50, 0}, 0.1, 0},
		{"within the tolerance, no hole", 33, []int{30, 29, 29, 29}, 0.1, 0},
		{"past the tolerance", 34, []int{29, 29, 29, 29}, 0.1, 4},
		{"a little above, a hole", 32, []int{32, 32, 32, 22}, 0.1, 2},
		{"below the average, a hole", 29, []int{40, 40, 41, 0}, 0.1, 0},
		{"uneven average rounded up", 2, []int{1}, 0, 0},
		{"one above the rounded-up average", 3, []int{1}, 0, 1},
		{"odd total on 5", 2, []int{2, 1, 1, 1}, 0.1, 0},
		{"tolerance 0", 31, []int{30, 30, 29, 30}, 0, 1},
		{"tolerance 1: past twice the average", 61, []int{30, 30, 30, 0}, 1, 30},
		{"tolerance 1: below twice the average", 59, []int{30, 30, 30, 1}, 1, 0},
		{"all on one of 2", 8, []int{0}, 0.1, 4},
		{"all on one of 10", 1000, make([]int, 9), 0.1, 900},
	} {
		if got := rebalanceExcess(tc.own, tc.peers, tc.tol); got != tc.want {
			t.Errorf("%s: own %d peers %v tolerance %v: %d, want %d", tc.name, tc.own, tc.peers, tc.tol, got, tc.want)
		}
	}
}

// modelSeeds is how many seeded runs TestRebalanceModel makes of each start.
const modelSeeds = 500

// TestRebalanceModel guards that repeated rounds converge through a
// balancer that picks replicas at random (kube-proxy): from skewed starts,
// in every seed, every replica is within ±25% of even, for good, within the
// start's number of rounds (the worst seed's; deploy/helm/README.md quotes
// these figures), and the ends stop. Each round, the replicas decide one
// after another in a random order with RELAY_REBALANCE_TOLERANCE's default,
// each seeing the others' counts without the streams already ended this
// round (their viewers are between replicas: the worst case of replicas
// whose rounds are out of phase); then every ended viewer lands on a
// replica drawn at random.
func TestRebalanceModel(t *testing.T) {
	const tol = 0.1
	for _, sc := range []struct {
		name   string
		start  func(r *rand.Rand) []int
		rounds int
	}{
		{"150 viewers, 3 to 5", func(*rand.Rand) []int { return []int{50, 50, 50, 0, 0} }, 10},
		{"150 viewers, 3 to 5 after random landing", func(r *rand.Rand) []int { return landed(r, 150, 3, 5) }, 7},
		{"300 viewers, 3 to 5", func(*rand.Rand) []int { return []int{100, 100, 100, 0, 0} }, 6},
		{"600 viewers, 3 to 5", func(*rand.Rand) []int { return []int{200, 200, 200, 0, 0} }, 4},
		{"150 viewers, 1 to 2", func(*rand.Rand) []int { return []int{150, 0} }, 4},
		{"150 viewers, 5 to 10", func(*rand.Rand) []int { return []int{30, 30, 30, 30, 30, 0, 0, 0, 0, 0} }, 28},
		{"1000 viewers, 3 to 12", func(r *rand.Rand) []int { return append(landed(r, 1000, 3, 3), make([]int, 9)...) }, 5},
	} {
		var reach, good, quiets []int
		var cost, ends int
		for seed := range uint64(modelSeeds) {
			r := rand.New(rand.NewPCG(seed, 16))
			counts := sc.start(r)
			total := 0
			for _, c := range counts {
				total += c
			}
			firstIn, lastOut, quiet := -1, 0, -1
			for round := 1; round <= 60 && quiet < 0; round++ {
				moved := modelRound(r, counts, tol)
				ends += moved
				if moved == 0 {
					quiet = round - 1
				}
				if !withinQuarter(counts, total) {
					lastOut = round
				} else if firstIn < 0 {
					firstIn = round
				}
			}
			if quiet < 0 {
				t.Fatalf("%s, seed %d: still ending streams after 60 rounds: %v", sc.name, seed, counts)
			}
			if lastOut+1 > sc.rounds {
				t.Fatalf("%s, seed %d: within ±25%% of even for good from round %d, want by %d", sc.name, seed, lastOut+1, sc.rounds)
			}
			reach, good, quiets = append(reach, firstIn), append(good, lastOut+1), append(quiets, quiet)
			cost += total
		}
		t.Logf("%s, %d seeds: rounds to within ±25%% (p50/p95/max) %s, within for good %s, last end %s; %.2f ends per viewer",
			sc.name, modelSeeds, pct(reach), pct(good), pct(quiets), float64(ends)/float64(cost))
	}
}

// pct is the median, 95th percentile and maximum of xs.
func pct(xs []int) string {
	slices.Sort(xs)
	return fmt.Sprintf("%d/%d/%d", xs[len(xs)/2], xs[len(xs)*95/100], xs[len(xs)-1])
}

// landed is n viewers landed at random on the first k of size replicas.
func landed(r *rand.Rand, n, k, size int) []int {
	counts := make([]int, size)
	for range n {
		counts[r.IntN(k)]++
	}
	return counts
}

// modelRound runs one round over counts and returns how many streams ended.
func modelRound(r *rand.Rand, counts []int, tol float64) int {
	moving := 0
	for _, i := range r.Perm(len(counts)) {
		peers := slices.Delete(slices.Clone(counts), i, i+1)
		n := rebalanceExcess(counts[i], peers, tol)
		counts[i] -= n
		moving += n
	}
	for range moving {
		counts[r.IntN(len(counts))]++
	}
	return moving
}

func withinQuarter(counts []int, total int) bool {
	even := float64(total) / float64(len(counts))
	for _, c := range counts {
		if float64(c) < 0.75*even || float64(c) > 1.25*even {
			return false
		}
	}
	return true
}

// peerServer serves handler on loopback and returns its host:port.
func peerServer(t *testing.T, handler http.HandlerFunc) string {
	t.Helper()
	ts := httptest.NewServer(handler)
	t.Cleanup(ts.Close)
	return strings.TrimPrefix(ts.URL, "http://")
}

// answering answers /peerz as a peer holding streams.
func answering(streams int, id string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/peerz" {
			http.NotFound(w, r)
			return
		}
		_ = json.NewEncoder(w).Encode(peerCount{Streams: streams, ID: id})
	}
}

// TestPeerCounts guards how peers are asked: the counts of those that
// answer; itself (its own id), a draining peer (503), one that hangs past
// the timeout, one that answers nonsense and a name that does not resolve
// are left out and counted, and the round takes no longer than the
// timeout. A name is looked up and each of its addresses asked once. A
// peer counts from the second round in a row that it answers in.
func TestPeerCounts(t *testing.T) {
	release := make(chan struct{})
	hanging := peerServer(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	t.Cleanup(func() { close(release) })
	_, okPort, _ := net.SplitHostPort(peerServer(t, answering(42, "peer-a")))
	entries := []string{
		"localhost:" + okPort, // /etc/hosts: 127.0.0.1 and maybe ::1, which refuses
		"127.0.0.1:" + okPort, // the same address again: asked once
		peerServer(t, answering(7, "peer-b")),
		peerServer(t, answering(99, "me")),
		peerServer(t, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusServiceUnavailable) }),
		peerServer(t, func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "<html>") }),
		hanging,
		"peers.invalid:8080",
	}
	polls := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "polls"}, []string{"result"})
	p := newPeerSet(entries, 2*time.Second, polls, discardLogger())
	// No DNS server in tests: names resolve through /etc/hosts or not at all.
	p.resolver = &net.Resolver{PreferGo: true, Dial: func(context.Context, string, string) (net.Conn, error) {
		return nil, errors.New("no DNS server in tests")
	}}
	for round, want := range [][]int{nil, {7, 42}} { // a peer counts from its second round
		start := time.Now()
		got := p.counts(context.Background(), "me")
		took := time.Since(start)
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Errorf("round %d: counts %v, want %v", round+1, got, want)
		}
		if took > p.timeout+time.Second {
			t.Errorf("round %d took %v, past the %v timeout", round+1, took, p.timeout)
		}
	}
	ok := counterValue(t, polls.WithLabelValues(peerOK))
	if ok != 2*3 { // peer-a, peer-b and itself, twice
		t.Errorf("ok polls %v, want 6", ok)
	}
	if got := counterValue(t, polls.WithLabelValues(peerUnready)); got != 2 {
		t.Errorf("unready polls %v, want 2", got)
	}
	// nonsense, the hanging one, the name that does not resolve, and ::1
	// when localhost has it and nothing listens there; twice.
	if got := counterValue(t, polls.WithLabelValues(peerError)); got < 2*3 || got > 2*4 {
		t.Errorf("error polls %v, want 6 to 8", got)
	}
}

// TestPeerz guards the endpoint peers ask: the open-stream count and the
// replica's id while ready, 503 while draining.
func TestPeerz(t *testing.T) {
	h := newHarness(t, newFakeStore(), nil)
	_, _ = h.dialStream(t, "u-viewer")
	_, _ = h.dialStream(t, "u-viewer")
	h.waitOpen(t, "u-viewer", 2)
	p := newPeerSet(nil, time.Second, prometheus.NewCounterVec(prometheus.CounterOpts{Name: "polls"}, []string{"result"}), discardLogger())
	addr := strings.TrimPrefix(strings.TrimSuffix(h.url, EventsPath), "http://")
	pc, err := p.ask(context.Background(), addr)
	if err != nil || pc.Streams != 2 || pc.ID != h.srv.id {
		t.Fatalf("/peerz: %+v %v, want 2 streams and id %q", pc, err, h.srv.id)
	}
	h.srv.Drain()
	if _, err := p.ask(context.Background(), addr); !errors.Is(err, errPeerUnready) {
		t.Fatalf("/peerz while draining: %v, want unready", err)
	}
}

// TestRebalanceRound guards a round in process: a replica holding 8 streams
// whose one peer holds none ends nothing in the peer's first round, then 4, each cleanly between frames after the
// frames published before, counted as rebalance; the other 4 stay open and
// get the frames published after. A draining replica does not rebalance.
func TestRebalanceRound(t *testing.T) {
	const n = 8
	peer := peerServer(t, answering(0, "peer"))
	h := newHarness(t, newFakeStore(), func(c *Config) {
		c.MaxPerUser = n
		c.Peers = []string{peer}
		c.RebalanceInterval = time.Second
		c.RebalanceTolerance = 0.1
	})
	bodies := make([]io.Reader, n)
	for i := range bodies {
		_, bodies[i] = h.dialStream(t, "u-viewer")
	}
	h.waitOpen(t, "u-viewer", n)
	for i := range 3 {
		publishAt(t, h.broker, i)
	}
	h.srv.rebalanceRound(context.Background()) // the peer's first: not counted yet
	if got := h.disconnects(t, reasonRebalance); got != 0 {
		t.Fatalf("%v streams ended in the peer's first round", got)
	}
	h.srv.rebalanceRound(context.Background()) // returns once the last was asked to end
	h.waitDisconnects(t, reasonRebalance, n/2)
	for i := 3; i < 5; i++ {
		publishAt(t, h.broker, i)
	}
	h.srv.Drain()
	h.srv.rebalanceRound(context.Background())
	if got := h.disconnects(t, reasonRebalance); got != n/2 {
		t.Fatalf("a draining replica rebalanced: %v ended", got)
	}
	_ = h.broker.Close() // ends the others, cleanly, as shutdown
	byEvents := map[int]int{}
	for i, body := range bodies {
		rest, err := readToEnd(t, body)
		if err != nil {
			t.Fatalf("stream %d cut instead of ended: %v (read %q)", i, err, rest)
		}
		fs, err := ssetest.ParseFrames(rest)
		if err != nil {
			t.Fatalf("stream %d did not end between frames: %v (%q)", i, err, rest)
		}
		byEvents[countEvents(fs)]++
	}
	if byEvents[3] != n/2 || byEvents[5] != n/2 {
		t.Fatalf("streams by events received: %v, want %d ended by the rebalance with 3 and %d open to the end with 5", byEvents, n/2, n/2)
	}
	h.waitDisconnects(t, fanout.ReasonShutdown, n/2)
}

func countEvents(fs []ssetest.Frame) int {
	n := 0
	for _, f := range fs {
		if f.Event == "formed" {
			n++
		}
	}
	return n
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// peerSet asks the relay's peers for their open-stream counts: each entry
// is host:port, its name looked up again every round (a headless Service's
// name gives every ready pod, so pods come and go with the endpoints), each
// address asked GET /peerz in parallel. A round costs one look-up per entry
// and one small request per peer, over a connection kept between rounds.
//
// A peer counts from the second round in a row it answers in (by its id):
// in the chart's rollout the new pods are ready a few seconds before the old
// ones are deleted, and an old pod that rebalanced towards them then would
// send viewers to other old pods too, which move again when those drain.
// One interval (30 s) outlasts that overlap (minReadySeconds and the preStop
// sleep, 20 s); a scale-up is rebalanced one interval later.
type peerSet struct {
	settled  map[string]bool // the ids that answered in the last round
	entries  []string
	timeout  time.Duration
	client   *http.Client
	resolver *net.Resolver
	polls    *prometheus.CounterVec // by result: ok, unready, error
	log      *slog.Logger
}

// maxPeerTimeout bounds a round's look-ups and requests: a peer slower than
// this (or than a quarter of the interval) is left out of the round.
const maxPeerTimeout = 2 * time.Second

func newPeerSet(entries []string, interval time.Duration, polls *prometheus.CounterVec, log *slog.Logger) *peerSet {
	return &peerSet{
		entries: entries,
		timeout: min(maxPeerTimeout, interval/4),
		client: &http.Client{Transport: &http.Transport{
			Proxy:               nil, // peers are in the cluster, never behind HTTP_PROXY
			MaxIdleConnsPerHost: 1,
			IdleConnTimeout:     2 * interval, // kept from one round to the next
		}},
		resolver: net.DefaultResolver,
		polls:    polls,
		log:      log,
	}
}

// peer results, the labels of relay_rebalance_peer_polls_total.
const (
	peerOK      = "ok"
	peerUnready = "unready" // answered 503: draining, or not ready
	peerError   = "error"   // no address, no answer in time, or a bad one
)

// counts returns the open-stream counts of the peers that answered in
// time, in this round and the last, leaving out the one whose id is self. A
// peer that does not answer is left out, logged and counted; nothing waits
// longer than the timeout. Rounds must not overlap.
func (p *peerSet) counts(ctx context.Context, self string) []int {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	addrs := p.addrs(ctx)
	answers := make([]*peerCount, len(addrs))
	var wg sync.WaitGroup
	for i, addr := range addrs {
		wg.Go(func() {
			pc, err := p.ask(ctx, addr)
			switch {
			case errors.Is(err, errPeerUnready):
				p.polls.WithLabelValues(peerUnready).Inc()
				p.log.Debug("peer not ready; left out", "peer", addr)
			case err != nil:
				p.polls.WithLabelValues(peerError).Inc()
				p.log.Warn("peer did not answer; left out", "peer", addr, "err", err)
			default:
				p.polls.WithLabelValues(peerOK).Inc()
				answers[i] = pc
			}
		})
	}
	wg.Wait()
	var out []int
	answered := map[string]bool{}
	for _, pc := range answers {
		if pc == nil || pc.ID == self {
			continue
		}
		if p.settled[pc.ID] {
			out = append(out, pc.Streams)
		}
		answered[pc.ID] = true
	}
	p.settled = answered
	return out
}

// addrs looks up each entry's host (an IP address is its own answer) and
// returns every address with the entry's port, once.
func (p *peerSet) addrs(ctx context.Context) []string {
	var out []string
	seen := map[string]bool{}
	for _, e := range p.entries {
		host, port, _ := net.SplitHostPort(e) // validated by internal/config
		ips, err := p.resolver.LookupHost(ctx, host)
		if err != nil {
			p.polls.WithLabelValues(peerError).Inc()
			p.log.Warn("peer look-up failed; left out", "peer", e, "err", err)
			continue
		}
		for _, ip := range ips {
			if a := net.JoinHostPort(ip, port); !seen[a] {
				seen[a] = true
				out = append(out, a)
			}
		}
	}
	return out
}

var errPeerUnready = errors.New("peer not ready")

// ask asks one peer for its count.
func (p *peerSet) ask(ctx context.Context, addr string) (*peerCount, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/peerz", nil)
	if err != nil {
		return nil, err
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<10))
	switch {
	case err != nil:
		return nil, err
	case resp.StatusCode == http.StatusServiceUnavailable:
		return nil, errPeerUnready
	case resp.StatusCode != http.StatusOK:
		return nil, fmt.Errorf("status %d", resp.StatusCode)
	}
	var pc peerCount
	if err := json.Unmarshal(body, &pc); err != nil || pc.Streams < 0 || pc.ID == "" {
		return nil, fmt.Errorf("not a peer's answer: %q", body)
	}
	return &pc, nil
}

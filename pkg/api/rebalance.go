package api

import (
	"context"
	"math"
	"net/http"
	"time"

	"github.com/gin-gonic/gin"
)

// A load balancer that picks a replica at random (kube-proxy) leaves the
// viewers of a scaled-up Deployment on the old replicas, and even once every
// viewer has reconnected (a stream lifetime) their counts are only as even
// as chance makes them: 150 viewers over 5 replicas all within ±25% of even
// in 55% of draws. So each replica, given its peers (Config.Peers), compares
// its open streams with theirs every Config.RebalanceInterval and ends those
// it holds above the average, spread over the first half of the interval;
// their viewers resume with Last-Event-ID through the Service and land at
// random again, and rounds repeat until every replica is within the
// tolerance (rebalanceExcess; TestRebalanceModel for how many rounds).

// peerCount is what /peerz answers: the replica's open streams, and its
// id, so that a replica that finds itself among its peers (a headless
// Service lists every ready pod) leaves itself out.
type peerCount struct {
	Streams int    `json:"streams"`
	ID      string `json:"id"`
}

// peerz answers the open-stream count to the relay's peers, or 503 while
// this replica is not ready (draining, Kafka, the database): such a
// replica gets no viewers from the Service, so its streams are not part of
// the average the others move viewers towards.
func (s *Server) peerz(c *gin.Context) {
	if err := s.readiness(c.Request.Context()); err != nil {
		c.Data(http.StatusServiceUnavailable, "application/json", detail(err.Error()))
		return
	}
	c.JSON(http.StatusOK, peerCount{Streams: s.streams.count(), ID: s.id})
}

// Rebalance runs rounds every Config.RebalanceInterval until ctx ends
// (the relay shutting down); without peers it returns at once.
func (s *Server) Rebalance(ctx context.Context) {
	if len(s.cfg.Peers) == 0 {
		return
	}
	s.log.Info("rebalancing with peers", "peers", s.cfg.Peers, "interval", s.cfg.RebalanceInterval.String(), "tolerance", s.cfg.RebalanceTolerance)
	tick := time.NewTicker(s.cfg.RebalanceInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			s.rebalanceRound(ctx)
		}
	}
}

// rebalanceRound counts the peers' streams and its own, and ends its
// excess (rebalanceExcess), chosen at random, spread over half the
// interval: the other half lets their viewers land before the next count.
// A replica that is not ready (its viewers' reconnects could be refused
// everywhere, the database down) or draining does nothing.
func (s *Server) rebalanceRound(ctx context.Context) {
	if s.draining.Load() || s.readiness(ctx) != nil {
		return
	}
	peers := s.peers.counts(ctx, s.id)
	own := s.streams.count()
	n := rebalanceExcess(own, peers, s.cfg.RebalanceTolerance)
	if n == 0 {
		return
	}
	window := s.cfg.RebalanceInterval / 2
	s.log.Info("ending streams above the peers' average", "streams", own, "peers", peers, "ending", n, "window", window.String())
	s.runSpread(ctx, s.spreadPlan(n, window), reasonRebalance)
}

// rebalanceExcess is how many of its own streams a replica ends, given the
// open-stream counts of the other ready replicas: none when it holds no
// more than the average rounded up; else, when it holds more than
// average×(1+tolerance), or a peer fewer than average×(1−tolerance), those
// above the average rounded up. Only replicas above the average end
// streams, so none ends more than its share of the surplus; rounding up
// keeps a replica one stream above an uneven average from ending it
// (with 3 viewers on 2 replicas, one holds 2 for good); the second
// condition lets an empty new replica be filled when the old ones are
// each only a little above the average.
func rebalanceExcess(own int, peers []int, tolerance float64) int {
	total, least := own, own
	for _, c := range peers {
		total += c
		least = min(least, c)
	}
	avg := float64(total) / float64(len(peers)+1)
	ceil := int(math.Ceil(avg))
	if own <= ceil {
		return 0
	}
	if float64(own) > avg*(1+tolerance) || float64(least) < avg*(1-tolerance) {
		return own - ceil
	}
	return 0
}

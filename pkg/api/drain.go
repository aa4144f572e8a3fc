package api

import (
	"context"
	"math/rand/v2"
	"time"

	"github.com/decnet/identity-relay/pkg/fanout"
)

// A replica that ends all its streams at once sends all its viewers to the
// others in the same second. In a rolling update (README, deploy/helm) it
// is better to end them one by one over a window: the reconnects are spread,
// and they come once every old replica has left the Service, so that each
// viewer lands on a new replica and moves once. Rebalancing (rebalance.go)
// ends a replica's excess streams the same way, over half its interval.

// Spread ends the open streams one by one, evenly over window, in a random
// order (spreadPlan), each between frames and counted as shutdown; the
// streams keep their live frames until their turn. It returns once the last
// has been asked to end, or when ctx ends. Call it after Drain, so that no
// viewer is admitted meanwhile; a stream that slipped in after the plan was
// made ends when the broker is closed.
func (s *Server) Spread(ctx context.Context, window time.Duration) {
	plan := s.spreadPlan(-1, window)
	s.log.Info("ending the open streams spread over a window", "streams", len(plan), "window", window.String())
	s.runSpread(ctx, plan, fanout.ReasonShutdown)
}

// spreadEnd is one stream's turn: at this long after the spread began.
type spreadEnd struct {
	v  *viewer
	at time.Duration
}

// spreadPlan picks n open streams at random (every one when n < 0 or
// more than are open) and gives each its turn over spreadSchedule's times.
func (s *Server) spreadPlan(n int, window time.Duration) []spreadEnd {
	vs := s.streams.viewers()
	rand.Shuffle(len(vs), func(i, j int) { vs[i], vs[j] = vs[j], vs[i] })
	if n >= 0 && n < len(vs) {
		vs = vs[:n]
	}
	at := spreadSchedule(len(vs), window, rand.Float64)
	plan := make([]spreadEnd, len(vs))
	for i, v := range vs {
		plan[i] = spreadEnd{v, at[i]}
	}
	return plan
}

// runSpread ends each stream of plan at its turn, counted as reason.
func (s *Server) runSpread(ctx context.Context, plan []spreadEnd, reason fanout.Reason) {
	start := time.Now()
	for _, e := range plan {
		if wait := e.at - time.Since(start); wait > 0 {
			select {
			case <-time.After(wait):
			case <-ctx.Done():
				return
			}
		}
		e.v.endFor(reason)
	}
}

// spreadSchedule returns, in increasing order, the times at which n streams
// end over window: the k-th at window×(k+u)/n, u drawn from [0, 1) for each.
// One end falls in each n-th of the window, so every second of it carries
// the same share of the reconnects (to within one stream), jittered within
// its slot so that replicas draining together do not end streams in step.
func spreadSchedule(n int, window time.Duration, u func() float64) []time.Duration {
	at := make([]time.Duration, n)
	for k := range at {
		at[k] = time.Duration((float64(k) + u()) * float64(window) / float64(n))
	}
	return at
}

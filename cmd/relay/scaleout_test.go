package main

import (
	"errors"
	"io"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/decnet/identity-relay/internal/relaytest"
	"github.com/decnet/identity-relay/internal/testenv"
)

// Three replicas behave as one service: viewers spread across them each get
// every event of every partition in order; SIGTERM on one replica ends its
// viewers' streams cleanly within the drain while the others miss nothing.
func TestScaleOutThreeReplicas(t *testing.T) {
	const perReplica, partitions, first, second = 4, 4, 120, 120
	env, topic := relaytest.TopicEnv(t, nil)
	cl := relaytest.Producer(t, testenv.KafkaBrokers(t))
	relaytest.CreateTopic(t, cl, topic, partitions)
	replicas := []*relaytest.Process{relaytest.Start(t, env), relaytest.Start(t, env), relaytest.Start(t, env)}
	token := relaytest.ViewerToken(t)
	type viewer struct {
		s *relaytest.Stream
		c *relaytest.Collector
	}
	var byReplica [][]viewer
	for _, r := range replicas {
		r.WaitReady(t)
		var vs []viewer
		for range perReplica {
			s := relaytest.Dial(t, r.URL, token)
			s.ExpectStart(t)
			vs = append(vs, viewer{s, relaytest.NewCollector(t)})
		}
		byReplica = append(byReplica, vs)
	}

	relaytest.ProduceSeq(t, relaytest.Producer(t, testenv.KafkaBrokers(t)), topic, partitions, 0, first)
	for _, vs := range byReplica {
		for _, v := range vs {
			for len(v.c.Seen) < first {
				v.c.Take(v.s, 15*time.Second)
			}
			v.c.Complete(first)
		}
	}

	// Drain replica 0 while events keep flowing.
	drained := replicas[0]
	start := time.Now()
	drained.Signal(syscall.SIGTERM)
	relaytest.ProduceSeq(t, relaytest.Producer(t, testenv.KafkaBrokers(t)), topic, partitions, first, first+second)
	for i, v := range byReplica[0] {
		for {
			f, err := v.s.NextOrEnd(15 * time.Second)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("drained viewer %d: %v (partial frame %q)", i, err, f)
			}
			if !strings.HasPrefix(f, ":") {
				v.c.TakeFrame(f) // frames queued before the drain are still whole and in order
			}
		}
	}
	// Env sets RELAY_SHUTDOWN_TIMEOUT=10s: the drain must finish inside it.
	if code := drained.Wait(t, 10*time.Second-time.Since(start)); code != 0 {
		t.Fatalf("drained replica exited %d", code)
	}
	t.Logf("drained replica's streams ended and it exited %v after SIGTERM", time.Since(start).Round(time.Millisecond))
	for _, vs := range byReplica[1:] {
		for _, v := range vs {
			for len(v.c.Seen) < first+second {
				v.c.Take(v.s, 15*time.Second)
			}
			v.c.Complete(first + second)
		}
	}
}

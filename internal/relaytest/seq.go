package relaytest

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/decnet/identity-relay/internal/testenv"
)

// SeqEvent is what the resume tests publish: a sequence number per partition.
type SeqEvent struct {
	Partition int32 `json:"p"`
	Seq       int   `json:"seq"`
}

// TopicEnv isolates a test on its own topic prefix against the real broker:
// it returns the relay's settings (Env plus extra) and a topic they read.
func TopicEnv(t testing.TB, extra map[string]string) (env map[string]string, topic string) {
	t.Helper()
	prefix := "identity.t" + RandomID(4)
	env = Env(t, testenv.KafkaBrokers(t))
	env["RELAY_KAFKA_TOPICS_REGEX"] = "^" + strings.ReplaceAll(prefix, ".", `\.`) + `\..+`
	for k, v := range extra {
		env[k] = v
	}
	return env, prefix + ".seq"
}

// StartOnTopic creates topic with partitions, starts a relay with env and
// waits until it is ready; it returns the relay and a producer.
func StartOnTopic(t testing.TB, env map[string]string, topic string, partitions int32) (*Process, *kgo.Client) {
	t.Helper()
	cl := Producer(t, testenv.KafkaBrokers(t))
	CreateTopic(t, cl, topic, partitions)
	r := Start(t, env)
	r.WaitReady(t)
	return r, cl
}

// ViewerToken adds a viewer to the test database and returns a token for it.
func ViewerToken(t testing.TB) string {
	t.Helper()
	return Token(t, Secret, AddUser(t, DB(t), "viewer"))
}

// SeqValue is the record value of seq on partition p.
func SeqValue(p int32, seq int) string { return fmt.Sprintf(`{"p":%d,"seq":%d}`, p, seq) }

// ProduceSeq produces seqs [from, to) with cl, round-robin over partitions.
func ProduceSeq(t testing.TB, cl *kgo.Client, topic string, partitions int32, from, to int) {
	t.Helper()
	for i := from; i < to; i++ {
		p := int32(i) % partitions
		Produce(t, cl, topic, p, SeqValue(p, i))
	}
}

// ProducePaced produces seqs [from, to) as ProduceSeq does, one every
// pause, in a goroutine of its own; the channel gets its first error, or
// nil once the last is acknowledged.
func ProducePaced(cl *kgo.Client, topic string, partitions int32, from, to int, pause time.Duration) <-chan error {
	produced := make(chan error, 1)
	go func() {
		for i := from; i < to; i++ {
			p := int32(i) % partitions
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			err := cl.ProduceSync(ctx, &kgo.Record{Topic: topic, Partition: p, Value: []byte(SeqValue(p, i))}).FirstErr()
			cancel()
			if err != nil {
				produced <- err
				return
			}
			time.Sleep(pause)
		}
		produced <- nil
	}()
	return produced
}

// Collector keeps what a viewer received, checking per-partition order and
// duplicates: the exactly-once check of every resume test, whatever the
// client (a Go stream or a browser's EventSource).
type Collector struct {
	t      testing.TB
	Seen   map[int]bool // seqs received
	lastBy map[int32]int
	LastID string // id of the last event received
}

// NewCollector returns an empty Collector failing t.
func NewCollector(t testing.TB) *Collector {
	return &Collector{t: t, Seen: map[int]bool{}, lastBy: map[int32]int{}}
}

// Take reads one event frame from s and records it.
func (c *Collector) Take(s *Stream, timeout time.Duration) {
	c.t.Helper()
	c.TakeFrame(s.NextEvent(c.t, timeout))
}

// TakeFrame records one event frame.
func (c *Collector) TakeFrame(frame string) {
	c.t.Helper()
	id, rest := SplitID(c.t, frame)
	_, data, ok := strings.Cut(rest, "\ndata: ")
	if !ok {
		c.t.Fatalf("frame without data: %q", rest)
	}
	c.Add(id, strings.TrimSuffix(data, "\n\n"))
}

// Add records one event by its id and data, failing on a seq received
// twice or out of order within its partition.
func (c *Collector) Add(id, data string) {
	c.t.Helper()
	var env struct {
		Payload SeqEvent `json:"payload"`
	}
	if err := json.Unmarshal([]byte(data), &env); err != nil {
		c.t.Fatalf("data %q: %v", data, err)
	}
	ev := env.Payload
	if c.Seen[ev.Seq] {
		c.t.Fatalf("seq %d delivered twice", ev.Seq)
	}
	if last, ok := c.lastBy[ev.Partition]; ok && ev.Seq <= last {
		c.t.Fatalf("partition %d: seq %d after %d", ev.Partition, ev.Seq, last)
	}
	c.Seen[ev.Seq], c.lastBy[ev.Partition], c.LastID = true, ev.Seq, id
}

// Complete fails unless every seq in [0, n) was received.
func (c *Collector) Complete(n int) {
	c.t.Helper()
	for i := range n {
		if !c.Seen[i] {
			c.t.Fatalf("seq %d never delivered (%d of %d seen)", i, len(c.Seen), n)
		}
	}
}

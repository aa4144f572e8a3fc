package consumer

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/decnet/identity-relay/pkg/sse"
)

// Helpers of the kfake tests: an in-process broker, a producer, a recording
// Sink and a running Consumer. They use of fanout only Event (and Range, for
// History), so a rename in fanout touches them in few places.

// hangBound only bounds a hang: a loaded 2-core machine may be slow, never this slow.
const hangBound = 60 * time.Second

// newKFake starts an in-process broker with the topics, each of partitions
// partitions, and closes it at the end of the test.
func newKFake(t *testing.T, partitions int32, topics ...string) (*kfake.Cluster, []string) {
	t.Helper()
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(partitions, topics...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c, c.ListenAddrs()
}

// topicID is the topic's current Kafka topic ID.
func topicID(t *testing.T, c *kfake.Cluster, topic string) [16]byte {
	t.Helper()
	info := c.TopicInfo(topic)
	if info == nil {
		t.Fatalf("topic %s does not exist", topic)
	}
	return info.TopicID
}

// producer writes records to the partition each names.
type producer struct {
	t  *testing.T
	cl *kgo.Client
}

func newProducer(t *testing.T, brokers []string) *producer {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.RecordPartitioner(kgo.ManualPartitioner()),
		kgo.DefaultProduceTopic(""))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return &producer{t, cl}
}

// produce writes values to topic/partition, in order.
func (p *producer) produce(topic string, partition int32, values ...[]byte) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), hangBound)
	defer cancel()
	recs := make([]*kgo.Record, len(values))
	for i, v := range values {
		recs[i] = &kgo.Record{Topic: topic, Partition: partition, Value: v}
	}
	if err := p.cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
		p.t.Fatalf("produce to %s/%d: %v", topic, partition, err)
	}
}

// seqValues returns n JSON objects naming their topic, partition and sequence
// number from first on, so that every record is told apart by its value.
func seqValues(topic string, partition int32, first, n int) [][]byte {
	out := make([][]byte, n)
	for i := range out {
		out[i] = fmt.Appendf(nil, `{"t":%q,"p":%d,"seq":%d}`, topic, partition, first+i)
	}
	return out
}

// emptyCall is one call of Sink.Empty.
type emptyCall struct {
	topic     string
	topicID   [16]byte
	partition int32
	next      int64
}

// recSink records what the consumer hands it; safe for concurrent use.
// behind, when set, answers Behind from the number of events published so far.
type recSink struct {
	mu          sync.Mutex
	events      []sse.Event
	empties     []emptyCall
	behind      func(published int) bool
	behindCalls int
}

func (s *recSink) Publish(ev sse.Event) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.events = append(s.events, ev)
	return nil
}

func (s *recSink) Behind() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.behindCalls++
	return s.behind != nil && s.behind(len(s.events))
}

func (s *recSink) Empty(topic string, topicID [16]byte, partition int32, next int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.empties = append(s.empties, emptyCall{topic, topicID, partition, next})
}

func (s *recSink) got() ([]sse.Event, []emptyCall) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]sse.Event(nil), s.events...), append([]emptyCall(nil), s.empties...)
}

// waitEvents waits until cond holds of the events published so far and
// returns them; it fails the test after hangBound.
func (s *recSink) waitEvents(t *testing.T, what string, cond func([]sse.Event) bool) []sse.Event {
	t.Helper()
	deadline := time.Now().Add(hangBound)
	for {
		evs, _ := s.got()
		if cond(evs) {
			return evs
		}
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s; got %d events: %s", hangBound, what, len(evs), describe(evs))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitCount waits for at least n events.
func (s *recSink) waitCount(t *testing.T, n int) []sse.Event {
	t.Helper()
	return s.waitEvents(t, fmt.Sprintf("%d events", n), func(evs []sse.Event) bool { return len(evs) >= n })
}

// describe lists events as topic/partition@offset, b for backfill.
func describe(evs []sse.Event) string {
	s := ""
	for _, ev := range evs {
		b := ""
		if ev.Backfill {
			b = "b"
		}
		s += fmt.Sprintf("%s/%d@%d%s ", ev.Topic, ev.Partition, ev.Offset, b)
	}
	return s
}

// tp names a partition in the tests.
type tp struct {
	topic     string
	partition int32
}

// byPartition splits events per partition, each in the order published.
func byPartition(evs []sse.Event) map[tp][]sse.Event {
	out := map[tp][]sse.Event{}
	for _, ev := range evs {
		k := tp{ev.Topic, ev.Partition}
		out[k] = append(out[k], ev)
	}
	return out
}

// runConsumer starts cfg's consumer on sink with a registry of its own and
// stops it at the end of the test, failing if Run errs or does not return.
func runConsumer(t *testing.T, cfg Config, sink Sink) (*Consumer, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	cfg.Registerer = reg
	if cfg.TopicsRegex == "" {
		cfg.TopicsRegex = `^identity\..+`
	}
	if cfg.MaxRecordBytes == 0 {
		cfg.MaxRecordBytes = 1 << 20
	}
	c, err := New(cfg, sink)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(hangBound):
			t.Errorf("Run did not return within %v of its context ending", hangBound)
		}
	})
	return c, reg
}

// metricValue reads a counter or gauge from reg: the sum over the series
// whose labels include labels (name=value pairs); 0 when there is none.
func metricValue(t *testing.T, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if hasLabels(m, labels) {
				sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
			}
		}
	}
	return sum
}

func hasLabels(m *dto.Metric, labels []string) bool {
	for i := 0; i+1 < len(labels); i += 2 {
		found := false
		for _, lp := range m.GetLabel() {
			if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
				found = true
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// holdFetches holds the first Fetch request the broker gets until release
// is called (or the test ends); held is closed once it is held.
func holdFetches(t *testing.T, c *kfake.Cluster) (held <-chan struct{}, release func()) {
	fired, unblock := make(chan struct{}), make(chan struct{})
	var once, relOnce sync.Once
	c.ControlKey(int16(kmsg.Fetch), func(kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		first := false
		once.Do(func() { first = true })
		if first {
			close(fired)
			c.SleepControl(func() { <-unblock })
		}
		return nil, nil, false
	})
	release = func() { relOnce.Do(func() { close(unblock) }) }
	t.Cleanup(release)
	return fired, release
}

// waitFor polls cond until it holds, failing the test after hangBound.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(hangBound)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s", hangBound, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

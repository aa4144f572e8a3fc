//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
)

// producer writes the tool's records: the publisher's envelope around a
// payload that leads with what the viewers read back,
//
//	{"run":"<run id>","part":P,"seq":N,"sent_ns":T,"identity_uuid":"...","pad":"xxxx"}
//
// seq counts per partition from 0 (-1 marks a priming record), sent_ns is
// the wall clock just before the record is handed to the client, and pad
// makes the whole record value --value-bytes long.
type producer struct {
	cl         *kgo.Client
	topic      string
	event      string
	parts      int
	valueBytes int
	runID      string
	seq        []int64
	next       int // partition of the next record, round robin
	sent       int64
	acked      atomic.Int64
	failed     atomic.Int64
	lastErr    atomic.Value
	headers    []kgo.RecordHeader // on every record
}

func newProducer(cfg *config, runID string) (*producer, error) {
	cl, err := kgo.NewClient(
		kgo.SeedBrokers(cfg.Brokers...),
		kgo.RecordPartitioner(kgo.ManualPartitioner()),
		kgo.ProducerLinger(cfg.Linger),
		kgo.MaxBufferedRecords(max(10000, cfg.Burst+cfg.Partitions)),
		kgo.ProducerBatchMaxBytes(1<<20),
		kgo.RecordDeliveryTimeout(30*time.Second),
		kgo.ClientID("relay-load"),
	)
	if err != nil {
		return nil, err
	}
	p := &producer{cl: cl, topic: cfg.Topic, event: eventName(cfg.Topic), valueBytes: cfg.ValueBytes, runID: runID}
	if cfg.Protocol == protoCentrifugo {
		// Centrifugo's Kafka consumer in publication data mode publishes
		// the value as is to the channels this header names.
		p.headers = []kgo.RecordHeader{{Key: centrifugoChannelsHeader, Value: []byte(centrifugoChannel)}}
	}
	return p, nil
}

func eventName(topic string) string {
	if n, ok := strings.CutPrefix(topic, "identity."); ok && n != "" {
		return n
	}
	return topic
}

// ensureTopic creates the topic with the wanted partitions when it does not
// exist and returns the number of partitions it has.
func (p *producer) ensureTopic(ctx context.Context, want int) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	adm := kadm.NewClient(p.cl)
	resp, err := adm.CreateTopic(ctx, int32(want), 1, nil, p.topic)
	if err == nil {
		err = resp.Err
	}
	if err != nil && !errors.Is(err, kerr.TopicAlreadyExists) {
		return 0, fmt.Errorf("create topic %s: %w", p.topic, err)
	}
	for {
		md, err := adm.Metadata(ctx, p.topic)
		if err == nil {
			if d, ok := md.Topics[p.topic]; ok && d.Err == nil && len(d.Partitions) > 0 {
				ready := true
				for _, pd := range d.Partitions {
					if pd.Err != nil || pd.Leader < 0 {
						ready = false
					}
				}
				if ready {
					p.parts = len(d.Partitions)
					p.seq = make([]int64, p.parts)
					return p.parts, nil
				}
			}
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("topic %s not ready: %w", p.topic, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (p *producer) value(part int, seq int64, now time.Time) []byte {
	b := make([]byte, 0, max(p.valueBytes, 320))
	b = append(b, `{"v":1,"id":"`...)
	b = strconv.AppendUint(b, uint64(now.UnixNano()), 16)
	b = append(b, `","topic":"`...)
	b = append(b, p.topic...)
	b = append(b, `","type":"`...)
	b = append(b, p.event...)
	b = append(b, `","ts":`...)
	b = strconv.AppendFloat(b, float64(now.UnixMilli())/1000, 'f', 3, 64)
	b = append(b, `,"payload":{"run":"`...)
	b = append(b, p.runID...)
	b = append(b, `","part":`...)
	b = strconv.AppendInt(b, int64(part), 10)
	b = append(b, `,"seq":`...)
	b = strconv.AppendInt(b, seq, 10)
	b = append(b, `,"sent_ns":`...)
	b = strconv.AppendInt(b, now.UnixNano(), 10)
	b = append(b, `,"identity_uuid":"`...)
	b = fmt.Appendf(b, "%08x-0000-4000-8000-%012x", part, seq&0xffffffffffff)
	b = append(b, `","pad":"`...)
	const tail = `"}}`
	for len(b)+len(tail) < p.valueBytes {
		b = append(b, 'x')
	}
	return append(b, tail...)
}

// send hands one record to the client; the result is counted when acked.
func (p *producer) send(ctx context.Context, prime bool) {
	part := p.next
	p.next = (p.next + 1) % p.parts
	seq := int64(-1)
	if !prime {
		seq = p.seq[part]
		p.seq[part]++
	}
	now := time.Now()
	r := &kgo.Record{Topic: p.topic, Partition: int32(part), Value: p.value(part, seq, now), Headers: p.headers}
	p.sent++
	p.cl.Produce(ctx, r, func(_ *kgo.Record, err error) {
		if err != nil {
			p.failed.Add(1)
			p.lastErr.Store(err.Error())
			return
		}
		p.acked.Add(1)
	})
}

// prime sends one priming record to every partition.
func (p *producer) prime(ctx context.Context) {
	for range p.parts {
		p.send(ctx, true)
	}
}

// paceResult says how well the pacing held.
type paceResult struct {
	Events     int64   `json:"events"`
	Secs       float64 `json:"secs"`
	Rate       float64 `json:"achieved_rate"`
	MaxLateMs  float64 `json:"max_late_ms"` // worst delay of a record behind its due time
	FirstNs    int64   `json:"first_ns"`
	LastNs     int64   `json:"last_ns"`
	AckedAll   bool    `json:"acked_all"`
	Failed     int64   `json:"failed"`
	FailReason string  `json:"fail_reason,omitempty"`
}

// runRate sends rate records a second, record i due at start + i/rate,
// until end. After a late wake-up it sends every record already due, so
// the count follows the clock, not the sleeps.
func (p *producer) runRate(ctx context.Context, rate float64, end time.Time) paceResult {
	start := time.Now()
	res := paceResult{FirstNs: start.UnixNano()}
	var maxLate time.Duration
	for i := int64(0); ; i++ {
		due := start.Add(time.Duration(float64(i) / rate * float64(time.Second)))
		if !due.Before(end) || ctx.Err() != nil {
			break
		}
		if d := time.Until(due); d > 0 {
			time.Sleep(d)
		} else if -d > maxLate {
			maxLate = -d
		}
		p.send(ctx, false)
		res.Events++
	}
	res.LastNs = time.Now().UnixNano()
	res.Secs = float64(res.LastNs-res.FirstNs) / 1e9
	if res.Events > 1 {
		// Rate over the spans between the first and the last record.
		res.Rate = float64(res.Events-1) / res.Secs
	}
	res.MaxLateMs = float64(maxLate) / 1e6
	return res
}

// runBurst sends n records as fast as the client takes them.
func (p *producer) runBurst(ctx context.Context, n int) paceResult {
	start := time.Now()
	res := paceResult{FirstNs: start.UnixNano()}
	for range n {
		if ctx.Err() != nil {
			break
		}
		p.send(ctx, false)
		res.Events++
	}
	res.LastNs = time.Now().UnixNano()
	res.Secs = float64(res.LastNs-res.FirstNs) / 1e9
	if res.Secs > 0 {
		res.Rate = float64(res.Events) / res.Secs
	}
	return res
}

// flush waits for every record's ack, at most 30 s.
func (p *producer) flush(ctx context.Context, res *paceResult) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	_ = p.cl.Flush(ctx)
	res.Failed = p.failed.Load()
	res.AckedAll = p.acked.Load()+res.Failed == p.sent && res.Failed == 0
	if s, ok := p.lastErr.Load().(string); ok {
		res.FailReason = s
	}
}

// expect is, per partition, how many (non-priming) records were sent.
func (p *producer) expect() []int64 { return append([]int64(nil), p.seq...) }

func (p *producer) close() { p.cl.Close() }

func (p *producer) deleteTopic() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := kadm.NewClient(p.cl).DeleteTopic(ctx, p.topic)
	if err == nil {
		err = resp.Err
	}
	return err
}

// runKFake serves an in-process Kafka (franz-go's kfake) on 127.0.0.1 until
// ctx ends or the time limit passes, with the topic seeded. It prints the
// address on its first line of stdout.
func runKFake(ctx context.Context, cfg *config, stdout io.Writer) error {
	c, err := kfake.NewCluster(
		kfake.NumBrokers(1),
		kfake.Ports(cfg.KFakePort),
		kfake.SeedTopics(int32(cfg.Partitions), cfg.Topic),
		kfake.AllowAutoTopicCreation(),
		kfake.DefaultNumPartitions(cfg.Partitions),
	)
	if err != nil {
		return fmt.Errorf("kfake: %w", err)
	}
	defer c.Close()
	fmt.Fprintf(stdout, "%s\n", strings.Join(c.ListenAddrs(), ","))
	if f, ok := stdout.(interface{ Sync() error }); ok {
		_ = f.Sync()
	}
	select {
	case <-ctx.Done():
	case <-time.After(cfg.KFakeFor):
	}
	return nil
}

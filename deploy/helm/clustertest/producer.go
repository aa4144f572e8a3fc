package clustertest

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// Partition is one partition the producer writes to.
type Partition struct {
	Topic string
	Part  int32
}

// Producer writes the records of one run, numbered from 0, at a steady rate,
// to its partitions in turn, and keeps the numbers Kafka acknowledged. Records
// are the publishers' envelope; the payload carries the run, the partition
// and the number, which the viewers read back.
type Producer struct {
	cl    *kgo.Client
	run   string
	parts []Partition
	logf  func(format string, args ...any)

	mu     sync.Mutex
	acked  []int64
	failed int
	wg     sync.WaitGroup
	sent   int64
}

// NewProducer returns a producer of run on cl (a client with a manual
// partitioner) over parts; logf receives its progress.
func NewProducer(cl *kgo.Client, run string, parts []Partition, logf func(string, ...any)) *Producer {
	return &Producer{cl: cl, run: run, parts: parts, logf: logf}
}

// Run produces rate records a second until ctx ends, then waits (at most
// flush) for the outstanding acknowledgements. Record i is due at
// start + i/rate; after a late wake-up every record due is sent at once.
// Every 5 s it logs what was sent and what Kafka acknowledged so far.
func (p *Producer) Run(ctx context.Context, rate float64, flush time.Duration) {
	start := time.Now()
	nextLog := start.Add(5 * time.Second)
	for ctx.Err() == nil {
		due := int64(time.Since(start).Seconds()*rate) + 1
		for p.sent < due {
			p.send(p.sent)
			p.mu.Lock()
			p.sent++
			p.mu.Unlock()
		}
		if time.Now().After(nextLog) {
			p.logProgress(start)
			nextLog = nextLog.Add(5 * time.Second)
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Until(start.Add(time.Duration(float64(p.sent) / rate * float64(time.Second))))):
		}
	}
	done := make(chan struct{})
	go func() { p.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(flush):
		p.logf("producer: %v after the end, acknowledgements still outstanding", flush)
	}
	p.logProgress(start)
}

func (p *Producer) logProgress(start time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.logf("producer: %5.1fs sent %d, Kafka acknowledged %d, failed %d", time.Since(start).Seconds(), p.sent, len(p.acked), p.failed)
}

func (p *Producer) send(seq int64) {
	pt := p.parts[int(seq)%len(p.parts)]
	name := pt.Topic[len("identity."):]
	value := fmt.Sprintf(`{"v":1,"id":"%s-%d","topic":%q,"type":%q,"ts":%.3f,"payload":{"run":%q,"part":%d,"seq":%d,"identity_uuid":"id-%s-%d"}}`,
		p.run, seq, pt.Topic, name, float64(time.Now().UnixMilli())/1000, p.run, pt.Part, seq, p.run, seq)
	p.wg.Add(1)
	// A background context: a record handed to the client is awaited to its
	// end, so that what Kafka acknowledged is known exactly.
	p.cl.Produce(context.Background(), &kgo.Record{Topic: pt.Topic, Partition: pt.Part, Value: []byte(value)}, func(_ *kgo.Record, err error) {
		p.mu.Lock()
		if err == nil {
			p.acked = append(p.acked, seq)
		} else {
			p.failed++
		}
		p.mu.Unlock()
		p.wg.Done()
	})
}

// Acked returns the numbers Kafka acknowledged.
func (p *Producer) Acked() []int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]int64(nil), p.acked...)
}

// Sent returns how many records were handed to the client.
func (p *Producer) Sent() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sent
}

// Package consumer reads every partition of every Kafka topic matching a
// pattern with one franz-go client and hands each record, decoded, to a Sink.
// It uses no consumer group: every replica of the relay sees every record.
package consumer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/decnet/identity-relay/pkg/fanout"
)

// Sink takes decoded events in record order per partition.
type Sink interface {
	Publish(ev fanout.Event) error
}

// Config holds what the consumer needs; the zero value of an optional field is its default.
type Config struct {
	Brokers     []string
	TopicsRegex string
	// MaxRecordBytes caps a record value; bigger ones are skipped (too_large).
	MaxRecordBytes int
	// MetadataMaxAge bounds how long a newly created matching topic goes
	// unnoticed. Default 5s, so new topics are read within 10 s.
	MetadataMaxAge time.Duration
	Logger         *slog.Logger
	Registerer     prometheus.Registerer
	// ExtraOpts are appended to the client options (tests use them).
	ExtraOpts []kgo.Opt
}

// Consumer is the process's one Kafka client.
type Consumer struct {
	cfg     Config
	cl      *kgo.Client
	sink    Sink
	log     *slog.Logger
	running atomic.Bool

	consumed *prometheus.CounterVec
	skipped  *prometheus.CounterVec
	lag      *prometheus.GaugeVec

	errMu     sync.Mutex
	lastError map[string]time.Time // rate-limits repeated fetch errors in the log
}

// New validates cfg and builds the client; it does not contact Kafka yet.
// Partitions seen at start-up are read from their end; partitions of topics
// created later are read from their first record after start-up, so nothing
// published into a new topic is missed.
func New(cfg Config, sink Sink) (*Consumer, error) {
	if len(cfg.Brokers) == 0 {
		return nil, errors.New("consumer: no brokers")
	}
	if _, err := regexp.Compile(cfg.TopicsRegex); err != nil {
		return nil, fmt.Errorf("consumer: topics regex: %w", err)
	}
	if cfg.MetadataMaxAge <= 0 {
		cfg.MetadataMaxAge = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Registerer == nil {
		cfg.Registerer = prometheus.NewRegistry()
	}
	c := &Consumer{
		cfg:       cfg,
		sink:      sink,
		log:       cfg.Logger.With("component", "consumer"),
		lastError: map[string]time.Time{},
		consumed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_records_consumed_total", Help: "Kafka records read, by topic.",
		}, []string{"topic"}),
		skipped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "relay_records_skipped_total", Help: "Kafka records not delivered, by reason.",
		}, []string{"reason"}),
		lag: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "relay_consumer_lag", Help: "Records between the last one read and the high watermark, by partition.",
		}, []string{"topic", "partition"}),
	}
	for _, col := range []prometheus.Collector{c.consumed, c.skipped, c.lag} {
		if err := cfg.Registerer.Register(col); err != nil {
			return nil, fmt.Errorf("consumer: metrics: %w", err)
		}
	}
	opts := []kgo.Opt{
		kgo.SeedBrokers(cfg.Brokers...),
		kgo.ConsumeTopics(cfg.TopicsRegex),
		kgo.ConsumeRegex(),
		kgo.ConsumeStartOffset(kgo.NewOffset().AfterMilli(time.Now().UnixMilli())),
		// A partition whose offset vanished (topic re-created, retention) restarts
		// at its earliest record rather than skipping what is there.
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.MetadataMaxAge(cfg.MetadataMaxAge),
		kgo.MetadataMinAge(time.Second),
		kgo.FetchMaxWait(500 * time.Millisecond),
		kgo.ClientID("identity-relay"),
	}
	cl, err := kgo.NewClient(append(opts, cfg.ExtraOpts...)...)
	if err != nil {
		return nil, fmt.Errorf("consumer: %w", err)
	}
	c.cl = cl
	return c, nil
}

// Running reports whether Run is reading (readiness uses it). Kafka itself
// may be unreachable: viewers are still served snapshots and keepalives.
func (c *Consumer) Running() bool { return c.running.Load() }

// Run reads until ctx ends, then closes the client. Kafka being unreachable is
// not an error: the client retries and resumes where it left off.
func (c *Consumer) Run(ctx context.Context) error {
	c.running.Store(true)
	defer c.running.Store(false)
	defer c.cl.Close()
	for {
		fetches := c.cl.PollFetches(ctx)
		if ctx.Err() != nil || fetches.IsClientClosed() {
			return nil
		}
		fetches.EachError(c.logFetchError)
		fetches.EachPartition(func(p kgo.FetchTopicPartition) {
			for _, r := range p.Records {
				c.handle(r)
			}
			if n := len(p.Records); n > 0 {
				lag := p.HighWatermark - p.Records[n-1].Offset - 1
				c.lag.WithLabelValues(p.Topic, strconv.Itoa(int(p.Partition))).Set(float64(max(lag, 0)))
			}
		})
	}
}

func (c *Consumer) handle(r *kgo.Record) {
	c.consumed.WithLabelValues(r.Topic).Inc()
	ev, err := Decode(r.Topic, r.Timestamp, r.Value, c.cfg.MaxRecordBytes)
	if err == nil {
		err = c.sink.Publish(ev)
		if errors.Is(err, fanout.ErrBadName) {
			err = skip(SkipBadTopic, "%v", err)
		}
	}
	if err == nil {
		return
	}
	var se *SkipError
	if !errors.As(err, &se) {
		se = &SkipError{Reason: "internal", Detail: err.Error()}
	}
	c.skipped.WithLabelValues(se.Reason).Inc()
	c.log.Warn("record skipped", "topic", r.Topic, "partition", r.Partition,
		"offset", r.Offset, "reason", se.Reason, "detail", se.Detail)
}

// logFetchError logs each distinct error at most once a minute: a broker that
// is down for an hour must not flood the log.
func (c *Consumer) logFetchError(topic string, partition int32, err error) {
	if errors.Is(err, context.Canceled) {
		return
	}
	key := topic + "/" + err.Error()
	now := time.Now()
	c.errMu.Lock()
	last, seen := c.lastError[key]
	logIt := !seen || now.Sub(last) > time.Minute
	if logIt {
		if len(c.lastError) > 1000 { // distinct errors are few; never let the map grow without end
			clear(c.lastError)
		}
		c.lastError[key] = now
	}
	c.errMu.Unlock()
	if logIt {
		c.log.Warn("kafka fetch error", "topic", topic, "partition", partition, "err", err)
	}
}

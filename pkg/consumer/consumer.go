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
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/decnet/identity-relay/pkg/sse"
)

// Sink takes decoded events in record order per partition.
type Sink interface {
	Publish(ev sse.Event) error
	// Empty says a partition holds no record below next: all were deleted
	// before the consumer read any.
	Empty(topic string, topicID [16]byte, partition int32, next int64)
	// Behind reports that many viewers (more than a quarter) are far behind
	// what was published.
	Behind() bool
}

// Config holds what the consumer needs; the zero value of an optional field is its default.
type Config struct {
	Brokers     []string
	TopicsRegex string
	// MaxRecordBytes caps a record value; bigger ones are skipped (too_large).
	MaxRecordBytes int
	Logger         *slog.Logger
	Registerer     prometheus.Registerer
	// Backfill is how many records per partition to read back at start-up
	// into the replay window, so that viewers can resume on a fresh replica.
	Backfill int
}

// Consumer is the process's one Kafka client.
type Consumer struct {
	cfg     Config
	cl      *kgo.Client // built by Run, which owns it
	sink    Sink
	log     *slog.Logger
	start   time.Time
	running atomic.Bool
	filled  atomic.Bool // the start-up backfill has reached the end of every partition
	// answered is when Kafka last answered the client (UnixNano): the
	// consumer's silence, which readiness deliberately ignores (README).
	answered atomic.Int64

	// startEnds holds, per partition that existed at start-up, its end
	// offset then: records below it are backfill. Run's goroutine only.
	startEnds map[topicPartition]int64
	// fillUntil holds the partitions whose backfill is not read yet. Run's goroutine only.
	fillUntil map[topicPartition]int64
	// endsKnown: the start offset is end − Backfill, which a partition
	// found later (a new or re-created topic) must not use; begun holds
	// those whose first fetch was checked (rewind). Run's goroutine only.
	endsKnown bool
	begun     map[topicPartition]bool

	consumed *prometheus.CounterVec
	skipped  *prometheus.CounterVec
	lag      *prometheus.GaugeVec
	paced    prometheus.Counter
	paceLeft time.Duration // of maxPace, until the viewers catch up (Run's goroutine only)

	errMu     sync.Mutex
	lastError map[string]time.Time // rate-limits repeated fetch errors in the log

	recheck map[string]time.Time // last re-creation check per topic (Run's goroutine only)
}

type topicPartition struct {
	topic     string
	partition int32
}

// New validates cfg and registers the metrics; it does not contact Kafka.
func New(cfg Config, sink Sink) (*Consumer, error) {
	if len(cfg.Brokers) == 0 {
		return nil, errors.New("consumer: no brokers")
	}
	if _, err := regexp.Compile(cfg.TopicsRegex); err != nil {
		return nil, fmt.Errorf("consumer: topics regex: %w", err)
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
		start:     time.Now(),
		log:       cfg.Logger.With("component", "consumer"),
		lastError: map[string]time.Time{},
		recheck:   map[string]time.Time{},
		paceLeft:  maxPace,
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
	c.paced = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "relay_consumer_paced_seconds_total",
		Help: "Time the consumer waited because more than a quarter of the viewers were far behind (the relay's writes, not Kafka, were the limit).",
	})
	c.answered.Store(c.start.UnixNano())
	silence := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "relay_consumer_kafka_silence_seconds",
		Help: "Seconds since Kafka last answered the consumer (fetches are answered every 0.5 s while it is reachable). A replica stays ready while Kafka does not answer: alert on one replica's silence while the others' is low.",
	}, func() float64 { return time.Since(time.Unix(0, c.answered.Load())).Seconds() })
	for _, col := range []prometheus.Collector{c.consumed, c.skipped, c.lag, c.paced, silence} {
		if err := cfg.Registerer.Register(col); err != nil {
			return nil, fmt.Errorf("consumer: metrics: %w", err)
		}
	}
	return c, nil
}

// Ready reports whether Run is reading and the start-up backfill is done
// (readiness uses it). Kafka unreachable at start-up means no backfill:
// viewers are still served snapshots and keepalives, and events flow when
// Kafka returns.
func (c *Consumer) Ready() bool { return c.running.Load() && c.filled.Load() }

const (
	// backfillTimeout bounds the wait for Kafka's end offsets at start-up.
	backfillTimeout = 10 * time.Second
	// maxBackfill bounds how long readiness waits for the backfill.
	maxBackfill = 60 * time.Second
	// metadataMaxAge bounds how long a newly created matching topic goes
	// unnoticed, so that new topics are read within 10 s.
	metadataMaxAge = 5 * time.Second
	// maxPace bounds the wait for viewers that are behind (pace). A burst
	// or a catch-up after an outage reads thousands of records at once:
	// without the wait it would fill every viewer's queue before any of
	// them ran, and drop them all. The bound keeps many stalled viewers
	// from holding the others back: past it the consumer reads on, and
	// they are dropped as their queues fill.
	maxPace = 100 * time.Millisecond
	// paceStep is how often pace looks again whether the viewers caught up.
	paceStep = time.Millisecond
	// metadataMinAge spaces metadata refreshes: fetch errors that each ask
	// for one (a broker restarting) cost one request a second.
	metadataMinAge = time.Second
	// fetchMaxWait is how long the broker holds a fetch open waiting for
	// records: a record arriving meanwhile is returned at once, so it costs
	// no latency, only how soon the consumer notices it should stop.
	fetchMaxWait = 500 * time.Millisecond
	// recreateRecheck spaces the metadata checks of a topic whose fetches
	// fail with UNKNOWN_TOPIC_ID, and recreateTimeout bounds one.
	recreateRecheck = time.Second
	recreateTimeout = 5 * time.Second
	// maxTracked bounds the per-topic and per-error maps: they hold a few
	// entries normally, and must not grow without end when topics churn.
	maxTracked = 1000
)

func (c *Consumer) clientOpts(start kgo.Offset) []kgo.Opt {
	opts := []kgo.Opt{
		kgo.SeedBrokers(c.cfg.Brokers...),
		kgo.ConsumeTopics(c.cfg.TopicsRegex),
		kgo.ConsumeRegex(),
		kgo.ConsumeStartOffset(start),
		// A partition whose offset vanished (retention) restarts at its
		// earliest record rather than skipping what is there.
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.MetadataMaxAge(metadataMaxAge),
		kgo.MetadataMinAge(metadataMinAge),
		kgo.FetchMaxWait(fetchMaxWait),
		kgo.ClientID("identity-relay"),
		kgo.WithHooks(answerHook{c}),
	}
	return opts
}

// answerHook notes each answer a broker gives the consuming client.
type answerHook struct{ c *Consumer }

func (h answerHook) OnBrokerE2E(_ kgo.BrokerMetadata, _ int16, e2e kgo.BrokerE2E) {
	if e2e.Err() == nil {
		h.c.answered.Store(time.Now().UnixNano())
	}
}

// connect learns the end offset of every matching partition and builds the
// consuming client. With the end offsets known, every partition is read from
// cfg.Backfill records before its end, and what lies below the end is
// backfill: kept in the replay window, not broadcast. Partitions of topics
// created later are not backfill: they are read from their first record.
// Without them (Kafka unreachable), partitions are read from their first
// record after start-up and nothing is backfill.
func (c *Consumer) connect(ctx context.Context) error {
	ends, err := c.endOffsets(ctx)
	start := kgo.NewOffset().AtEnd().Relative(-int64(c.cfg.Backfill))
	if err != nil {
		c.log.Warn("start-up backfill skipped: end offsets unknown", "err", err)
		start = kgo.NewOffset().AfterMilli(c.start.UnixMilli())
	}
	c.startEnds, c.fillUntil = map[topicPartition]int64{}, map[topicPartition]int64{}
	c.endsKnown, c.begun = err == nil, map[topicPartition]bool{}
	for tp, o := range ends {
		if o.end == o.start { // nothing left to read: viewers behind o.end lost records
			c.sink.Empty(tp.topic, o.id, tp.partition, o.end)
		}
		c.startEnds[tp] = o.end
		if o.end > o.start && c.cfg.Backfill > 0 {
			c.fillUntil[tp] = o.end - 1
		}
	}
	c.checkFilled()
	cl, err := kgo.NewClient(c.clientOpts(start)...)
	if err != nil {
		return fmt.Errorf("consumer: %w", err)
	}
	c.cl = cl
	return nil
}

type startEnd struct {
	start, end int64
	id         [16]byte // the topic's ID
}

func (c *Consumer) endOffsets(ctx context.Context) (map[topicPartition]startEnd, error) {
	ctx, cancel := context.WithTimeout(ctx, backfillTimeout)
	defer cancel()
	cl, err := kgo.NewClient(kgo.SeedBrokers(c.cfg.Brokers...), kgo.ClientID("identity-relay"))
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	details, err := adm.ListTopics(ctx)
	if err != nil {
		return nil, err
	}
	re := regexp.MustCompile(c.cfg.TopicsRegex)
	var topics []string
	for _, t := range details.Names() {
		if re.MatchString(t) {
			topics = append(topics, t)
		}
	}
	out := map[topicPartition]startEnd{}
	if len(topics) == 0 {
		return out, nil
	}
	starts, err := adm.ListStartOffsets(ctx, topics...)
	if err != nil {
		return nil, err
	}
	ends, err := adm.ListEndOffsets(ctx, topics...)
	if err != nil {
		return nil, err
	}
	ends.Each(func(o kadm.ListedOffset) {
		if s, ok := starts.Lookup(o.Topic, o.Partition); o.Err == nil && ok && s.Err == nil {
			out[topicPartition{o.Topic, o.Partition}] = startEnd{s.Offset, o.Offset, details[o.Topic].ID}
		}
	})
	return out, nil
}

// checkFilled marks the backfill done once no partition has any left.
func (c *Consumer) checkFilled() {
	if len(c.fillUntil) == 0 && !c.filled.Swap(true) {
		c.log.Info("start-up backfill done", "took", time.Since(c.start).Round(time.Millisecond).String())
	}
}

// Run reads until ctx ends, then closes the client. Kafka being unreachable is
// not an error: the client retries and resumes where it left off.
func (c *Consumer) Run(ctx context.Context) error {
	if err := c.connect(ctx); err != nil {
		return err
	}
	c.running.Store(true)
	defer c.running.Store(false)
	defer c.cl.Close()
	// A partition whose last record is a transaction marker is never read up
	// to its end: readiness must not wait for it forever.
	giveUp := time.AfterFunc(maxBackfill, func() {
		if !c.filled.Swap(true) {
			c.log.Warn("start-up backfill incomplete; ready anyway", "after", maxBackfill.String())
		}
	})
	defer giveUp.Stop()
	for {
		fetches := c.cl.PollFetches(ctx)
		if ctx.Err() != nil || fetches.IsClientClosed() {
			return nil
		}
		fetches.EachError(c.logFetchError)
		c.followRecreated(ctx, fetches)
		rewound := map[topicPartition]bool{}
		fetches.EachTopic(func(t kgo.FetchTopic) {
			for _, p := range t.Partitions {
				if c.rewind(t.Topic, p, rewound) {
					continue
				}
				for _, r := range p.Records {
					c.handle(r, t.TopicID)
					c.pace(ctx)
				}
				if n := len(p.Records); n > 0 {
					lag := p.HighWatermark - p.Records[n-1].Offset - 1
					c.lag.WithLabelValues(t.Topic, strconv.Itoa(int(p.Partition))).Set(float64(max(lag, 0)))
				}
			}
		})
	}
}

func (c *Consumer) handle(r *kgo.Record, topicID [16]byte) {
	c.consumed.WithLabelValues(r.Topic).Inc()
	tp := topicPartition{r.Topic, r.Partition}
	if last, ok := c.fillUntil[tp]; ok && r.Offset >= last {
		delete(c.fillUntil, tp)
		c.checkFilled()
	}
	ev, err := Decode(r.Topic, r.Timestamp, r.Value, c.cfg.MaxRecordBytes)
	if err == nil {
		ev.TopicID, ev.Partition, ev.Offset = topicID, r.Partition, r.Offset
		end, existed := c.startEnds[tp]
		ev.Backfill = existed && r.Offset < end
		err = c.sink.Publish(ev)
		switch {
		case errors.Is(err, sse.ErrBadName):
			err = skip(SkipBadTopic, "%v", err)
		case errors.Is(err, sse.ErrTooManyPartitions):
			err = skip(SkipTooManyPartitions, "%v", err)
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

// rewind moves a partition found after start-up (a topic created or
// re-created since) back to its log start when its first fetch begins past
// it, and reports whether to drop what this poll fetched of it: the start
// offset, end − Backfill, is for the partitions there at start-up, and the
// others are read from their first record. Run's goroutine only.
func (c *Consumer) rewind(topic string, p kgo.FetchPartition, rewound map[topicPartition]bool) bool {
	tp := topicPartition{topic, p.Partition}
	if rewound[tp] {
		return true
	}
	if _, existed := c.startEnds[tp]; existed || !c.endsKnown || c.begun[tp] || len(p.Records) == 0 {
		return false
	}
	c.begun[tp] = true
	if p.LogStartOffset < 0 || p.Records[0].Offset <= p.LogStartOffset {
		return false
	}
	// SetOffsets also drops what the client fetched and buffered since.
	c.cl.SetOffsets(map[string]map[int32]kgo.EpochOffset{topic: {p.Partition: {Epoch: -1, Offset: p.LogStartOffset}}})
	rewound[tp] = true
	return true
}

// pace waits while many viewers are behind: up to maxPace in all, until
// they have caught up once. Run's goroutine only.
func (c *Consumer) pace(ctx context.Context) {
	if !c.sink.Behind() {
		c.paceLeft = maxPace
		return
	}
	for c.paceLeft > 0 && ctx.Err() == nil && c.sink.Behind() {
		start := time.Now()
		time.Sleep(paceStep)
		waited := time.Since(start)
		c.paceLeft -= waited
		c.paced.Add(waited.Seconds())
	}
}

// followRecreated purges from the client every topic whose fetch fails with
// UNKNOWN_TOPIC_ID while the broker lists it under another topic ID: it was
// deleted and re-created. franz-go never adopts the new ID by itself, so the
// topic would stall for good; once purged, the regex finds it again and it is
// read from its start. A topic the broker still lists under the fetched ID
// (its creation not yet propagated) is left alone, so nothing is read twice.
func (c *Consumer) followRecreated(ctx context.Context, fetches kgo.Fetches) {
	stale := map[string][16]byte{}
	now := time.Now()
	fetches.EachTopic(func(ft kgo.FetchTopic) {
		for _, p := range ft.Partitions {
			if errors.Is(p.Err, kerr.UnknownTopicID) && now.Sub(c.recheck[ft.Topic]) > recreateRecheck {
				stale[ft.Topic] = ft.TopicID
			}
		}
	})
	if len(stale) == 0 {
		return
	}
	topics := make([]string, 0, len(stale))
	for t := range stale {
		topics = append(topics, t)
		c.recheck[t] = now
	}
	ctx, cancel := context.WithTimeout(ctx, recreateTimeout)
	defer cancel()
	md, err := kadm.NewClient(c.cl).Metadata(ctx, topics...)
	if err != nil {
		return // checked again on a later fetch
	}
	var purge []string
	for t, fetched := range stale {
		if d, ok := md.Topics[t]; ok && d.Err == nil && d.ID != (kadm.TopicID{}) && d.ID != kadm.TopicID(fetched) {
			purge = append(purge, t)
		}
	}
	if len(purge) > 0 {
		c.log.Warn("topics deleted and re-created; following the new ones from their start", "topics", purge)
		c.cl.PurgeTopicsFromClient(purge...)
		for _, t := range purge { // the new topic's records are all new: none is backfill
			for tp := range c.startEnds {
				if tp.topic == t {
					delete(c.startEnds, tp)
					delete(c.fillUntil, tp)
				}
			}
			for tp := range c.begun {
				if tp.topic == t {
					delete(c.begun, tp)
				}
			}
		}
		c.checkFilled()
	}
	if len(c.recheck) > maxTracked {
		clear(c.recheck)
	}
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
		if len(c.lastError) > maxTracked {
			clear(c.lastError)
		}
		c.lastError[key] = now
	}
	c.errMu.Unlock()
	if logIt {
		c.log.Warn("kafka fetch error", "topic", topic, "partition", partition, "err", err)
	}
}

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
	// Backfill is how many records per partition to read back at start-up
	// into the replay window, so that viewers can resume on a fresh replica.
	Backfill int
	// ExtraOpts are appended to the client options (tests use them).
	ExtraOpts []kgo.Opt
}

// Consumer is the process's one Kafka client.
type Consumer struct {
	cfg     Config
	cl      *kgo.Client
	sink    Sink
	log     *slog.Logger
	start   time.Time
	running atomic.Bool

	filled    atomic.Bool // the start-up backfill has reached the end of every partition
	fillMu    sync.Mutex
	fillUntil map[topicPartition]int64 // last offset to read per partition; nil until known
	fillSeen  map[topicPartition]int64 // last offset read per partition while filling

	consumed *prometheus.CounterVec
	skipped  *prometheus.CounterVec
	lag      *prometheus.GaugeVec

	errMu     sync.Mutex
	lastError map[string]time.Time // rate-limits repeated fetch errors in the log

	recheck map[string]time.Time // last re-creation check per topic (Run's goroutine only)
}

type topicPartition struct {
	topic     string
	partition int32
}

// New validates cfg and builds the client; it does not contact Kafka yet.
// Every partition is read from cfg.Backfill records before its end; records
// older than the process go to the replay window only (fanout.Event.Backfill),
// so a new topic's records, all newer, are delivered from its first one.
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
		start:     time.Now(),
		fillSeen:  map[topicPartition]int64{},
		log:       cfg.Logger.With("component", "consumer"),
		lastError: map[string]time.Time{},
		recheck:   map[string]time.Time{},
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
		kgo.ConsumeStartOffset(kgo.NewOffset().AtEnd().Relative(-int64(cfg.Backfill))),
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

// Ready reports whether Run is reading and the start-up backfill is done
// (readiness uses it). Kafka being unreachable at start-up counts as done
// once the backfill gives up: viewers are still served snapshots and
// keepalives, and events flow when Kafka returns.
func (c *Consumer) Ready() bool { return c.running.Load() && c.filled.Load() }

// backfillTimeout bounds the wait for Kafka's end offsets at start-up.
const backfillTimeout = 10 * time.Second

// watchBackfill learns the end offset of every matching partition and marks
// the backfill done once each was read up to it.
func (c *Consumer) watchBackfill(ctx context.Context) {
	until, err := c.endOffsets(ctx)
	if err != nil {
		c.log.Warn("start-up backfill skipped: end offsets unknown", "err", err)
		until = map[topicPartition]int64{}
	}
	c.fillMu.Lock()
	defer c.fillMu.Unlock()
	for tp, seen := range c.fillSeen {
		if seen >= until[tp] {
			delete(until, tp)
		}
	}
	c.fillUntil = until
	c.checkFilledLocked()
}

func (c *Consumer) endOffsets(ctx context.Context) (map[topicPartition]int64, error) {
	ctx, cancel := context.WithTimeout(ctx, backfillTimeout)
	defer cancel()
	adm := kadm.NewClient(c.cl)
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
	until := map[topicPartition]int64{}
	if len(topics) == 0 {
		return until, nil
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
		if s, ok := starts.Lookup(o.Topic, o.Partition); o.Err == nil && ok && s.Err == nil && o.Offset > s.Offset {
			until[topicPartition{o.Topic, o.Partition}] = o.Offset - 1
		}
	})
	return until, nil
}

// noteFill records a read offset while the backfill runs.
func (c *Consumer) noteFill(r *kgo.Record) {
	if c.filled.Load() {
		return
	}
	tp := topicPartition{r.Topic, r.Partition}
	c.fillMu.Lock()
	defer c.fillMu.Unlock()
	if c.fillUntil == nil {
		c.fillSeen[tp] = r.Offset
		return
	}
	if last, ok := c.fillUntil[tp]; ok && r.Offset >= last {
		delete(c.fillUntil, tp)
		c.checkFilledLocked()
	}
}

func (c *Consumer) checkFilledLocked() {
	if len(c.fillUntil) == 0 && !c.filled.Load() {
		c.filled.Store(true)
		c.fillSeen = nil
		c.log.Info("start-up backfill done", "took", time.Since(c.start).Round(time.Millisecond).String())
	}
}

// Run reads until ctx ends, then closes the client. Kafka being unreachable is
// not an error: the client retries and resumes where it left off.
func (c *Consumer) Run(ctx context.Context) error {
	c.running.Store(true)
	defer c.running.Store(false)
	defer c.cl.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { c.watchBackfill(ctx) })
	for {
		fetches := c.cl.PollFetches(ctx)
		if ctx.Err() != nil || fetches.IsClientClosed() {
			return nil
		}
		fetches.EachError(c.logFetchError)
		c.followRecreated(ctx, fetches)
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
	c.noteFill(r)
	ev, err := Decode(r.Topic, r.Timestamp, r.Value, c.cfg.MaxRecordBytes)
	if err == nil {
		ev.Partition, ev.Offset = r.Partition, r.Offset
		ev.Backfill = r.Timestamp.Before(c.start)
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
			if errors.Is(p.Err, kerr.UnknownTopicID) && now.Sub(c.recheck[ft.Topic]) > time.Second {
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
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
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
	}
	if len(c.recheck) > 1000 {
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
